"""The DAQ runner: one DAQ's passes over the files watch events named, rescans of its whole
tree beside them (a worker thread lists it while the passes go on), a stability clock per
file, and batched copies of the files that settled.

A file its writer closed (inotify's close-after-write, or a rename into the tree) is settled
at once; the clock only guards files found without such an event (polling, rescans)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import time
from pathlib import Path

from .common import flag
from .copying import CopyAborted, FileStat, TransferFailed, file_stat, list_files
from .transfer import ERROR, WAITING, Transfer
from .watch import POLL_SECONDS, RESCAN_SECONDS, WatchHub

STABLE_SECONDS = 0.5  # a file not seen closed is copied once unchanged this long
TICK_SECONDS = 0.1  # shortest pause between two passes of a DAQ (coalesces bursts of events)
DRAIN_SECONDS = 30.0  # stopDaq waits at most this long for files that are still changing
# a rescan walks the whole tree and looks every file up: on a tree of 100,000s of files it
# takes seconds, so the next one waits at least this many times as long as the last took
# (rescans then cost at most 1/(1+RESCAN_SPACING) of the DAQ's time, not all of it)
RESCAN_SPACING = 10.0


class DaqRunner:
    """Watches one DAQ's tree and copies each new or changed file once it is stable."""

    def __init__(self, transfer: Transfer, hub: WatchHub) -> None:
        self.transfer = transfer
        self._hub = hub
        self._existing = flag(transfer.doc, "processExistingFiles", True)
        self._started = float(transfer.doc["startTime"])
        self._waiting: dict[str, tuple[FileStat, float]] = {}  # version seen, unchanged since
        self._dirty: set[str] = set()  # paths named by watch events since the last pass
        self._closed: set[str] = set()  # of those, the ones their writer closed
        self._trees: set[str] = set()  # directories that appeared since the last pass
        self._rescan = True
        # the rescan under way: the files it found unhandled, and when the next one is due
        self._listing: asyncio.Task[tuple[dict[str, tuple[FileStat, float]], float]] | None = None
        self._wake = asyncio.Event()
        self._stop_at: float | None = None

    def notify(self, path: str | None, closed: bool, tree: bool) -> None:
        """A watch event: a file that changed (``closed``: its writer is done with it), a
        directory that appeared (``tree``), or None when the tree must be scanned anew."""
        if path is None:
            self._rescan = True
        elif not (rel := os.path.relpath(path, self.transfer.source)).startswith(".."):
            if tree:
                self._trees.add(rel)
            elif self.transfer.wanted(rel):
                self._dirty.add(rel)
                if closed:
                    self._closed.add(rel)
        self._wake.set()

    def stop(self) -> None:
        """End the DAQ after one last scan, once every file seen is copied."""
        if self._stop_at is None:
            self._stop_at = time.monotonic()
        self._rescan = True
        self._wake.set()

    async def run(self) -> None:
        source = self.transfer.source
        watched = await self._hub.watch(source, self.notify)
        try:
            await self._loop(RESCAN_SECONDS if watched else POLL_SECONDS)
        except CopyAborted:
            pass  # service shutdown: stays running, resumed at the next start
        finally:
            if watched:
                await self._hub.unwatch(source, self.notify)

    async def _loop(self, period: float) -> None:
        next_scan = 0.0
        final = False  # the rescan under way began after stopDaq
        ended = False  # such a rescan is done: once every file it found is copied, stop
        try:
            while not self.transfer.abort.is_set():
                if self._listing is None and (self._rescan or time.monotonic() >= next_scan):
                    final, self._rescan = self._stop_at is not None, False
                    self._listing = asyncio.create_task(self._rescan_tree(period))
                await self._pass()
                if self._listing is not None and self._listing.done():
                    found, next_scan = self._listing.result()
                    self._listing = None
                    self._observe(found, set(found), set())
                    ended = final
                await self._copy_stable()
                if ended and (not self._waiting or self._drain_expired()):
                    self.transfer.finish("done")
                    return
                await self._pause(None if self._listing else next_scan)
        finally:
            if self._listing is not None:
                self._listing.cancel()

    async def _rescan_tree(self, period: float
                           ) -> tuple[dict[str, tuple[FileStat, float]], float]:
        """A rescan, in a worker thread while the events' passes go on: the files of the
        whole tree not handled at their current version, and when the next rescan is due."""
        started = time.monotonic()
        try:
            found = await asyncio.to_thread(self._list_unhandled)
        finally:
            self._wake.set()  # the loop takes it in at once
        due = started + max(period, (time.monotonic() - started) * (1 + RESCAN_SPACING))
        return {rel: seen for rel, seen in found.items() if self.transfer.wanted(rel)}, due

    async def _pass(self) -> None:
        """Look at the files events named (and the directories that appeared), and at those
        waiting to settle."""
        dirty, self._dirty = self._dirty, set()
        closed, self._closed = self._closed, set()
        trees, self._trees = self._trees, set()
        checked = dirty | self._waiting.keys()
        found = await asyncio.to_thread(self._stat, checked)
        for tree in trees:  # new directories: their files, not the whole tree's
            listed = await asyncio.to_thread(self._list_unhandled, tree)
            found.update((rel, seen) for rel, seen in listed.items() if self.transfer.wanted(rel))
        checked |= found.keys()
        self._observe(found, checked, closed)

    def _list_unhandled(self, under: str = "") -> dict[str, tuple[FileStat, float]]:
        """In a worker thread: the files of the tree (or of its directory ``under``), less
        those copied (or failed) at their current version, looked up one by one in the store
        (a waiting file has no version)."""
        hidden = self.transfer.hidden
        if under and not hidden and any(p.startswith(".") for p in Path(under).parts):
            return {}
        with self.transfer.files.lookup() as lookup:
            def handled(rel: str, version: FileStat) -> bool:
                known = lookup(os.path.join(under, rel))
                return known is not None and known[1] == version
            try:
                found = list_files(self.transfer.source / under, hidden, handled)
            except TransferFailed:
                if not under:
                    raise
                return {}  # the new directory is gone again
        return {os.path.join(under, rel): seen for rel, seen in found.items()}

    def _stat(self, rels: set[str]) -> dict[str, tuple[FileStat, float]]:
        """The current version of some files (those that are gone or not files are left out)."""
        found = {}
        for rel in rels:
            with contextlib.suppress(OSError):
                st = os.stat(self.transfer.source / rel)
                if stat.S_ISREG(st.st_mode):
                    found[rel] = (file_stat(st), st.st_ctime)
        return found

    def _observe(self, found: dict[str, tuple[FileStat, float]], checked: set[str],
                 closed: set[str]) -> None:
        """Start or restart the stability clock of every new or changed file; a closed one
        is settled already."""
        now, wall = time.monotonic(), time.time()
        for rel in checked - found.keys():
            if self._waiting.pop(rel, None) is not None:
                self.transfer.forget(rel)
        new: list[str] = []
        known = self.transfer.seen(found.keys())  # with the version each was handled at
        for rel, (version, ctime) in found.items():
            if known.get(rel) == version:
                continue
            seen = self._waiting.get(rel)
            if seen is None:
                if rel not in known and not self._existing and ctime < self._started:
                    continue  # untouched since before the DAQ started
                new.append(rel)
            if seen is None or seen[0] != version or rel in closed:
                # closed by its writer, or untouched for STABLE_SECONDS already (by the clock
                # of its last change) when first seen: no need to watch it settle
                age = wall - max(version[1] / 1e9, ctime)
                settled = rel in closed or (seen is None and age >= STABLE_SECONDS)
                self._waiting[rel] = (version, now - STABLE_SECONDS if settled else now)
        self.transfer.set_states(new, WAITING)

    async def _copy_stable(self) -> None:
        now = time.monotonic()
        stable = sorted(rel for rel, (_, since) in self._waiting.items()
                        if now - since >= STABLE_SECONDS)
        files = [(rel, self._waiting.pop(rel)[0]) for rel in stable]
        # the transfer keeps, with each file's outcome, the version it was handled at
        self._dirty.update(await self.transfer.copy_all(files))  # changed again: look anew

    def _drain_expired(self) -> bool:
        """After DRAIN_SECONDS of stopping, files still changing are given up as errors."""
        assert self._stop_at is not None
        if time.monotonic() - self._stop_at < DRAIN_SECONDS:
            return False
        for rel in self._waiting:
            self.transfer.set_state(rel, ERROR, "still changing when the DAQ was stopped")
        return True

    async def _pause(self, next_scan: float | None) -> None:
        """Sleep one tick, then until an event, a stable-file check, the end of the rescan
        under way, or (None: none under way) the next rescan."""
        if self._listing is not None:  # its end is news at once, not after a tick
            await asyncio.wait([self._listing], timeout=TICK_SECONDS)
        else:
            await asyncio.sleep(TICK_SECONDS)
        if (self._waiting or self._dirty or self._rescan or self.transfer.abort.is_set()
                or (self._listing is not None and self._listing.done())):
            return
        self._wake.clear()
        timeout = None if next_scan is None else max(0.0, next_scan - time.monotonic())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)
