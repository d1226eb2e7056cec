"""Bluesky plans that drive APS Data Management through the gateway, like hardware.

``setup_user`` selects the DM experiment, reuses or starts a DAQ and uploads a file;
``file_collection_plan`` collects files, waits for the DAQ to copy them, runs a workflow
and shares the run metadata; ``streaming_collection_plan`` starts the workflow first and
runs the ``Stream:Bluesky``/``Stream:Workflow`` handshake around the collection.
Every wait is a ``bps.sleep`` loop, so the RunEngine stays responsive (pause, Ctrl-C).
"""

from __future__ import annotations

import contextlib
import json
import logging
import posixpath
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from bluesky import plan_stubs as bps
from bluesky import plans as bp
from bluesky import preprocessors as bpp
from bluesky.utils import MsgGenerator
from ophyd import Device, EpicsSignal
from ophyd.status import Status
from p4p.client.thread import Context, RemoteError

from . import pva
from .devices import NO_YES, UPLOAD_MODES, DMDaq, DMExperiment, DMGateway, DMUpload, DMWorkflow

__all__ = ["GatewayError", "JobReport", "RunReport", "UserSetup", "WorkflowFailed",
           "file_collection_plan", "follow_job", "select_experiment", "setup_user",
           "share_run_metadata", "start_daq", "streaming_collection_plan", "upload",
           "wait_for_daq"]

log = logging.getLogger(__name__)

#: Seconds readbacks may take to show the outcome of a completed put.
READBACK_GRACE = 2.0
#: Run-metadata keys left out of what is shared with DM's catalog (bulky, not searchable).
UNSHARED_KEYS = frozenset({"plan_args", "hints"})
YES = NO_YES[1]
JOB_END_STATES = frozenset({"done", "failed", "timeout", "aborted"})


class GatewayError(RuntimeError):
    """The gateway refused a command or it did not do what was asked; the text says why."""


class WorkflowFailed(GatewayError):
    """A processing job did not start or ended in a state other than ``done``."""


@dataclass(frozen=True)
class UserSetup:
    """What ``setup_user`` selected and started (blank ids: nothing was asked for)."""

    experiment: str
    daq_id: str = ""
    upload_id: str = ""


@dataclass(frozen=True)
class JobReport:
    """How a processing job ended, with its stages table (rows of ``WFn:Stages``)."""

    workflow: str
    job_id: str
    status: str
    stage: str
    run_time: float
    message: str
    stages: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """The job ended ``done``."""
        return self.status == "done"

    def describe(self) -> str:
        """One line for logs and exceptions: workflow, job, status, stage, time and message."""
        return (f"workflow {self.workflow} job {self.job_id or '(none)'} {self.status or 'unknown'}"
                f" at stage {self.stage or '-'} after {self.run_time:.1f} s: {self.message}")


@dataclass(frozen=True)
class RunReport:
    """The outcome of a collection plan: the bluesky run, the job and the catalog entry."""

    run_uid: str
    job: JobReport
    dataset: str = ""
    workflow_stream: pva.StreamState | None = None


# --- small plan stubs shared by the plans -------------------------------------------------


def _poll(condition: Callable[[], MsgGenerator[bool]], timeout: float,
          period: float) -> MsgGenerator[bool]:
    """Re-check ``condition`` every ``period`` s until it holds (True) or ``timeout`` (False)."""
    deadline = time.monotonic() + timeout
    while not (yield from condition()):
        if time.monotonic() >= deadline:
            return False
        yield from bps.sleep(period)
    return True


def _refusal(device: Device) -> MsgGenerator[str | None]:
    """The device's ``Message_RBV`` if it carries an alarm (the IOC refused something)."""
    text = yield from bps.rd(device.message)  # a fresh read, which also updates the alarm
    return (str(text) or "no reason given") if device.message.alarm_severity else None


