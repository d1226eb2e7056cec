"""A preprocessor-style wrapper that puts a DM workflow around any plan that opens a run.

Before the plan: the pre-flight checks (and, with ``start_first``, the job's start). In
the run: ``data_management`` in the start document; at its end, before ``close_run``:
the wait for the DAQ's copies, the job (started now unless it already runs), a ``dm``
event stream with the job's outcome, the metadata shared with DM's catalog, and the stop
document's ``exit_status``/``reason``. Stop or abort releases the job's slot; a run ended
early (abort, stop, an error) shares its metadata too, marked with how it ended.
"""

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bluesky import plan_stubs as bps
from bluesky import preprocessors as bpp
from bluesky.utils import Msg, MsgGenerator, RequestAbort, RequestStop, single_gen

from .devices import DMGateway
from .errors import GatewayError, WorkflowFailed
from .preflight import preflight
from .progress import DEFAULT_TIMING, Timing
from .pva import PvaChannels
from .reports import DMRecord, JobReport, RunReport
from .stubs import (
    DaqBaseline,
    JobHandle,
    daq_baseline,
    release_workflow,
    run_metadata,
    share_metadata,
    start_workflow,
    wait_daq_files,
    wait_workflow,
)

__all__ = ["WorkflowRequest", "dm_workflow_wrapper"]

log = logging.getLogger("apsdm_ophyd")

#: How a run that ended early is marked in the metadata shared with DM (else: ``fail``).
_EXIT_STATUS: dict[type[BaseException], str] = {RequestAbort: "abort", RequestStop: "stop"}


@dataclass(frozen=True)
class WorkflowRequest:
    """The job to run: workflow name, its arguments, owner (blank: DM user) and slot."""

    workflow: str
    args: Mapping[str, Any] = field(default_factory=dict)
    owner: str = ""
    slot: int = 1
    wait_for_others: bool = False


@dataclass
class _Run:
    """What the wrapper learns while the plan runs."""

    dm: dict[str, Any]
    handle: JobHandle | None = None
    job: JobReport | None = None
    dataset: str = ""
    failure: Exception | None = None
    opened: bool = False
    closing: bool = False
    shared: bool = False  # share_metadata was begun
    baseline: DaqBaseline | None = None
    start: dict[str, Any] = field(default_factory=dict)
    descriptors: list[dict[str, Any]] = field(default_factory=list)


