"""Checks made before any data are taken, so a mistake fails the plan before the first event.

:func:`check_job_args` applies the IOC's rules for ``WFn:Args`` (README "Behaviour"):
a JSON object whose keys are variable names and not DM's reserved job fields, with string
or number values (``filePathList`` may be a list of strings).
"""

import json
import logging
import posixpath
import re
from collections.abc import Mapping, Sequence
from typing import Any

from bluesky import plan_stubs as bps
from bluesky.utils import MsgGenerator
from ophyd import Device
from p4p.client.thread import RemoteError

from .devices import DMDaq, DMGateway, DMWorkflow
from .errors import PreflightFailed, WaitExpired
from .progress import wait_until
from .pva import TableSignal
from .stubs.io import YES, busy, is_busy, pv_name

__all__ = ["RESERVED_JOB_KEYS", "check_job_args", "detector_directories", "preflight"]

log = logging.getLogger("apsdm_ophyd")

#: Fields of a DM processing job that a job argument may not replace.
RESERVED_JOB_KEYS = frozenset({
    "id", "owner", "status", "stage", "workflow", "submissionTime", "submissionTimestamp",
    "startTime", "startTimestamp", "endTime", "endTimestamp", "runTime", "countFiles",
    "errorMessage",
})
_VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: The IOC lists DM's workflows every this many polls (``Status:PollPeriod_RBV``).
WORKFLOWS_REFRESH_POLLS = 10
#: Seconds a pre-flight check waits for a gateway that has not reached DM yet (just started).
FIRST_POLL_WAIT = 30.0


def check_job_args(args: Any) -> list[str]:
    """Why the IOC would refuse ``args`` as ``WFn:Args`` (empty: it takes them)."""
    if not isinstance(args, Mapping):
        return [f"job arguments must be a mapping (a JSON object), not {type(args).__name__}"]
    problems = []
    for key, value in args.items():
        if key in RESERVED_JOB_KEYS:
            problems.append(f"{key!r} is a job field that DM reserves")
        elif not isinstance(key, str) or not _VARIABLE.fullmatch(key):
            problems.append(f"{key!r} is not a variable name (letters, digits, '_')")
        elif not _argument_value(key, json.loads(json.dumps(value, default=str))):
            problems.append(f"the value of {key} must be a string or a number")
    return problems


def _argument_value(key: str, value: Any) -> bool:
    """A string or number (no NUL); for ``filePathList`` also a list of strings."""
    if key == "filePathList" and isinstance(value, list):
        return all(isinstance(v, str) and "\0" not in v for v in value)
    return isinstance(value, int | float) or (isinstance(value, str) and "\0" not in value)


def detector_directories(detectors: Sequence[Any]) -> MsgGenerator[list[str]]:
    """Where the detectors write files, where they say: a ``save_path`` attribute or the
    ``file_path`` signals of their file plugins (areaDetector)."""
    found = [str(det.save_path) for det in detectors if isinstance(getattr(det, "save_path", None), str)]
    for det in detectors:
        if isinstance(det, Device):
            for walk in det.walk_signals():
                if walk.dotted_name.split(".")[-1] == "file_path":
                    found.append(str((yield from bps.rd(walk.item, default_value=""))))
    return [path for path in found if path]


