"""Watching DAQ trees: one watchdog (inotify) observer whose events reach the DAQs on the loop.

Events say where to look, and whether a writer closed the file (inotify's IN_CLOSE_WRITE,
or a rename into the tree), so it need not settle; a DAQ still rescans its whole tree every
RESCAN_SECONDS (POLL_SECONDS where the tree cannot be watched) to catch what they missed, or
less often where a rescan takes long (daqrunner.RESCAN_SPACING).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver, ObservedWatch

log = logging.getLogger(__name__)

# path (None: rescan everything), closed by its writer, a new directory (list its files)
Notify = Callable[[str | None, bool, bool], None]

# the events a DAQ uses: not opened / closed-without-writing, which the DAQ's own reads of
# every file it copies raise (two events per file, each decoded and dispatched in Python)
EVENTS: list[type[FileSystemEvent]] = [
    FileCreatedEvent, DirCreatedEvent, FileModifiedEvent, FileClosedEvent, FileMovedEvent,
    DirMovedEvent, FileDeletedEvent, DirDeletedEvent]

RESCAN_SECONDS = 5.0  # full rescan period while inotify works: catches anything it missed
POLL_SECONDS = 1.0  # full rescan period when the tree cannot be watched


class _Fanout(FileSystemEventHandler):
    """Watchdog handler of one tree: hands each event to the DAQs on the asyncio loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.callbacks: list[Notify] = []

    def on_any_event(self, event: FileSystemEvent) -> None:
        paths: list[tuple[str | None, bool, bool]]
        if event.event_type == "modified" and event.is_directory:
            paths = []
        elif event.event_type == "created" and event.is_directory:
            # files made in it before its watch was added have no event: list it (only it:
            # a detector making a directory per scan must not cost a walk of the whole tree)
            paths = [(os.fsdecode(event.src_path), False, True)]
        elif event.is_directory:  # a tree went or moved: rescan rather than trust events
            paths = [(None, False, False)]
        else:
            paths = [(os.fsdecode(event.src_path), event.event_type == "closed", False)]
            if event.dest_path:  # renamed into place: complete, as writers rename when done
                paths.append((os.fsdecode(event.dest_path), True, False))
        for path, done, tree in paths:
            with contextlib.suppress(RuntimeError):  # the loop is closing
                self._loop.call_soon_threadsafe(self._deliver, path, done, tree)

    def _deliver(self, path: str | None, closed: bool, tree: bool) -> None:
        for callback in list(self.callbacks):
            callback(path, closed, tree)


class WatchHub:
    """One watchdog observer for every DAQ; DAQs on the same tree share its watch."""

    def __init__(self) -> None:
        self._observer: BaseObserver | None = None
        self._trees: dict[Path, tuple[ObservedWatch, _Fanout]] = {}
        self._lock = asyncio.Lock()

    async def watch(self, root: Path, callback: Notify) -> bool:
        """Send events under root to callback; False if the tree cannot be watched."""
        async with self._lock:
            if root not in self._trees:
                fanout = _Fanout(asyncio.get_running_loop())
                try:
                    if self._observer is None:
                        self._observer = Observer()
                        self._observer.daemon = True
                        self._observer.start()
                    watch = await asyncio.to_thread(self._observer.schedule, fanout, str(root),
                                                    recursive=True, event_filter=EVENTS)
                except OSError as exc:
                    log.warning("cannot watch %s (%s): polling it every %.0f s", root,
                                exc.strerror or exc, POLL_SECONDS)
                    return False
                self._trees[root] = (watch, fanout)
            self._trees[root][1].callbacks.append(callback)
            return True

    async def unwatch(self, root: Path, callback: Notify) -> None:
        async with self._lock:
            watch, fanout = self._trees[root]
            fanout.callbacks.remove(callback)
            if not fanout.callbacks:
                del self._trees[root]
                if self._observer is not None:
                    with contextlib.suppress(KeyError, OSError):
                        await asyncio.to_thread(self._observer.unschedule, watch)

    async def close(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            await asyncio.to_thread(self._observer.join, 5)
            self._observer = None