def _write(device: Device, **settings: Any) -> MsgGenerator[None]:
    """Write settings in order (each put completes when the IOC has it); raise if not taken.

    The IOC may normalize a path (``a/b/`` reads back as ``a/b``); any other difference
    means the write was refused (the reason is in ``Message_RBV``) or lost on the way.
    """
    for attr, value in settings.items():
        signal: EpicsSignal = getattr(device, attr)
        yield from bps.abs_set(signal, value, wait=True)
        actual = yield from bps.rd(signal)
        if actual == value or (isinstance(value, str) and value
                               and actual == posixpath.normpath(value)):
            continue
        why = yield from _refusal(device)
        raise GatewayError(f"{signal.setpoint_pvname} = {value!r} "
                           + (f"refused: {why}" if why else f"not taken (reads {actual!r})"))


def _expect(device: Device, condition: Callable[[], MsgGenerator[bool]],
            failure: str) -> MsgGenerator[None]:
    """After a completed command, wait briefly for ``condition``; else raise with the reason."""
    if not (yield from _poll(condition, READBACK_GRACE, 0.1)):
        why = (yield from _refusal(device)) or (yield from bps.rd(device.message))
        raise GatewayError(f"{failure}: {why or 'no reason given'}")


@contextlib.contextmanager
def _pva_context(ctx: Context | None) -> Iterator[Context]:
    """The caller's p4p context, or a new one (from the EPICS_PVA_* environment) closed after."""
    if ctx is not None:
        yield ctx
        return
    own = Context("pva")
    try:
        yield own
    finally:
        own.close()


# --- setup_user ---------------------------------------------------------------------------


def select_experiment(experiment: DMExperiment, name: str) -> MsgGenerator[None]:
    """Select the DM experiment by name; raise GatewayError at once if DM does not know it."""
    yield from _write(experiment, experiment_name=name)

    def selected() -> MsgGenerator[bool]:
        valid = yield from bps.rd(experiment.valid)
        current = yield from bps.rd(experiment.experiment_name)
        return valid == YES and current == name

    yield from _expect(experiment, selected, f"DM experiment {name!r} not selected")


def start_daq(daq: DMDaq, data_directory: str, dest_directory: str = "") -> MsgGenerator[str]:
    """Reuse the active DAQ on this experiment and tree, or start one; returns its id."""
    yield from _write(daq, data_directory=data_directory, dest_directory=dest_directory)
    yield from bps.mv(daq.start_daq, 1)

    def running() -> MsgGenerator[bool]:
        active = yield from bps.rd(daq.active)
        refused = yield from _refusal(daq)
        return active == YES and refused is None

    yield from _expect(daq, running, f"{daq.name}: no DAQ is running on {data_directory}")
    return str((yield from bps.rd(daq.daq_id)))


def upload(slot: DMUpload, path: str, dest_directory: str = "") -> MsgGenerator[str]:
    """Upload a file (or a directory tree, in one transfer); returns the upload id when done."""
    mode = UPLOAD_MODES[Path(path).is_dir()]
    before = yield from bps.rd(slot.upload_id)
    yield from _write(slot, path=path, dest_directory=dest_directory, mode=mode)
    yield from bps.mv(slot.start_upload, 1)  # completes when the upload has ended

    def uploaded() -> MsgGenerator[bool]:
        upload_id = yield from bps.rd(slot.upload_id)
        status = yield from bps.rd(slot.upload_status)
        return upload_id not in ("", before) and status == "done"

    yield from _expect(slot, uploaded, f"{slot.name}: upload of {path} failed")
    return str((yield from bps.rd(slot.upload_id)))


