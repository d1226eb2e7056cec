"""The IOC through real clients: pyepics (libca) and p4p, on the embedded DM service."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import epics
import pytest
from conftest import DmServer, Ioc, make_ioc, use_ca

INVALID, MINOR = 3, 1
COMM, STATE = 9, 7


def wait_until(check: Callable[[], Any], timeout: float = 60.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what or check}"
        time.sleep(0.1)


def caget(ioc: Ioc, suffix: str) -> Any:
    """The value as text, a long string at its whole used length: pyepics asks a fresh get for
    as many elements as the PV's last monitor update carried (a short text earlier) unless
    asked for count 0, which the IOC answers at the used length, as RSRV does."""
    return epics.caget(ioc.pv(suffix), as_string=True, timeout=5, use_monitor=False, count=0)


def caput(ioc: Ioc, suffix: str, value: Any, timeout: float = 60.0) -> Any:
    return epics.caput(ioc.pv(suffix), value, wait=True, timeout=timeout)


def alarm(ioc: Ioc, suffix: str) -> tuple[int, int]:
    pv = epics.PV(ioc.pv(suffix), auto_monitor=False)
    pv.get(timeout=5, use_monitor=False)
    info = pv.get_with_metadata(use_monitor=False, as_string=True, timeout=5)
    return info["severity"], info["status"]


def add_experiment(ioc: Ioc, name: str) -> Any:
    async def go() -> Any:
        async with ioc.dm_client() as dm:
            return await dm.add_experiment(name, description=f"{name} for tests")
    return asyncio.run(go())


def add_workflow(ioc: Ioc, workflow: dict[str, Any]) -> None:
    async def go() -> None:
        async with ioc.dm_client() as dm:
            await dm.add_workflow(workflow)
    asyncio.run(go())


def select(ioc: Ioc, name: str) -> None:
    caput(ioc, "Experiment:Name", name)
    wait_until(lambda: caget(ioc, "Experiment:Name_RBV") == name, 10, "experiment selected")


def test_select_experiment_on_both_protocols(ioc: Ioc) -> None:
    exp = add_experiment(ioc, "sel-1")
    select(ioc, "sel-1")
    assert caget(ioc, "Experiment:Valid_RBV") == "Yes"
    assert int(caget(ioc, "Experiment:Id_RBV")) == exp.id
    assert caget(ioc, "Experiment:Description_RBV") == "sel-1 for tests"
    assert caget(ioc, "Experiment:DataDirectory_RBV") == exp.data_directory
    ctx = ioc.pva_context()
    try:
        assert ctx.get(ioc.pv("Experiment:Name_RBV")) == "sel-1"
        assert ctx.get(ioc.pv("Experiment:StorageDirectory_RBV")) == exp.storage_directory
        assert ctx.get(ioc.pv("Experiment:Valid_RBV")).raw.value.index == 1
        names = ctx.get(ioc.pv("Experiments")).value.todict()["name"]
        wait_until(lambda: "sel-1" in ctx.get(ioc.pv("Experiments")).value.todict()["name"]
                   or "sel-1" in names, 15, "Experiments table")
        # written through PVA, seen at once through CA
        ctx.put(ioc.pv("DAQ2:DestDirectory"), "from/pva")
        assert caget(ioc, "DAQ2:DestDirectory") == "from/pva"
    finally:
        ctx.close()


def test_daq_counts_rise_as_files_appear(ioc: Ioc, tmp_path: Path) -> None:
    add_experiment(ioc, "daq-1")
    select(ioc, "daq-1")
    src = tmp_path / "det"
    src.mkdir()
    caput(ioc, "DAQ1:DataDirectory", str(src))
    caput(ioc, "DAQ1:DestDirectory", "raw")
    caput(ioc, "DAQ1:Start", 1)
    wait_until(lambda: caget(ioc, "DAQ1:Active_RBV") == "Yes", 15, "DAQ active")
    seen = []
    for i in range(3):
        for j in range(10):
            (src / f"f{i}-{j}.dat").write_bytes(b"x" * 100)
        wait_until(lambda n=10 * (i + 1): int(caget(ioc, "DAQ1:NProcessed_RBV")) >= n, 30)
        seen.append(int(caget(ioc, "DAQ1:NProcessed_RBV")))
    assert seen == [10, 20, 30]
    assert int(caget(ioc, "DAQ1:NFiles_RBV")) == 30
    assert caget(ioc, "DAQ1:Status_RBV") == "running"
    # Start again reuses the active DAQ instead of starting a second one
    first = caget(ioc, "DAQ1:Id_RBV")
    caput(ioc, "DAQ2:DataDirectory", str(src))
    caput(ioc, "DAQ2:Start", 1)
    assert wait_until(lambda: caget(ioc, "DAQ2:Id_RBV"), 10) == first
    caput(ioc, "DAQ1:Stop", 1)
    assert caget(ioc, "DAQ1:Active_RBV") == "No"
    assert caget(ioc, "DAQ1:Status_RBV") == "done"


def test_directory_upload_put_completes_at_the_end(ioc: Ioc, tmp_path: Path) -> None:
    exp = add_experiment(ioc, "up-1")
    select(ioc, "up-1")
    src = tmp_path / "scan"
    src.mkdir()
    for i in range(50):
        (src / f"img{i}.tif").write_bytes(bytes(2000))
    caput(ioc, "UP1:Path", str(src))
    caput(ioc, "UP1:DestDirectory", "uploads/scan")
    caput(ioc, "UP1:Mode", "Directory")
    busy_seen = []
    monitor = epics.PV(ioc.pv("UP1:Start"), callback=lambda value, **_: busy_seen.append(value))
    monitor.wait_for_connection(5)
    assert caput(ioc, "UP1:Start", 1) == 1  # put-callback: returns when the upload has ended
    assert caget(ioc, "UP1:Status_RBV") == "done"
    assert int(caget(ioc, "UP1:NProcessed_RBV")) == 50
    assert caget(ioc, "UP1:Start") == "Done"
    wait_until(lambda: 1 in busy_seen, 5, "busy 1 seen by a monitor")
    assert len(list((Path(exp.data_directory) / "uploads" / "scan").glob("*.tif"))) == 50


def test_workflow_start_runs_job_to_done_with_stages(ioc: Ioc) -> None:
    add_workflow(ioc, {"name": "wf3", "stages": {
        "01-A": {"command": "echo v=$value", "outputVariableRegexList": ["v=(?P<got>\\S+)"]},
        "02-B": {"command": "sleep 0.3"},
        "03-C": {"command": "echo final $got"}}})
    caput(ioc, "WF1:Name", "wf3")
    caput(ioc, "WF1:Args", json.dumps({"value": "42"}))
    statuses: list[str] = []
    mon = epics.PV(ioc.pv("WF1:Status_RBV"), callback=lambda char_value, **_: statuses.append(char_value))
    mon.wait_for_connection(5)
    caput(ioc, "WF1:Start", 1)
    assert caget(ioc, "WF1:Status_RBV") == "done"
    assert "running" in statuses or "pending" in statuses
    assert int(caget(ioc, "WF1:StagesDone_RBV")) == int(caget(ioc, "WF1:StagesTotal_RBV")) == 3
    ctx = ioc.pva_context()
    try:
        rows = ctx.get(ioc.pv("WF1:Stages")).value.todict()
        assert list(rows["stage"]) == ["01-A", "02-B", "03-C"]
        assert list(rows["status"]) == ["done"] * 3
        assert rows["stdOut"][2].strip() == "final 42"
        jobs = ctx.get(ioc.pv("Jobs")).value.todict()
        assert caget(ioc, "WF1:JobId_RBV") in list(jobs["id"])
    finally:
        ctx.close()
    writer = caget(ioc, "Status:LastWriter_RBV")
    assert "WF1:Start" in writer and "(ca)" in writer


@pytest.mark.parametrize(("suffix", "value", "words"), [
    ("Experiment:Name", "no-such-experiment", "does not exist"),
    ("WF1:Args", "{not json", "not valid JSON"),
    ("WF1:Args", "[1, 2]", "JSON object"),
    ("DAQ1:DestDirectory", "../../etc", ".."),
    ("UP1:DestDirectory", "/abs/path", "relative"),
    ("DAQ1:DataDirectory", "relative/dir", "absolute"),
    ("DAQ1:DataDirectory", "/x/" + "a" * 10_000, "too long"),
    ("Metadata:Json", "x" * 10_000, "too long"),
])
def test_bad_setting_gives_message_and_alarm(ioc: Ioc, suffix: str, value: str, words: str) -> None:
    before = caget(ioc, suffix)
    caput(ioc, suffix, value, timeout=10)
    message = ioc.pv(suffix).rsplit(":", 1)[0][len(ioc.prefix):] + ":Message_RBV"
    wait_until(lambda: words.lower() in caget(ioc, message).lower(), 10, f"message for {suffix}")
    assert alarm(ioc, message) == (MINOR, STATE)
    assert alarm(ioc, suffix) == (0, 0)  # the alarm is on the message, the same on CA and PVA
    assert caget(ioc, suffix) == before  # the bad value was not taken
    assert caget(ioc, "Status:Heartbeat_RBV")  # and the IOC is alive


def test_commands_refused_with_reasons(ioc: Ioc, tmp_path: Path) -> None:
    caput(ioc, "DAQ1:Start", 1)
    assert "no DM experiment selected" in caget(ioc, "DAQ1:Message_RBV")
    add_experiment(ioc, "bad-1")
    select(ioc, "bad-1")
    caput(ioc, "DAQ1:DataDirectory", str(tmp_path / "does-not-exist"))
    caput(ioc, "DAQ1:Start", 1)
    assert "not started" in caget(ioc, "DAQ1:Message_RBV")
    assert alarm(ioc, "DAQ1:Message_RBV") == (MINOR, STATE)
    caput(ioc, "WF1:Start", 1)
    assert "Name is empty" in caget(ioc, "WF1:Message_RBV")
    caput(ioc, "WF1:Name", "no-such-workflow")
    caput(ioc, "WF1:Start", 1)
    assert "not started" in caget(ioc, "WF1:Message_RBV")
    ctx = ioc.pva_context()
    try:
        with pytest.raises(Exception, match="not one of"):
            ctx.put(ioc.pv("Stream:Bluesky"), {"state": "bogus"})
        with pytest.raises(Exception, match="not supported"):  # p4p's word for read-only
            ctx.put(ioc.pv("DAQ1:Status_RBV"), "hacked")
    finally:
        ctx.close()


def test_start_while_busy_is_refused(ioc: Ioc) -> None:
    add_workflow(ioc, {"name": "slow", "stages": {"01": {"command": "sleep 3"}}})
    caput(ioc, "WF1:Name", "slow")
    first = threading.Thread(target=lambda: epics.caput(ioc.pv("WF1:Start"), 1, wait=True, timeout=60))
    first.start()
    wait_until(lambda: caget(ioc, "WF1:Status_RBV") == "running", 10, "job running")
    assert caget(ioc, "WF1:Start") == "Start"
    ctx = ioc.pva_context()
    try:
        with pytest.raises(Exception, match="busy"):
            ctx.put(ioc.pv("WF1:Start"), 1, timeout=5)
    finally:
        ctx.close()
    assert "busy" in caget(ioc, "WF1:Message_RBV")
    first.join(60)
    assert caget(ioc, "WF1:Status_RBV") == "done"


def test_write_allow_list_on_both_protocols(tmp_path: Path) -> None:
    ioc = make_ioc(tmp_path, "--allow-write", "operator-nobody")
    try:
        pv = epics.PV(ioc.pv("WF1:Name"))
        pv.wait_for_connection(5)
        assert pv.read_access and not pv.write_access
        ctx = ioc.pva_context()
        try:
            with pytest.raises(Exception, match="may not write"):
                ctx.put(ioc.pv("WF1:Name"), "x", timeout=5)
        finally:
            ctx.close()
        assert caget(ioc, "WF1:Name") == ""
    finally:
        ioc.stop()


def test_dm_down_gives_comm_invalid_then_recovers(dm_server: DmServer, tmp_path: Path) -> None:
    ioc = make_ioc(tmp_path, "--dm", "rest", "--dm-setup", str(dm_server.setup_file))
    try:
        wait_until(lambda: caget(ioc, "Status:Connected_RBV") == "Connected", 15)
        assert alarm(ioc, "WF1:Status_RBV")[0] == 0
        dm_server.stop()
        wait_until(lambda: caget(ioc, "Status:Connected_RBV") == "Disconnected", 15)
        for suffix in ("WF1:Status_RBV", "DAQ3:NFiles_RBV", "Experiment:Name_RBV"):
            assert alarm(ioc, suffix) == (INVALID, COMM)
        caput(ioc, "Experiment:Name", "anything")
        assert "unreachable" in caget(ioc, "Experiment:Message_RBV")
        ctx = ioc.pva_context()
        try:
            assert ctx.get(ioc.pv("Jobs")).alarm.severity == INVALID  # tables too
        finally:
            ctx.close()
        dm_server.start()
        wait_until(lambda: caget(ioc, "Status:Connected_RBV") == "Connected", 45, "reconnect")
        for suffix in ("WF1:Status_RBV", "Metadata:Message_RBV", "Metadata:DatasetName_RBV"):
            assert alarm(ioc, suffix) == (0, 0), suffix
    finally:
        ioc.stop()


def test_ioc_restart_reattaches_to_running_job(dm_server: DmServer, tmp_path: Path) -> None:
    ioc = make_ioc(tmp_path, "--dm", "rest", "--dm-setup", str(dm_server.setup_file))
    try:
        async def setup() -> None:
            async with dm_server.client() as dm:
                await dm.add_workflow({"name": "long", "stages": {
                    "01": {"command": "sleep 4"}, "02": {"command": "echo end"}}})
        asyncio.run(setup())
        caput(ioc, "WF2:Name", "long")
        start = threading.Thread(
            target=lambda: epics.caput(ioc.pv("WF2:Start"), 1, wait=True, timeout=2))
        start.start()
        job_id = wait_until(lambda: caget(ioc, "WF2:JobId_RBV"), 10, "job id")
        ioc.stop()
        start.join(10)  # its put gives up; use_ca then destroys the libca context it used
        ioc.start()
        use_ca(ioc.env)
        assert caget(ioc, "WF2:Name") == "long"  # settings restored
        assert wait_until(lambda: caget(ioc, "WF2:JobId_RBV"), 10) == job_id
        wait_until(lambda: caget(ioc, "WF2:Status_RBV") == "done", 30, "job done after restart")

        async def count() -> int:
            async with dm_server.client() as dm:
                return len(await dm.list_processing_jobs())
        assert asyncio.run(count()) == 1  # reattached, never started twice
    finally:
        ioc.stop()


def test_writing_0_releases_a_waiting_command(ioc: Ioc) -> None:
    add_workflow(ioc, {"name": "long", "stages": {"01": {"command": "sleep 30"}}})
    caput(ioc, "WF1:Name", "long")
    done = threading.Event()
    threading.Thread(target=lambda: (epics.caput(ioc.pv("WF1:Start"), 1, wait=True, timeout=60),
                                     done.set()), daemon=True).start()
    wait_until(lambda: caget(ioc, "WF1:Status_RBV") == "running", 15, "job running")
    ctx = ioc.pva_context()
    try:
        ctx.put(ioc.pv("WF1:Start"), 0)
    finally:
        ctx.close()
    assert done.wait(10), "the waiting put did not end"
    assert caget(ioc, "WF1:Start") == "Done"
    assert "stopped waiting" in caget(ioc, "WF1:Message_RBV")
    assert caget(ioc, "WF1:Status_RBV") == "running"  # the job itself goes on


def test_allow_list_by_address_on_pva(tmp_path: Path) -> None:
    ioc = make_ioc(tmp_path, "--allow-write", "127.0.0.1")
    try:
        ctx = ioc.pva_context()
        try:
            ctx.put(ioc.pv("WF1:Name"), "by-address")
        finally:
            ctx.close()
        assert caget(ioc, "WF1:Name") == "by-address"
    finally:
        ioc.stop()


def test_fifty_monitors_follow_a_burst_of_writes(ioc: Ioc) -> None:
    last: dict[int, str] = {}
    counts = dict.fromkeys(range(50), 0)

    def watcher(k: int) -> Callable[..., None]:
        def cb(char_value: str = "", **_kw: Any) -> None:
            last[k], counts[k] = char_value, counts[k] + 1
        return cb

    monitors = [epics.PV(ioc.pv("Metadata:Json"), callback=watcher(k), form="native")
                for k in range(50)]
    for m in monitors:
        assert m.wait_for_connection(5)
    writer = epics.PV(ioc.pv("Metadata:Json"))
    writer.wait_for_connection(5)
    for i in range(300):
        writer.put(json.dumps({"n": i}), wait=True, timeout=10)
    final = json.dumps({"n": 299})
    wait_until(lambda: all(v == final for v in last.values()) and len(last) == 50, 15,
               "every monitor shows the last write")
    assert min(counts.values()) > 10  # updates flowed throughout, not just the last one


#: a CA client that monitors a PV 50 times, writes it 500 times and vanishes at once
_BURST_AND_LEAVE = """
import os, sys, epics
name = sys.argv[1]
monitors = [epics.PV(name, auto_monitor=True, callback=lambda **_: None) for _ in range(50)]
writer = epics.PV(name)
assert all(m.wait_for_connection(10) for m in [*monitors, writer])
for i in range(500):
    writer.put('{"n": %d}' % i, wait=True, timeout=10)
