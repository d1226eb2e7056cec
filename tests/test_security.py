"""Security: the write allow-list on both protocols for every writable PV, workflow
arguments that try to run shell commands, destinations that try to leave experiment
storage, and the DM password kept out of every PV, log line, error message and process.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import epics
import numpy
import psutil
import pytest
from caproto.sync.client import ErrorResponseReceived
from caproto.sync.client import write as ca_write
from conftest import DmServer, Ioc, make_ioc
from p4p.client.thread import RemoteError
from test_ioc import add_experiment, add_workflow, caget, caput, select, wait_until

from apsdm.dm import routes
from apsdm.gateway.schema import PV, Kind, Layout, build

# --- the write allow-list ----------------------------------------------------------------

#: a valid value for each setting, other than the one the IOC starts with
NEW_VALUES: dict[str, Any] = {
    "Name": "other", "DataDirectory": "/tmp", "DestDirectory": "other", "Path": "/tmp/x",
    "Mode": 1, "Owner": "other", "Args": '{"a": 1}', "WaitForOthers": 1, "Json": '{"a": 1}',
    "IncludeExtensions": "h5", "SkipPattern": "*.tmp", "Workflow": "other",
    "WorkflowOwner": "other", "WorkflowArgs": "a:1", "RemoveSource": 1,
    "Options": '{"skipChecksum": true}', "Id": "1", "Experiment": "other",
}
STREAM_PARTS: dict[str, Any] = {"State": 1, "Message": "other", "Counter": 5, "Lost": 2,
                                "Results": '{"a": 1}'}
#: DM routes the IOC calls by itself (polls); anything else would be a command getting through
POLL_ROUTES = {"listDaqs", "listUploads", "listProcessingJobs", "getExperimentsByStation",
               "listWorkflows", "getExperimentByName"}


def new_value(pv: PV) -> Any:
    if pv.field.kind is Kind.STREAM:
        return {"state": "ready"}
    if pv.group == "Stream":  # the handshake's scalar mirrors, the workflow's lost and results
        return STREAM_PARTS[pv.suffix.rsplit(":", 1)[1]]
    return 1 if pv.field.kind is Kind.BUSY else NEW_VALUES[pv.suffix]


def dm_objects(ioc: Ioc) -> tuple[int, int, int]:
    """How many DAQs, uploads and jobs DM holds."""
    async def count() -> tuple[int, int, int]:
        async with ioc.dm_client() as dm:
            return (len(await dm.list_daqs()), len(await dm.list_uploads()),
                    len(await dm.list_processing_jobs()))
    return asyncio.run(count())


def stamp_less(value: Any) -> dict[str, Any]:
    return {k: v for k, v in value.todict().items() if k != "timeStamp"}


def dm_calls(log: str) -> set[str]:
    """Names of the DM routes called in an access log excerpt (login aside)."""
    names = set()
    for method, target in re.findall(r'dmserver\.access: \S+ "(\S+) (\S+) HTTP', log):
        path, _, query = target.partition("?")
        found = routes.match(method, path, query)
        if path != routes.LOGIN_PATH:
            names.add(found[0].name if found else f"{method} {path}")
    return names


@pytest.mark.own_process
def test_allow_list_holds_for_every_writable_pv_on_both_protocols(tmp_path: Path) -> None:
    """With every command ready to start real work (saved settings of an existing experiment,
    directory, file and workflow), a client not on the list changes nothing on CA or PVA."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f.dat").write_bytes(b"data")
    layout = Layout()
    settings: dict[str, Any] = {"Experiment:Name": "sec"}
    for n in range(1, layout.n_daq + 1):
        settings |= {f"DAQ{n}:DataDirectory": str(src), f"DAQ{n}:DestDirectory": f"d{n}"}
    for n in range(1, layout.n_upload + 1):
        settings |= {f"UP{n}:Path": str(src / "f.dat"), f"UP{n}:DestDirectory": f"u{n}"}
    for n in range(1, layout.n_workflow + 1):
        settings[f"WF{n}:Name"] = "wf"
    (tmp_path / "ioc").mkdir()
    (tmp_path / "ioc" / "ioc-state.json").write_text(json.dumps({"settings": settings, "ids": {}}))
    ioc = make_ioc(tmp_path, "--allow-write", "someone-else")
    try:
        add_experiment(ioc, "sec")
        add_workflow(ioc, {"name": "wf", "stages": {"01": {"command": "echo ran"}}})
        refused_writes_change_nothing(ioc)
        # the same write from a listed account does start work (so the refusals counted)
        ioc.extra = ["--allow-write", "someone-else", getpass.getuser()]
        ioc.restart()
        ctx = ioc.pva_context()
        try:
            wait_until(lambda: ctx.get(ioc.pv("Experiment:Valid_RBV")).raw.value.index == 1, 20)
            ctx.put(ioc.pv("WF1:Start"), 1, timeout=30)
        finally:
            ctx.close()
        assert dm_objects(ioc) == (0, 0, 1)
    finally:
        ioc.stop()


