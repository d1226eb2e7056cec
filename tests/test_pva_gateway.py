"""Reached through the standard PVA gateway (p4p's ``pvagw``, as sites put one between a
beamline network and the IOC): a client behind it sees scalars, monitors and tables, and
a busy put completes when the job it started has ended, not before."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Ioc, _stop, free_port
from test_ioc import add_workflow, wait_until


@pytest.fixture
def behind_pvagw(ioc: Ioc, tmp_path: Path) -> Iterator[Any]:
    """A p4p client context that reaches the IOC only through a pvagw on loopback."""
    import subprocess

    from p4p.client.thread import Context

    port, bcast = free_port(udp=False), free_port()
    config = {"version": 2, "readOnly": False,
              "clients": [{"name": "to_ioc", "provider": "pva", "addrlist": "127.0.0.1",
                           "autoaddrlist": False, "bcastport": ioc.pva_bcast}],
              "servers": [{"name": "beamline", "clients": ["to_ioc"], "interface": ["127.0.0.1"],
                           "addrlist": "127.0.0.1", "autoaddrlist": False,
                           "serverport": port, "bcastport": bcast}]}
    conf_file = tmp_path / "pvagw.json"
    conf_file.write_text(json.dumps(config))
    log = (tmp_path / "pvagw.log").open("w")
    gw = subprocess.Popen([sys.executable, "-m", "p4p.gw", str(conf_file)], stdout=log,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True,
                          env={k: v for k, v in os.environ.items() if not k.startswith("EPICS_")})
    ctx = Context("pva", useenv=False, conf={
        "EPICS_PVA_ADDR_LIST": f"127.0.0.1:{bcast}", "EPICS_PVA_AUTO_ADDR_LIST": "NO",
        "EPICS_PVA_BROADCAST_PORT": str(bcast), "EPICS_PVA_NAME_SERVERS": f"127.0.0.1:{port}"})
    try:
        wait_until(lambda: gw.poll() is not None or _reachable(ctx, ioc.pv("Status:Version_RBV")),
                   60, "pvagw serving the IOC's PVs")
        assert gw.poll() is None, (tmp_path / "pvagw.log").read_text()[-3000:]
        yield ctx
    finally:
        ctx.close()
        _stop(gw)  # type: ignore[arg-type]
        log.close()


def _reachable(ctx: Any, name: str) -> bool:
    try:
        ctx.get(name, timeout=2)
    except TimeoutError:
        return False
    return True


def test_client_behind_pvagw_sees_pvs_monitors_tables_and_completes_a_busy_put(
        ioc: Ioc, behind_pvagw: Any) -> None:
    ctx = behind_pvagw
    direct = ioc.pva_context()
    try:
        version = ctx.get(ioc.pv("Status:Version_RBV"))
        assert version.raw["value"] == direct.get(ioc.pv("Status:Version_RBV")).raw["value"] != ""
        assert version.raw["display.description"] == "Gateway version"

        beats: list[int] = []
        sub = ctx.monitor(ioc.pv("Status:Heartbeat_RBV"), lambda v: beats.append(int(v)))
        try:
            wait_until(lambda: len(set(beats)) >= 3, 20, "heartbeat updates through pvagw")
        finally:
            sub.close()
        assert beats == sorted(beats)

        add_workflow(ioc, {"name": "gw-busy", "stages": {"01": {"command": "sleep 2"}}})
        ctx.put(ioc.pv("WF1:Name"), "gw-busy", timeout=10)
        started = time.monotonic()
        ctx.put(ioc.pv("WF1:Start"), 1, timeout=60)  # put-callback: returns when the job ended
        elapsed = time.monotonic() - started
        assert elapsed >= 1.5, f"the busy put completed after {elapsed:.2f} s, before the job"
        assert ctx.get(ioc.pv("WF1:Status_RBV")).raw["value"] == "done"
        assert int(ctx.get(ioc.pv("WF1:Start"))) == 0

        jobs = ctx.get(ioc.pv("Jobs")).value.todict()  # an NTTable through the gateway
        assert ctx.get(ioc.pv("WF1:JobId_RBV")).raw["value"] in list(jobs["id"])
        assert list(jobs) == list(direct.get(ioc.pv("Jobs")).value.todict())
    finally:
        direct.close()
