"""Bluesky plans that drive APS Data Management through the gateway, like hardware.

``setup_user`` selects the DM experiment, reuses or starts a DAQ and uploads a file;
``file_collection_plan`` collects files, waits for the DAQ to copy them, runs a workflow
and shares the run metadata; ``streaming_collection_plan`` starts the workflow first and
runs the ``Stream:Bluesky``/``Stream:Workflow`` handshake around the collection. Both are
``bp.count`` inside :func:`~apsdm_ophyd.wrappers.dm_workflow_wrapper`.
"""

import dataclasses
import json
import logging
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bluesky import plan_stubs as bps
from bluesky import plans as bp
from bluesky import preprocessors as bpp
from bluesky.utils import MsgGenerator

from .devices import DMGateway
from .errors import WaitExpired, WorkflowFailed
from .progress import DEFAULT_POLL_PERIOD, Progress, Timing, wait_until
from .pva import StreamSignal, StreamState, TableSignal, UniqueIdSignal
from .reports import RunReport, UserSetup
from .stubs import (
    JobHandle,
    select_beamtime,
    select_experiment,
    start_daq,
    upload,
    wait_workflow,
)
from .wrappers import WorkflowRequest, dm_workflow_wrapper

__all__ = ["FrameSource", "beamtime_experiment_name", "file_collection_plan", "frame_source",
           "setup_user",
           "streaming_collection_plan"]

log = logging.getLogger("apsdm_ophyd")


def setup_user(gateway: DMGateway, dm_experiment_name: str = "",
               data_directory: str | None = None, daq_dest: str = "",
               upload_file: str | None = None, upload_dest: str = "",
               daq_slot: int = 1, upload_slot: int = 1,
               upload_timeout: float = Timing.upload_timeout, *, esaf_id: str | int = "",
               proposal_id: str | int = "") -> MsgGenerator[UserSetup]:
    """Prepare DM for a user: select the experiment, reuse or start a DAQ, upload a file.

    With ``esaf_id`` and/or ``proposal_id`` the experiment (default name
    :func:`beamtime_experiment_name`) is selected, or created in DM if it has none, and the
    ids are tied to it on the gateway (``Esaf:Id``, ``Proposal:Id``: checked in DM's APS DB
    service); later runs record them in ``data_management``. The IOC remembers the
    experiment and its ties (across restarts too), so later plans need no name.
    A DAQ is started only when ``data_directory`` is given (``daq_dest``: experiment
    subdirectory); an upload only when ``upload_file`` is. Raises GatewayError with the
    gateway's reason when DM refuses any step.
    """
    esaf_id, proposal_id = str(esaf_id).strip(), str(proposal_id).strip()
    name = dm_experiment_name or beamtime_experiment_name(esaf_id, proposal_id)
    timing = Timing(upload_timeout=upload_timeout)
    if esaf_id or proposal_id:
        yield from select_beamtime(gateway, name, esaf_id, proposal_id)
    else:
        yield from select_experiment(gateway.experiment, name)
    log.info("DM experiment %s selected", name)
    daq_id = upload_id = ""
    if data_directory is not None:
        daq_id = yield from start_daq(gateway.daq(daq_slot), str(data_directory), daq_dest,
                                      timing)
        log.info("DAQ %s copies %s into %s/%s", daq_id, data_directory, name, daq_dest)
    if upload_file is not None:
        upload_id = yield from upload(gateway.upload(upload_slot), str(upload_file),
                                      upload_dest, timing)
        log.info("uploaded %s into %s/%s (%s)", upload_file, name, upload_dest, upload_id)
    return UserSetup(name, daq_id, upload_id, esaf_id, proposal_id)


def beamtime_experiment_name(esaf_id: str = "", proposal_id: str = "") -> str:
    """The experiment ``setup_user`` uses for a proposal (``proposal-77777``), else for an
    ESAF (``esaf-271828``), when it is given no name."""
    if proposal_id:
        return f"proposal-{proposal_id}"
    if esaf_id:
        return f"esaf-{esaf_id}"
    raise ValueError("setup_user needs dm_experiment_name, esaf_id or proposal_id")