def refused_writes_change_nothing(ioc: Ioc) -> None:
    """Every writable PV written by a client not on the list, on CA (pyepics sees no write
    right; a raw client that ignores it is refused) and PVA: no value, message or DM object
    changes, and DM gets no call but the IOC's own polls."""
    raw, ctx = ioc.pva_context(nt=False), ioc.pva_context()
    try:
        wait_until(lambda: raw.get(ioc.pv("Experiment:Valid_RBV"))["value.index"] == 1, 20,
                   "saved experiment selected")
        pvs = build(Layout(prefix=ioc.prefix))
        watched = [pv.name for pv in pvs
                   if pv.field.writable or (pv.suffix == "Message_RBV" and pv.group != "Status")]
        before = {name: stamp_less(raw.get(name)) for name in watched}
        mark = len(ioc.log())
        for pv in (pv for pv in pvs if pv.field.writable):
            value = new_value(pv)
            if not pv.field.pva_only:
                chan = epics.get_pv(pv.name)
                assert chan.wait_for_connection(5)
                assert chan.read_access and not chan.write_access, pv.name
                with pytest.raises(ErrorResponseReceived):
                    data = value.encode() if isinstance(value, str) else [value]
                    ca_write(pv.name, data, notify=True, timeout=5, repeater=False)
            with pytest.raises(RemoteError, match="may not write"):
                ctx.put(pv.name, {"value": value} if isinstance(value, str) else value, timeout=10)
        for name, old in before.items():  # value and alarm (not the time stamp)
            assert stamp_less(raw.get(name)) == old, f"{name} changed"
        assert dm_objects(ioc) == (0, 0, 0)  # nothing started in DM
        assert dm_calls(ioc.log()[mark:]) <= POLL_ROUTES
    finally:
        raw.close()
        ctx.close()


# --- workflow arguments ------------------------------------------------------------------

#: shell metacharacter payloads; {m} is a marker file that any injected command would create
PAYLOADS = [
    "; touch {m}", "$(touch {m})", "`touch {m}`", "| touch {m}", "&& touch {m}", "|| touch {m}",
    "\ntouch {m}", "'; touch {m}; '", '"; touch {m}; "', "${{IFS}}touch${{IFS}}{m}",
    "$(touch${{IFS}}{m})", 'x\\"; touch {m}; echo \\"', "> {m}", "$((1+1))", "${{HOME}}",
    "\\$(touch {m})", "'$(touch {m})'", "$'\\x41'", "#", "a  b\tc",
]
#: how a workflow may quote a variable: (stage suffix, command)
QUOTINGS = [("dq", "printf '%s\\n' \"$p{i}\""), ("sq", "printf '%s\\n' '$p{i}'"),
            ("uq", "printf '%s\\n' $p{i}"), ("echo", "echo $p{i}")]


def test_workflow_arguments_cannot_inject_shell_commands(ioc: Ioc, tmp_path: Path) -> None:
    """A job whose commands print each payload (double-, single- and unquoted): it is done,
    prints the payloads literally, and no marker file exists."""
    marker = tmp_path / "INJECTED"
    payloads = [p.format(m=marker) for p in PAYLOADS]
    stages = {f"{i:02d}{style}": {"command": command.format(i=i)}
              for i in range(len(payloads)) for style, command in QUOTINGS}
    add_workflow(ioc, {"name": "inject", "stages": stages})
    ctx = ioc.pva_context()
    try:
        ctx.put(ioc.pv("WF1:Name"), "inject")
        ctx.put(ioc.pv("WF1:Args"), {"value": json.dumps({f"p{i}": p for i, p in enumerate(payloads)})})
        ctx.put(ioc.pv("WF1:Start"), 1, timeout=60)  # completes when the job has ended
        assert caget(ioc, "WF1:Status_RBV") == "done", caget(ioc, "WF1:Message_RBV")
        rows = ctx.get(ioc.pv("WF1:Stages")).value.todict()
        out = dict(zip(rows["stage"], rows["stdOut"], strict=True))
        for i, payload in enumerate(payloads):
            assert out[f"{i:02d}dq"] == out[f"{i:02d}sq"] == payload + "\n", payload
            assert out[f"{i:02d}uq"].split("\n")[:-1] == payload.split(), payload  # only split
        # keys are variable names: a key with metacharacters is refused before DM sees it
        with pytest.raises(RemoteError, match="variable name"):
            ctx.put(ioc.pv("WF2:Args"), {"value": json.dumps({f"x;touch {marker}": "1"})})
        assert "variable name" in caget(ioc, "WF2:Message_RBV")
    finally:
        ctx.close()
    assert not marker.exists(), "a workflow argument ran a shell command"


