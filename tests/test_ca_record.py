"""The CA server answers as an EPICS IOC running db/apsdm.db does: every DBR request,
record fields, arrays at their used length; checked with libca (pyepics) in child
processes, since a wrong answer can make libca abort the process that asked."""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import epics
import psutil
import pytest
from conftest import Ioc, make_ioc
from test_ioc import MINOR, STATE, add_workflow, alarm, caget, caput, wait_until

from apsdm.gateway.memory import TRIM_DELAY
from apsdm.gateway.schema import Layout, build

# libca through pyepics in a fresh process, with libca's own exception handler (as caget
# has; it aborts on fatal errors such as ECA_INTERNAL): ``script`` sees ``ca``, ``dbr``,
# ``ctypes``, ``chan(name)`` (a connected channel id) and ``out`` (printed as JSON)
CHILD = """
import ctypes, json, sys
from epics import ca, dbr

ca.initialize_libca()
ca.libca.ca_add_exception_event(None, None)

def chan(name):
    chid = ca.create_channel(name, connect=True, auto_cb=False)
    assert ca.connect_channel(chid, timeout=5), name
    return chid

out = {}
exec(sys.argv[1])
print(json.dumps(out))
"""


def libca(ioc: Ioc, script: str) -> dict[str, Any]:
    """Run ``script`` against the IOC in a child process; it must exit normally."""
    proc = subprocess.run([sys.executable, "-c", CHILD, script], env={**ioc.env, "PATH": ""},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"libca client died (rc {proc.returncode}): {proc.stderr[-2000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def ioc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ioc]:
    running = make_ioc(Path(tmp_path_factory.mktemp("ca-record")))
    yield running
    running.stop()


def test_numeric_read_of_text_fails_and_client_survives(ioc: Ioc) -> None:
    """``caget -d DBR_DOUBLE`` of text: RSRV answers ECA_GETFAIL, which libca's handler
    reports; caproto answered ECA_INTERNAL, on which that handler aborts the client. (Text
    that starts with a number reads as that number, as on an IOC: tests/test_differential.)"""
    caput(ioc, "WF1:Name", "beamline staff")
    out = libca(ioc, f"""
c = chan({ioc.pv('WF1:Name')!r})
for ftype in (dbr.DOUBLE, dbr.TIME_DOUBLE, dbr.CTRL_DOUBLE):
    buf = ctypes.create_string_buffer(128)
    ca.libca.ca_array_get(ftype, 1, c, buf)  # caget's plain get, no callback
    ca.libca.ca_pend_io(ctypes.c_double(1.0))  # libca counts a failed get as pending
    out[str(ftype)] = buf.raw.count(0)
out['after'] = ca.get(c, timeout=5)
""")
    assert out["after"]  # the channel still serves its text
    assert [out[ftype] for ftype in ("6", "20", "34")] == [128] * 3, out  # nothing copied


def test_ctrl_string_has_the_sts_string_layout(ioc: Ioc) -> None:
    """dbr_ctrl_string is dbr_sts_string: status, severity, then the text (no timestamp)."""
    out = libca(ioc, f"""
for name in ({ioc.pv('Status:Version_RBV')!r}, {ioc.pv('Status:Connected_RBV')!r}):
    c = chan(name)
    buf = ctypes.create_string_buffer(64)
    ca.libca.ca_array_get(dbr.CTRL_STRING, 1, c, buf)
    ca.libca.ca_pend_io(ctypes.c_double(5.0))
    out[name] = [buf.raw[4:44].split(b'\\0')[0].decode(), ca.get(c, ftype=dbr.STRING)]
""")
    for raw, text in out.values():
        assert raw == text and text


def test_record_fields_as_in_the_database(ioc: Ioc) -> None:
    pct, msg = ioc.pv("DAQ1:Percent_RBV"), ioc.pv("DAQ1:Message_RBV")
    out = libca(ioc, f"""
for field in ('VAL', 'DESC', 'SEVR', 'STAT', 'RTYP', 'EGU', 'PREC', 'HOPR', 'LOPR', 'NAME'):
    out[field] = ca.get(chan({pct!r} + '.' + field), ftype=dbr.STRING, timeout=5)
for field in ('RTYP', 'NORD', 'NELM', 'DESC'):
    out['msg.' + field] = ca.get(chan({msg!r} + '.' + field), ftype=dbr.STRING, timeout=5)
out['VAL$'] = ca.get(chan({ioc.pv('Status:DmUrl_RBV')!r} + '.VAL$'), as_string=True, timeout=5)
out['bo'] = ca.get(chan({ioc.pv('DAQ1:Start.RTYP')!r}), timeout=5)
""")
    assert out["DESC"] == "Percent complete" and out["RTYP"] == "ai" and out["EGU"] == "%"
    assert out["SEVR"] == "NO_ALARM" and out["STAT"] == "NO_ALARM" and out["NAME"] == pct
    assert float(out["HOPR"]) == 100 and float(out["LOPR"]) == 0 and out["PREC"] == "2"
    assert float(out["VAL"]) == 0
    assert out["msg.RTYP"] == "lsi" and out["msg.NELM"] == "4096" and out["msg.DESC"] == "Last message"
    assert out["VAL$"] == ioc.dm_url and out["bo"] == "bo"


def test_busy_refusal_is_state_minor_on_the_message_not_write_major(ioc: Ioc) -> None:
    """caproto marks a failed put WRITE/MAJOR on its PV; the design says STATE/MINOR on
    the slot's Message_RBV, and the command PV keeps its own (no) alarm throughout."""
    add_workflow(ioc, {"name": "slow-busy", "stages": {"01": {"command": "sleep 3"}}})
    caput(ioc, "WF2:Name", "slow-busy")
    first = threading.Thread(target=lambda: caput(ioc, "WF2:Start", 1))
    first.start()
    wait_until(lambda: caget(ioc, "WF2:Start") == "Start", 10, "command running")
    severities: list[int] = []
    start = epics.PV(ioc.pv("WF2:Start"), form="time",
                     callback=lambda severity, **_: severities.append(severity))
    wait_until(lambda: severities, 5, "first monitor update")
    epics.ca.put(start.chid, 1, wait=True, timeout=10)  # refused (pyepics hides the status)
    wait_until(lambda: "busy" in caget(ioc, "WF2:Message_RBV"), 5, "busy message")
    assert alarm(ioc, "WF2:Message_RBV") == (MINOR, STATE)
    first.join(60)
    start.clear_callbacks()
    assert set(severities) == {0}, severities


def test_long_string_read_at_its_used_length(ioc: Ioc) -> None:
    """A char waveform asked for count 0 (get and monitor) comes at its used length with the
    NUL, as an lsi's .VAL$ (LEN), not at NELM (4096); NORD and LEN say that length."""
    url = ioc.pv("Status:DmUrl_RBV")
    out = libca(ioc, f"""
import time
c = chan({url!r})
out['nord'] = ca.get(chan({url!r} + '.NORD'), timeout=5)
out['len'] = ca.get(chan({url!r} + '.LEN'), timeout=5)
out['get'] = len(ca.get(c, count=0, timeout=5))
out['monitor'] = []
keep = ca.create_subscription(c, count=0, callback=lambda value, **kw: out['monitor'].append(len(value)))
time.sleep(0.5)
ca.poll()
""")
    assert out["nord"] == out["len"] == len(ioc.dm_url) + 1 == out["get"] == out["monitor"][0], out


def test_a_get_right_after_a_write_sees_what_was_written(ioc: Ioc) -> None:
    """Gets of unchanged values are answered from the receive callback (ca._CaReader); one
    sent behind a write on the same circuit must wait for that write, as on an IOC."""
    name = ioc.pv("Metadata:Json")
    out = libca(ioc, f"""
c = chan({name!r})
ca.get(c, as_string=True, timeout=5)  # an answer to keep, which each write makes stale
out['seen'] = []
for i in range(200):
    ca.put(c, '{{"n": %d}}' % i, wait=False)
    out['seen'].append(ca.get(c, as_string=True, timeout=5))
""")
    assert out["seen"] == [f'{{"n": {i}}}' for i in range(200)], out["seen"][:5]


def test_bytes_no_ca_client_sends_end_that_circuit_alone(ioc: Ioc) -> None:
    """An unknown command (a port scanner, a broken client) passes the receive callback's
    get answers (ca._CaReader) to caproto, which ends that client's circuit; other clients
    go on as before."""
    header = struct.Struct(">HHHHII")
    with socket.create_connection(("127.0.0.1", ioc.ca_port), timeout=10) as sock:
        sock.sendall(header.pack(0, 0, 0, 13, 0, 0))  # VERSION, as every client starts
        sock.sendall(header.pack(0x7777, 0, 0, 0, 0, 0))
        while sock.recv(4096):  # the version answer, then the end of the circuit
            pass
    assert "bad command ID 0x7777" in ioc.log()
    assert caget(ioc, "Status:Message_RBV") is not None


# a short-lived CA client, as a shell's caget, a screen opened and closed, an archiver
# reconnecting: it connects to every PV, monitors it, and its process ends (no goodbye)
CHURN = """
import os, sys
from epics import ca

chids = [ca.create_channel(name, connect=False, auto_cb=False) for name in sys.argv[1:]]
subs = [ca.create_subscription(c, callback=lambda **kw: None) for c in chids
        if ca.connect_channel(c, timeout=5)]
ca.pend_event(0.05)
os._exit(0)
"""


@pytest.mark.slow
@pytest.mark.timeout(1800)
# it measures the IOC's memory: with the load tests, never beside the 10-minute soak (beside
# it RSS rose some 18 MB over 448 clients; in-process, the IOC's Python objects stayed flat)
@pytest.mark.xdist_group("load")
def test_short_lived_ca_clients_leave_memory_flat(ioc: Ioc) -> None:
    """caproto 1.3 kept about 0.6 MB per client that left abruptly (see
    ``get_from_sub_queue`` in ca.py); 1,024 such clients, four at a time."""
    assert ioc.proc is not None
    process = psutil.Process(ioc.proc.pid)
    names = [pv.name for pv in build(Layout(ioc.prefix)) if not pv.field.pva_only]
    rss: dict[int, float] = {}

    def circuits() -> int:
        return sum(c.laddr.port == ioc.ca_port and c.status == "ESTABLISHED"
                   for c in process.net_connections("tcp"))
    before = circuits()  # the test's own, if any
    for clients in range(4, 1025, 4):
        children = [subprocess.Popen([sys.executable, "-c", CHURN, *names], env={**ioc.env, "PATH": ""},
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    for _ in range(4)]
        for child in children:
            child.wait(60)
        if clients % 64 == 0:
            # measured once the IOC has closed the circuits of the clients gone (1 s on a
            # quiet machine; in CI, under load, RSS read after a fixed 1 s still held some)
            # and its heap has given their memory back (memory.TRIM_DELAY after they left)
            wait_until(lambda: circuits() <= before, 60,
                       "the IOC closed the circuits of the clients gone")
            time.sleep(TRIM_DELAY + 1)  # and has given back what they held
            rss[clients] = round(process.memory_info().rss / 1e6, 1)
    print(f"IOC RSS (MB) by short-lived CA clients: {rss}")
    assert rss[256] - rss[64] <= 10, rss
    assert rss[1024] - rss[256] <= 10, rss  # and flat past the 1,000th
