"""PV write -> command -> DM: the handlers the schema names for its writable PVs.

Each handler checks its inputs before any DM call (so DM never sees an invalid
argument), makes the call, and for busy commands waits on the DM-side state until the
DM action has ended. A refusal raises :class:`PutRejected`; the hub turns it into the
slot's ``Message_RBV`` with an alarm and a failed put.
"""

from __future__ import annotations

import asyncio
import logging
import posixpath
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from apsdm.dm import CommunicationError, Daq, DmError, Job, NoAnswer, ObjectNotFound, Upload
from apsdm.dm.api import DmApi

from .checks import (
    STREAM_STATES,
    PutRejected,
    absolute_path,
    digits,
    dm_options,
    job_args,
    json_object,
    relative_path,
    stream_value,
    workflow_args,
)
from .hub import OK, STATUS_COMM, Hub, Writer, coerce, state_alarm
from .poller import look_up_beamtime
from .schema import PV, Kind, Record
from .state import DmState, Snapshot

log = logging.getLogger(__name__)

#: how much earlier than our start call DM's clock may date what that call started
CLOCK_SLACK = 60.0

T = TypeVar("T")


def _dm_refusal(action: str, exc: DmError) -> PutRejected:
    return PutRejected(f"{action}: {exc.message}")


def _dir(path: str) -> str:
    """A directory as a comparable path ("" is ".")."""
    return posixpath.normpath(path or ".")


