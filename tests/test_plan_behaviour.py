"""Issue 13 behaviour of the plans in a real RunEngine against the IOC on the embedded DM:
pauses inside every wait, abort releasing the slot, pre-flight before data, DM in the
documents, a wrapped user scan, progress through Status.watch() and metadata limits."""

from __future__ import annotations

import json
import sys
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from bluesky import RunEngine
from bluesky import plans as bp
from bluesky import preprocessors as bpp
from bluesky.utils import RunEngineInterrupted
from ophyd.sim import SynAxis
from plan_helpers import (
    FAST,
    add_to_dm,
    catalogued,
    demo,
    failing_workflow,
    file_detector,
    new_user,
    run,
)

from apsdm_ophyd import (
    DMGateway,
    MetadataNotShared,
    PreflightFailed,
    Progress,
    RunReport,
    Timing,
    WorkflowFailed,
    WorkflowRequest,
    dm_workflow_wrapper,
    file_collection_plan,
    setup_user,
    share_metadata,
    streaming_collection_plan,
)

pytestmark = pytest.mark.timeout(180)

POLL = 0.5  # the poll period of the pause tests: a pause must take effect within it
SLACK = 0.5  # for a loaded test machine
#: bluesky waits this long at the checkpoint of a deferred pause, to catch a second Ctrl-C
DEFERRED_GRACE = 0.5


def in_time(asked: dict[str, float], defer: bool) -> bool:
    """The pause asked for took effect within one poll period (plus bluesky's own grace)."""
    return time.monotonic() - asked["at"] < POLL + SLACK + (DEFERRED_GRACE if defer else 0)


def sleeper(name: str, seconds: float = 3) -> dict[str, Any]:
    """A workflow of two stages that together take ``seconds``."""
    half = seconds / 2
    return {"name": name, "stages": {"01": {"command": f"sleep {half}"},
                                     "02": {"command": f"sleep {half}"}}}


def documents(RE: RunEngine) -> dict[str, list[dict[str, Any]]]:
    """Every document the RunEngine emits from now on, by name."""
    docs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    RE.subscribe(lambda name, doc: docs[name].append(doc))
    return docs


def pause_in(RE: RunEngine, wait: str, defer: bool) -> dict[str, float]:
    """Ask for a pause the first time the RunEngine shows the named wait's Progress."""
    asked: dict[str, float] = {}

    def hook(msg: Any) -> None:
        if (msg.command == "trigger" and isinstance(msg.obj, Progress)
                and msg.obj.name.endswith(wait) and not asked):
            asked["at"] = time.monotonic()  # as Ctrl-C does: from outside the RunEngine's loop
            threading.Thread(target=RE.request_pause, kwargs={"defer": defer}).start()

    RE.msg_hook = hook
    return asked


def paused_then_resumed(RE: RunEngine, plan: Any, wait: str, defer: bool) -> Any:
    """Run ``plan``, pause it inside ``wait``, check it paused in time, resume it."""
    asked = pause_in(RE, wait, defer)
    with pytest.raises(RunEngineInterrupted):
        RE(plan)
    assert asked, f"the plan never waited in {wait}"
    assert in_time(asked, defer)
    assert RE.state == "paused"
    RE.msg_hook = None
    result = RE.resume()
    assert result.exit_status == "success"
    return result.plan_result


@pytest.mark.parametrize("defer", [True, False], ids=["deferred", "immediate"])
def test_daq_wait_pauses_and_resumes(dm: Any, gateway: DMGateway, RE: RunEngine,
                                     tmp_path: Path, defer: bool) -> None:
    data = tmp_path / "detector"
    new_user(dm, gateway, RE, sleeper("quick", 0.2), data=data)
    asked = pause_in(RE, "daq1 files", defer)
    plan = file_collection_plan(gateway, [file_detector(data)], 2, "quick", expected_files=3,
                                poll_period=POLL)
    with pytest.raises(RunEngineInterrupted):
        RE(plan)
    assert asked and in_time(asked, defer)
    (data / "third.txt").write_text("the file the plan still waits for\n")
    RE.msg_hook = None
    result = RE.resume()
    assert result.exit_status == "success" and result.plan_result.job.ok