def file_collection_plan(
    gateway: DMGateway, detectors: Sequence[Any], num: int, workflow_name: str, *,
    workflow_args: Mapping[str, Any] | None = None, workflow_owner: str = "",
    expected_files: int | None = None, daq_slot: int = 1, wf_slot: int = 1,
    wait_for_others: bool = False, daq_timeout: float = Timing.daq_timeout,
    reporting_period: float = Timing.reporting_period,
    poll_period: float = DEFAULT_POLL_PERIOD, timeout: float = Timing.job_timeout,
    raise_on_failure: bool = True, share_metadata: bool = True, report: bool = True,
    md: Mapping[str, Any] | None = None,
) -> MsgGenerator[RunReport]:
    """Collect files, wait for the DAQ to copy them, then run a DM workflow on them.

    ``count``s the detectors ``num`` times into the DAQ's tree (checked first where the
    detectors say where they write), waits until the DAQ of ``daq_slot`` has copied
    ``expected_files`` new files (None: all it has seen since; 0: do not wait), starts the
    workflow (after other jobs of it, with ``wait_for_others``) and follows it for at most
    ``timeout`` s, then shares the run metadata. The job gets ``experimentName`` and
    ``dataDir`` (where the DAQ copies to) before ``workflow_args``. ``raise_on_failure``:
    a failed job fails the run and raises WorkflowFailed (True) or is logged (False).
    """
    daq = gateway.daq(daq_slot)
    experiment = yield from bps.rd(gateway.experiment.experiment_name, default_value="")
    copies_to = yield from bps.rd(gateway.experiment.data_directory, default_value="")
    dest = yield from bps.rd(daq.dest_directory, default_value="")
    args = {"experimentName": experiment,
            **({"dataDir": posixpath.normpath(posixpath.join(copies_to, dest))}
               if copies_to else {}),
            **(workflow_args or {})}
    collection = bp.count(list(detectors), num=num,
                          md={"plan_name": "file_collection_plan", **(md or {})})
    return (yield from dm_workflow_wrapper(
        collection, gateway,
        WorkflowRequest(workflow_name, args, workflow_owner, wf_slot, wait_for_others),
        daq_slot=None if expected_files == 0 else daq_slot, expected_files=expected_files,
        detectors=detectors, raise_on_failure=raise_on_failure, share=share_metadata,
        report=report, channels=gateway.pva,
        timing=Timing(poll_period=poll_period, reporting_period=reporting_period,
                      daq_timeout=daq_timeout, job_timeout=timeout)))


@dataclass(frozen=True)
class FrameSource:
    """An NTNDArray PV the workflow subscribes to: its name, ``host:port`` of its server
    (blank: found through the ``EPICS_PVA_*`` environment) and a signal of its last uniqueId."""

    pvname: str
    address: str
    unique_id: Any


def frame_source(detectors: Sequence[Any], frames_pv: str = "",
                 frames_address: str = "") -> FrameSource | None:
    """``frames_pv`` (any NTNDArray PV, e.g. an areaDetector PVA plugin's), else the first
    detector that serves frames (a StreamingDetector: ``frames_pv``, ``unique_id``)."""
    if frames_pv:
        return FrameSource(frames_pv, frames_address, UniqueIdSignal(frames_pv, frames_address))
    for det in detectors:
        if hasattr(det, "frames_pv") and hasattr(det, "unique_id"):
            return FrameSource(det.frames_pv.get(), getattr(det, "address", ""), det.unique_id)
    return None


