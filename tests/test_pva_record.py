"""The PVA side as QSRV serves db/apsdm.db (display, control, NTEnum), the ports READY
reports with ``--pva-port 0``, and who-wrote-last alike on both protocols."""

from __future__ import annotations

import getpass
import os
import re
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import epics
import psutil
import pytest
from conftest import BIN, Ioc, _start, _stop, epics_env, use_ca
from p4p.client.thread import Context


@pytest.fixture(scope="module")
def ioc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ioc]:
    """An IOC asked to pick every port itself (``--ca-port 0 --pva-port 0``)."""
    root = Path(tmp_path_factory.mktemp("pva-record"))
    running = Ioc(root, f"T{uuid.uuid4().hex[:6]}:")
    cmd = [str(BIN / "apsdm-ioc"), "--prefix", running.prefix, "--data-root", str(root),
           "--interface", "127.0.0.1", "--ca-port", "0", "--pva-port", "0", "--log-level", "DEBUG"]
    env = {key: value for key, value in os.environ.items() if not key.startswith("EPICS_")}
    running.proc, line = _start(cmd, root / "ioc.log", {**env, "PYTHONUNBUFFERED": "1"})
    ports = dict(re.findall(r"(\w+_port)=(\d+)", line))
    running.ca_port, running.pva_port = int(ports["ca_port"]), int(ports["pva_port"])
    running.pva_bcast = int(ports["pva_udp_port"])
    running.env = epics_env(running.ca_port, running.pva_port, running.pva_bcast)
    use_ca(running.env)
    yield running
    _stop(running.proc)


def search_only(port: int, host: str = "127.0.0.1") -> Context:
    """A p4p client that finds servers by UDP search alone (no name server)."""
    return Context("pva", useenv=False, nt=False, conf={
        "EPICS_PVA_ADDR_LIST": f"{host}:{port}", "EPICS_PVA_AUTO_ADDR_LIST": "NO",
        "EPICS_PVA_BROADCAST_PORT": str(port)})


def test_pva_port_0_picks_the_search_port_too_and_ready_names_it(ioc: Ioc) -> None:
    assert ioc.pva_bcast not in (0, 5076)
    ctx = search_only(ioc.pva_bcast)
    try:
        assert ctx.get(ioc.pv("Status:Version_RBV"), timeout=5)["value"]
    finally:
        ctx.close()
    assert ioc.proc is not None
    listening = {c.laddr for c in psutil.Process(ioc.proc.pid).net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN}
    assert ("127.0.0.1", ioc.pva_port) in listening and ("0.0.0.0", ioc.pva_port) not in listening
    # pvxs binds its UDP search socket to the wildcard whatever the interface list says, but
    # answers only searches that arrive on a listed interface
    others = [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
              if a.family == socket.AF_INET and not a.address.startswith("127.")]
    for address in others[:1]:
        ctx = search_only(ioc.pva_bcast, address)
        try:
            with pytest.raises(TimeoutError):
                ctx.get(ioc.pv("Status:Version_RBV"), timeout=2)
        finally:
            ctx.close()


def test_pva_metadata_as_qsrv_serves_it(ioc: Ioc) -> None:
    ctx = ioc.pva_context(nt=False)
    try:
        pct: Any = ctx.get(ioc.pv("DAQ1:Percent_RBV"))
        count: Any = ctx.get(ioc.pv("DAQ1:NFiles_RBV"))
        choice: Any = ctx.get(ioc.pv("Status:Connected_RBV"))
        text: Any = ctx.get(ioc.pv("Status:Version_RBV"))
    finally:
        ctx.close()
    assert (pct["display.limitLow"], pct["display.limitHigh"]) == (0, 100)
    assert (pct["control.limitLow"], pct["control.limitHigh"]) == (0, 100)
    assert pct["display.units"] == "%" and pct["display.precision"] == 2
    assert pct["display.description"] == "Percent complete"
    assert pct["display.form.choices"][pct["display.form.index"]] == "Default"
    assert count["display.description"] == "Files seen" and count["display.precision"] == 0
    assert choice.getID() == "epics:nt/NTEnum:1.0"
    assert list(choice["value.choices"]) == ["Disconnected", "Connected"]
    assert choice["display.description"] == "DM reachable"
    assert text["display.description"] == "Gateway version"


def test_last_writer_names_user_and_host_alike_on_both_protocols(ioc: Ioc) -> None:
    """Every write that takes effect (a setting too), ``user@host (ca|pva)``."""
    who = f"{getpass.getuser()}@{socket.gethostname()}"
    assert epics.caput(ioc.pv("WF1:Owner"), "by-ca", wait=True, timeout=10) == 1
    last = epics.caget(ioc.pv("Status:LastWriter_RBV"), as_string=True, use_monitor=False)
    assert last.startswith(f"{who} (ca) WF1:Owner"), last
    ctx = ioc.pva_context()
    try:
        ctx.put(ioc.pv("WF1:Owner"), "by-pva")
        last = ctx.get(ioc.pv("Status:LastWriter_RBV"))
    finally:
        ctx.close()
    assert last.startswith(f"{who} (pva) WF1:Owner"), last