os._exit(0)
"""


def test_clients_leaving_mid_burst_leave_ca_serving(ioc: Ioc) -> None:
    """Monitors that disconnect while their updates are still being sent must not stop
    caproto's update loop (it iterated a list that the disconnection changed, and died)."""
    for _ in range(2):  # the second finds no CA server if the first killed it
        subprocess.run([sys.executable, "-c", _BURST_AND_LEAVE, ioc.pv("Metadata:Json")],
                       env={**os.environ, **ioc.env}, timeout=120, check=True,
                       stdout=subprocess.DEVNULL)
    beats: list[int] = []
    monitor = epics.PV(ioc.pv("Status:Heartbeat_RBV"), callback=lambda value, **_: beats.append(value))
    assert monitor.wait_for_connection(5)
    wait_until(lambda: len(beats) >= 3, 10, "heartbeat updates to a new monitor")
    assert "Server error" not in ioc.log()


def test_metadata_json_takes_32_kib_over_pva_and_shows_4_kib_on_ca(ioc: Ioc) -> None:
    """Metadata:Json: PVA takes what DM can take (32 KiB), CA shows the first 4095 bytes
    (its char waveform); longer texts are refused on each, with the reason, never cut."""
    from p4p.client.thread import RemoteError

    ctx = ioc.pva_context()
    text = json.dumps({"esaf": "e" * 10_000})
    ctx.put(ioc.pv("Metadata:Json"), {"value": text}, timeout=10)
    assert ctx.get(ioc.pv("Metadata:Json"), timeout=5) == text
    chars = epics.caget(ioc.pv("Metadata:Json"), count=4096, use_monitor=False, timeout=5)
    assert bytes(chars).rstrip(b"\0").decode() == text[:4095]
    too_long = json.dumps({"esaf": "e" * 32 * 1024})
    with pytest.raises(RemoteError, match="text too long"):
        ctx.put(ioc.pv("Metadata:Json"), {"value": too_long}, timeout=10)
    assert "text too long" in caget(ioc, "Metadata:Message_RBV")
    assert alarm(ioc, "Metadata:Message_RBV")[0] == 1  # MINOR
    assert ctx.get(ioc.pv("Metadata:Json"), timeout=5) == text  # kept, not cut
    caput(ioc, "Metadata:Json", json.dumps({"x": "y" * 5000}))  # CA: refused (or cut by pyepics)
    assert ctx.get(ioc.pv("Metadata:Json"), timeout=5) == text
