"""Fast unit tests of the gateway's middle: commands, the poll loop, the DM-side state, the
publisher and the in-doubt start logic, in-process on asyncio against the fake DM
(``tests/fake_dm.py``) and a hub with no servers attached."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from fake_dm import FakeDm

from apsdm.dm import Experiment, InvalidArgument, NoAnswer
from apsdm.gateway.commands import Commands
from apsdm.gateway.hub import MINOR, OK, STATUS_COMM, Hub, PutRejected, Writer
from apsdm.gateway.persist import SAVE_DELAY, Persistence
from apsdm.gateway.poller import Poller
from apsdm.gateway.publisher import Publisher
from apsdm.gateway.schema import PV, Field, Kind, Layout, Record, build, of
from apsdm.gateway.state import MISSING_POLLS, DmState, Link

P = "U:"
LAYOUT = Layout(P, n_daq=2, n_upload=1, n_workflow=2)
WRITER = Writer("ca", "testhost", "tester")
PERIOD = 0.01
WORKFLOW = {"name": "reduce", "stages": {"01": {"command": "echo $x"}}}


class Gateway:
    """The gateway's pieces wired as ``apsdm-ioc`` wires them, without CA and PVA servers."""

    def __init__(self, dm: FakeDm, state_file: Path) -> None:
        self.dm, self.hub = dm, Hub(build(LAYOUT))
        self.state = DmState(Persistence(state_file), Publisher(self.hub))
        self.poller = Poller(dm, self.state, PERIOD)  # type: ignore[arg-type]
        self.commands = Commands(self.hub, dm, self.state, P)  # type: ignore[arg-type]
        self.commands.register()
        self.posts: list[tuple[str, Any]] = []  # every value shown, as a server would see it
        self.hub.sinks.append(self)

    async def publish(self, pv: Any, value: Any, _alarm: Any, _timestamp: float) -> None:
        self.posts.append((pv.name[len(P):], value))

    def __getitem__(self, suffix: str) -> Any:
        return self.hub[P + suffix]

    def alarm(self, suffix: str) -> Any:
        return self.hub.alarms[P + suffix]

    async def put(self, suffix: str, value: Any) -> Any:
        return await self.hub.put(P + suffix, value, WRITER)

    def start(self, suffix: str) -> asyncio.Task[Any]:
        """A busy command written in the background (its put completes when it ends)."""
        return asyncio.ensure_future(self.put(suffix, 1))

    async def until(self, ready: Callable[[], Any], timeout: float = 5.0) -> None:
        async def poll() -> None:
            while not ready():
                await asyncio.sleep(PERIOD / 2)
        await asyncio.wait_for(poll(), timeout)


@asynccontextmanager
async def running(tmp_path: Path, dm: FakeDm | None = None) -> AsyncIterator[Gateway]:
    """A gateway whose poll loop runs, once it has published its first poll."""
    gw = Gateway(dm or FakeDm(), tmp_path / "ioc-state.json")
    await gw.commands.restore()
    task = asyncio.ensure_future(gw.poller.run())
    try:
        await gw.until(lambda: gw.state.link is not Link.STARTING)
        yield gw
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await gw.state.flush()  # as apsdm-ioc does when it stops


def scenario(test: Callable[[Path], Awaitable[None]]) -> Callable[[Path], None]:
    """Run an async test body on a fresh loop (pytest-asyncio is not a dependency)."""
    def run(tmp_path: Path) -> None:
        asyncio.run(asyncio.wait_for(test(tmp_path), 30))
    run.__name__, run.__doc__ = test.__name__, test.__doc__
    return run


def dm_with_experiment() -> FakeDm:
    dm = FakeDm()
    dm.add("exp1", description="beam time", experimentUsernameList=["d1", "d2"],
           experimentType={"name": "TEST"}, dataDirectory="/data/exp1")
    dm.workflows["reduce"] = {"owner": "dm", **WORKFLOW}
    return dm


@asynccontextmanager
async def selected(tmp_path: Path) -> AsyncIterator[Gateway]:
    """A running gateway with ``exp1`` selected."""
    async with running(tmp_path, dm_with_experiment()) as gw:
        await gw.put("Experiment:Name", "exp1")
        yield gw