def setup_user(gateway: DMGateway, dm_experiment_name: str, data_directory: str | None = None,
               daq_dest: str = "", upload_file: str | None = None, upload_dest: str = "",
               daq_slot: int = 1, upload_slot: int = 1) -> MsgGenerator[UserSetup]:
    """Prepare DM for a user: select the experiment, reuse or start a DAQ, upload a file.

    The IOC remembers the experiment (across restarts too), so later plans need no name.
    A DAQ is started only when ``data_directory`` is given (``daq_dest``: experiment
    subdirectory); an upload only when ``upload_file`` is. Raises GatewayError with the
    gateway's reason when DM refuses any step.
    """
    yield from select_experiment(gateway.experiment, dm_experiment_name)
    log.info("DM experiment %s selected", dm_experiment_name)
    daq_id = upload_id = ""
    if data_directory is not None:
        daq_id = yield from start_daq(gateway.daq(daq_slot), str(data_directory), daq_dest)
        log.info("DAQ %s copies %s into %s/%s", daq_id, data_directory, dm_experiment_name,
                 daq_dest)
    if upload_file is not None:
        upload_id = yield from upload(gateway.upload(upload_slot), str(upload_file), upload_dest)
        log.info("uploaded %s into %s/%s (%s)", upload_file, dm_experiment_name, upload_dest,
                 upload_id)
    return UserSetup(dm_experiment_name, daq_id, upload_id)


# --- workflows ----------------------------------------------------------------------------


def _start_job(wf: DMWorkflow, workflow_name: str, args: Mapping[str, Any], owner: str,
               wait_for_others: bool) -> MsgGenerator[tuple[Status, str]]:
    """Start a job without waiting for it; returns the put status and the previous job id."""
    previous = yield from bps.rd(wf.job_id)
    yield from _write(wf, workflow_name=workflow_name, owner=owner,
                      args=json.dumps(dict(args), default=str),
                      wait_for_others=NO_YES[wait_for_others])
    started = yield from bps.abs_set(wf.start_job, 1)  # completes when the job has ended
    log.info("%s: starting workflow %s with %s", wf.name, workflow_name, dict(args))
    return started, str(previous)


def _job_line(wf: DMWorkflow) -> MsgGenerator[str]:
    """One progress line from the slot's readbacks."""
    job_id = yield from bps.rd(wf.job_id)
    status = yield from bps.rd(wf.job_status)
    stage = yield from bps.rd(wf.current_stage)
    run_time = yield from bps.rd(wf.run_time)
    done = yield from bps.rd(wf.stages_done)
    total = yield from bps.rd(wf.stages_total)
    return (f"{wf.name}: job {str(job_id)[:8]} {status}, stage {stage} ({done}/{total}), "
            f"{float(run_time):.1f} s")


def follow_job(wf: DMWorkflow, workflow_name: str, started: Status, previous_job_id: str,
               ctx: Context, reporting_period: float = 10.0, poll_period: float = 0.5,
               timeout: float | None = None) -> MsgGenerator[JobReport]:
    """Report a running job every ``reporting_period`` s until it ends; returns how it ended.

    ``timeout`` only stops the reporting (status ``timeout``); the job itself goes on.
    """
    begin = last = time.monotonic()
    while not started.done:
        if timeout is not None and time.monotonic() - begin >= timeout:
            log.warning("%s: stopped following %s after %g s; the job goes on in DM",
                        wf.name, workflow_name, timeout)
            break
        if time.monotonic() - last >= reporting_period:
            log.info((yield from _job_line(wf)))
            last = time.monotonic()
        yield from bps.sleep(poll_period)

    def ended() -> MsgGenerator[bool]:
        job_id = yield from bps.rd(wf.job_id)
        status = yield from bps.rd(wf.job_status)
        return job_id in ("", previous_job_id) or status in JOB_END_STATES

    if started.done:
        yield from _poll(ended, READBACK_GRACE, 0.1)
    job_id = str((yield from bps.rd(wf.job_id)))
    if job_id in ("", previous_job_id):  # the IOC refused the start: no new job
        return JobReport(workflow_name, "", "not started", "", 0.0,
                         str((yield from bps.rd(wf.message))))
    status = str((yield from bps.rd(wf.job_status)))
    report = JobReport(workflow_name, job_id, status if started.done else "timeout",
                       str((yield from bps.rd(wf.current_stage))),
                       float((yield from bps.rd(wf.run_time))),
                       str((yield from bps.rd(wf.message))), _stages(ctx, wf))
    log.info("%s: %s", wf.name, report.describe())
    for row in report.stages:
        log.info("  stage %s child %s %s exit %s %.1f s: %s", row["stage"], row["child"],
                 row["status"], row["exitStatus"], row["runTime"], row["command"])
    return report


