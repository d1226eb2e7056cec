"""PV write -> command -> DM: the handlers behind every writable PV.

Each handler checks its inputs before any DM call (so DM never sees an invalid
argument), makes the call, and for busy commands waits on the poller until the DM
action has ended. A refusal raises :class:`PutRejected`; the hub turns it into the
slot's ``Message_RBV`` with an alarm and a failed put.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import posixpath
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from apsdm.dm import CommunicationError, Daq, DmClient, DmError, Job, NoAnswer, Upload
from apsdm.dm.records import RESERVED_JOB_KEYS

from .hub import OK, STATUS_COMM, Hub, PutRejected, Writer, coerce, state_alarm
from .persist import Persistence
from .poller import Poller, Snapshot
from .schema import PV, STREAM_STATES, Kind

log = logging.getLogger(__name__)

#: a DM account name (workflow owner): it becomes a URL path segment, so no '/', '?', ' ', ...
_USERNAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._@-]*")
#: a job argument: a ``$name`` variable of the workflow's commands
_VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: how much earlier than our start call DM's clock may date what that call started
CLOCK_SLACK = 60.0

T = TypeVar("T")


def _dm_refusal(action: str, exc: DmError) -> PutRejected:
    return PutRejected(f"{action}: {exc.message}")


def _dir(path: str) -> str:
    """A directory as a comparable path ("" is ".")."""
    return posixpath.normpath(path or ".")


def absolute_path(label: str, path: str) -> str:
    """A local path DM can use: absolute, no ``..``; refused with a reason otherwise."""
    if not path:
        raise PutRejected(f"{label} is empty")
    if not path.startswith("/"):
        raise PutRejected(f"{label} must be an absolute path: {path!r}")
    if ".." in path.split("/"):
        raise PutRejected(f"{label} must not contain '..': {path!r}")
    return posixpath.normpath(path)


def relative_path(label: str, path: str) -> str:
    """A destination inside the experiment: relative, never escaping it."""
    if path.startswith("/"):
        raise PutRejected(f"{label} must be relative to the experiment: {path!r}")
    if ".." in path.split("/"):
        raise PutRejected(f"{label} must not contain '..': {path!r}")
    return posixpath.normpath(path) if path else ""


def username(label: str, name: str) -> str:
    """A DM account name, or blank for the DM user; anything else is refused with why."""
    if name and not _USERNAME.fullmatch(name):
        raise PutRejected(f"{label} {name!r} is not a DM user name "
                          "(letters, digits, '.', '_', '@', '-')")
    return name


def json_object(label: str, text: str) -> dict[str, Any]:
    """Parse a JSON object (``{}`` when blank); anything else is refused with why."""
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PutRejected(f"{label} is not valid JSON: {exc.msg} at character {exc.pos}") from None
    except RecursionError:
        raise PutRejected(f"{label} is nested too deeply") from None
    if not isinstance(value, dict):
        raise PutRejected(f"{label} must be a JSON object, not {type(value).__name__}")
    return value


def job_args(label: str, text: str) -> dict[str, Any]:
    """WFn:Args as DM takes them: a JSON object of variables with string or number values
    (``filePathList`` may be a list of strings); anything else is refused with why."""
    args = json_object(label, text)
    for key, value in args.items():
        if key in RESERVED_JOB_KEYS:
            raise PutRejected(f"{label}: {key!r} is a job field that DM reserves")
        if not _VARIABLE.fullmatch(key):
            raise PutRejected(f"{label}: {key!r} is not a variable name (letters, digits, '_')")
        if key == "filePathList" and isinstance(value, list):
            ok = all(isinstance(v, str) and "\0" not in v for v in value)
        else:
            ok = isinstance(value, int | float) or (isinstance(value, str) and "\0" not in value)
        if not ok:
            raise PutRejected(f"{label}: the value of {key} must be a string or a number")
    return args


class Commands:
    """Registers a handler for every writable PV and carries out the DM calls."""

    def __init__(self, hub: Hub, dm: DmClient, poller: Poller, persist: Persistence) -> None:
        self.hub, self.dm, self.poller, self.persist = hub, dm, poller, persist
        self.p = poller.p
        self._starting: dict[tuple[str, str], asyncio.Lock] = {}  # (owner, workflow)

    def register(self) -> None:
        """Attach handlers by PV role; plain settings are checked, stored and saved."""
        slot_commands: dict[str, Callable[[int], Callable[..., Awaitable[Any]]]] = {
            "DAQ:Start": lambda n: lambda *_: self.daq_start(n),
            "DAQ:Stop": lambda n: lambda *_: self.daq_stop(n),
            "UP:Start": lambda n: lambda *_: self.upload_start(n),
            "WF:Start": lambda n: lambda *_: self.workflow_start(n),
        }
        for pv in self.hub.pvs.values():
            if not pv.field.writable:
                continue
            key = f"{pv.group}:{pv.suffix}"
            if key in slot_commands:
                self.hub.handle(pv.name, slot_commands[key](pv.slot))
            elif key == "Experiment:Name":
                self.hub.handle(pv.name, self.select_experiment)
            elif key == "Metadata:Upload":
                self.hub.handle(pv.name, self.metadata_upload)
            elif pv.field.kind is Kind.STREAM:
                self.hub.handle(pv.name, self.stream_write)
            else:
                self.hub.handle(pv.name, self.setting)
        self.hub.on_write.append(self._record_writer)

    def _key(self, pv: PV) -> str:
        return pv.name[len(self.p):]

    async def _record_writer(self, pv: PV, writer: Writer) -> None:
        """Status:LastWriter_RBV: who wrote which PV (set a setting, started a command), and when."""
        await self.hub.post(f"{self.p}Status:LastWriter_RBV",
                            f"{writer} {self._key(pv)} {time.strftime('%H:%M:%S')}")

    # --- settings -----------------------------------------------------------------------

    async def restore(self) -> None:
        """Put saved settings back on their PVs (autosave's job in a record IOC)."""
        for key, value in self.persist.settings.items():
            name = self.p + key
            pv = self.hub.pvs.get(name)
            if pv is None or not pv.field.autosave:
                continue
            try:  # a hand-edited state file is checked like a client write
                await self.hub.post(name, coerce(pv, value))
            except PutRejected as exc:
                log.error("saved setting not restored: %s", exc)
        name = self.persist.settings.get("Experiment:Name", "")
        self.poller.experiment_name = name
        self._poll_owners()

    def _poll_owners(self, pending: dict[str, str] | None = None) -> None:
        """The owners whose jobs the poller lists: every WFn:Owner and owners of started jobs
        (``pending``: PV name -> value being written), so old settings add no DM calls."""
        owners = {pv.name: self.hub[pv.name] for pv in self.hub.pvs.values()
                  if pv.group == "WF" and pv.suffix == "Owner"}
        owners.update(pending or {})
        started = set(self.persist.owners.values())  # owners of the jobs the slots started
        self.poller.owners = started | {o for o in owners.values() if _USERNAME.fullmatch(o)}

    async def setting(self, pv: PV, value: Any, _writer: Writer) -> Any:
        """Check a setting where it can be checked alone, then store and save it."""
        suffix = pv.suffix
        if isinstance(value, str) and value:
            if suffix in ("DataDirectory", "Path"):
                value = absolute_path(pv.name, value)
            elif suffix == "DestDirectory":
                value = relative_path(pv.name, value)
            elif suffix == "Args":
                job_args(pv.name, value)
            elif suffix == "Json":
                json_object(pv.name, value)
            elif suffix == "Owner":
                username(pv.name, value)
        if suffix == "Owner":
            self._poll_owners({pv.name: value})
        if pv.field.autosave:
            self.persist.settings[self._key(pv)] = value
            self.persist.save()
        message = self.hub.message_pv(pv)
        if self.hub.alarms[message].status != STATUS_COMM:  # DM down stays visible
            await self.hub.post(message, "", OK)
        return value

    async def stream_write(self, pv: PV, value: dict[str, Any], _writer: Writer) -> Any:
        """A streaming handshake write: a known state, a bounded message, a finite timestamp."""
        state = value.get("state")
        if state not in STREAM_STATES:
            raise PutRejected(f"{pv.name}: state {state!r} is not one of {', '.join(STREAM_STATES)}")
        if len(str(value.get("message", ""))) > 4000:
            raise PutRejected(f"{pv.name}: message too long")
        timestamp = float(value.get("timestamp") or time.time())
        if not math.isfinite(timestamp):
            raise PutRejected(f"{pv.name}: timestamp {timestamp} is not a finite number")
        return {**value, "timestamp": timestamp}

    # --- experiment ---------------------------------------------------------------------

    def _experiment(self) -> str:
        """The selected experiment's name; commands that copy data need one."""
        exp = self.poller.snapshot.experiment
        if exp is None:
            raise PutRejected("no DM experiment selected: write Experiment:Name first")
        return exp.name

    async def _dm_ready(self) -> None:
        """Refuse a command, sending nothing, while DM is unreachable (see
        :meth:`Poller.ensure_connected`); call it after the inputs are checked."""
        try:
            await self.poller.ensure_connected()
        except CommunicationError as exc:
            raise PutRejected(f"not sent: {exc.message}") from None

    async def select_experiment(self, pv: PV, name: str, _writer: Writer) -> str:
        name = name.strip()
        if not name:
            self.poller.select("", None)
        else:
            await self._dm_ready()
            try:
                exp = await self.dm.get_experiment(name)
            except DmError as exc:
                raise _dm_refusal(f"experiment {name!r} not selected", exc) from None
            self.poller.select(name, exp)
        self.persist.settings["Experiment:Name"] = name
        self.persist.save()
        await self.hub.post(f"{self.p}Experiment:Message_RBV", "", OK)
        await self.poller.publish_experiment(self.poller.snapshot.experiment)
        return name

    # --- DAQs ---------------------------------------------------------------------------

    async def _remember(self, slot: str, obj_id: str, owner: str = "") -> None:
        """Follow what a slot started; keep its id (and job owner) on disk for restarts."""
        self.poller.ids[slot] = obj_id
        self.poller.poll_soon()
        self.persist.ids[slot] = obj_id
        if owner:
            self.persist.owners[slot] = owner
        try:
            self.persist.save()
        except OSError as exc:  # it has started all the same: say so, don't refuse
            log.error("state not saved: %s", exc)
            await self.hub.post(f"{self.p}{slot}:Message_RBV",
                                f"started {obj_id[:8]}, but not saved for restarts: {exc.strerror}",
                                state_alarm("state not saved"))

    async def _follow(self, find: Callable[[Snapshot], Any], what: str,
                      **reached: Callable[[Any], bool]) -> Any:
        """Wait until the started DAQ, upload or job has ended, or what ``reached`` asks
        (see :meth:`Poller.follow`); a refusal if DM stops listing it."""
        try:
            return await self.poller.follow(find, what, **reached)
        except LookupError as exc:
            raise PutRejected(str(exc)) from None

    async def _start(self, slot: str, what: str, call: Callable[[], Awaitable[T]],
                     listed: Callable[[Snapshot], dict[str, T]], matches: Callable[[T], bool],
                     since: Callable[[T], float] | None = None,
                     confirm: Callable[[T], Awaitable[bool]] | None = None) -> T:
        """Make a start call. When it went out but no answer came, DM may have acted on it:
        wait until DM answers again and take what it lists that ``matches`` (and, with
        ``since``, is new since the call; and ``confirm`` accepts), so the slot shows the
        truth and a retry cannot start it twice."""
        before, asked = set(listed(self.poller.snapshot)), time.time()

        def started(snap: Snapshot) -> T | None:
            return next((obj for key, obj in listed(snap).items() if matches(obj) and (
                since is None or (key not in before and since(obj) >= asked - CLOCK_SLACK))),
                None)

        try:
            return await call()
        except NoAnswer as exc:
            why = exc.message
        except DmError as exc:
            raise _dm_refusal(f"{what} not started", exc) from None
        log.warning("%s: %s: started or not? asking DM once it answers", slot, why)
        await self.hub.post(f"{self.p}{slot}:Message_RBV",
                            f"no answer from DM: waiting to see if the {what} started",
                            state_alarm("no answer from DM"))
        try:
            found = await self.poller.follow(started, what, reached=lambda _obj: True)
        except LookupError:
            raise PutRejected(f"{what} not started: DM gave no answer ({why}) "
                              "and has listed none since") from None
        try:
            if confirm is not None and not await confirm(found):
                raise PutRejected(f"{what} not started: DM gave no answer ({why}); what "
                                  "it started since has other arguments")
        except DmError as exc:
            raise _dm_refusal(f"{what} started or not: DM cannot tell", exc) from None
        log.info("%s: DM did start the %s: following it", slot, what)
        return found

    async def daq_start(self, n: int) -> None:
        """Start the slot's DAQ, or adopt an active one on the same experiment and tree."""
        s = f"{self.p}DAQ{n}:"
        experiment = self._experiment()
        directory = absolute_path(s + "DataDirectory", self.hub[s + "DataDirectory"])
        dest = relative_path(s + "DestDirectory", self.hub[s + "DestDirectory"])

        def on_tree(daq: Daq) -> bool:
            return (daq.active and daq.experiment_name == experiment
                    and daq.data_directory.rstrip("/") == directory)

        await self._dm_ready()
        try:
            daq = next(filter(on_tree, await self.dm.list_daqs()), None)
        except DmError as exc:
            raise _dm_refusal("DAQ not started", exc) from None
        if daq is not None:
            await self.hub.post(s + "Message_RBV", f"reusing active DAQ {daq.id[:8]}")
        else:  # started in doubt: any active DAQ on the tree is the one to follow
            daq = await self._start(
                f"DAQ{n}", "DAQ", lambda: self.dm.start_daq(experiment, directory, destDirectory=dest),
                lambda snap: snap.daqs, on_tree)
        await self._remember(f"DAQ{n}", daq.id)
        await self._follow(lambda snap: snap.daqs.get(daq.id), f"DAQ {daq.id[:8]}",
                           reached=lambda _listed: True)

    async def daq_stop(self, n: int) -> None:
        s = f"{self.p}DAQ{n}:"
        daq_id = self.poller.ids.get(f"DAQ{n}", "")
        daq = self.poller.snapshot.daqs.get(daq_id)
        if daq is None or not daq.active:
            raise PutRejected(f"DAQ{n} has no active DAQ to stop")
        await self._dm_ready()
        try:
            await self.dm.stop_daq(daq.experiment_name, daq.data_directory)
        except DmError as exc:
            raise _dm_refusal("DAQ not stopped", exc) from None
        self.poller.poll_soon()
        await self._follow(lambda snap: snap.daqs.get(daq_id), f"DAQ {daq_id[:8]}")
        await self.hub.post(s + "Message_RBV", f"DAQ {daq_id[:8]} stopped")

    # --- uploads ------------------------------------------------------------------------

    async def upload_start(self, n: int) -> None:
        """Upload a file (Mode File) or a directory in one transfer (Mode Directory)."""
        s = f"{self.p}UP{n}:"
        experiment = self._experiment()
        path = absolute_path(s + "Path", self.hub[s + "Path"])
        dest = relative_path(s + "DestDirectory", self.hub[s + "DestDirectory"])
        info: dict[str, Any] = {"destDirectory": dest}
        if self.hub[s + "Mode"] == 0:  # File
            directory, filename = posixpath.split(path)
            info["experimentFilePath"] = filename
        else:
            directory = path
            info["processingMode"] = "directory"
        await self._dm_ready()
        def this_one(u: Upload) -> bool:
            return (u.experiment_name, _dir(u.data_directory), _dir(u.dest_directory),
                    u.raw.get("experimentFilePath")) == (
                experiment, _dir(directory), _dir(dest), info.get("experimentFilePath"))

        upload = await self._start(
            f"UP{n}", "upload", lambda: self.dm.upload(experiment, directory, **info),
            lambda snap: snap.uploads, this_one, since=lambda u: u.start_time)
        await self._remember(f"UP{n}", upload.id)
        final = await self._follow(lambda snap: snap.uploads.get(upload.id),
                                   f"upload {upload.id[:8]}")
        if final.status != "done":
            raise PutRejected(f"upload {upload.id[:8]} {final.status}: {final.error_message}")

    # --- workflows ----------------------------------------------------------------------

    async def workflow_start(self, n: int) -> None:
        """Start a processing job; the put completes when the job is done or failed."""
        s = f"{self.p}WF{n}:"
        name = self.hub[s + "Name"].strip()
        if not name:
            raise PutRejected(f"{s}Name is empty: which workflow?")
        args = job_args(s + "Args", self.hub[s + "Args"])
        owner = self.hub[s + "Owner"].strip() or self.dm.username
        # one start at a time per workflow, so two slots that wait for others cannot both
        # see "none running" and start together
        async with self._starting.setdefault((owner, name), asyncio.Lock()):
            if self.hub[s + "WaitForOthers"]:
                await self.hub.post(s + "Message_RBV", f"waiting for other {name} jobs to end")
                polls = self.poller.snapshot.polls  # decide on a poll made after this point
                self.poller.poll_soon()
                await self.poller.wait_for(lambda snap: snap.polls > polls + 1 and not any(
                    j.workflow_name == name and j.owner == owner and not j.finished
                    for j in snap.jobs.values()))
            await self._dm_ready()
            job = await self._start(
                f"WF{n}", f"workflow {name}", lambda: self.dm.start_processing_job(name, args, owner=owner),
                lambda snap: snap.jobs, lambda j: (j.workflow_name, j.owner) == (name, owner),
                since=lambda j: j.submission_time, confirm=lambda j: self._has_args(j, args))
            await self._remember(f"WF{n}", job.id, owner)
            self._poll_owners()
        final = await self._follow(lambda snap: snap.jobs.get(job.id), f"job {job.id[:8]}")
        if final.status != "done":
            raise PutRejected(f"job {job.id[:8]} {final.status}: {final.error_message}")

    async def _has_args(self, job: Job, args: dict[str, Any]) -> bool:
        """Whether DM's job was given these arguments (DM keeps each at the job's top level)."""
        raw = (await self.dm.get_processing_job(job.id, job.owner)).raw
        return all(str(raw.get(key)) == str(value) for key, value in args.items())

    # --- metadata -----------------------------------------------------------------------

    async def metadata_upload(self, _pv: PV, _value: Any, _writer: Writer) -> None:
        """Add the run metadata in Metadata:Json to DM's dataset catalog."""
        m = f"{self.p}Metadata:"
        experiment = self._experiment()
        metadata = json_object(m + "Json", self.hub[m + "Json"])
        if not metadata:
            raise PutRejected(f"{m}Json is empty: nothing to upload")
        uid = str(metadata.get("uid") or metadata.get("bluesky_run_uid") or uuid.uuid4())
        name = str(metadata.get("datasetName") or f"run_uid8_{uid[:8]}")
        await self._dm_ready()
        try:
            await self.dm.add_dataset(experiment, name, bluesky_run_uid=uid,
                                      bluesky_metadata=metadata,
                                      time_iso8601=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        except DmError as exc:
            raise _dm_refusal("metadata not uploaded", exc) from None
        await self.hub.post(m + "DatasetName_RBV", name)
        await self.hub.post(m + "Message_RBV", f"dataset {name} added to {experiment}")