# --- experiment selection ------------------------------------------------------------------

@scenario
async def test_selection_shows_the_experiment_and_is_kept(tmp_path: Path) -> None:
    """Writing Experiment:Name publishes every field its schema source names, and saves it."""
    async with running(tmp_path, dm_with_experiment()) as gw:
        await gw.put("Experiment:Name", " exp1 ")
        assert (gw["Experiment:Name_RBV"], gw["Experiment:Description_RBV"]) == ("exp1", "beam time")
        assert (gw["Experiment:Users_RBV"], gw["Experiment:Valid_RBV"]) == ("d1,d2", 1)
        assert gw["Experiment:DataDirectory_RBV"] == "/data/exp1"
        await gw.state.flush()
        saved = json.loads((tmp_path / "ioc-state.json").read_text())
        assert saved["settings"]["Experiment:Name"] == "exp1"
        await gw.put("Experiment:Name", "")
        assert (gw["Experiment:Name_RBV"], gw["Experiment:Id_RBV"], gw["Experiment:Valid_RBV"]) == ("", 0, 0)


@scenario
async def test_unknown_experiment_is_refused_with_a_message(tmp_path: Path) -> None:
    """DM's refusal becomes the put's error and Experiment:Message_RBV, with a STATE alarm."""
    async with running(tmp_path) as gw:
        with pytest.raises(PutRejected, match="experiment 'nope' not selected"):
            await gw.put("Experiment:Name", "nope")
        assert "not selected" in gw["Experiment:Message_RBV"]
        assert gw.alarm("Experiment:Message_RBV").severity == MINOR


@scenario
async def test_selected_experiment_deleted_in_dm_is_unselected(tmp_path: Path) -> None:
    """The poll loop looks the selection up again: gone from DM, the readbacks go blank."""
    async with selected(tmp_path) as gw:
        del gw.dm.experiments["exp1"]
        await gw.until(lambda: gw["Experiment:Valid_RBV"] == 0)
        assert gw["Experiment:Name_RBV"] == ""


# --- settings ------------------------------------------------------------------------------

@pytest.mark.parametrize(("suffix", "value", "words"), [
    ("DAQ1:DataDirectory", "relative/dir", "absolute path"),
    ("UP1:Path", "/data/../etc", "must not contain '..'"),
    ("DAQ2:DestDirectory", "/abs", "relative path inside the experiment"),
    ("WF1:Args", "{bad json", "not valid JSON"),
    ("WF1:Args", '{"id": 3}', "reserves"),
    ("WF1:Owner", "a b", "not a DM user name"),
    ("Metadata:Json", "[1]", "JSON object"),
])
def test_schema_checks_refuse_bad_settings(tmp_path: Path, suffix: str, value: str,
                                           words: str) -> None:
    """Each setting's schema check refuses bad input with a message; nothing is saved."""
    async def body() -> None:
        gw = Gateway(FakeDm(), tmp_path / "s.json")
        with pytest.raises(PutRejected, match=words):
            await gw.put(suffix, value)
        assert gw[suffix] == "" and not (tmp_path / "s.json").exists()
        assert gw.alarm(suffix.split(":")[0] + ":Message_RBV").severity == MINOR
    asyncio.run(body())


@scenario
async def test_good_settings_are_normalised_saved_and_restored(tmp_path: Path) -> None:
    """Paths are normalised; autosaved settings come back after a restart, owners are polled."""
    gw = Gateway(FakeDm(), tmp_path / "s.json")
    assert await gw.put("DAQ1:DataDirectory", "/data//a/./b/") == "/data/a/b"
    await gw.put("WF2:Owner", "alice")
    await gw.put("Stream:Bluesky", {"state": "ready", "message": "", "counter": 1})
    assert gw["Stream:Bluesky"]["timestamp"] > 0
    await gw.state.flush()  # as apsdm-ioc does when it stops
    again = Gateway(FakeDm(), tmp_path / "s.json")
    await again.commands.restore()
    assert again["DAQ1:DataDirectory"] == "/data/a/b" and again["WF2:Owner"] == "alice"
    assert again.state.owners == {"alice"}