@pytest.mark.parametrize("defer", [True, False], ids=["deferred", "immediate"])
def test_workflow_wait_pauses_and_resumes(dm: Any, gateway: DMGateway, RE: RunEngine,
                                          tmp_path: Path, defer: bool) -> None:
    new_user(dm, gateway, RE, sleeper("slow"))
    docs = documents(RE)
    report: RunReport = paused_then_resumed(RE, file_collection_plan(
        gateway, [file_detector(tmp_path)], 1, "slow", expected_files=0,
        poll_period=POLL), "wf1 stages", defer)
    assert report.job.ok and docs["stop"][-1]["exit_status"] == "success"


def test_daq_wait_times_out_naming_the_watched_tree(
        dm: Any, gateway: DMGateway, RE: RunEngine, tmp_path: Path) -> None:
    data = tmp_path / "detector"
    new_user(dm, gateway, RE, sleeper("quick", 0.2), data=data)
    docs = documents(RE)
    with pytest.raises(TimeoutError, match=r"1 of 2 new files copied after 1 s; the DAQ "
                                           r"watches .*detector"):
        RE(file_collection_plan(gateway, [file_detector(data)], 1, "quick", expected_files=2,
                                daq_timeout=1, **FAST))
    assert docs["stop"][-1]["exit_status"] == "fail"
    assert "new files copied" in docs["stop"][-1]["reason"]


@pytest.mark.parametrize("defer", [True, False], ids=["deferred", "immediate"])
def test_upload_pauses_while_waiting_and_resumes(
        gateway: DMGateway, dm: Any, RE: RunEngine, tmp_path: Path, defer: bool) -> None:
    experiment = f"exp-{uuid.uuid4().hex[:6]}"
    add_to_dm(dm, experiment)
    tree = tmp_path / "user" / "tree"
    tree.mkdir(parents=True)
    for n in range(200):
        (tree / f"f{n}.txt").write_text("x" * 1000)
    setup = paused_then_resumed(RE, setup_user(gateway, experiment, upload_file=str(tree)),
                                "up1 upload", defer)
    assert setup.upload_id


@pytest.mark.parametrize("defer", [True, False], ids=["deferred", "immediate"])
def test_streaming_plan_pauses_while_waiting_for_ready_and_resumes(
        dm: Any, gateway: DMGateway, RE: RunEngine, tmp_path: Path,
        defer: bool) -> None:
    new_user(dm, gateway, RE, demo("streaming-demo"))
    report: RunReport = paused_then_resumed(RE, streaming_collection_plan(
        gateway, [file_detector(tmp_path)], 3, "apsdm-streaming-demo",
        workflow_args={"pythonExe": sys.executable}, poll_period=POLL),
        "workflow ready", defer)
    assert report.job.ok and report.workflow_stream is not None
    assert report.workflow_stream.counter == 3