def preflight(gateway: DMGateway, workflows: TableSignal | None, wf: DMWorkflow | None, *,
              workflow: str = "", args: Mapping[str, Any] | None = None, owner: str = "",
              daq: DMDaq | None = None, detectors: Sequence[Any] = ()
              ) -> MsgGenerator[dict[str, Any]]:
    """Check experiment, workflow, arguments, slot and DAQ; returns the run's
    ``data_management`` metadata. Raises PreflightFailed listing every problem."""
    problems: list[str] = []
    experiment = str((yield from bps.rd(gateway.experiment.experiment_name, default_value="sim")))
    valid = yield from bps.rd(gateway.experiment.valid, default_value=YES)
    if not experiment or valid != YES:
        problems.append(f"no valid DM experiment selected ({experiment!r}): run setup_user first")
    dm: dict[str, Any] = {"experiment": experiment}
    for key, beamtime in (("esaf_id", gateway.esaf), ("proposal_id", gateway.proposal)):
        tied = str((yield from bps.rd(beamtime.beamtime_id, default_value="")))
        if tied:  # the ESAF / proposal setup_user tied to the experiment
            dm[key] = tied
    if wf is not None:
        dm.update(workflow=workflow, owner=owner, workflow_slot=wf.prefix)
        problems += check_job_args(args or {})
        period = yield from bps.rd(gateway.health.poll_period, default_value=0.0)
        problems += (yield from _workflow_known(gateway, workflows, workflow, owner,
                                                WORKFLOWS_REFRESH_POLLS * float(period) + 1.0))
        if is_busy((yield from bps.rd(busy(wf.start_job)))):
            problems.append(f"{pv_name(busy(wf.start_job))} is busy with an earlier job: "
                            "wait for it, or write 0 to release the slot")
    if daq is not None:
        directories = yield from detector_directories(detectors)
        dm.update(daq_id=str((yield from bps.rd(daq.daq_id, default_value=""))),
                  detector_directories=directories)
        problems += (yield from _daq_covers(daq, directories))
    if problems:
        raise PreflightFailed("pre-flight check failed, nothing was started: "
                              + "; ".join(problems))
    return dm


def _workflow_known(gateway: Any, workflows: TableSignal | None, workflow: str, owner: str,
                    refresh: float) -> MsgGenerator[list[str]]:
    """Problems with the workflow name, from the ``Workflows`` table where PVA answers;
    a name not (yet) listed is looked for again until the IOC has refreshed the table. An IOC
    just started lists the table on its first poll of DM: that is waited for first."""
    if not workflow:
        return ["no workflow name given"]
    if workflows is None:
        return []
    connected = gateway.health.connected

    def polled() -> MsgGenerator[bool]:
        return (yield from bps.rd(connected, default_value="Connected")) == "Connected"

    try:
        yield from wait_until(polled, timeout=FIRST_POLL_WAIT, poll_period=0.5,
                              what="the gateway's first poll of DM")
    except WaitExpired:
        why = yield from bps.rd(gateway.health.message, default_value="")
        return [f"the gateway has not reached DM (Status:Connected_RBV after {FIRST_POLL_WAIT:g} s): "
                f"{why or 'no reason given'}"]
    names: set[str] = set()
    unreadable: list[Exception] = []

    def listed() -> MsgGenerator[bool]:
        try:
            rows = yield from bps.rd(workflows, default_value=[{"name": workflow, "owner": owner}])
        except (TimeoutError, RemoteError) as exc:  # no PVA here: the IOC will check
            unreadable.append(exc)
            return True
        names.clear()
        names.update(row["name"] for row in rows if not owner or row["owner"] == owner)
        return workflow in names

    try:
        yield from wait_until(listed, timeout=refresh, poll_period=min(refresh, 0.5),
                              what=f"workflow {workflow} listed")
    except WaitExpired:
        of = f" of owner {owner}" if owner else ""
        return [f"DM has no workflow {workflow!r}{of} (known: {', '.join(sorted(names)) or 'none'})"]
    if unreadable:
        log.warning("workflow %s not checked: %s unreadable: %s", workflow, workflows.pvname,
                    unreadable[0])
    return []


def _daq_covers(daq: DMDaq, directories: list[str]) -> MsgGenerator[list[str]]:
    """Problems if the DAQ is not running or does not watch where the detectors write."""
    if (yield from bps.rd(daq.active, default_value=YES)) != YES:
        return [f"{daq.prefix} no DAQ is running: run setup_user with a data_directory"]
    tree = posixpath.normpath(str((yield from bps.rd(daq.data_directory, default_value="/"))))
    outside = [d for d in directories if d.startswith("/")
               and posixpath.commonpath([tree, posixpath.normpath(d)]) != tree]
    if not outside:
        return []
    return [f"{daq.prefix} watches {tree}, but the detectors write to {', '.join(outside)}"]
