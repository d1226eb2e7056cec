"""Plan stubs for DM processing jobs: start one, follow it with progress, release its slot."""

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bluesky import plan_stubs as bps
from bluesky import preprocessors as bpp
from bluesky.utils import MsgGenerator
from ophyd.status import Status
from p4p.client.thread import RemoteError

from ..devices import NO_YES, DMWorkflow
from ..errors import WaitExpired, WorkflowFailed
from ..progress import DEFAULT_POLL_PERIOD, DEFAULT_TIMING, Progress, Timing, wait_until
from ..pva import TableSignal
from ..reports import JobReport, plain
from .io import READBACK_GRACE, Completion, release, write

__all__ = ["JOB_END_STATES", "JobHandle", "release_workflow", "start_workflow", "wait_workflow"]

log = logging.getLogger("apsdm_ophyd")

JOB_END_STATES = frozenset({"done", "failed", "timeout", "aborted"})


@dataclass
class JobHandle:
    """A job started by :func:`start_workflow`: its slot, the put Status and its id."""

    slot: DMWorkflow
    workflow: str
    started: Status | None
    previous_id: str
    job_id: str = ""


def start_workflow(wf: DMWorkflow, workflow: str, args: Mapping[str, Any] | None = None, *,
                   owner: str = "", wait_for_others: bool = False,
                   timeout: float = Timing.job_timeout,
                   poll_period: float = DEFAULT_POLL_PERIOD) -> MsgGenerator[JobHandle]:
    """Start a job and wait (in short waits) until DM has given it an id; returns its handle.

    With ``wait_for_others`` the id comes once no other job of the workflow runs. Raises
    WorkflowFailed with the IOC's reason if it refused the start.
    """
    previous = str((yield from bps.rd(wf.job_id, default_value="")))
    yield from write(wf, workflow_name=workflow, owner=owner,
                     args=json.dumps(plain(dict(args or {})), default=str),
                     wait_for_others=NO_YES[wait_for_others])
    handle = JobHandle(wf, workflow, None, previous)
    handle.started = yield from bps.abs_set(Completion(wf.start_job), 1)  # done when the job ends
    yield from bps.checkpoint()  # a rewind after a pause must not start it twice
    log.info("%s: starting workflow %s with %s", wf.name, workflow, dict(args or {}))

    def has_id() -> MsgGenerator[bool]:
        handle.job_id = str((yield from bps.rd(wf.job_id, default_value="simulated")))
        return handle.job_id not in ("", previous) or _ended(handle)

    def give_up(exc: Exception) -> MsgGenerator[None]:  # e.g. stopped while waiting for others
        yield from release(wf.start_job, handle.started, f"start of {workflow} interrupted")

    yield from bpp.contingency_wrapper(
        wait_until(has_id, timeout=timeout, poll_period=poll_period,
                   what=f"{wf.name}: start of {workflow}"), except_plan=give_up)
    if handle.job_id in ("", previous):
        why = yield from bps.rd(wf.message, default_value="")
        raise WorkflowFailed(f"workflow {workflow} not started: {why}")
    return handle


def _ended(handle: JobHandle) -> bool:
    """The Start put has completed: the job ended (or the start was refused)."""
    return handle.started is None or handle.started.done


def wait_workflow(handle: JobHandle, stages: TableSignal | None = None, *,
                  timing: Timing = DEFAULT_TIMING, concise: bool = True,
                  report: bool = True) -> MsgGenerator[JobReport]:
    """Follow the job until it ends, reporting every ``timing.reporting_period`` s.

    Progress (``StagesDone_RBV`` of ``StagesTotal_RBV``) goes to ``Status.watch()``;
    reports are printed (``report``: one line, or with ``concise=False`` every stage) and
    logged. After ``timing.job_timeout`` s the slot is released and the status is
    ``timeout``; the job goes on in DM.
    """
    wf = handle.slot
    progress = Progress(f"{wf.name} stages", 0, "stages")
    last = time.monotonic()

    def ended() -> MsgGenerator[bool]:
        nonlocal last
        done = yield from bps.rd(wf.stages_done, default_value=1)
        total = yield from bps.rd(wf.stages_total, default_value=1)
        progress.update(float(done), float(total))
        if _ended(handle):
            return True
        if time.monotonic() - last >= timing.reporting_period:
            last = time.monotonic()
            line = yield from _job_line(wf)
            log.info(line)
            if report:
                print(line)
        return False

    status = None
    try:
        yield from wait_until(ended, timeout=timing.job_timeout, poll_period=timing.poll_period,
                              what=f"{wf.name}: job {handle.job_id[:8]}", progress=progress)
    except WaitExpired:
        yield from release(wf.start_job, handle.started, f"followed for {timing.job_timeout:g} s")
        status = "timeout"
    else:
        yield from _settle(wf)
    job = yield from _job_report(handle, stages, status)
    _report(wf, job, report, concise)
    return job


def release_workflow(handle: JobHandle | None, why: str) -> MsgGenerator[None]:
    """Free the job's slot if the plan still waits on it (for stop/abort clean-up)."""
    if handle is not None:
        yield from release(handle.slot.start_job, handle.started, why)


def _settle(wf: DMWorkflow) -> MsgGenerator[None]:
    """Give the readbacks a moment to show the job's final status after the put completed."""

    def final() -> MsgGenerator[bool]:
        status = yield from bps.rd(wf.job_status, default_value="done")
        return status in JOB_END_STATES

    try:
        yield from wait_until(final, timeout=READBACK_GRACE, poll_period=0.1,
                              what=f"{wf.name}: final job status")
    except WaitExpired:
        log.warning("%s: the job's final status has not been read back", wf.name)


def _job_line(wf: DMWorkflow) -> MsgGenerator[str]:
    """One progress line from the slot's readbacks."""
    job_id = yield from bps.rd(wf.job_id, default_value="")
    status = yield from bps.rd(wf.job_status, default_value="")
    stage = yield from bps.rd(wf.current_stage, default_value="")
    run_time = yield from bps.rd(wf.run_time)
    done = yield from bps.rd(wf.stages_done)
    total = yield from bps.rd(wf.stages_total)
    return (f"{wf.name}: job {str(job_id)[:8]} {status}, stage {stage} ({done}/{total}), "
            f"{float(run_time):.1f} s")


def _job_report(handle: JobHandle, stages: TableSignal | None,
                status: str | None) -> MsgGenerator[JobReport]:
    """The job as the slot's readbacks (and its stages table, where PVA answers) show it."""
    wf = handle.slot
    rows: list[dict[str, Any]] = []
    if stages is not None:
        try:
            rows = plain((yield from bps.rd(stages, default_value=[])))
        except (TimeoutError, RemoteError) as exc:
            log.warning("%s: stages table not read over PVA: %s", wf.name, exc)
    return JobReport(
        handle.workflow, handle.job_id,
        status or str((yield from bps.rd(wf.job_status, default_value="done"))),
        str((yield from bps.rd(wf.current_stage, default_value=""))),
        float((yield from bps.rd(wf.run_time))),
        str((yield from bps.rd(wf.message, default_value=""))), rows)


def _report(wf: DMWorkflow, job: JobReport, printed: bool, concise: bool) -> None:
    """Log the job's end with every stage; print one line (or every stage) if asked."""
    log.info("%s: %s", wf.name, job.describe())
    for line in job.stage_lines():
        log.info(line)
    if printed:
        print("\n".join([f"{wf.name}: {job.describe()}", *([] if concise else job.stage_lines())]))