# --- destinations ------------------------------------------------------------------------

ESCAPES = ["..", "../x", "a/../../b", "a/..", "./../x", "/abs", "/tmp", "//x"]


def test_destinations_cannot_leave_experiment_storage(ioc: Ioc, tmp_path: Path) -> None:
    """``..`` and absolute destinations are refused by the IOC; a symlink inside storage that
    leads out of it is refused by DM, at the start and when planted under a running DAQ."""
    exp = add_experiment(ioc, "esc")
    select(ioc, "esc")
    data = Path(exp.data_directory)
    outside, src = tmp_path / "outside", tmp_path / "src"
    outside.mkdir()
    src.mkdir()
    (src / "f.dat").write_bytes(b"x")
    for setting in ("DAQ1:DestDirectory", "UP1:DestDirectory", "DAQ2:DestDirectory",
                    "UP2:DestDirectory"):
        for dest in [*ESCAPES, str(outside)]:
            caput(ioc, setting, dest)
            assert caget(ioc, setting) == "", f"{setting} took {dest!r}"
            message = caget(ioc, setting.replace("DestDirectory", "Message_RBV"))
            assert "relative" in message or "'..'" in message, message
    (data / "link_out").symlink_to(outside)
    (data / "real").mkdir()
    (data / "link_in").symlink_to(data / "real")
    caput(ioc, "UP1:Path", str(src / "f.dat"))
    caput(ioc, "UP1:Mode", "File")
    caput(ioc, "DAQ1:DataDirectory", str(src))
    for slot, dest in (("UP1", "link_out"), ("UP1", "link_out/sub"), ("DAQ1", "link_out")):
        caput(ioc, f"{slot}:DestDirectory", dest)  # a plain relative path: the IOC takes it
        caput(ioc, f"{slot}:Start", 1)
        assert "leaves the experiment" in caget(ioc, f"{slot}:Message_RBV"), (slot, dest)
    assert not any(outside.iterdir())
    caput(ioc, "UP1:DestDirectory", "link_in")  # a link that stays inside is fine
    caput(ioc, "UP1:Start", 1)
    assert caget(ioc, "UP1:Status_RBV") == "done"
    assert (data / "real" / "f.dat").read_bytes() == b"x"
    # a symlink planted under the destination of a running DAQ
    caput(ioc, "DAQ1:DestDirectory", "raw")
    caput(ioc, "DAQ1:Start", 1)
    wait_until(lambda: caget(ioc, "DAQ1:NProcessed_RBV") == "1", 15, "f.dat copied")
    (data / "raw" / "evil").symlink_to(outside)
    (src / "evil").mkdir()
    (src / "evil" / "g.dat").write_bytes(b"y")
    wait_until(lambda: caget(ioc, "DAQ1:NFiles_RBV") == "2"
               and caget(ioc, "DAQ1:NWaiting_RBV") == "0", 15, "g.dat handled")
    assert not any(outside.iterdir()), "a DAQ copied through a symlink out of storage"
    assert caget(ioc, "DAQ1:NErrors_RBV") == "1"
    caput(ioc, "DAQ1:Stop", 1)


# --- the DM password ---------------------------------------------------------------------


def ca_text(pv: PV) -> str:
    """A PV's value over CA as text (char waveforms as their bytes, decoded)."""
    if pv.field.kind is Kind.LONGSTRING:
        chars = epics.caget(pv.name, count=pv.field.max_length, use_monitor=False, timeout=5)
        return bytes(numpy.asarray(chars, dtype=numpy.uint8)).decode(errors="replace")
    return str(epics.caget(pv.name, as_string=True, use_monitor=False, timeout=5))


def assert_nowhere(ioc: Ioc, secrets: list[str], logs: list[Path], errors: list[str]) -> None:
    """No secret in any PV (CA and PVA, tables included), log, error or process."""
    raw = ioc.pva_context(nt=False)
    try:
        shown = [str(raw.get(pv.name, timeout=5)) for pv in build(Layout(prefix=ioc.prefix))]
    finally:
        raw.close()
    shown += [ca_text(pv) for pv in build(Layout(prefix=ioc.prefix)) if not pv.field.pva_only]
    assert len(shown) > 200
    texts = {"PVs": "\n".join(shown), "errors": "\n".join(errors),
             "ps -eo args": subprocess.run(["ps", "-eo", "args"], capture_output=True,
                                           text=True, check=True).stdout}
    texts |= {log.name: log.read_text() for log in logs}
    assert ioc.proc is not None
    for proc in [psutil.Process(ioc.proc.pid), *psutil.Process(ioc.proc.pid).children(True)]:
        texts[f"environment of {proc.pid}"] = "\n".join(f"{k}={v}" for k, v in proc.environ().items())
    for secret in secrets:
        for where, text in texts.items():
            assert secret not in text, f"the DM password shows in {where}"