class Commands:
    """The handler of every writable PV (``Field.command``, else :meth:`setting`); DM calls
    go out here, and what they change in DM's state goes through :class:`DmState`."""

    def __init__(self, hub: Hub, dm: DmApi, state: DmState, prefix: str) -> None:
        self.hub, self.dm, self.state, self.p = hub, dm, state, prefix
        self._starting: dict[tuple[str, str], asyncio.Lock] = {}  # (owner, workflow)

    def register(self) -> None:
        """Attach to each writable PV the handler its schema field names."""
        for pv in self.hub.pvs.values():
            if pv.field.writable:
                self.hub.handle(pv.name, getattr(self, pv.field.command or "setting"))
        self.hub.on_write.append(self._record_writer)

    def _key(self, pv: PV) -> str:
        return pv.name[len(self.p):]

    async def _record_writer(self, pv: PV, writer: Writer) -> None:
        """Status:LastWriter_RBV: who wrote which PV (a setting, a command), and when."""
        if pv.field.kind is Kind.BUSY:  # a command starts (settings stay off the console)
            log.info("%s by %s", self._key(pv), writer)
        await self.hub.post(f"{self.p}Status:LastWriter_RBV",
                            f"{writer} {self._key(pv)} {time.strftime('%H:%M:%S')}")

    # --- settings -----------------------------------------------------------------------

    async def restore(self) -> None:
        """Put saved settings back on their PVs (autosave's job in a record IOC)."""
        for key, value in self.state.settings.items():
            name = self.p + key
            pv = self.hub.pvs.get(name)
            if pv is None or not pv.field.autosave:
                continue
            try:  # a hand-edited state file is checked like a client write
                await self.hub.post(name, coerce(pv, value))
            except PutRejected as exc:
                log.error("saved setting not restored: %s", exc)
                continue
            if self.hub.handlers.get(name) == self.owner_setting:
                self.state.set_owner(_slot(pv), self.hub[name])
        await self.show_ties()

    async def setting(self, pv: PV, value: Any, _writer: Writer) -> Any:
        """Check a setting (its schema check, where it can be checked alone), store and save it."""
        if pv.field.check is not None and value != "":
            value = pv.field.check(pv.name, value)
        if pv.field.autosave:
            self.state.save_setting(self._key(pv), value)
        message = self.hub.message_pv(pv)  # its group's (a stream has none)
        if message != self.hub.status_message and self.hub.alarms[message].status != STATUS_COMM:
            await self.hub.post(message, "", OK)  # DM down stays visible
        return value

    async def owner_setting(self, pv: PV, value: str, writer: Writer) -> str:
        """WFn:Owner: a setting whose owner's jobs the poll lists from now on."""
        value = await self.setting(pv, value, writer)
        self.state.set_owner(_slot(pv), value)
        return value

    # --- the streaming handshake ----------------------------------------------------------

    async def stream_whole(self, pv: PV, value: dict[str, Any], writer: Writer) -> dict[str, Any]:
        """A handshake structure: checked and stored, its scalar mirrors updated to match."""
        value = await self.setting(pv, value, writer)
        await self._mirror(pv.name, value)
        return value

    async def stream_part(self, pv: PV, value: Any, _writer: Writer) -> Any:
        """A scalar mirror (``Stream:Bluesky:State`` ...): merged into its structure,
        stamped now, so readers of either form see one handshake."""
        whole, member = pv.name.rsplit(":", 1)
        key = member.lower()
        if key == "state" and not 0 <= value < len(STREAM_STATES):  # never a negative index
            raise PutRejected(f"{pv.name}: index {value} is not one of 0..{len(STREAM_STATES) - 1}")
        merged = {**self.hub[whole], key: STREAM_STATES[value] if key == "state" else value,
                  "timestamp": 0.0}  # 0: the check stamps it now
        merged = stream_value(whole, merged)
        await self.hub.post(whole, merged)
        await self._mirror(whole, merged)
        return value

    async def _mirror(self, whole: str, value: dict[str, Any]) -> None:
        """Post a handshake structure's members to its scalar mirrors."""
        await self.hub.post(f"{whole}:State", STREAM_STATES.index(value["state"]))
        await self.hub.post(f"{whole}:Message", str(value["message"]))
        await self.hub.post(f"{whole}:Counter", int(value["counter"]))

    # --- experiment ---------------------------------------------------------------------

    def _experiment(self) -> str:
        """The selected experiment's name; commands that copy data need one."""
        exp = self.state.experiment
        if exp is None:
            raise PutRejected("no DM experiment selected: write Experiment:Name first")
        return exp.name

    async def _dm_ready(self) -> None:
        """Refuse a command, sending nothing, while DM is unreachable (see
        :meth:`DmState.ensure_connected`); call it after the inputs are checked."""
        try:
            await self.state.ensure_connected()
        except CommunicationError as exc:
            raise PutRejected(f"not sent: {exc.message}") from None

    async def select_experiment(self, pv: PV, name: str, _writer: Writer) -> str:
        """Look the experiment up in DM and select it (blank: none)."""
        name = name.strip()
        experiment = None
        if name:
            await self._dm_ready()
            try:
                experiment = await self.dm.get_experiment(name)
            except DmError as exc:
                raise _dm_refusal(f"experiment {name!r} not selected", exc) from None
        await self._selected(name, experiment)
        await self.hub.post(self.hub.message_pv(pv), "", OK)
        return name

    async def _selected(self, name: str, experiment: Any) -> None:
        """Select an experiment DM answered for, with the ESAF and proposal tied to it."""
        esaf, proposal = (await look_up_beamtime(self.dm, self.state, name) if name
                          else (None, None))
        await self.state.select(name, experiment, esaf, proposal)
        await self.show_ties()
        log.info("experiment %r selected", name)

    async def show_ties(self) -> None:
        """Esaf:Id and Proposal:Id show the ids tied to the selected experiment."""
        for kind in ("Esaf", "Proposal"):
            await self.hub.post(f"{self.p}{kind}:Id", self.state.tied(kind))

    # --- ESAF and proposal --------------------------------------------------------------

    async def select_beamtime(self, pv: PV, value: str, _writer: Writer) -> str:
        """Esaf:Id / Proposal:Id: look the id up in DM's APS DB service and tie it to the
        selected experiment (blank: untie)."""
        kind = pv.group
        value = digits(pv.name, value) if value.strip() else ""
        experiment = self._experiment()
        found = None
        if value:
            await self._dm_ready()
            try:
                found = await (self.dm.get_esaf(value) if kind == "Esaf"
                               else self.dm.get_proposal(value))
            except DmError as exc:
                raise _dm_refusal(f"{kind} {value} not tied to {experiment}", exc) from None
        await self.state.tie(kind, value, found)
        log.info("%s %r tied to experiment %s", kind, value, experiment)
        await self.hub.post(self.hub.message_pv(pv), "", OK)
        return value

    async def beamtime_experiment(self, pv: PV, name: str, _writer: Writer) -> str:
        """Beamtime:Experiment: select the named experiment, first creating it in DM if DM
        has none (Esaf:Id / Proposal:Id written next tie to it)."""
        name = name.strip()
        if not name:
            raise PutRejected(f"{pv.name}: name the experiment")
        await self._dm_ready()
        try:
            experiment = await self.dm.get_experiment(name)
        except ObjectNotFound:
            try:
                experiment = await self.dm.add_experiment(name)
            except DmError as exc:
                raise _dm_refusal(f"experiment {name!r} not created", exc) from None
            log.info("experiment %r created in DM", name)
        except DmError as exc:
            raise _dm_refusal(f"experiment {name!r} not selected", exc) from None
        await self._selected(name, experiment)
        await self.hub.post(f"{self.p}Experiment:Name", name)
        await self.hub.post(self.hub.message_pv(pv), "", OK)
        return name

    # --- starting and following ---------------------------------------------------------

    async def _remember(self, slot: str, obj_id: str, owner: str = "") -> None:
        """Follow what a slot started; its id (and job owner) are kept for restarts."""
        log.info("%s: following %s", slot, obj_id)
        try:
            self.state.remember(slot, obj_id, owner)
        except OSError as exc:  # it has started all the same: say so, don't refuse
            log.error("state not saved: %s", exc)
            await self.hub.post(f"{self.p}{slot}:Message_RBV",
                                f"started {obj_id[:8]}, but not saved for restarts: {exc.strerror}",
                                state_alarm("state not saved"))

    async def _follow(self, find: Callable[[Snapshot], Any], what: str,
                      **reached: Callable[[Any], bool]) -> Any:
        """Wait until the started DAQ, upload or job has ended, or what ``reached`` asks
        (see :meth:`DmState.follow`); a refusal if DM stops listing it."""
        try:
            return await self.state.follow(find, what, **reached)
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
        before, asked = set(listed(self.state.snapshot)), time.time()

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
            found = await self.state.follow(started, what, reached=lambda _obj: True)
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

    def _transfer_options(self, s: str) -> dict[str, Any]:
        """The DM options a DAQ or upload slot passes at Start: its ``Options`` object, then
        its option PVs (schema ``Field.option``) that are set; checked like their writes."""
        info = dm_options(s + "Options", self.hub[s + "Options"])
        for name, pv in self.hub.pvs.items():
            if name.startswith(s) and pv.field.option and (value := self.hub[name]):
                info[pv.field.option] = True if pv.field.kind is Kind.ENUM else value
        workflow_args(s + "WorkflowArgs", info.get("workflowArgs", ""))
        return info

    async def daq_start(self, pv: PV, _value: int, _writer: Writer) -> None:
        """Start the slot's DAQ, or adopt an active one on the same experiment and tree."""
        s, slot = _group(pv), _slot(pv)
        experiment = self._experiment()
        directory = absolute_path(s + "DataDirectory", self.hub[s + "DataDirectory"])
        dest = relative_path(s + "DestDirectory", self.hub[s + "DestDirectory"])
        info = self._transfer_options(s)

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
                slot, "DAQ", lambda: self.dm.start_daq(experiment, directory,
                                                       **info, destDirectory=dest),
                lambda snap: snap.daqs, on_tree)
        await self._remember(slot, daq.id, info.get("workflowOwner", ""))
        await self._follow(lambda snap: snap.daqs.get(daq.id), f"DAQ {daq.id[:8]}",
                           reached=lambda _listed: True)

    async def daq_stop(self, pv: PV, _value: int, _writer: Writer) -> None:
        """Stop the DAQ the slot follows; done when DM lists it ended."""
        slot = _slot(pv)
        daq: Daq | None = self.state.followed(Record.DAQ, slot)
        if daq is None or not daq.active:
            raise PutRejected(f"{slot} has no active DAQ to stop")
        daq_id = daq.id
        await self._dm_ready()
        try:
            await self.dm.stop_daq(daq.experiment_name, daq.data_directory)
        except DmError as exc:
            raise _dm_refusal("DAQ not stopped", exc) from None
        self.state.poll_soon()
        await self._follow(lambda snap: snap.daqs.get(daq_id), f"DAQ {daq_id[:8]}")
        await self.hub.post(self.hub.message_pv(pv), f"DAQ {daq_id[:8]} stopped")

    # --- uploads ------------------------------------------------------------------------

    async def upload_start(self, pv: PV, _value: int, _writer: Writer) -> None:
        """Upload a file (Mode File) or a directory in one transfer (Mode Directory)."""
        s, slot = _group(pv), _slot(pv)
        experiment = self._experiment()
        path = absolute_path(s + "Path", self.hub[s + "Path"])
        dest = relative_path(s + "DestDirectory", self.hub[s + "DestDirectory"])
        info = {**self._transfer_options(s), "destDirectory": dest}
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
            slot, "upload", lambda: self.dm.upload(experiment, directory, **info),
            lambda snap: snap.uploads, this_one, since=lambda u: u.start_time)
        await self._remember(slot, upload.id, info.get("workflowOwner", ""))
        final = await self._follow(lambda snap: snap.uploads.get(upload.id),
                                   f"upload {upload.id[:8]}")
        if final.status != "done":
            raise PutRejected(f"upload {upload.id[:8]} {final.status}: {final.error_message}")

    # --- workflows ----------------------------------------------------------------------

    async def workflow_start(self, pv: PV, _value: int, _writer: Writer) -> None:
        """Start a processing job; the put completes when the job is done or failed."""
        s, slot = _group(pv), _slot(pv)
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
                polls = self.state.snapshot.polls  # decide on a poll made after this point
                self.state.poll_soon()
                await self.state.wait_for(lambda snap: snap.polls > polls + 1 and not any(
                    j.workflow_name == name and j.owner == owner and not j.finished
                    for j in snap.jobs.values()))
            await self._dm_ready()
            job = await self._start(
                slot, f"workflow {name}", lambda: self.dm.start_processing_job(name, args, owner=owner),
                lambda snap: snap.jobs, lambda j: (j.workflow_name, j.owner) == (name, owner),
                since=lambda j: j.submission_time, confirm=lambda j: self._has_args(j, args))
            await self._remember(slot, job.id, owner)
        final = await self._follow(lambda snap: snap.jobs.get(job.id), f"job {job.id[:8]}")
        if final.status != "done":
            raise PutRejected(f"job {job.id[:8]} {final.status}: {final.error_message}")

    async def _has_args(self, job: Job, args: dict[str, Any]) -> bool:
        """Whether DM's job was given these arguments (DM keeps each at the job's top level)."""
        raw = (await self.dm.get_processing_job(job.id, job.owner)).raw
        return all(str(raw.get(key)) == str(value) for key, value in args.items())

    # --- metadata -----------------------------------------------------------------------

    async def metadata_upload(self, pv: PV, _value: int, _writer: Writer) -> None:
        """Add the run metadata in Metadata:Json to DM's dataset catalog; DatasetName_RBV
        is blank until DM has added it (a client waits for the name it expects)."""
        m = _group(pv)
        await self.hub.post(m + "DatasetName_RBV", "")
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
        log.info("dataset %s added to %s", name, experiment)


def _slot(pv: PV) -> str:
    """The slot a PV belongs to, as the state names it (e.g. ``WF2``)."""
    return f"{pv.group}{pv.slot}"


def _group(pv: PV) -> str:
    """The name prefix of a PV's group (e.g. ``DM:WF2:``)."""
    return pv.name[:-len(pv.suffix)]