# --- commands ------------------------------------------------------------------------------

async def start_job(gw: Gateway, args: str = "") -> tuple[asyncio.Task[Any], str]:
    """WF1:Start of workflow ``reduce`` in the background, once DM lists its job: the put, the job id."""
    await gw.put("WF1:Name", "reduce")
    await gw.put("WF1:Args", args)
    put = gw.start("WF1:Start")
    await gw.until(lambda: gw["WF1:JobId_RBV"] != "")
    return put, gw["WF1:JobId_RBV"]

@scenario
async def test_workflow_start_completes_when_the_job_is_done(tmp_path: Path) -> None:
    """WFn:Start starts a job with the slot's arguments and its put ends with the job."""
    async with selected(tmp_path) as gw:
        put, job_id = await start_job(gw, '{"x": 5}')
        assert gw["WF1:Start"] == 1 and not put.done()
        assert gw.dm.jobs[job_id]["x"] == 5
        gw.dm.set(job_id, status="done")
        await put
        assert (gw["WF1:Start"], gw["WF1:Status_RBV"]) == (0, "done")
        assert gw["WF1:Message_RBV"] == f"{job_id[:8]} done"
        assert gw["Status:LastWriter_RBV"].startswith("tester@testhost (ca) WF1:Start")
        saved = json.loads((tmp_path / "ioc-state.json").read_text())
        assert saved["ids"]["WF1"] == job_id and saved["owners"]["WF1"] == "dm"


@scenario
async def test_failed_job_fails_the_put_with_an_alarm(tmp_path: Path) -> None:
    """A job that fails fails its put and raises a STATE alarm on Status_RBV."""
    async with selected(tmp_path) as gw:
        put, job_id = await start_job(gw)
        gw.dm.set(job_id, status="failed", errorMessage="Stage 01 failed")
        with pytest.raises(PutRejected, match="failed: Stage 01 failed"):
            await put
        assert gw.alarm("WF1:Status_RBV").severity == MINOR


@scenario
async def test_daq_start_reuses_an_active_daq_then_stops_it(tmp_path: Path) -> None:
    """Start adopts the active DAQ on the same experiment and tree; Stop ends it."""
    async with selected(tmp_path) as gw:
        existing = await gw.dm.start_daq("exp1", "/data/tree")
        await gw.put("DAQ2:DataDirectory", "/data/tree")
        await gw.put("DAQ2:Start", 1)
        assert ("DAQ2:Message_RBV", f"reusing active DAQ {existing.id[:8]}") in gw.posts
        assert gw.dm.calls.count("start_daq") == 1 and gw.state.ids["DAQ2"] == existing.id
        await gw.until(lambda: gw["DAQ2:Active_RBV"] == 1)
        await gw.put("DAQ2:Stop", 1)
        assert gw["DAQ2:Message_RBV"] == f"DAQ {existing.id[:8]} stopped"
        assert (gw["DAQ2:Active_RBV"], gw["DAQ2:Status_RBV"]) == (0, "done")


@scenario
async def test_upload_of_a_file_shows_counts_until_done(tmp_path: Path) -> None:
    """UPn:Start uploads the file's directory with its name; counts come from the poll."""
    async with selected(tmp_path) as gw:
        await gw.put("UP1:Path", "/data/run/a.h5")
        await gw.put("UP1:DestDirectory", "raw")
        put = gw.start("UP1:Start")
        await gw.until(lambda: gw["UP1:Id_RBV"] != "")
        upload = gw.dm.uploads[gw["UP1:Id_RBV"]]
        assert (upload["dataDirectory"], upload["experimentFilePath"]) == ("/data/run", "a.h5")
        gw.dm.set(upload["id"], nFiles=1, nProcessedFiles=1, nProcessingErrors=1,
                  percentageComplete=100.0, status="done")
        await put
        assert (gw["UP1:NFiles_RBV"], gw["UP1:Percent_RBV"]) == (1, 100.0)
        assert gw.alarm("UP1:NErrors_RBV").message == "copy errors"


