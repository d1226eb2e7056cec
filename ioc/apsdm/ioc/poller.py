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

from apsdm.dm import CommunicationError, Daq, DmClient, DmError, Experiment, Job, Upload
from apsdm.dm.records import Workflow

from .hub import OK, Alarm, Hub, comm_alarm, state_alarm
from .schema import Layout

log = logging.getLogger(__name__)

# DM's DEFAULT list keys plus what the slots and the Stages table show
JOB_KEYS = ["id", "owner", "status", "stage", "startTime", "endTime", "runTime",
            "startTimestamp", "endTimestamp", "submissionTime", "submissionTimestamp",
            "errorMessage", "workflow"]
SLOW_EVERY = 10  # experiments and workflows change rarely: list them every 10th poll
JOBS_SHOWN = 100  # rows of the Jobs table (newest first)
MAX_BACKOFF = 30.0


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
        self.experiment_name = ""  # the selected experiment, set by commands
        self.owners: set[str] = set()  # workflow owners besides the DM user
        self._changed = asyncio.Condition()
        self._wake = asyncio.Event()
        self._last_status: dict[str, str] = {}
        self._down = False
        self._before_comm: dict[str, Alarm] = {}  # Message_RBV alarms hidden by COMM

    # --- waiting ------------------------------------------------------------------------

    async def wait_for(self, predicate: Callable[[Snapshot], bool]) -> Snapshot:
        """Wait until a poll produces a snapshot for which ``predicate`` holds."""
        async with self._changed:
            await self._changed.wait_for(lambda: predicate(self.snapshot))
            return self.snapshot

    def poll_soon(self) -> None:
        """Poll now instead of at the end of the period (after a command changed DM)."""
        self._wake.set()

    # --- the loop -----------------------------------------------------------------------

    async def run(self) -> None:
        backoff = self.period
        while True:
            try:
                await self.poll_once()
                backoff = self.period
                delay = self.period
            except CommunicationError as exc:
                await self._disconnected(str(exc))
                backoff = min(backoff * 2, MAX_BACKOFF)
                delay = backoff
            except DmError as exc:  # DM answered, but refused a list call
                log.error("DM poll failed: %s", exc)
                await self.hub.post(f"{self.p}Status:Message_RBV", f"DM poll failed: {exc}",
                                    state_alarm(str(exc)))
                delay = self.period
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    async def poll_once(self) -> None:
        snap = Snapshot(polls=self.snapshot.polls + 1, connected=True)
        snap.daqs = {d.id: d for d in await self.dm.list_daqs()}
        snap.uploads = {u.id: u for u in await self.dm.list_uploads()}
        for owner in {self.dm.username, *self.owners}:
            for job in await self.dm.list_processing_jobs(owner=owner, keys=JOB_KEYS):
                snap.jobs[job.id] = job
        slow = not self.snapshot.connected or snap.polls % SLOW_EVERY == 1
        if slow:
            snap.experiments = await self.dm.list_experiments()
            snap.workflows = await self.dm.list_workflows()
            if self.experiment_name:
                try:
                    snap.experiment = await self.dm.get_experiment(self.experiment_name)
                except DmError as exc:
                    log.warning("selected experiment %s: %s", self.experiment_name, exc)
        else:
            snap.experiments = self.snapshot.experiments
            snap.workflows = self.snapshot.workflows
            snap.experiment = self.snapshot.experiment
        reconnected = not self.snapshot.connected
        if self._down:
            log.info("DM reachable again")
        self._down = False
        self.snapshot = snap
        await self.publish(snap, force=reconnected)
        async with self._changed:
            self._changed.notify_all()

    async def _disconnected(self, why: str) -> None:
        if not self._down:  # say it once, not at every retry
            log.error("DM unreachable: %s (retrying with backoff)", why)
        self._down = True
        self.snapshot.connected = False
        p = self.p
        await self.hub.post(f"{p}Status:Connected_RBV", 0, Alarm(2, 9, why))
        await self.hub.post(f"{p}Status:Message_RBV", why, Alarm(2, 9, why))
        alarm = comm_alarm(why)
        for name, pv in self.hub.pvs.items():
            if pv.is_rbv and pv.group != "Status":
                if self.hub.alarms[name].status != alarm.status:
                    self._before_comm[name] = self.hub.alarms[name]
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
        await post(e + "StartDate_RBV", exp.start_date[:39] if exp else "", force=force)
        await post(e + "Users_RBV", ",".join(exp.users) if exp else "", force=force)
        await post(e + "Valid_RBV", 1 if exp else 0, force=force)
        await self._reshow_message(e + "Message_RBV", force)

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
            await self._reshow_message(s + "Message_RBV", force)
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

    async def _reshow_message(self, name: str, force: bool) -> None:
        """After a reconnection, give a message back the alarm it had before COMM."""
        if force and name in self._before_comm:
            await self.hub.post(name, self.hub[name], self._before_comm.pop(name), force=True)

    async def _transition(self, slot: str, obj_id: str, status: str, error: str,
                          force: bool) -> None:
        """Say in Message_RBV when a slot's DM object changes status (not every poll)."""
        name = f"{self.p}{slot}:Message_RBV"
        key = f"{obj_id}:{status}"
        if self._last_status.get(slot) != key:
            self._last_status[slot] = key
            text = f"{obj_id[:8]} {status}" + (f": {error}" if error else "")
            await self.hub.post(name, text[:4000], _status_alarm(status))
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
            await self._reshow_message(s + "Message_RBV", force)
            return
        stages = job.stages
        run_time = job.run_time
        if not job.finished and job.raw.get("startTime"):
            run_time = time.time() - float(job.raw["startTime"])
        await post(s + "JobId_RBV", job.id, force=force)
        await post(s + "Status_RBV", job.status, _status_alarm(job.status), force=force)
        await post(s + "Stage_RBV", job.stage[:39], force=force)
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
