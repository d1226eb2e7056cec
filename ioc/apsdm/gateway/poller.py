"""The poll loop: DM -> state. One list call per kind per period refreshes every slot and
table; each poll's outcome (a snapshot, DM unreachable, or a refused call) goes to the
:class:`~apsdm.gateway.state.DmState`. While DM is unreachable it retries with backoff.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from apsdm.dm import CommunicationError, DmError, Esaf, Job, ObjectNotFound, Proposal
from apsdm.dm.api import DmApi

from .schema import JOBS_SHOWN
from .state import DmState, Lookup, Snapshot

log = logging.getLogger(__name__)
T = TypeVar("T")

# DM's DEFAULT list keys plus what the slots and the Stages table show
JOB_KEYS = ["id", "owner", "status", "stage", "startTime", "endTime", "runTime",
            "startTimestamp", "endTimestamp", "submissionTime", "submissionTimestamp",
            "errorMessage", "workflow"]
SLOW_EVERY = 10  # experiments and workflows change rarely: list them every 10th poll
MAX_BACKOFF = 30.0


class Poller:
    """Asks DM for its DAQs, uploads and jobs every period (and the rarely changing lists
    every SLOW_EVERY polls, and after DM was unreachable) and reports to the state."""

    def __init__(self, dm: DmApi, state: DmState, period: float) -> None:
        self.dm, self.state, self.period = dm, state, period
        self._full = True  # the next poll lists everything (at start, after an outage)
        self._job_skip: dict[str, tuple[int, str]] = {}  # owner -> (jobs to skip, last skipped id)

    async def run(self) -> None:
        """Poll forever: after the period, or at once when a command asks."""
        backoff, delay = self.period, 0.0
        while True:
            await self.state.next_poll(delay)
            delay = self.period
            try:
                await self.poll_once()
                backoff = self.period
            except CommunicationError as exc:
                self._full = True
                await self.state.unreachable(str(exc))
                backoff = delay = min(backoff * 2, MAX_BACKOFF)
            except Exception as exc:  # DM refused a list call, or sent what we cannot read:
                # say so and keep polling (a dead poller would leave every PV stale)
                log.error("DM poll failed: %s", exc, exc_info=not isinstance(exc, DmError))
                await self.state.refused(str(exc))

    async def poll_once(self) -> None:
        """One poll; raises if DM could not be reached or refused a call."""
        last = self.state.snapshot
        snap = Snapshot(polls=last.polls + 1)
        snap.daqs = {d.id: d for d in await self.dm.list_daqs()}
        snap.uploads = {u.id: u for u in await self.dm.list_uploads()}
        jobs = dict(last.jobs)  # finished jobs never change: keep those seen
        skips = dict(self._job_skip)  # kept only if the whole poll succeeds
        for owner in {self.dm.username, *self.state.owners}:
            listed, whole = await self._list_jobs(owner, skips)
            if whole:  # DM listed all of them: forget any it no longer has
                jobs = {i: j for i, j in jobs.items() if j.owner != owner}
            jobs.update((j.id, j) for j in listed)
        snap.jobs = self._retain(jobs)
        lookup = None
        if self._full or snap.polls % SLOW_EVERY == 1:
            snap.experiments = await self.dm.list_experiments()
            snap.workflows = await self.dm.list_workflows()
            lookup = await self._look_up_selection()
        else:
            snap.experiments, snap.workflows = last.experiments, last.workflows
        snap.requests = self.dm.requests
        self._job_skip, self._full = skips, False
        await self.state.polled(snap, lookup)

    async def _look_up_selection(self) -> Lookup:
        """The selected experiment as DM has it now (None if deleted) with its tied ESAF
        and proposal, and which selection."""
        selection, name = self.state.selection, self.state.selected
        if not name:
            return selection, None, None, None
        try:
            experiment = await self.dm.get_experiment(name)
        except ObjectNotFound as exc:  # deleted in DM: no longer selected
            log.warning("selected experiment %s: %s", name, exc)
            return selection, None, None, None
        esaf, proposal = await look_up_beamtime(self.dm, self.state, name)
        return selection, experiment, esaf, proposal

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
        keep = {j.id for j in newest[:JOBS_SHOWN]} | set(self.state.ids.values())
        return {i: j for i, j in jobs.items() if i in keep or not j.finished}



async def look_up_beamtime(dm: DmApi, state: DmState, experiment: str
                           ) -> tuple[Esaf | None, Proposal | None]:
    """The ESAF and proposal tied to ``experiment`` as DM's APS DB has them (None: none
    tied, or refused by DM, which is logged); nothing is asked for an untied one."""
    esaf_id, proposal_id = state.tied("Esaf", experiment), state.tied("Proposal", experiment)
    return (await _beamtime(lambda: dm.get_esaf(esaf_id), f"ESAF {esaf_id}", experiment)
            if esaf_id else None,
            await _beamtime(lambda: dm.get_proposal(proposal_id), f"proposal {proposal_id}",
                            experiment) if proposal_id else None)


async def _beamtime(get: Callable[[], Awaitable[T]], what: str, experiment: str) -> T | None:
    """One APS DB look-up; a refusal (unknown id, unreadable APS DB) shows none and is
    logged, so it never keeps the experiment from being selected or polled."""
    try:
        return await get()
    except CommunicationError:
        raise
    except DmError as exc:
        log.warning("%s of experiment %s: %s", what, experiment, exc)
        return None