@scenario
async def test_commands_need_an_experiment_and_refuse_empty_input(tmp_path: Path) -> None:
    """Commands refuse, sending nothing to DM, without an experiment or a workflow name."""
    async with running(tmp_path, dm_with_experiment()) as gw:
        with pytest.raises(PutRejected, match="no DM experiment selected"):
            await gw.put("Metadata:Upload", 1)
        with pytest.raises(PutRejected, match="Name is empty"):
            await gw.put("WF2:Start", 1)
        assert gw["WF2:Start"] == 0 and "start_processing_job" not in gw.dm.calls


@scenario
async def test_metadata_upload_adds_a_dataset(tmp_path: Path) -> None:
    """Metadata:Upload adds Metadata:Json to the catalog under its dataset name."""
    async with selected(tmp_path) as gw:
        await gw.put("Metadata:Json", '{"uid": "abcdef0123", "sample": "Si"}')
        await gw.put("Metadata:Upload", 1)
        assert gw["Metadata:DatasetName_RBV"] == "run_uid8_abcdef01"
        assert gw.dm.datasets[0]["bluesky_metadata"]["sample"] == "Si"


# --- in-doubt starts -----------------------------------------------------------------------

async def _start_in_doubt(gw: Gateway) -> asyncio.Task[Any]:
    await gw.put("WF1:Name", "reduce")
    await gw.put("WF1:Args", '{"x": 1}')
    put = gw.start("WF1:Start")
    await gw.until(lambda: ("WF1:Message_RBV", "no answer from DM: waiting to see if the "
                            "workflow reduce started") in gw.posts)
    return put


@scenario
async def test_start_without_answer_adopts_what_dm_started(tmp_path: Path) -> None:
    """A start DM took but never answered is found in DM's list and followed to its end."""
    async with selected(tmp_path) as gw:
        gw.dm.fail("start_processing_job", NoAnswer("read timed out"), acted=True)
        put = await _start_in_doubt(gw)
        (job_id,) = gw.dm.jobs
        await gw.until(lambda: gw["WF1:JobId_RBV"] == job_id)
        gw.dm.set(job_id, status="done")
        await put
        assert len(gw.dm.jobs) == 1 and gw.state.ids["WF1"] == job_id


@scenario
async def test_start_without_answer_gives_up_after_missing_polls(tmp_path: Path) -> None:
    """If DM lists nothing it started for MISSING_POLLS polls, the put fails: not started."""
    async with selected(tmp_path) as gw:
        gw.dm.fail("start_processing_job", NoAnswer("read timed out"))
        put = await _start_in_doubt(gw)
        polls = gw.state.snapshot.polls
        with pytest.raises(PutRejected, match="has listed none since"):
            await put
        # the first verdict is on the snapshot at hand when the start call failed
        assert gw.state.snapshot.polls - polls >= MISSING_POLLS - 2
        assert not gw.dm.jobs and "WF1" not in gw.state.ids


@scenario
async def test_start_without_answer_checks_the_job_arguments(tmp_path: Path) -> None:
    """A job of the same workflow started meanwhile with other arguments is not taken."""
    async with selected(tmp_path) as gw:
        gw.dm.fail("start_processing_job", NoAnswer("read timed out"))
        put = await _start_in_doubt(gw)
        await gw.dm.start_processing_job("reduce", {"x": 2})  # someone else's start
        with pytest.raises(PutRejected, match="has other arguments"):
            await put
        assert "WF1" not in gw.state.ids


@scenario
async def test_upload_without_answer_adopts_the_upload_of_that_source(tmp_path: Path) -> None:
    """An upload DM took but never answered is taken by its source and destination."""
    async with selected(tmp_path) as gw:
        gw.dm.fail("upload", NoAnswer("read timed out"), acted=True)
        await gw.put("UP1:Path", "/data/run")
        await gw.put("UP1:Mode", "Directory")
        put = gw.start("UP1:Start")
        await gw.until(lambda: gw["UP1:Id_RBV"] != "")
        (upload_id,) = gw.dm.uploads
        assert gw["UP1:Id_RBV"] == upload_id
        gw.dm.set(upload_id, status="done")
        await put


