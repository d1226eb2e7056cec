"""The plans without an IOC: plan simulation shows every PV they touch, and the ophyd
package's check of job arguments agrees with the IOC's own (``WFn:Args``)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from bluesky import RunEngine
from bluesky import plan_stubs as bps
from bluesky.simulators import summarize_plan
from bluesky.utils import ProgressBarManager
from ophyd import Signal
from ophyd.signal import ReadTimeoutError
from ophyd.sim import SynSignalWithRegistry

from apsdm.gateway.commands import job_args
from apsdm.gateway.hub import PutRejected
from apsdm_ophyd import (
    DMGateway,
    JobReport,
    Progress,
    RunReport,
    WaitExpired,
    check_job_args,
    file_collection_plan,
    streaming_collection_plan,
)
from apsdm_ophyd.preflight import RESERVED_JOB_KEYS
from apsdm_ophyd.progress import wait_until

ARG_CASES: list[Any] = [
    {}, {"a": 1}, {"filePath": "/x/y"}, {"n": 2.5}, {"_x9": "s"}, {"filePathList": ["a", "b"]},
    {"filePathList": ["a", 3]}, {"other": ["a"]}, {"id": "1"}, {"owner": "me"},
    {"status": "x"}, {"runTime": 1}, {"9lives": 1}, {"a-b": 1}, {"a b": 1}, {"": 1},
    {"nested": {"a": 1}}, {"nul": "a\0b"}, {"none": None}, {"yes": True}, {"é": 1},
    [1, 2], "text", 3,
]


@pytest.mark.parametrize("args", ARG_CASES, ids=lambda a: json.dumps(a, ensure_ascii=False))
def test_job_argument_rules_agree_with_the_ioc(args: Any) -> None:
    try:
        job_args("WF1:Args", json.dumps(args))
        ioc_takes = True
    except PutRejected:
        ioc_takes = False
    assert (check_job_args(args) == []) is ioc_takes


def test_reserved_job_fields_are_the_iocs() -> None:
    from apsdm.dm.records import RESERVED_JOB_KEYS as IOC_RESERVED

    assert RESERVED_JOB_KEYS == IOC_RESERVED


def simulated(plan: Any, capsys: pytest.CaptureFixture[str]) -> str:
    summarize_plan(plan)
    return capsys.readouterr().out


def test_plan_simulation_shows_every_pv_written(capsys: pytest.CaptureFixture[str]) -> None:
    gateway = DMGateway("SIM:", name="dm")
    det = SynSignalWithRegistry(func=lambda: np.zeros((2, 2)), name="image", save_path="/data")
    out = simulated(file_collection_plan(gateway, [det], 2, "wf", workflow_args={"q": 1}),
                    capsys)
    for line in ["dm_wf1_workflow_name -> wf", '"q": 1', "dm_wf1_start_job -> 1",
                 "Read ['dm']", "dm_metadata_upload -> 1"]:
        assert line in out
    assert out.index("Open Run") < out.index("dm_wf1_start_job") < out.index("Close Run")
    out = simulated(streaming_collection_plan(gateway, [det], 2, "wf"), capsys)
    assert out.index("dm_wf1_start_job -> 1") < out.index("Open Run")
    assert "dm_stream_bluesky -> StreamState(state='done', message='frame 2 of 2'" in out


def test_run_report_is_json_able() -> None:
    job = JobReport("wf", "j1", "done", "02", np.float64(1.5), "", [{"exitStatus": np.int32(0)}])
    report = RunReport("uid", job, "run_uid8_uid", data_management={"n": np.int64(3)})
    assert json.loads(json.dumps(report.to_dict()))["job"]["stages"][0]["exitStatus"] == 0


def test_waits_show_and_close_progress_bars(recwarn: pytest.WarningsRecorder) -> None:
    progress = Progress("demo stages", 3, "stages")
    checks = iter([0, 1, 2, 3])

    def check() -> Any:
        yield from bps.null()
        progress.update(next(checks), 3)
        return progress.current >= 3

    RE = RunEngine({})
    RE.waiting_hook = ProgressBarManager()
    RE(wait_until(check, timeout=5, poll_period=0.05, what="demo", progress=progress))
    assert progress.done and progress.success
    assert not [w for w in recwarn if "ProgressBar" in str(w.message)]
    with pytest.raises(TimeoutError, match=r"demo: not done after 0\.1 s"):
        RE(wait_until(_never, timeout=0.1, poll_period=0.05, what="demo"))


def _never() -> Any:
    yield from bps.null()
    return False


class _Unanswered(Signal):
    """A readback whose first ``misses`` reads time out as ophyd's do on a loaded IOC."""

    def __init__(self, misses: int, **kwargs: Any) -> None:
        super().__init__(value="done", **kwargs)
        self.misses = misses

    def read(self) -> dict[str, dict[str, Any]]:
        if self.misses > 0:
            self.misses -= 1
            raise ReadTimeoutError(f"{self.name}: no answer")
        return super().read()


@pytest.mark.parametrize("misses", [2, 1000])
def test_a_read_that_times_out_is_not_the_waits_timeout(
        misses: int, caplog: pytest.LogCaptureFixture) -> None:
    """A readback that does not answer for a while does not end a wait (the workflow wait
    took it for the job's own timeout and released the slot); the wait's timeout still holds."""
    signal = _Unanswered(misses, name="status")

    def ended() -> Any:
        return (yield from bps.rd(signal)) == "done"

    RE = RunEngine({})
    if misses < 10:
        RE(wait_until(ended, timeout=5, poll_period=0.01, what="job"))
        assert signal.misses == 0
    else:
        with pytest.raises(WaitExpired, match=r"job: not done after 0\.1 s"):
            RE(wait_until(ended, timeout=0.1, poll_period=0.01, what="job"))
    warned = [r for r in caplog.records if "did not answer" in r.message]
    assert len(warned) == 1 and warned[0].levelname == "WARNING"  # once per wait


def test_reading_the_experiment_says_which_it_is() -> None:
    assert {"experiment_name", "valid"} <= set(DMGateway("X:", name="dm").experiment.read_attrs)


def test_the_bluesky_extra_has_what_best_effort_callback_needs(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """BestEffortCallback plots a run with what ``[bluesky]`` installs (matplotlib)."""
    monkeypatch.setenv("MPLBACKEND", "Agg")  # no display on a test machine
    import matplotlib.pyplot as plt
    from bluesky import plans as bp
    from bluesky.callbacks.best_effort import BestEffortCallback
    from ophyd.sim import det, motor

    RE = RunEngine({})
    RE.subscribe(BestEffortCallback())
    RE(bp.scan([det], motor, -1, 1, 3))
    assert plt.get_fignums(), "BestEffortCallback drew no plot"
    plt.close("all")
