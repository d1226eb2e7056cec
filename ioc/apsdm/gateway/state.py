"""The DM-side state and its one owner: the last snapshot of DM, the selected experiment,
the DM objects the slots follow (and their job owners), the connection, and the waiters.

The poll loop hands it what DM said; commands change it through its public methods; an
:class:`Observer` (the publisher) shows every change on PVs. It alone writes persistence,
so what is on disk is always what it holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from apsdm.dm import CommunicationError, Daq, Esaf, Experiment, Job, Proposal, Upload, Workflow

from .checks import is_username
from .persist import Persistence
from .schema import Record

log = logging.getLogger(__name__)

MISSING_POLLS = 5  # polls in a row without a followed object before giving up on it
SELECTION = "Experiment:Name"  # the setting that keeps the selection across restarts
TIES = "Beamtime"  # the saved ESAF/proposal ids of each experiment: {name: {"Esaf": id, ...}}


@dataclass
class Snapshot:
    """What DM said in the last poll."""

    daqs: dict[str, Daq] = field(default_factory=dict)
    uploads: dict[str, Upload] = field(default_factory=dict)
    jobs: dict[str, Job] = field(default_factory=dict)
    experiments: list[Experiment] = field(default_factory=list)
    workflows: list[Workflow] = field(default_factory=list)
    requests: int = 0  # DM calls the client had made by the end of this poll
    polls: int = 0


#: what a poll looked up for the selection: which selection, its experiment, ESAF, proposal
Lookup = tuple[int, Experiment | None, Esaf | None, Proposal | None]


class Link(StrEnum):
    """The connection to DM, as the last poll found it."""

    STARTING = "starting"  # no poll has ended yet
    UP = "up"  # the last poll reached DM (even if DM refused a call)
    DOWN = "down"  # the last poll could not reach DM


class Observer(Protocol):
    """Shows the state (the publisher): called after every change, in order."""

    async def changed(self, state: DmState, only: Record | None = None) -> None: ...

    async def lost(self, why: str) -> None: ...

    async def poll_failed(self, why: str) -> None: ...


class DmState:
    """Owns the DM-side state; the poll loop, the publisher and commands go through it."""

    def __init__(self, persist: Persistence, observer: Observer) -> None:
        self._persist = persist
        self.observer = observer
        self.snapshot = Snapshot()
        self.selected: str = persist.settings.get(SELECTION, "")  # the name asked for
        self.experiment: Experiment | None = None  # what DM answered for it
        self.esaf: Esaf | None = None  # what DM's APS DB answered for the tied ids
        self.proposal: Proposal | None = None
        self.selection = 0  # bumped by select: a lookup begun before must not undo it
        self.link = Link.STARTING
        self.why = ""  # why DM could not be reached
        self._owner_settings: dict[str, str] = {}  # WFn:Owner values, by slot
        self._changed = asyncio.Condition()
        self._wake = asyncio.Event()
        self._polling = False  # a poll is under way
        self._ended = 0  # polls ended, whether or not DM answered

    # --- reading ------------------------------------------------------------------------

    @property
    def ids(self) -> Mapping[str, str]:
        """DM ids of what each slot started and follows, by slot (e.g. ``WF2``)."""
        return self._persist.ids

    @property
    def settings(self) -> Mapping[str, Any]:
        """Saved setting values by PV suffix path (e.g. ``DAQ1:DataDirectory``)."""
        return self._persist.settings

    @property
    def owners(self) -> set[str]:
        """Workflow owners whose jobs to list besides the DM user: owners of the jobs the
        slots started and every valid WFn:Owner (so old settings add no DM calls)."""
        settings = {o for o in self._owner_settings.values() if is_username(o)}
        return set(self._persist.owners.values()) | settings

    def tied(self, kind: str, experiment: str | None = None) -> str:
        """The ``Esaf`` or ``Proposal`` id tied to an experiment (default: the selected one)."""
        name = self.selected if experiment is None else experiment
        return str(self._persist.settings.get(TIES, {}).get(name, {}).get(kind, ""))

    def followed(self, record: Record, slot: str) -> Any:
        """The DM object ``slot`` follows, as the last poll saw it (None: none)."""
        listed: Mapping[str, Any] = {Record.DAQ: self.snapshot.daqs,
                                     Record.UPLOAD: self.snapshot.uploads,
                                     Record.JOB: self.snapshot.jobs}[record]
        return listed.get(self.ids.get(slot, ""))

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
        if self.link is Link.UP:
            return
        target = self._ended + (2 if self._polling else 1)
        self.poll_soon()
        async with self._changed:
            await self._changed.wait_for(lambda: self._ended >= target)
        if self.link is not Link.UP:
            raise CommunicationError(self.why)

    # --- what the poll loop reports -----------------------------------------------------

    async def next_poll(self, delay: float) -> None:
        """Wait ``delay`` seconds, or less if a poll is asked for; then a poll begins."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), delay)
        self._wake.clear()  # a wake-up asked for during this poll makes another one
        self._polling = True

    async def polled(self, snap: Snapshot,
                     lookup: Lookup | None = None) -> None:
        """A poll reached DM: take its snapshot and, from ``lookup`` (the selection it
        looked up, and DM's answers), the selected experiment and its ESAF and proposal
        unless a command chose anew."""
        self.snapshot = snap
        if lookup is not None and lookup[0] == self.selection:
            self.experiment, self.esaf, self.proposal = lookup[1:]
        await self._ended_with(Link.UP, "")

    async def unreachable(self, why: str) -> None:
        """A poll could not reach DM."""
        if self.link is not Link.DOWN:  # say it once, not at every retry
            log.error("DM unreachable: %s (retrying with backoff)", why)
        await self._ended_with(Link.DOWN, why)

    async def refused(self, why: str) -> None:
        """A poll reached DM, but DM refused a list call or sent what cannot be read."""
        await self._ended_with(Link.UP, "", failure=why)

    async def _ended_with(self, link: Link, why: str, failure: str = "") -> None:
        if self.link is Link.DOWN and link is Link.UP:
            log.info("DM reachable again")
        self.link, self.why = link, why
        if link is Link.DOWN:
            await self.observer.lost(why)
        elif failure:
            await self.observer.poll_failed(failure)
        else:
            await self.observer.changed(self)
        self._polling = False
        self._ended += 1
        async with self._changed:
            self._changed.notify_all()

    # --- what commands change -----------------------------------------------------------

    async def select(self, name: str, experiment: Experiment | None,
                     esaf: Esaf | None = None, proposal: Proposal | None = None) -> None:
        """Make ``experiment`` (looked up by a command, with its tied ESAF and proposal) the
        selected one, at once, and keep its name for restarts."""
        self.selected, self.experiment = name, experiment
        self.esaf, self.proposal = esaf, proposal
        self.selection += 1
        self.save_setting(SELECTION, name)
        for record in (Record.EXPERIMENT, Record.ESAF, Record.PROPOSAL):
            await self.observer.changed(self, only=record)

    async def tie(self, kind: str, beamtime_id: str, found: Esaf | Proposal | None) -> None:
        """Tie an ESAF or proposal id (looked up by a command: ``found``) to the selected
        experiment, show it at once and keep it for restarts (blank id: untie)."""
        ties = dict(self._persist.settings.get(TIES, {}))
        mine = {**ties.get(self.selected, {}), kind: beamtime_id}
        ties[self.selected] = {k: v for k, v in mine.items() if v}
        self.save_setting(TIES, {k: v for k, v in ties.items() if v})
        record = Record.ESAF if kind == "Esaf" else Record.PROPOSAL
        setattr(self, record.value, found)
        self.selection += 1  # a lookup begun before must not undo it
        await self.observer.changed(self, only=record)

    def remember(self, slot: str, obj_id: str, owner: str = "") -> None:
        """Follow what a slot started and keep its id (and job owner) on disk for restarts;
        raises OSError if it could not be saved (it is followed all the same)."""
        self._persist.ids[slot] = obj_id
        if owner:
            self._persist.owners[slot] = owner
        self.poll_soon()
        self._persist.save()

    def save_setting(self, key: str, value: Any) -> None:
        """Keep a setting for restarts (autosave: on disk within persist.SAVE_DELAY)."""
        self._persist.settings[key] = value
        self._persist.save_soon()

    async def flush(self) -> None:
        """Put every kept setting on disk (at shutdown)."""
        await self._persist.flush()

    def set_owner(self, slot: str, owner: str) -> None:
        """A workflow slot's Owner setting: its jobs are listed from the next poll."""
        self._owner_settings[slot] = owner