@scenario
async def test_refused_start_is_not_in_doubt(tmp_path: Path) -> None:
    """DM's refusal of a start (an answer) fails the put at once with DM's words."""
    async with selected(tmp_path) as gw:
        gw.dm.fail("start_processing_job", InvalidArgument("unknown variable"))
        await gw.put("WF1:Name", "reduce")
        with pytest.raises(PutRejected, match="not started: unknown variable"):
            await gw.put("WF1:Start", 1)


# --- the poll loop, the connection, restarts -----------------------------------------------

@scenario
async def test_dm_down_gives_comm_alarms_refuses_commands_then_recovers(tmp_path: Path) -> None:
    """DM unreachable: readbacks go COMM/INVALID and commands are not sent; all clears after."""
    async with selected(tmp_path) as gw:
        await gw.put("WF1:Name", "reduce")
        gw.dm.down = True
        await gw.until(lambda: gw.state.link is Link.DOWN)
        assert gw["Status:Connected_RBV"] == 0 and "unreachable" in gw["Status:Message_RBV"]
        assert gw.alarm("Experiment:Name_RBV").status == STATUS_COMM
        assert gw.alarm("Jobs").status == STATUS_COMM
        with pytest.raises(PutRejected, match="not sent"):
            await gw.put("WF1:Start", 1)
        assert "start_processing_job" not in gw.dm.calls
        gw.dm.down = False
        await gw.until(lambda: gw["Status:Connected_RBV"] == 1)
        assert gw["Status:Message_RBV"] == "OK"
        assert gw.alarm("Experiment:Name_RBV") == OK and gw.alarm("Jobs") == OK
        assert gw.alarm("WF1:Message_RBV").status != STATUS_COMM  # the refusal stays


@scenario
async def test_refused_poll_says_so_and_keeps_polling(tmp_path: Path) -> None:
    """DM refusing a list call is not an outage: Status:Message_RBV says so; DM stays up."""
    async with running(tmp_path) as gw:
        gw.dm.fail("list_daqs", InvalidArgument("bad list"))
        await gw.until(lambda: "DM poll failed" in gw["Status:Message_RBV"])
        assert gw.state.link is Link.UP
        await gw.until(lambda: gw["Status:Message_RBV"] == "OK")


@scenario
async def test_restart_reattaches_and_starts_nothing(tmp_path: Path) -> None:
    """After a restart the slots show what they started before; nothing is started anew."""
    async with selected(tmp_path) as gw:
        put, job_id = await start_job(gw)
        put.cancel()
    gw.dm.calls.clear()
    gw.dm.set(job_id, status="running", stage="01")
    async with running(tmp_path, gw.dm) as again:
        await again.until(lambda: again["WF1:Stage_RBV"] == "01")
        assert again["WF1:JobId_RBV"] == job_id and again["Experiment:Name_RBV"] == "exp1"
        assert again["WF1:Name"] == "reduce"
        assert not [c for c in again.dm.calls if c.startswith(("start", "upload"))]


# --- the schema names the behaviour --------------------------------------------------------

def test_every_writable_pv_is_handled_as_its_schema_names() -> None:
    """Each writable PV's handler is the Commands method its field names (else a setting)."""
    gw = Gateway(FakeDm(), Path("/nonexistent/s.json"))
    for pv in gw.hub.pvs.values():
        if pv.field.writable:
            handler = gw.hub.handlers[pv.name]
            assert handler == getattr(gw.commands, pv.field.command or "setting"), pv.name
        else:
            assert not pv.field.command and pv.field.check is None, pv.name


