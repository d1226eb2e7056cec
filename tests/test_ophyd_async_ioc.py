"""The ophyd-async devices against the live IOC on the embedded DM service, driven by the RunEngine."""

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.plans as bp
import pytest
from bluesky import RunEngine
from bluesky.run_engine import call_in_bluesky_event_loop
from bluesky.utils import FailedStatus
from conftest import Ioc
from ophyd_async.core import init_devices, wait_for_value
from ophyd_async.epics.core import _p4p
from p4p.client.asyncio import Context
from plan_helpers import FAST, check_file_based_flow, failing_workflow, file_detector, new_user, rd
from test_ioc import add_experiment, add_workflow

from apsdm_ophyd import WorkflowFailed, file_collection_plan
from apsdm_ophyd.async_devices import (
    CommandFailed,
    DMGateway,
    HandshakeState,
    NoYes,
    StartCommand,
    StopCommand,
    UploadCommand,
    UploadMode,
)


@pytest.fixture
def run_engine(ioc: Ioc, monkeypatch: pytest.MonkeyPatch) -> Iterator[RunEngine]:
    """A RunEngine whose ophyd-async PVA signals find this test's IOC: ophyd-async keeps one
    p4p context per process, made from os.environ on first use, so each test gets its own."""
    conf = {key: value for key, value in ioc.env.items() if key.startswith("EPICS_PVA")}
    context = Context("pva", conf=conf, useenv=False, nt=False)
    monkeypatch.setattr(_p4p, "_context", context)
    yield RunEngine(call_returns_result=True)
    context.close()


@pytest.fixture
def dm(ioc: Ioc, run_engine: RunEngine) -> DMGateway:
    with init_devices():
        dm = DMGateway(ioc.prefix)
    return dm


def test_file_based_flow_runs_a_job_to_done(ioc: Ioc, run_engine: RunEngine, dm: DMGateway) -> None:
    add_experiment(ioc, "oasync-1")
    add_workflow(ioc, {"name": "oasync-wf", "stages": {
        "01-A": {"command": "echo v=$value", "outputVariableRegexList": ["v=(?P<got>\\S+)"]},
        "02-B": {"command": "echo final $got"}}})
    wf = dm.workflow[1]
    events: list[dict[str, Any]] = []

    def flow() -> Any:
        yield from bps.mv(dm.experiment.experiment_name, "oasync-1")
        yield from bps.mv(wf.workflow_name, "oasync-wf", wf.args, json.dumps({"value": "42"}))
        yield from bps.abs_set(wf.start_job, StartCommand.START, wait=True)
        yield from bp.count([wf, dm.stream])
        return (yield from bps.rd(wf.job_id))

    job_id = run_engine(flow(), lambda name, doc: events.append(doc) if name == "event" else None
                        ).plan_result
    assert job_id
    assert rd(run_engine, dm.experiment.valid) is NoYes.YES
    assert rd(run_engine, wf.job_status) == "done"
    assert rd(run_engine, wf.stages_done) == rd(run_engine, wf.stages_total) == 2
    [event] = events
    assert event["data"][wf.job_status.name] == "done"
    assert event["data"][dm.stream.workflow.state.name] == HandshakeState.IDLE
    stages = rd(run_engine, wf.stages)
    assert list(stages.stage) == ["01-A", "02-B"] and list(stages.status) == ["done", "done"]
    assert stages.stdOut[1].strip() == "final 42"
    jobs = rd(run_engine, dm.jobs)
    row = list(jobs.id).index(job_id)
    assert (jobs.workflow[row], jobs.status[row]) == ("oasync-wf", "done")
    assert len(rd(run_engine, dm.uploads)) == 0  # p4p gives None for its empty numeric columns


def test_command_fails_with_the_slot_message(ioc: Ioc, run_engine: RunEngine, dm: DMGateway) -> None:
    add_experiment(ioc, "oasync-2")
    add_workflow(ioc, {"name": "oasync-exit", "stages": {"01-A": {"command": "exit 3"}}})
    wf = dm.workflow[2]

    def start(workflow: str) -> Any:
        yield from bps.mv(wf.workflow_name, workflow)
        yield from bps.abs_set(wf.start_job, StartCommand.START, wait=True)

    run_engine(bps.mv(dm.experiment.experiment_name, "oasync-2"))
    with pytest.raises(FailedStatus) as refused:
        run_engine(start("no-such-workflow"))
    assert isinstance(refused.value.__cause__, CommandFailed)
    assert "does not exist" in str(refused.value.__cause__)
    with pytest.raises(FailedStatus) as failed:
        run_engine(start("oasync-exit"))
    assert isinstance(failed.value.__cause__, CommandFailed)
    assert "exit status 3" in str(failed.value.__cause__)
    assert rd(run_engine, wf.job_status) == "failed"