@pytest.mark.parametrize("end", ["abort", "stop"])
def test_abort_and_stop_release_the_workflow_slot_and_share_the_metadata(
        ioc: Any, dm: Any, gateway: DMGateway, RE: RunEngine, tmp_path: Path, end: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    experiment = new_user(dm, gateway, RE, sleeper("slow", 20))
    docs = documents(RE)
    pause_in(RE, "wf1 stages", defer=False)
    with pytest.raises(RunEngineInterrupted):
        RE(file_collection_plan(gateway, [file_detector(tmp_path)], 1, "slow",
                                expected_files=0, poll_period=POLL))
    assert gateway.wf1.start_job.get() == 1  # paused: the job is still followed
    RE.msg_hook = None
    getattr(RE, end)()
    deadline = time.monotonic() + 5
    while gateway.wf1.start_job.get() != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gateway.wf1.start_job.get() == 0
    assert "WF1:Start released" in capsys.readouterr().out
    uid = docs["start"][-1]["uid"]
    shared = catalogued(ioc, experiment, f"run_uid8_{uid[:8]}")
    assert shared is not None, f"the {end}ed run's metadata is not in DM's catalog"
    dm_md = shared["bluesky_metadata"]["data_management"]
    assert dm_md["exit_status"] == end and dm_md["job_id"]
    assert "primary" in shared["bluesky_metadata"]["streams"]


def test_mistakes_fail_in_preflight_before_any_data(
        dm: Any, gateway: DMGateway, RE: RunEngine, tmp_path: Path) -> None:
    experiment = new_user(dm, gateway, RE, sleeper("slow", 4))
    frames = tmp_path / "frames"
    frames.mkdir()
    docs = documents(RE)
    with pytest.raises(PreflightFailed, match=r"no workflow 'nope' \(known: .*slow"):
        RE(file_collection_plan(gateway, [file_detector(frames)], 1, "nope",
                                expected_files=0, **FAST))
    with pytest.raises(PreflightFailed, match="'id' is a job field that DM reserves"):
        RE(file_collection_plan(gateway, [file_detector(frames)], 1, "slow",
                                workflow_args={"id": 3}, expected_files=0))
    gateway.wf1.workflow_name.set("slow").wait(5)
    running = gateway.wf1.start_job.set(1)  # the slot's earlier job
    while gateway.wf1.start_job.get() != 1:
        time.sleep(0.05)
    with pytest.raises(PreflightFailed, match="WF1:Start is busy"):
        RE(file_collection_plan(gateway, [file_detector(frames)], 1, "slow",
                                expected_files=0))
    running.wait(30)
    with pytest.raises(PreflightFailed, match="DAQ1: no DAQ is running"):
        RE(file_collection_plan(gateway, [file_detector(frames)], 1, "slow"))
    watched = tmp_path / "watched"
    watched.mkdir()
    run(RE, setup_user(gateway, experiment, data_directory=str(watched)))
    with pytest.raises(PreflightFailed, match=r"DAQ1: watches \S*watched, but the detectors "
                                              r"write to \S*frames"):
        RE(file_collection_plan(gateway, [file_detector(frames)], 1, "slow"))
    assert not docs["start"] and not docs["event"]
    assert not list(frames.iterdir())  # no frame was taken


def test_runs_record_dm_and_failure_in_their_documents(
        dm: Any, gateway: DMGateway, RE: RunEngine, tmp_path: Path) -> None:
    experiment = new_user(dm, gateway, RE, demo("streaming-demo"), failing_workflow())
    docs = documents(RE)
    report: RunReport = run(RE, streaming_collection_plan(
        gateway, [file_detector(tmp_path)], 2, "apsdm-streaming-demo",
        workflow_args={"pythonExe": sys.executable}, **FAST))
    start, stop = docs["start"][-1], docs["stop"][-1]
    assert start["plan_name"] == "streaming_collection_plan"
    dm_md = start["data_management"]
    assert dm_md["job_id"] == report.job.job_id  # known before the run opened
    assert dm_md["experiment"] == experiment and dm_md["workflow"] == "apsdm-streaming-demo"
    dm_events = [d for d in docs["event"]
                 if d["descriptor"] in {x["uid"] for x in docs["descriptor"] if x["name"] == "dm"}]
    assert dm_events[0]["data"]["dm_job_id"] == report.job.job_id
    assert dm_events[0]["data"]["dm_job_status"] == "done"
    assert stop["exit_status"] == "success" and report.job.job_id in stop["reason"]
    json.dumps(report.to_dict())  # JSON-able: no numpy scalars

    with pytest.raises(WorkflowFailed, match="02-FAIL"):
        RE(file_collection_plan(gateway, [file_detector(tmp_path)], 1, "always-fails",
                                expected_files=0, **FAST))
    stop = docs["stop"][-1]
    assert stop["exit_status"] == "fail" and "02-FAIL" in stop["reason"]
    assert docs["start"][-1]["plan_name"] == "file_collection_plan"


def test_a_users_own_scan_wrapped_with_a_workflow_completes(
        dm: Any, gateway: DMGateway, RE: RunEngine, tmp_path: Path) -> None:
    new_user(dm, gateway, RE, sleeper("after-scan", 1))
    docs = documents(RE)
    motor = SynAxis(name="motor")
    report: RunReport = run(RE, dm_workflow_wrapper(
        bp.scan([file_detector(tmp_path)], motor, 0, 1, 3), gateway,
        WorkflowRequest("after-scan", {"note": "wrapped"})))
    assert report.job.ok and report.dataset == f"run_uid8_{report.run_uid[:8]}"
    assert docs["start"][-1]["plan_name"] == "scan"
    assert len(docs["event"]) == 3 + 1  # the scan's points and the dm event


def test_progress_reaches_status_watchers(
        dm: Any, gateway: DMGateway, RE: RunEngine, tmp_path: Path) -> None:
    data = tmp_path / "detector"
    new_user(dm, gateway, RE, sleeper("slow", 2), data=data)
    seen: dict[str, list[dict[str, Any]]] = defaultdict(list)

    def waiting_hook(statuses: Any) -> None:  # what bluesky's ProgressBarManager does
        for status in statuses or ():
            if hasattr(status, "watch"):
                status.watch(lambda name, **kw: seen[name].append(kw))

    RE.waiting_hook = waiting_hook
    run(RE, file_collection_plan(gateway, [file_detector(data)], 2, "slow",
                                 report=False, **FAST))
    stages = seen["dm_wf1 stages"]
    assert stages and stages[-1]["target"] == 2
    assert {kw["current"] for kw in stages} >= {0.0, 1.0}
    assert all(0 <= kw["fraction"] <= 1 for kw in stages)


def test_10_kB_of_metadata_and_every_stream_reach_dms_catalog(
        ioc: Any, dm: Any, gateway: DMGateway, RE: RunEngine, tmp_path: Path) -> None:
    experiment = new_user(dm, gateway, RE, sleeper("quick", 0.2))
    esaf = {"id": 271828, "title": "x" * 10_000, "users": ["ada", "grace"]}
    motor = SynAxis(name="motor")
    plan = bpp.baseline_wrapper(bp.count([file_detector(tmp_path)], 2), [motor])
    report: RunReport = run(RE, dm_workflow_wrapper(
        plan, gateway, WorkflowRequest("quick"), timing=Timing(**FAST)))
    shared = catalogued(ioc, experiment, report.dataset)
    assert shared is not None and report.dataset == f"run_uid8_{report.run_uid[:8]}"
    md = shared["bluesky_metadata"]
    assert md["bluesky_run_uid"] == report.run_uid and md["data_management"]["job_id"]
    streams = md["streams"]
    assert set(streams) == {"primary", "baseline", "dm"}  # every stream, as apstools shares
    (baseline,) = streams["baseline"]["descriptors"]
    assert baseline["data_keys"]["motor"]["dtype"] == "number"
    assert "motor" in baseline["configuration"]
    assert streams["dm"]["descriptors"][0]["data_keys"]["dm_job_id"]

    report = run(RE, file_collection_plan(gateway, [file_detector(tmp_path)], 1, "quick",
                                          expected_files=0, md={"esaf": esaf}, **FAST))
    shared = catalogued(ioc, experiment, report.dataset)
    assert shared is not None and shared["bluesky_metadata"]["esaf"] == esaf
    assert len(json.dumps(shared["bluesky_metadata"])) > 10_000


def test_metadata_the_ioc_or_dm_refuses_fails_the_run_with_the_reason(
        ioc: Any, dm: Any, gateway: DMGateway, RE: RunEngine, tmp_path: Path) -> None:
    experiment = new_user(dm, gateway, RE, sleeper("quick", 0.2))
    docs = documents(RE)
    with pytest.raises(MetadataNotShared, match=r"Metadata:Json \(\d+ bytes\) refused: "
                                                r".*text too long"):
        RE(file_collection_plan(gateway, [file_detector(tmp_path)], 1, "quick",
                                expected_files=0, md={"image": "x" * (1 << 20)}, **FAST))
    assert docs["stop"][-1]["exit_status"] == "fail"
    assert "text too long" in docs["stop"][-1]["reason"]
    assert catalogued(ioc, experiment, f"run_uid8_{docs['start'][-1]['uid'][:8]}") is None

    info = {"datasetName": "twice", "bluesky_run_uid": uuid.uuid4().hex, "big": "y" * 32_000}
    share = share_metadata(gateway.metadata, info, json_pva=gateway.pva.metadata_json)
    assert run(RE, share) == "twice"
    assert catalogued(ioc, experiment, "twice") == {**catalogued(ioc, experiment, "twice"),
                                                    "bluesky_metadata": info}
    with pytest.raises(MetadataNotShared, match="already exists"):  # DM's refusal
        RE(share_metadata(gateway.metadata, info, json_pva=gateway.pva.metadata_json))
    with pytest.raises(MetadataNotShared, match="over the 4095 bytes Metadata:Json holds on CA"):
        RE(share_metadata(gateway.metadata, {"big": "x" * 5000}))  # CA alone: refused before