def streaming_collection_plan(
    gateway: DMGateway, detectors: Sequence[Any], num: int, workflow_name: str, *,
    workflow_args: Mapping[str, Any] | None = None, workflow_owner: str = "", wf_slot: int = 1,
    frames_pv: str = "", frames_address: str = "",
    ready_timeout: float = Timing.ready_timeout,
    reporting_period: float = Timing.reporting_period, poll_period: float = DEFAULT_POLL_PERIOD,
    timeout: float = Timing.job_timeout, raise_on_failure: bool = True,
    share_metadata: bool = True, report: bool = True, md: Mapping[str, Any] | None = None,
) -> MsgGenerator[RunReport]:
    """Start a streaming workflow, wait until it is ready, collect while announcing frames.

    The job gets ``prefix``, ``blueskyPv``, ``workflowPv`` and ``experimentName`` before
    ``workflow_args``; its id is in the start document. Stream:Bluesky goes ``idle`` ->
    ``acquiring`` (counter: frames so far) -> ``done`` (or ``error`` if collection stops).
    A workflow not ``ready`` within ``ready_timeout`` s, or ending before it is ready,
    raises WorkflowFailed; one that ends the stream while bluesky collects (``done``: it has
    enough frames; ``error``) stops the collection, and the run closes with the shots so
    far. After the collection, ``raise_on_failure`` works as in :func:`file_collection_plan`.

    With a frame stream (see :func:`frame_source`: ``frames_pv``, at ``frames_address``,
    or a StreamingDetector among ``detectors``) the job also gets ``framesPv``,
    ``framesAddress`` and ``dataDir`` (the experiment's data directory); the counters are
    uniqueIds (``acquiring``: the one before the first frame, ``done``: the last taken), and
    the workflow's ``Stream:Workflow:Results`` and ``:Lost`` are recorded in the run
    (``stream_*`` in ``data_management``, the ``dm`` stream and the stop document's reason).
    """
    channels = gateway.pva
    ours, theirs = channels.bluesky, channels.workflow
    source = frame_source(detectors, frames_pv, frames_address)
    experiment = yield from bps.rd(gateway.experiment.experiment_name, default_value="")
    args: dict[str, Any] = {"experimentName": experiment, "prefix": gateway.prefix,
                            "blueskyPv": ours.pvname, "workflowPv": theirs.pvname}
    if source is not None:
        data_dir = yield from bps.rd(gateway.experiment.data_directory, default_value="")
        args.update(framesPv=source.pvname, framesAddress=source.address, dataDir=data_dir)
        # no results of an earlier run recorded in this one
        yield from bps.abs_set(gateway.stream.workflow.results, "", wait=True)
        yield from bps.abs_set(gateway.stream.workflow.lost, 0, wait=True)
    args.update(workflow_args or {})
    yield from bps.abs_set(ours, StreamState("idle", "waiting for the workflow"), wait=True)
    before = yield from bps.rd(theirs, default_value=StreamState("idle"))
    timing = Timing(poll_period=poll_period, reporting_period=reporting_period,
                    ready_timeout=ready_timeout, job_timeout=timeout)

    def ready(handle: JobHandle) -> MsgGenerator[None]:
        yield from _wait_ready(ours, theirs, before, handle, timing, channels.stages(wf_slot))
        first = 0 if source is None else (yield from bps.rd(source.unique_id, default_value=0))
        yield from bps.abs_set(ours, StreamState("acquiring", f"collecting {num} frames",
                                                 int(first)), wait=True)

    def results() -> MsgGenerator[dict[str, Any]]:
        if source is None:
            return {}
        text = yield from bps.rd(gateway.stream.workflow.results, default_value="")
        lost = yield from bps.rd(gateway.stream.workflow.lost, default_value=0)
        summary = json.loads(text) if text else {}
        received = int(summary.get("framesReceived", 0))
        return {"stream_frames_pv": source.pvname, "stream_frames_received": received,
                "stream_frames_lost": int(lost), "stream_file": str(summary.get("file", "")),
                "stream_results": text,
                "stream_summary": f"{received} frames received, {int(lost)} lost"}

    result = yield from dm_workflow_wrapper(
        _announced_count(detectors, num, {"plan_name": "streaming_collection_plan",
                                          **(md or {})}, ours, theirs,
                         None if source is None else source.unique_id),
        gateway, WorkflowRequest(workflow_name, args, workflow_owner, wf_slot),
        start_first=True, when_started=ready, raise_on_failure=raise_on_failure,
        share=share_metadata, report=report, channels=channels, timing=timing,
        job_results=results)
    final = yield from bps.rd(theirs, default_value=StreamState("done"))
    log.info("workflow stream: %s (%s, counter %d)", final.state, final.message, final.counter)
    return dataclasses.replace(result, workflow_stream=final)