def dm_workflow_wrapper(
    plan: MsgGenerator[Any], gateway: DMGateway, request: WorkflowRequest, *,
    start_first: bool = False, daq_slot: int | None = None, expected_files: int | None = None,
    detectors: Sequence[Any] = (), timing: Timing = DEFAULT_TIMING, raise_on_failure: bool = True,
    share: bool = True, report: bool = True, concise: bool = True,
    channels: PvaChannels | None = None,
    when_started: Callable[[JobHandle], MsgGenerator[None]] | None = None,
    job_results: Callable[[], MsgGenerator[Mapping[str, Any]]] | None = None,
) -> MsgGenerator[RunReport]:
    """Run ``plan`` with a DM workflow around its (first) run; returns a RunReport.

    ``start_first``: start the job before the run opens (streaming; ``when_started`` runs
    then), else after the plan's data (file-based). ``daq_slot``: wait for that DAQ to copy
    ``expected_files`` new files (None: all it has seen) first. A failed job closes the run
    with ``exit_status`` ``fail`` and raises WorkflowFailed if ``raise_on_failure``.
    ``job_results``: read once the job has ended; what it returns joins ``data_management``
    (the ``dm`` stream, the shared metadata) and the stop document's reason.
    """
    channels = channels or gateway.pva
    wf = gateway.workflow(request.slot)
    daq = gateway.daq(daq_slot) if daq_slot else None
    run = _Run({})

    def start() -> MsgGenerator[None]:
        run.handle = yield from start_workflow(
            wf, request.workflow, request.args, owner=request.owner,
            wait_for_others=request.wait_for_others, timeout=timing.job_timeout,
            poll_period=timing.poll_period)
        run.dm["job_id"] = run.handle.job_id

    def finish(close: Msg) -> MsgGenerator[Any]:
        run.closing = True
        kwargs = dict(close.kwargs)
        if kwargs.get("exit_status") in (None, "success"):
            try:
                yield from after_data()
            except (GatewayError, TimeoutError) as exc:
                run.failure = exc
                kwargs.update(exit_status="fail", reason=str(exc))
            else:
                kwargs.update(_stop_fields(run, raise_on_failure))
        return (yield close._replace(kwargs=kwargs))

    def after_data() -> MsgGenerator[None]:
        if daq is not None and run.baseline is not None:
            written = ", ".join(run.dm.get("detector_directories", []))
            hint = f"; the detectors write to {written}" if written else ""
            yield from wait_daq_files(daq, run.baseline, expected_files, timeout=timing.daq_timeout,
                                      poll_period=timing.poll_period, hint=hint)
        if run.handle is None:
            yield from start()
        assert run.handle is not None
        run.job = yield from wait_workflow(run.handle, channels.stages(request.slot),
                                           timing=timing, report=report, concise=concise)
        run.dm.update(job_status=run.job.status)
        if job_results is not None:
            run.dm.update((yield from job_results()))
        yield from bps.create("dm")
        yield from bps.read(DMRecord(run.job, run.dm))
        yield from bps.save()
        if share:
            yield from share_run()

    def share_run() -> MsgGenerator[None]:
        run.shared = True
        run.dataset = yield from share_metadata(
            gateway.metadata, run_metadata(run.start, run.descriptors, data_management=run.dm),
            timing, json_pva=channels.metadata_json)

    def on_error(exc: Exception) -> MsgGenerator[None]:
        """A run that ends early (abort, stop, an error) still has its metadata shared."""
        if not (share and run.opened) or run.shared:
            return
        run.dm.update(exit_status=_EXIT_STATUS.get(type(exc), "fail"),
                      reason=str(exc) or type(exc).__name__)
        try:
            yield from share_run()
        except GatewayError as failure:  # the run's own exception goes on; say this loudly
            log.error("metadata of the ended run not shared: %s", failure)
            print(f"metadata of the ended run not shared with DM: {failure}")

    def on_msg(msg: Msg) -> tuple[MsgGenerator[Any] | None, None]:
        if msg.command == "open_run" and not run.opened:
            run.opened = True
            md = {**msg.kwargs, "data_management": dict(run.dm)}  # a copy: run.dm grows later
            return single_gen(msg._replace(kwargs=md)), None
        if msg.command == "close_run" and run.opened and not run.closing:
            return finish(msg), None
        return None, None

    def body() -> MsgGenerator[Any]:
        run.dm.update((yield from preflight(
            gateway, channels.workflows, wf, workflow=request.workflow, args=request.args,
            owner=request.owner, daq=daq, detectors=detectors)))
        run.baseline = (yield from daq_baseline(daq)) if daq is not None else None
        if start_first:
            yield from start()
            if when_started is not None:
                assert run.handle is not None
                yield from when_started(run.handle)
        subs = {"start": [lambda _n, doc: run.start.update(doc)],
                "descriptor": [lambda _n, doc: run.descriptors.append(doc)]}
        return (yield from bpp.subs_wrapper(bpp.plan_mutator(plan, on_msg), subs))

    def cleanup() -> MsgGenerator[None]:  # reads run.handle when it runs, not before
        yield from release_workflow(run.handle, "the plan ended first")

    yield from bpp.contingency_wrapper(body(), except_plan=on_error, final_plan=cleanup)
    if run.failure is not None:
        raise run.failure
    if run.job is None:
        raise GatewayError("the wrapped plan opened no run (or its run failed): no DM workflow ran")
    result = RunReport(str(run.start.get("uid", "")), run.job, run.dataset,
                       data_management=dict(run.dm))
    if report and run.dataset:
        print(f"run {result.run_uid[:8]}: metadata in DM dataset {run.dataset}")
    return result


def _stop_fields(run: _Run, raise_on_failure: bool) -> dict[str, str]:
    """The stop document's exit_status/reason for the job's outcome."""
    job = run.job
    assert job is not None
    if job.ok:
        results = run.dm.get("stream_summary")
        return {"reason": f"DM {job.describe()}" + (f"; stream: {results}" if results else "")}
    if raise_on_failure and job.status != "timeout":
        run.failure = WorkflowFailed(job.describe())
        return {"exit_status": "fail", "reason": job.describe()}
    log.error("%s (continuing: raise_on_failure=False)", job.describe())
    return {"reason": job.describe()}