def test_transfer_and_metadata_commands_complete_on_the_ioc(ioc: Ioc, run_engine: RunEngine,
                                                            dm: DMGateway, tmp_path: Path) -> None:
    add_experiment(ioc, "oasync-3")
    src = tmp_path / "scan"
    src.mkdir()
    for i in range(20):
        (src / f"img{i}.tif").write_bytes(bytes(1000))
    up, daq = dm.upload[1], dm.daq[1]
    run_engine(bps.mv(dm.experiment.experiment_name, "oasync-3"))
    run_engine(bps.mv(up.path, str(src), up.dest_directory, "scan", up.mode, UploadMode.DIRECTORY))
    run_engine(bps.abs_set(up.start_upload, StartCommand.START, wait=True))
    assert (rd(run_engine, up.upload_status), rd(run_engine, up.n_processed)) == ("done", 20)
    uploads = rd(run_engine, dm.uploads)
    assert list(uploads.nProcessed) == [20] and list(uploads.destDirectory) == ["scan"]
    run_engine(bps.mv(daq.data_directory, str(src)))
    run_engine(bps.abs_set(daq.start_daq, StartCommand.START, wait=True))
    # the DAQ's start is confirmed by the next poll, as test_ioc's DAQ test waits for it too
    call_in_bluesky_event_loop(wait_for_value(daq.active, NoYes.YES, timeout=15))
    run_engine(bps.abs_set(daq.stop_daq, StopCommand.STOP, wait=True))
    assert rd(run_engine, daq.active) is NoYes.NO
    run_engine(bps.mv(dm.metadata.json, json.dumps({"uid": "0123abcd-ef", "sample": "Si"})))
    run_engine(bps.abs_set(dm.metadata.upload, UploadCommand.UPLOAD, wait=True))
    assert rd(run_engine, dm.metadata.dataset_name) == "run_uid8_0123abcd"


def test_stream_handshake_both_ways(ioc: Ioc, run_engine: RunEngine, dm: DMGateway) -> None:
    ctx = ioc.pva_context()
    try:
        ctx.put(ioc.pv("Stream:Workflow"), {"state": "acquiring", "message": "frame 5", "counter": 5})
    finally:
        ctx.close()
    side = dm.stream.workflow
    assert rd(run_engine, side.state) is HandshakeState.ACQUIRING
    assert (rd(run_engine, side.message), rd(run_engine, side.counter)) == ("frame 5", 5)
    assert rd(run_engine, side.timestamp) > 0
    before = time.time()
    run_engine(bps.mv(dm.stream.bluesky.state, HandshakeState.READY, dm.stream.bluesky.counter, 2))
    ctx = ioc.pva_context(nt=False)
    try:
        posted = ctx.get(ioc.pv("Stream:Bluesky"))
    finally:
        ctx.close()
    assert (posted["state"], posted["counter"], posted["message"]) == ("ready", 2, "")
    assert posted["timestamp"] >= before


def test_plans_run_the_file_based_flow_to_a_done_job(ioc: Ioc, run_engine: RunEngine, ctx: Any,
                                                     tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """apsdm_ophyd's plans take the ophyd-async gateway: the same flow as with the ophyd one."""
    with init_devices():
        gateway = DMGateway(ioc.prefix, pva_context=ctx)
    check_file_based_flow(run_engine, gateway, ioc.dm_client(), tmp_path, caplog)


def test_plans_report_a_failed_job_with_the_ophyd_async_gateway(
        ioc: Ioc, run_engine: RunEngine, ctx: Any, tmp_path: Path) -> None:
    """A failed job and a refused start end as with the ophyd gateway: WorkflowFailed, its reason."""
    with init_devices():
        gateway = DMGateway(ioc.prefix, pva_context=ctx)
    experiment = new_user(ioc.dm_client(), gateway, run_engine, failing_workflow())
    with pytest.raises(WorkflowFailed, match=r"always-fails job \S+ failed at stage 02-FAIL"):
        run_engine(file_collection_plan(gateway, [file_detector(tmp_path)], 1, "always-fails",
                                        expected_files=0, **FAST))
    assert rd(run_engine, gateway.workflow(1).job_status) == "failed"
    assert experiment == rd(run_engine, gateway.experiment.experiment_name)