def _stages(ctx: Context, wf: DMWorkflow) -> list[dict[str, Any]]:
    """The slot's stages table over PVA; empty (with a warning) where PVA is unreachable."""
    try:
        return pva.read_table(ctx, f"{wf.prefix}Stages")
    except (TimeoutError, RemoteError) as exc:
        log.warning("%s: stages table not read over PVA: %s", wf.name, exc)
        return []


def _conclude(job: JobReport, raise_on_failure: bool) -> None:
    """Raise WorkflowFailed for a failed job, or only log it, as the caller chose."""
    if job.ok or job.status == "timeout":
        return
    if raise_on_failure:
        raise WorkflowFailed(job.describe())
    log.error("%s (continuing: raise_on_failure=False)", job.describe())


# --- run metadata -------------------------------------------------------------------------


def share_run_metadata(gateway: DMGateway, start_doc: Mapping[str, Any],
                       job: JobReport | None = None) -> MsgGenerator[str]:
    """Add a run's start metadata to DM's dataset catalog; returns the dataset name.

    A refusal is logged, not raised: the data are safe and the catalog entry can be
    added later. The dataset name follows apstools: ``run_uid8_<first 8 of the uid>``.
    """
    uid = str(start_doc["uid"])
    info = {key: value for key, value in start_doc.items() if key not in UNSHARED_KEYS}
    info.update(datasetName=f"run_uid8_{uid[:8]}", bluesky_run_uid=uid,
                time_iso8601=datetime.fromtimestamp(float(start_doc["time"])).isoformat())
    if job is not None:
        info.update(workflow_name=job.workflow, dm_job_id=job.job_id, dm_job_status=job.status)
    metadata = gateway.metadata
    try:
        yield from _write(metadata, json=json.dumps(info, default=str))
        yield from bps.mv(metadata.upload, 1)
        yield from _expect(metadata, lambda: _has_no_refusal(metadata), "metadata not shared")
    except GatewayError as exc:
        log.error("run %s: %s", uid, exc)
        return ""
    return str((yield from bps.rd(metadata.dataset_name)))


def _has_no_refusal(device: Device) -> MsgGenerator[bool]:
    """True when the device's ``Message_RBV`` carries no alarm."""
    return (yield from _refusal(device)) is None


# --- collection ---------------------------------------------------------------------------


def _collect(detectors: Sequence[Any], num: int, md: Mapping[str, Any],
             per_shot: Callable[..., MsgGenerator[Any]] | None = None
             ) -> MsgGenerator[dict[str, Any]]:
    """A ``count`` of the detectors; returns the run's start document."""
    start: dict[str, Any] = {}

    def keep_start(name: str, doc: dict[str, Any]) -> None:
        start.update(doc)

    yield from bpp.subs_wrapper(bp.count(list(detectors), num=num, md=dict(md),
                                         per_shot=per_shot), {"start": [keep_start]})
    return start


def _dm_md(gateway: DMGateway, workflow_name: str,
           md: Mapping[str, Any] | None) -> MsgGenerator[dict[str, Any]]:
    """Run metadata naming the DM experiment and workflow, plus the caller's ``md``."""
    experiment = yield from bps.rd(gateway.experiment.experiment_name)
    if not experiment:
        raise GatewayError("no DM experiment selected: run setup_user first")
    return {"dm_experiment": experiment, "dm_workflow": workflow_name, **(md or {})}


