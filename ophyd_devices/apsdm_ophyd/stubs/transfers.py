"""Plan stubs for the experiment, DAQs and uploads: select, start, and wait for copies."""

import logging
from dataclasses import dataclass
from pathlib import Path

from bluesky import plan_stubs as bps
from bluesky import preprocessors as bpp
from bluesky.utils import MsgGenerator
from ophyd.status import Status

from ..devices import UPLOAD_MODES, DMDaq, DMExperiment, DMUpload
from ..errors import GatewayError, WaitExpired
from ..progress import DEFAULT_POLL_PERIOD, DEFAULT_TIMING, Progress, Timing, wait_until
from .io import YES, Completion, expect, refusal, release, run_command, write

__all__ = ["DaqBaseline", "daq_baseline", "select_experiment", "start_daq", "start_upload",
           "upload", "wait_daq_files", "wait_upload"]

log = logging.getLogger("apsdm_ophyd")


def select_experiment(experiment: DMExperiment, name: str) -> MsgGenerator[None]:
    """Select the DM experiment by name; raise GatewayError at once if DM does not know it."""
    yield from write(experiment, experiment_name=name)

    def selected() -> MsgGenerator[bool]:
        valid = yield from bps.rd(experiment.valid, default_value=YES)
        current = yield from bps.rd(experiment.experiment_name, default_value=name)
        return valid == YES and current == name

    yield from expect(experiment, selected, f"DM experiment {name!r} not selected")


def start_daq(daq: DMDaq, data_directory: str, dest_directory: str = "",
              timing: Timing = DEFAULT_TIMING) -> MsgGenerator[str]:
    """Reuse the active DAQ on this experiment and tree, or start one; returns its id."""
    yield from write(daq, data_directory=data_directory, dest_directory=dest_directory)
    yield from run_command(daq.start_daq, timeout=timing.daq_timeout,
                           poll_period=timing.poll_period)

    def running() -> MsgGenerator[bool]:
        active = yield from bps.rd(daq.active, default_value=YES)
        refused = yield from refusal(daq)
        return active == YES and refused is None

    yield from expect(daq, running, f"{daq.name}: no DAQ is running on {data_directory}")
    return str((yield from bps.rd(daq.daq_id, default_value="")))


@dataclass(frozen=True)
class DaqBaseline:
    """A DAQ's counts before a collection, so later waits count only new files."""

    files: int
    errors: int


def daq_baseline(daq: DMDaq) -> MsgGenerator[DaqBaseline]:
    """Read the DAQ's file and error counts now."""
    files = yield from bps.rd(daq.n_files)
    errors = yield from bps.rd(daq.n_errors)
    return DaqBaseline(int(files), int(errors))


def wait_daq_files(daq: DMDaq, baseline: DaqBaseline, expected: int | None = None, *,
                   timeout: float = Timing.daq_timeout, poll_period: float = DEFAULT_POLL_PERIOD,
                   hint: str = "") -> MsgGenerator[int]:
    """Wait until the DAQ has copied the files written since ``baseline``; returns how many.

    ``expected``: that many new files; None: every file the DAQ has seen since, at least
    one (right for a detector writing one file per run). Raises GatewayError if the DAQ
    counts copy errors or stops, WaitExpired (a TimeoutError, with ``hint``) after
    ``timeout`` s of waiting.
    """
    progress = Progress(f"{daq.name} files", expected or 0, "files")
    copied = 0

    def all_copied() -> MsgGenerator[bool]:
        nonlocal copied
        seen = int((yield from bps.rd(daq.n_files, default_value=baseline.files + 1)))
        processed = int((yield from bps.rd(daq.n_processed, default_value=seen)))
        copied = processed - baseline.files
        target = expected if expected is not None else max(seen - baseline.files, 1)
        progress.update(copied, target)
        if copied >= target:
            return True
        errors = yield from bps.rd(daq.n_errors, default_value=baseline.errors)
        if int(errors) > baseline.errors:
            why = yield from bps.rd(daq.message, default_value="")
            raise GatewayError(f"{daq.name}: DAQ failed to copy files: {why}")
        if (yield from bps.rd(daq.active, default_value=YES)) != YES:
            why = yield from bps.rd(daq.message, default_value="")
            raise GatewayError(f"{daq.name}: DAQ is not running: {why}")
        return False

    try:
        yield from wait_until(all_copied, timeout=timeout, poll_period=poll_period,
                              what=f"{daq.name}: DAQ copies", progress=progress)
    except WaitExpired:
        directory = yield from bps.rd(daq.data_directory, default_value="")
        of = f" of {expected}" if expected is not None else ""
        raise WaitExpired(f"{daq.name}: {copied}{of} new files copied after {timeout:g} s; "
                           f"the DAQ watches {directory}{hint}") from None
    return copied


def start_upload(slot: DMUpload, path: str, dest_directory: str = "") -> MsgGenerator[Status]:
    """Start uploading a file (or a directory tree, in one transfer); returns the put Status."""
    mode = UPLOAD_MODES[Path(path).is_dir()]
    yield from write(slot, path=path, dest_directory=dest_directory, mode=mode)
    started = yield from bps.abs_set(Completion(slot.start_upload), 1)  # done when it ends
    yield from bps.checkpoint()  # a rewind after a pause must not start it twice
    return started


def wait_upload(slot: DMUpload, started: Status | None, before_id: str, *,
                timeout: float = Timing.upload_timeout,
                poll_period: float = DEFAULT_POLL_PERIOD) -> MsgGenerator[str]:
    """Wait (showing ``Percent_RBV``) until the upload ends; returns its id, raises if it failed."""
    progress = Progress(f"{slot.name} upload", 100, "%")

    def ended() -> MsgGenerator[bool]:
        progress.update(float((yield from bps.rd(slot.percent, default_value=100))))
        return started is None or started.done

    yield from wait_until(ended, timeout=timeout, poll_period=poll_period,
                          what=f"{slot.name}: upload", progress=progress)

    def uploaded() -> MsgGenerator[bool]:
        upload_id = yield from bps.rd(slot.upload_id, default_value="simulated")
        status = yield from bps.rd(slot.upload_status, default_value="done")
        return upload_id not in ("", before_id) and status == "done"

    yield from expect(slot, uploaded, f"{slot.name}: upload failed")
    return str((yield from bps.rd(slot.upload_id, default_value="")))


def upload(slot: DMUpload, path: str, dest_directory: str = "",
           timing: Timing = DEFAULT_TIMING) -> MsgGenerator[str]:
    """Upload and wait for it; stop/abort while waiting releases ``UPn:Start``."""
    before = str((yield from bps.rd(slot.upload_id, default_value="")))
    started: Status | None = None

    def go() -> MsgGenerator[str]:
        nonlocal started
        started = yield from start_upload(slot, path, dest_directory)
        return (yield from wait_upload(slot, started, before, timeout=timing.upload_timeout,
                                       poll_period=timing.poll_period))

    def cleanup() -> MsgGenerator[None]:  # reads ``started`` when it runs, not before
        yield from release(slot.start_upload, started, "the plan ended first")

    return (yield from bpp.finalize_wrapper(go(), cleanup))