def exercise(ioc: Ioc, dm: Any, tmp_path: Path) -> list[str]:
    """Work and errors of every kind: a job that prints its environment, refused settings
    and commands (``dm``: a client of the IOC's DM). Returns what PVA clients were told."""
    async def setup() -> None:
        async with dm:
            await dm.add_experiment("pw")
            await dm.add_workflow({"name": "pwwf", "stages": {"01": {"command": "echo $a; env"}}})
    asyncio.run(setup())
    select(ioc, "pw")
    caput(ioc, "WF1:Name", "pwwf")
    caput(ioc, "WF1:Args", '{"a": "1"}')
    caput(ioc, "WF1:Start", 1)
    assert caget(ioc, "WF1:Status_RBV") == "done"
    errors = []
    ctx = ioc.pva_context()
    try:
        for suffix, value in (("Experiment:Name", "no-such"), ("DAQ1:DataDirectory", "rel"),
                              ("WF2:Name", "no-such"), ("WF2:Start", 1),
                              ("DAQ1:DataDirectory", str(tmp_path / "missing")),
                              ("DAQ1:Start", 1), ("UP1:Start", 1), ("Metadata:Upload", 1)):
            try:
                ctx.put(ioc.pv(suffix), {"value": value} if isinstance(value, str) else value,
                        timeout=30)
            except RemoteError as exc:
                errors.append(str(exc))
    finally:
        ctx.close()
    assert len(errors) >= 6, errors
    return errors


def password_of(login: Path) -> str:
    return login.read_text().strip().partition("|")[2]


def test_password_nowhere_with_embedded_dm(ioc: Ioc, tmp_path: Path) -> None:
    password = password_of(ioc.data_root / "dm" / "dm.login")
    errors = exercise(ioc, ioc.dm_client(), tmp_path)
    assert_nowhere(ioc, [password], [ioc.data_root / "ioc.log"], errors)


def test_password_nowhere_with_dm_service_apart(dm_server: DmServer, tmp_path: Path) -> None:
    """The IOC and ``apsdm-server`` as two processes: both logs and both environments."""
    password = password_of(dm_server.data_root / "dm.login")
    ioc = make_ioc(tmp_path, "--dm", "rest", "--dm-setup", str(dm_server.setup_file))
    try:
        errors = exercise(ioc, dm_server.client(), tmp_path)
        assert dm_server.proc is not None
        server_env = psutil.Process(dm_server.proc.pid).environ()
        assert all(password not in v for v in server_env.values())
        assert_nowhere(ioc, [password], [ioc.data_root / "ioc.log",
                                         dm_server.data_root.parent / "dm-server.log"], errors)
    finally:
        ioc.stop()


def test_wrong_password_is_not_shown_either(dm_server: DmServer, tmp_path: Path) -> None:
    """A login file with a wrong password: DM refuses the login, and the IOC says so without
    the password (the wrong one or the real one)."""
    wrong = "wrong-" + "Zq8" * 8
    login = tmp_path / "bad.login"
    login.write_text(f"dm|{wrong}\n")
    login.chmod(0o600)
    setup = tmp_path / "bad.setup.sh"
    setup.write_text(re.sub(r"DM_LOGIN_FILE=\S+", f"DM_LOGIN_FILE={login}",
                            dm_server.setup_file.read_text()))
    ioc = make_ioc(tmp_path, "--dm", "rest", "--dm-setup", str(setup))
    try:
        wait_until(lambda: "login" in caget(ioc, "Status:Message_RBV"), 15, "login refused")
        errors = []
        ctx = ioc.pva_context()
        try:
            ctx.put(ioc.pv("WF1:Name"), "x")
            for suffix, value in (("Experiment:Name", {"value": "x"}), ("WF1:Start", 1)):
                with pytest.raises(RemoteError) as refused:
                    ctx.put(ioc.pv(suffix), value, timeout=30)
                errors.append(str(refused.value))
        finally:
            ctx.close()
        logs = [ioc.data_root / "ioc.log", dm_server.data_root.parent / "dm-server.log"]
        assert_nowhere(ioc, [wrong, password_of(dm_server.data_root / "dm.login")], logs, errors)
    finally:
        ioc.stop()