def wait_for_daq(daq: DMDaq, n_files: int, baseline: int, timeout: float,
                 reporting_period: float = 10.0, poll_period: float = 0.5) -> MsgGenerator[int]:
    """Wait until the DAQ has copied ``n_files`` files past ``baseline`` (files it had seen).

    Raises GatewayError if the DAQ counts copy errors or stops, TimeoutError after
    ``timeout`` s; returns the DAQ's processed-file count.
    """
    target, begin, last = baseline + n_files, time.monotonic(), time.monotonic()
    errors_before = yield from bps.rd(daq.n_errors)
    while True:
        processed = int((yield from bps.rd(daq.n_processed)))
        if processed >= target:
            return processed
        if int((yield from bps.rd(daq.n_errors))) > errors_before:
            raise GatewayError(f"{daq.name}: DAQ failed to copy files: "
                               f"{(yield from bps.rd(daq.message))}")
        if (yield from bps.rd(daq.active)) != YES:
            raise GatewayError(f"{daq.name}: DAQ is not running: {(yield from bps.rd(daq.message))}")
        now = time.monotonic()
        if now - begin >= timeout:
            raise TimeoutError(f"{daq.name}: {processed - baseline} of {n_files} files copied "
                               f"after {timeout:g} s")
        if now - last >= reporting_period:
            log.info("%s: %d of %d files copied", daq.name, processed - baseline, n_files)
            last = now
        yield from bps.sleep(poll_period)


def file_collection_plan(
    gateway: DMGateway, detectors: Sequence[Any], num: int, workflow_name: str, *,
    workflow_args: Mapping[str, Any] | None = None, workflow_owner: str = "",
    expected_files: int | None = None, daq_slot: int = 1, wf_slot: int = 1,
    wait_for_others: bool = False, daq_timeout: float = 120.0, reporting_period: float = 10.0,
    poll_period: float = 0.5, timeout: float | None = None, raise_on_failure: bool = True,
    share_metadata: bool = True, md: Mapping[str, Any] | None = None,
    pva_context: Context | None = None,
) -> MsgGenerator[RunReport]:
    """Collect files, wait for the DAQ to copy them, then run a DM workflow on them.

    ``count``s the detectors ``num`` times (they write files into the DAQ's directory),
    waits until the DAQ of ``daq_slot`` has copied ``expected_files`` (default ``num``; 0:
    do not wait), optionally waits for other jobs of the workflow (``wait_for_others``),
    starts the workflow and reports it every ``reporting_period`` s without blocking the
    RunEngine, then shares the run metadata with DM's catalog. The job gets
    ``experimentName`` and ``dataDir`` (where the DAQ copies to) before ``workflow_args``.
    ``raise_on_failure``: a failed job raises WorkflowFailed (True) or is logged as an
    error and the plan returns normally (False); either way the metadata is shared first.
    """
    daq, wf = gateway.daq(daq_slot), gateway.workflow(wf_slot)
    run_md = yield from _dm_md(gateway, workflow_name, md)
    expected = num if expected_files is None else expected_files
    if expected and (yield from bps.rd(daq.active)) != YES:
        raise GatewayError(f"{daq.name}: no DAQ is running: run setup_user with a data_directory")
    baseline = int((yield from bps.rd(daq.n_files)))
    copies_to = yield from bps.rd(gateway.experiment.data_directory)  # + the DAQ dest
    dest = yield from bps.rd(daq.dest_directory)
    run_md.update(dm_daq_id=(yield from bps.rd(daq.daq_id)),
                  dm_data_directory=(yield from bps.rd(daq.data_directory)))
    start_doc = yield from _collect(detectors, num, run_md)
    if expected:
        yield from wait_for_daq(daq, expected, baseline, daq_timeout, reporting_period,
                                poll_period)
    args = {"experimentName": run_md["dm_experiment"],
            **({"dataDir": posixpath.normpath(posixpath.join(copies_to, dest))}
               if copies_to else {}),
            **(workflow_args or {})}
    with _pva_context(pva_context) as ctx:
        started, previous = yield from _start_job(wf, workflow_name, args, workflow_owner,
                                                  wait_for_others)
        job = yield from follow_job(wf, workflow_name, started, previous, ctx, reporting_period,
                                    poll_period, timeout)
    dataset = (yield from share_run_metadata(gateway, start_doc, job)) if share_metadata else ""
    _conclude(job, raise_on_failure)
    return RunReport(str(start_doc["uid"]), job, dataset)