def test_every_readback_is_published_or_posted_by_a_command() -> None:
    """Readbacks without a DM source are the few that commands, the publisher's connection
    state or start-up post; tables all name their rows."""
    posted_elsewhere = {"Message_RBV", "DatasetName_RBV", "Connected_RBV", "Heartbeat_RBV",
                        "Version_RBV", "LastWriter_RBV", "DmUrl_RBV", "PollPeriod_RBV"}
    for pv in build(LAYOUT):
        if pv.is_rbv and pv.field.source is None:
            assert pv.suffix in posted_elsewhere, pv.name
        assert (pv.field.table is not None) == (pv.field.kind is Kind.TABLE), pv.name


@scenario
async def test_a_new_readback_is_one_schema_line(tmp_path: Path) -> None:
    """A field that names its DM source is published with no other code."""
    extra = PV(P + "Experiment:Extra_RBV", "Experiment", 0,
               Field("Extra_RBV", Kind.STRING, "extra", source=of(Record.EXPERIMENT, "station")))
    hub = Hub([*build(LAYOUT), extra])
    state = DmState(Persistence(tmp_path / "s.json"), Publisher(hub))
    await state.select("exp1", Experiment(1, "exp1", station="8-ID-I"))
    assert hub[extra.name] == "8-ID-I"
    await state.select("", None)
    assert hub[extra.name] == extra.field.initial


# --- what is kept for restarts -------------------------------------------------------------

class CountedWrites(Persistence):
    """Persistence that counts its file writes and can hold them up."""

    writes = 0

    def _write(self, number: int, text: str) -> None:
        super()._write(number, text)
        self.writes += 1


def saved(path: Path) -> Any:
    return json.loads(path.read_text())


@scenario
async def test_settings_are_saved_soon_in_one_write_and_ids_at_once(tmp_path: Path) -> None:
    """A burst of setting writes is one file write, SAVE_DELAY later; an id is on disk
    before ``save`` returns, with every setting changed so far."""
    keep = CountedWrites(tmp_path / "s.json")
    for i in range(50):
        keep.settings["WF1:Args"] = str(i)
        keep.save_soon()
    assert not keep.path.exists()
    await asyncio.sleep(SAVE_DELAY * 3)
    assert keep.writes == 1 and saved(keep.path)["settings"]["WF1:Args"] == "49"
    keep.settings["WF1:Args"] = "last"
    keep.save_soon()
    keep.ids["WF1"] = "job-1"
    keep.save()
    assert saved(keep.path)["ids"] == {"WF1": "job-1"}
    assert saved(keep.path)["settings"]["WF1:Args"] == "last"
    await asyncio.sleep(SAVE_DELAY * 3)
    assert keep.writes == 2  # the write to come was part of save's


@scenario
async def test_an_older_state_never_replaces_a_newer_one(tmp_path: Path) -> None:
    """A worker thread's write held up until a newer state was taken: whichever of the two
    writes runs last, the file ends with the newer state."""
    keep = Persistence(tmp_path / "s.json")
    keep.settings["WF1:Args"] = "older"
    with keep._lock:  # the worker thread takes "older", then waits here
        keep.save_soon()
        await asyncio.sleep(SAVE_DELAY * 2)
        keep.settings["WF1:Args"] = "newer"
        newer = asyncio.ensure_future(asyncio.to_thread(keep.save))
        await asyncio.sleep(0.1)
    await newer
    await keep.flush()
    assert saved(keep.path)["settings"]["WF1:Args"] == "newer"


@scenario
async def test_a_failed_save_is_logged_once_and_retried(tmp_path: Path) -> None:
    """A setting that cannot be written (here: its directory's place is taken by a file)
    is logged as an error once, and written as soon as it can be."""
    blocker = tmp_path / "state"
    blocker.write_text("in the way")
    keep = Persistence(blocker / "s.json")
    keep.settings["DAQ1:DataDirectory"] = "/data/a"
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("apsdm.gateway.persist")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        keep.save_soon()
        await asyncio.sleep(SAVE_DELAY * 4.5)
        assert len(records) == 1 and "settings not saved" in records[0], records
        blocker.unlink()
        await asyncio.sleep(SAVE_DELAY * 2.5)
        assert saved(keep.path)["settings"]["DAQ1:DataDirectory"] == "/data/a"
        assert "saved" in records[-1] and "again" in records[-1], records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
