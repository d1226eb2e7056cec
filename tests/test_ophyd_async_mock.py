"""The ophyd-async devices in ophyd-async's mock mode: plans can be written and tested with
no IOC, the mock standing in for the IOC's side of a busy command."""

from typing import Any

import bluesky.plan_stubs as bps
import bluesky.plans as bp
import pytest
from bluesky import RunEngine
from bluesky.utils import FailedStatus
from ophyd_async.core import callback_on_mock_put, get_mock_put, init_devices, set_mock_value
from p4p.client.asyncio import RemoteError

from apsdm_ophyd.async_devices import (
    CommandFailed,
    DMGateway,
    HandshakeState,
    JobsTable,
    StartCommand,
)


@pytest.fixture
def run_engine() -> RunEngine:
    return RunEngine(call_returns_result=True)


@pytest.fixture
def dm(run_engine: RunEngine) -> DMGateway:
    with init_devices(mock=True):
        dm = DMGateway("MOCK:", n_daq=1, n_upload=1, n_workflow=1)
    return dm


def test_a_job_runs_on_the_mock(run_engine: RunEngine, dm: DMGateway) -> None:
    wf = dm.workflow[1]

    def job_ends(value: StartCommand) -> StartCommand:
        """The IOC's side: the job runs, ends, and the busy record returns to Done."""
        set_mock_value(wf.job_id, "job-1")
        set_mock_value(wf.job_status, "done")
        set_mock_value(dm.jobs, JobsTable(id=["job-1"], workflow=["wf"], owner=["dm"],
                                          status=["done"], stage=["01"], runTime=[0.5],
                                          submitted=[""], errorMessage=[""]))
        return StartCommand.DONE

    callback_on_mock_put(wf.start_job.busy, job_ends)
    set_mock_value(dm.stream.workflow.state, HandshakeState.ACQUIRING)
    events: list[dict[str, Any]] = []

    def flow() -> Any:
        yield from bps.mv(dm.experiment.experiment_name, "exp-1")
        yield from bps.mv(wf.workflow_name, "wf", wf.args, '{"value": "42"}')
        yield from bps.abs_set(wf.start_job, StartCommand.START, wait=True)
        yield from bp.count([wf, dm.stream, dm.experiment])
        return (yield from bps.rd(dm.jobs))

    jobs = run_engine(flow(), lambda name, doc: events.append(doc) if name == "event" else None
                      ).plan_result
    get_mock_put(wf.start_job.busy).assert_called_once_with(StartCommand.START)
    assert list(jobs.status) == ["done"]
    [event] = events
    assert event["data"][wf.job_status.name] == "done"
    assert event["data"][dm.stream.workflow.state.name] == HandshakeState.ACQUIRING
    assert event["data"][dm.experiment.experiment_name.name] == "exp-1"


def test_a_refused_command_fails_the_plan(run_engine: RunEngine, dm: DMGateway) -> None:
    def refuse(value: StartCommand) -> None:
        raise RemoteError("no DM experiment selected")

    callback_on_mock_put(dm.upload[1].start_upload.busy, refuse)
    with pytest.raises(FailedStatus) as refused:
        run_engine(bps.abs_set(dm.upload[1].start_upload, StartCommand.START, wait=True))
    assert isinstance(refused.value.__cause__, CommandFailed)
    assert "no DM experiment selected" in str(refused.value.__cause__)