def _wait_ready(ctx: Context, names: pva.StreamNames, before: pva.StreamState,
                started: Status, timeout: float, poll_period: float) -> MsgGenerator[bool]:
    """Wait for a new ``ready`` on Stream:Workflow; False on timeout or if the job ended."""

    def ready() -> MsgGenerator[bool]:
        current = pva.read(ctx, names.workflow)
        yield from bps.null()
        return started.done or (current.state == "ready"
                                and current.timestamp != before.timestamp)

    return (yield from _poll(ready, timeout, poll_period)) and not started.done


def streaming_collection_plan(
    gateway: DMGateway, detectors: Sequence[Any], num: int, workflow_name: str, *,
    workflow_args: Mapping[str, Any] | None = None, workflow_owner: str = "", wf_slot: int = 1,
    ready_timeout: float = 60.0, reporting_period: float = 10.0, poll_period: float = 0.2,
    timeout: float | None = None, raise_on_failure: bool = True, share_metadata: bool = True,
    md: Mapping[str, Any] | None = None, pva_context: Context | None = None,
) -> MsgGenerator[RunReport]:
    """Start a streaming workflow, wait until it is ready, collect while announcing frames.

    The job gets ``prefix``, ``blueskyPv``, ``workflowPv`` and ``experimentName`` before
    ``workflow_args``. Stream:Bluesky goes ``idle`` -> ``acquiring`` (counter: frames so
    far) -> ``done`` (or ``error`` if collection stops). A workflow that does not say
    ``ready`` within ``ready_timeout`` s, or ends first, raises WorkflowFailed; after the
    collection, ``raise_on_failure`` works as in :func:`file_collection_plan`.
    """
    wf = gateway.workflow(wf_slot)
    names = pva.StreamNames.for_prefix(gateway.prefix)
    run_md = yield from _dm_md(gateway, workflow_name, md)
    args = {"experimentName": run_md["dm_experiment"], "prefix": gateway.prefix,
            "blueskyPv": names.bluesky, "workflowPv": names.workflow, **(workflow_args or {})}
    with _pva_context(pva_context) as ctx:
        pva.post(ctx, names.bluesky, "idle", "waiting for the workflow")
        before = pva.read(ctx, names.workflow)
        started, previous = yield from _start_job(wf, workflow_name, args, workflow_owner, False)
        if not (yield from _wait_ready(ctx, names, before, started, ready_timeout, poll_period)):
            pva.post(ctx, names.bluesky, "error", "the workflow did not become ready")
            if not started.done:
                raise WorkflowFailed(f"workflow {workflow_name} did not become ready within "
                                     f"{ready_timeout:g} s (told to stop through {names.bluesky})")
            job = yield from follow_job(wf, workflow_name, started, previous, ctx)
            raise WorkflowFailed(f"{job.describe()} (it ended before it was ready)")
        frames = 0

        def announce(dets: Sequence[Any]) -> MsgGenerator[None]:
            nonlocal frames
            yield from bps.one_shot(dets)
            frames += 1
            pva.post(ctx, names.bluesky, "acquiring", f"frame {frames} of {num}", frames)

        pva.post(ctx, names.bluesky, "acquiring", f"collecting {num} frames", 0)
        try:
            start_doc = yield from _collect(detectors, num, run_md, per_shot=announce)
        except BaseException as exc:
            pva.post(ctx, names.bluesky, "error", f"collection stopped: {exc!r}", frames)
            raise
        pva.post(ctx, names.bluesky, "done", f"collected {frames} frames", frames)
        job = yield from follow_job(wf, workflow_name, started, previous, ctx, reporting_period,
                                    poll_period, timeout)
        final = pva.read(ctx, names.workflow)
    log.info("workflow stream: %s (%s, counter %d)", final.state, final.message, final.counter)
    dataset = (yield from share_run_metadata(gateway, start_doc, job)) if share_metadata else ""
    _conclude(job, raise_on_failure)
    return RunReport(str(start_doc["uid"]), job, dataset, final)