def _wait_ready(ours: StreamSignal, theirs: StreamSignal, before: StreamState,
                handle: JobHandle, timing: Timing, stages: TableSignal) -> MsgGenerator[None]:
    """Wait for a new ``ready`` on Stream:Workflow; raise WorkflowFailed if none comes."""

    def ready_or_ended() -> MsgGenerator[bool]:
        current = yield from bps.rd(theirs, default_value=StreamState("ready", timestamp=1))
        return (handle.started is None or handle.started.done) or (
            current.state == "ready" and current.timestamp != before.timestamp)

    try:
        yield from wait_until(ready_or_ended, timeout=timing.ready_timeout,
                              poll_period=timing.poll_period,
                              what=f"workflow {handle.workflow} ready",
                              progress=Progress(f"{theirs.name} ready"))
    except WaitExpired:
        yield from bps.abs_set(ours, StreamState("error", "the workflow did not become ready"),
                               wait=True)
        raise WorkflowFailed(f"workflow {handle.workflow} did not become ready within "
                             f"{timing.ready_timeout:g} s (told to stop through "
                             f"{ours.pvname})") from None
    if handle.started is not None and handle.started.done:
        yield from bps.abs_set(ours, StreamState("error", "the workflow ended first"), wait=True)
        job = yield from wait_workflow(handle, stages, timing=timing, report=False)
        raise WorkflowFailed(f"{job.describe()} (it ended before it was ready)")


def _announced_count(detectors: Sequence[Any], num: int, md: Mapping[str, Any],
                     ours: StreamSignal, theirs: StreamSignal,
                     unique_id: Any = None) -> MsgGenerator[str]:
    """``bp.count`` posting each shot to Stream:Bluesky (``done`` with the last one, before
    the run closes; ``error`` if the collection stops); the counter is the shots so far, or
    with a frame stream the ``unique_id`` signal's last frame. When the workflow ends the
    stream first (Stream:Workflow ``done``: it has enough; ``error``: it failed), the
    remaining shots are not taken and the run closes with the frames so far."""
    frames = 0
    ended: StreamState | None = None  # the workflow's own end of the stream

    def announce(dets: Sequence[Any]) -> MsgGenerator[None]:
        nonlocal frames, ended
        if ended is not None:
            return  # the workflow ended the stream: no more shots
        yield from bps.one_shot(dets)
        frames += 1
        counter = frames if unique_id is None else (yield from bps.rd(unique_id))
        current = yield from bps.rd(theirs, default_value=StreamState("acquiring"))
        if current.state in ("done", "error") and frames < num:
            ended = current
            log.info("the workflow ended the stream after %d of %d shots: %s (%s)", frames,
                     num, current.state, current.message)
        state = "done" if frames == num or ended is not None else "acquiring"
        message = f"frame {frames} of {num}" + (
            "" if ended is None else f"; the workflow ended the stream: {ended.message}")
        yield from bps.abs_set(ours, StreamState(state, message, int(counter)), wait=True)

    def stopped(exc: BaseException) -> MsgGenerator[None]:
        yield from bps.abs_set(ours, StreamState("error", f"collection stopped: {exc!r}",
                                                 frames), wait=True)

    return (yield from bpp.contingency_wrapper(
        bp.count(list(detectors), num=num, md=dict(md), per_shot=announce),
        except_plan=stopped))

