"""DM -> state: one list call per kind per period refreshes every slot and table.

The poller owns the latest :class:`Snapshot` of DM; commands wait on it for their
action to end. While DM is unreachable every readback goes to COMM/INVALID and the
poller retries with exponential backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from apsdm.dm import (
    CommunicationError,
    Daq,
    DmClient,
    DmError,
    Experiment,
    Job,
    ObjectNotFound,
    Upload,
)
from apsdm.dm.records import Workflow

from .hub import MAJOR, OK, STATUS_COMM, Alarm, Hub, comm_alarm, state_alarm
from .schema import Kind, Layout

log = logging.getLogger(__name__)

# DM's DEFAULT list keys plus what the slots and the Stages table show
JOB_KEYS = ["id", "owner", "status", "stage", "startTime", "endTime", "runTime",
            "startTimestamp", "endTimestamp", "submissionTime", "submissionTimestamp",
            "errorMessage", "workflow"]
SLOW_EVERY = 10  # experiments and workflows change rarely: list them every 10th poll
JOBS_SHOWN = 100  # rows of the Jobs table (newest first)
MAX_BACKOFF = 30.0
MISSING_POLLS = 5  # polls in a row without a followed object before giving up on it


@dataclass
class Snapshot:
    """What DM said in the last poll."""

    daqs: dict[str, Daq] = field(default_factory=dict)
    uploads: dict[str, Upload] = field(default_factory=dict)
    jobs: dict[str, Job] = field(default_factory=dict)
    experiments: list[Experiment] = field(default_factory=list)
    workflows: list[Workflow] = field(default_factory=list)
    experiment: Experiment | None = None
    connected: bool = False
    polls: int = 0


def _status_alarm(status: str) -> Alarm:
    return state_alarm(status) if status in ("failed", "aborted", "timeout") else OK


class Poller:
    """Refreshes the hub from DM every period and wakes commands waiting on DM state."""

    def __init__(self, hub: Hub, dm: DmClient, layout: Layout, ids: dict[str, str],
                 period: float) -> None:
        self.hub, self.dm, self.layout, self.ids = hub, dm, layout, ids
        self.period = period
        self.p = layout.prefix
        self.snapshot = Snapshot()
        self.experiment_name = ""  # the selected experiment (see select)
        self._selection = 0  # bumped by select: a poll begun before must not undo it
        self.owners: set[str] = set()  # workflow owners besides the DM user
        self._changed = asyncio.Condition()
        self._wake = asyncio.Event()
        self._last_status: dict[str, str] = {}
        self._down = False
        self._why = ""  # why the last poll could not reach DM
        self._reachable = False  # the last poll reached DM (even if DM refused a call)
        self._polling = False  # a poll is under way
        self._attempts = 0  # polls finished, whether or not DM answered
        self._before_comm: dict[str, Alarm] = {}  # alarms that COMM covers while DM is down
        self._job_skip: dict[str, tuple[int, str]] = {}  # owner -> (jobs to skip, last skipped id)

    # --- waiting ------------------------------------------------------------------------

    async def wait_for(self, predicate: Callable[[Snapshot], bool]) -> Snapshot:
        """Wait until a poll produces a snapshot for which ``predicate`` holds."""
        async with self._changed:
            await self._changed.wait_for(lambda: predicate(self.snapshot))
            return self.snapshot

    async def follow(self, find: Callable[[Snapshot], Any], what: str,
                     reached: Callable[[Any], bool] = lambda obj: obj.finished) -> Any:
        """Wait until the DM object ``find`` picks out of each poll is ``reached`` (by
        default: has ended); return it.

        Waits through DM outages (no poll, no verdict); raises LookupError if DM stops
        listing the object for MISSING_POLLS polls in a row, so no command waits forever.
        """
        missing, seen = 0, -1
        while True:
            snap = await self.wait_for(lambda s, seen=seen: s.polls != seen)
            seen = snap.polls
            obj = find(snap)
            if obj is not None and reached(obj):
                return obj
            missing = 0 if obj is not None else missing + 1
            if missing >= MISSING_POLLS:
                raise LookupError(f"DM no longer lists {what}")

    def select(self, name: str, experiment: Experiment | None) -> None:
        """Make ``experiment`` (looked up by a command) the selected one, at once."""
        self.experiment_name, self.snapshot.experiment = name, experiment
        self._selection += 1

    def poll_soon(self) -> None:
        """Poll now instead of at the end of the period (after a command changed DM)."""
        self._wake.set()

    async def ensure_connected(self) -> None:
        """Return at once if the last poll reached DM; otherwise poll now and wait for the
        outcome of a poll that started after this call (at start: for the first poll).

        Raises CommunicationError while DM stays unreachable, so that a command is never
        sent to a DM known to be down: a frozen DM would act on it when it thaws, after
        the client was told the command failed.
        """
        if self._reachable:
            return
        target = self._attempts + (2 if self._polling else 1)
        self.poll_soon()
        async with self._changed:
            await self._changed.wait_for(lambda: self._attempts >= target)
        if not self._reachable:
            raise CommunicationError(self._why)

    # --- the loop -----------------------------------------------------------------------

    async def run(self) -> None:
        backoff = self.period
        while True:
            self._wake.clear()  # a wake-up asked for during this poll makes another one
            self._polling = True
            reachable = True  # unless the poll says otherwise
            try:
                await self.poll_once()
                backoff = self.period
                delay = self.period
            except CommunicationError as exc:
                reachable = False
                await self._disconnected(str(exc))
                backoff = min(backoff * 2, MAX_BACKOFF)
                delay = backoff
            except Exception as exc:  # DM refused a list call, or sent what we cannot read:
                # say so and keep polling (a dead poller would leave every PV stale)
                log.error("DM poll failed: %s", exc, exc_info=not isinstance(exc, DmError))
                await self.hub.post(f"{self.p}Status:Message_RBV", f"DM poll failed: {exc}",
                                    state_alarm(str(exc)))
                delay = self.period
            self._polling, self._reachable = False, reachable
            self._attempts += 1
            async with self._changed:
                self._changed.notify_all()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    async def poll_once(self) -> None:
        snap = Snapshot(polls=self.snapshot.polls + 1, connected=True)
        snap.daqs = {d.id: d for d in await self.dm.list_daqs()}
        snap.uploads = {u.id: u for u in await self.dm.list_uploads()}
        jobs = dict(self.snapshot.jobs)  # finished jobs never change: keep those seen
        skips = dict(self._job_skip)  # kept only if the whole poll succeeds
        for owner in {self.dm.username, *self.owners}:
            listed, whole = await self._list_jobs(owner, skips)
            if whole:  # DM listed all of them: forget any it no longer has
                jobs = {i: j for i, j in jobs.items() if j.owner != owner}
            jobs.update((j.id, j) for j in listed)
        snap.jobs = self._retain(jobs)
        slow = not self.snapshot.connected or snap.polls % SLOW_EVERY == 1
        selection = self._selection
        snap.experiment = self.snapshot.experiment
        if slow:
            snap.experiments = await self.dm.list_experiments()
            snap.workflows = await self.dm.list_workflows()
            if self.experiment_name:
                try:
                    snap.experiment = await self.dm.get_experiment(self.experiment_name)
                except ObjectNotFound as exc:  # deleted in DM: no longer selected
                    log.warning("selected experiment %s: %s", self.experiment_name, exc)
                    snap.experiment = None
        else:
            snap.experiments = self.snapshot.experiments
            snap.workflows = self.snapshot.workflows
        if selection != self._selection:  # a command selected another one meanwhile
            snap.experiment = self.snapshot.experiment
        reconnected = not self.snapshot.connected
        if self._down:
            log.info("DM reachable again")
        self._down = False
        self.snapshot, self._job_skip = snap, skips
        await self.publish(snap, force=reconnected)
        await self._restore_alarms()
        async with self._changed:
            self._changed.notify_all()

    async def _list_jobs(self, owner: str, skips: dict[str, tuple[int, str]]
                         ) -> tuple[list[Job], bool]:
        """An owner's jobs from the first one unfinished at the last poll; True if all of them.

        DM lists jobs in submission order and a finished job never changes, so the leading
        finished ones are not asked for again: a poll costs what is active, not the owner's
        whole history (which DM would also cut at the list's limit, hiding new jobs). The
        last skipped job is listed again as an anchor; if it moved, DM's list changed under
        us and the whole list is asked for.
        """
        skip, anchor = skips.get(owner, (0, ""))
        start = max(skip - 1, 0)
        jobs = await self.dm.list_processing_jobs(owner=owner, keys=JOB_KEYS, skip=start)
        if anchor and (not jobs or jobs[0].id != anchor):
            start = 0
            jobs = await self.dm.list_processing_jobs(owner=owner, keys=JOB_KEYS)
        done = next((i for i, job in enumerate(jobs) if not job.finished), len(jobs))
        skips[owner] = (start + done, jobs[done - 1].id if done else "")
        return jobs, start == 0

    def _retain(self, jobs: dict[str, Job]) -> dict[str, Job]:
        """What a snapshot keeps: unfinished jobs, the slots' jobs and the newest JOBS_SHOWN."""
        newest = sorted(jobs.values(), key=lambda j: j.submission_time, reverse=True)
        keep = {j.id for j in newest[:JOBS_SHOWN]} | set(self.ids.values())
        return {i: j for i, j in jobs.items() if i in keep or not j.finished}

    async def _disconnected(self, why: str) -> None:
        if not self._down:  # say it once, not at every retry
            log.error("DM unreachable: %s (retrying with backoff)", why)
        self._down = True
        self._why = why
        self.snapshot.connected = False
        p = self.p
        await self.hub.post(f"{p}Status:Connected_RBV", 0, Alarm(MAJOR, STATUS_COMM, why))
        await self.hub.post(f"{p}Status:Message_RBV", why, Alarm(MAJOR, STATUS_COMM, why))
        alarm = comm_alarm(why)
        for name, pv in self.hub.pvs.items():
            if (pv.is_rbv or pv.field.kind is Kind.TABLE) and pv.group != "Status":
                if self.hub.alarms[name].status != alarm.status:
                    self._before_comm[name] = self.hub.alarms[name]
                await self.hub.set_alarm(name, alarm)

    async def _restore_alarms(self) -> None:
        """After a reconnection, give back the alarm each PV had before COMM (for PVs the
        poll itself did not post anew, such as messages and Metadata readbacks)."""
        saved, self._before_comm = self._before_comm, {}
        for name, alarm in saved.items():
            if self.hub.alarms[name].status == STATUS_COMM:
                await self.hub.set_alarm(name, alarm)

    # --- DM -> PVs ----------------------------------------------------------------------

    async def publish(self, snap: Snapshot, force: bool = False) -> None:
        p, post = self.p, self.hub.post
        await post(f"{p}Status:Connected_RBV", 1)
        await post(f"{p}Status:Message_RBV", "OK", force=force)
        await post(f"{p}Status:DmRequests_RBV", self.dm.requests)
        await self.publish_experiment(snap.experiment, force)
        for n in range(1, self.layout.n_daq + 1):
            await self._transfer_slot(f"DAQ{n}", snap.daqs.get(self.ids.get(f"DAQ{n}", "")), force)
        for n in range(1, self.layout.n_upload + 1):
            await self._transfer_slot(f"UP{n}", snap.uploads.get(self.ids.get(f"UP{n}", "")),
                                      force)
        for n in range(1, self.layout.n_workflow + 1):
            await self._job_slot(n, snap.jobs.get(self.ids.get(f"WF{n}", "")), force)
        await self._tables(snap)

    async def publish_experiment(self, exp: Experiment | None, force: bool = False) -> None:
        """Show the selected experiment's fields (blank when none is selected)."""
        e, post = f"{self.p}Experiment:", self.hub.post
        await post(e + "Name_RBV", exp.name if exp else "", force=force)
        await post(e + "Id_RBV", exp.id if exp else 0, force=force)
        await post(e + "Description_RBV", exp.description if exp else "", force=force)
        await post(e + "Station_RBV", exp.station if exp else "", force=force)
        await post(e + "Type_RBV", exp.type if exp else "", force=force)
        await post(e + "DataDirectory_RBV", exp.data_directory if exp else "", force=force)
        await post(e + "StorageDirectory_RBV", exp.storage_directory if exp else "", force=force)
        await post(e + "StartDate_RBV", exp.start_date if exp else "", force=force)
        await post(e + "Users_RBV", ",".join(exp.users) if exp else "", force=force)
        await post(e + "Valid_RBV", 1 if exp else 0, force=force)

    async def _transfer_slot(self, slot: str, t: Daq | Upload | None, force: bool) -> None:
        s, post = f"{self.p}{slot}:", self.hub.post
        if t is None:
            for suffix in ("Id_RBV", "Status_RBV"):
                await post(s + suffix, "", force=force)
            for suffix in ("NFiles_RBV", "NProcessed_RBV", "NErrors_RBV"):
                await post(s + suffix, 0, force=force)
            await post(s + "Percent_RBV", 0.0, force=force)
            if slot.startswith("DAQ"):
                await post(s + "NWaiting_RBV", 0, force=force)
                await post(s + "Active_RBV", 0, force=force)
            return
        await post(s + "Id_RBV", t.id, force=force)
        await post(s + "Status_RBV", t.status, _status_alarm(t.status), force=force)
        await post(s + "NFiles_RBV", t.n_files, force=force)
        await post(s + "NProcessed_RBV", t.n_processed, force=force)
        errors_alarm = state_alarm("copy errors") if t.n_errors else OK
        await post(s + "NErrors_RBV", t.n_errors, errors_alarm, force=force)
        await post(s + "Percent_RBV", round(t.percent, 2), force=force)
        if isinstance(t, Daq):
            await post(s + "NWaiting_RBV", t.n_waiting, force=force)
            await post(s + "Active_RBV", 1 if t.active else 0, force=force)
        await self._transition(slot, t.id, t.status, t.error_message, force)

    async def _transition(self, slot: str, obj_id: str, status: str, error: str,
                          force: bool) -> None:
        """Say in Message_RBV when a slot's DM object changes status (not every poll)."""
        name = f"{self.p}{slot}:Message_RBV"
        key = f"{obj_id}:{status}"
        if self._last_status.get(slot) != key:
            self._last_status[slot] = key
            text = f"{obj_id[:8]} {status}" + (f": {error}" if error else "")
            await self.hub.post(name, text, _status_alarm(status))
        elif force:  # after a reconnection: replace the COMM alarm
            await self.hub.post(name, self.hub[name], _status_alarm(status), force=True)

    async def _job_slot(self, n: int, job: Job | None, force: bool) -> None:
        s, post = f"{self.p}WF{n}:", self.hub.post
        if job is None:
            for suffix in ("JobId_RBV", "Status_RBV", "Stage_RBV"):
                await post(s + suffix, "", force=force)
            await post(s + "RunTime_RBV", 0.0, force=force)
            await post(s + "StagesDone_RBV", 0, force=force)
            await post(s + "StagesTotal_RBV", 0, force=force)
            await post(s + "Stages", [], force=force)
            return
        stages = job.stages
        run_time = job.run_time
        if not job.finished and job.raw.get("startTime"):
            run_time = time.time() - float(job.raw["startTime"])
        await post(s + "JobId_RBV", job.id, force=force)
        await post(s + "Status_RBV", job.status, _status_alarm(job.status), force=force)
        await post(s + "Stage_RBV", job.stage, force=force)
        await post(s + "RunTime_RBV", round(run_time, 1), force=force)
        await post(s + "StagesDone_RBV", sum(st.status in ("done", "failed") for st in stages),
                   force=force)
        await post(s + "StagesTotal_RBV", len(stages), force=force)
        rows = []
        for st in stages:
            for child in st.children or ({},):
                rows.append({
                    "stage": st.id, "child": int(child.get("childProcessNumber", -1)),
                    "status": str(child.get("status", st.status)),
                    "runTime": float(child.get("runTime") or 0.0),
                    "exitStatus": int(child.get("exitStatus") or 0),
                    "command": str(child.get("command", st.command)),
                    "stdOut": str(child.get("stdOut") or "")[-2000:],
                    "stdErr": str(child.get("stdErr") or "")[-2000:],
                })
        await post(s + "Stages", rows, force=force)
        await self._transition(f"WF{n}", job.id, job.status, job.error_message, force)

    async def _tables(self, snap: Snapshot) -> None:
        p, post = self.p, self.hub.post
        await post(p + "Experiments", [
            {"name": e.name, "id": e.id, "station": e.station, "type": e.type,
             "startDate": e.start_date, "description": e.description}
            for e in snap.experiments])
        for table, items in (("DAQs", snap.daqs), ("Uploads", snap.uploads)):
            await post(p + table, [
                {"id": t.id, "experiment": t.experiment_name, "dataDirectory": t.data_directory,
                 "destDirectory": t.dest_directory, "status": t.status, "nFiles": t.n_files,
                 "nProcessed": t.n_processed, "nErrors": t.n_errors, "percent": t.percent}
                for t in items.values()])
        newest = sorted(snap.jobs.values(), key=lambda j: j.submission_time, reverse=True)
        await post(p + "Jobs", [
            {"id": j.id, "workflow": j.workflow_name, "owner": j.owner, "status": j.status,
             "stage": j.stage, "runTime": j.run_time,
             "submitted": str(j.raw.get("submissionTimestamp", "")),
             "errorMessage": j.error_message}
            for j in newest[:JOBS_SHOWN]])
        await post(p + "Workflows", [
            {"name": w.name, "owner": w.owner, "stages": len(w.stages),
             "description": w.description}
            for w in snap.workflows])
