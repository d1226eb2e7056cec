"""What the gateway remembers across restarts: the selected experiment, slot settings
and the ids of the DAQs, uploads and jobs it started (so it reattaches, never restarts).
Only :class:`~apsdm.gateway.state.DmState` writes it.

An id is on disk before the command that started it completes. Settings are written as
EPICS autosave writes them: by a worker thread, shortly after they change (a burst of
writes makes one file write), and at shutdown; never with an fsync on the event loop that
every client's request waits behind.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SAVE_DELAY = 0.5  # a changed setting is on disk this soon (autosave's default period: 5 s)


class Persistence:
    """A JSON file written atomically (temp file + rename): at once (:meth:`save`) or soon
    after, in a worker thread (:meth:`save_soon`); never an older state over a newer one."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {"settings": {}, "ids": {}, "owners": {}}
        self._lock = threading.Lock()  # one write of the file at a time
        self._taken = 0  # states taken to be written, numbered
        self._written = 0  # the number of the state on disk
        self._soon: asyncio.TimerHandle | None = None
        self._writes: set[asyncio.Future[None]] = set()  # in worker threads
        self._failing = False
        if path.exists():
            try:
                loaded = json.loads(path.read_text())
                if not isinstance(loaded, dict) or not all(
                        isinstance(loaded.get(k, {}), dict) for k in self.data):
                    raise ValueError("not an object of 'settings', 'ids' and 'owners'")
                for key in self.data:
                    self.data[key].update(loaded.get(key, {}))
            except (OSError, ValueError) as exc:
                # keep the unreadable file for inspection; start from defaults
                backup = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
                path.replace(backup)
                log.error("state file %s unreadable (%s); moved to %s", path, exc, backup)

    @property
    def settings(self) -> dict[str, Any]:
        """Saved setting values by PV suffix path (e.g. ``DAQ1:DataDirectory``)."""
        return self.data["settings"]

    @property
    def ids(self) -> dict[str, str]:
        """DM ids of what each slot started, by slot (e.g. ``WF2``)."""
        return self.data["ids"]

    @property
    def owners(self) -> dict[str, str]:
        """Owners of the jobs the workflow slots started, by slot: the jobs to list."""
        return self.data["owners"]

    def save(self) -> None:
        """Write the file now (raises OSError if it cannot be written)."""
        self._cancel_soon()
        self._write(*self._take())

    def save_soon(self) -> None:
        """Write the file within SAVE_DELAY, in a worker thread."""
        if self._soon is None:
            self._soon = asyncio.get_running_loop().call_later(SAVE_DELAY, self._save_in_thread)

    async def flush(self) -> None:
        """Put every change on disk now (at shutdown)."""
        if self._cancel_soon():
            self._save_in_thread()
        await asyncio.gather(*self._writes, return_exceptions=True)  # _write_ended logs a failure

    def _cancel_soon(self) -> bool:
        """Cancel the write to come; whether there was one."""
        if self._soon is None:
            return False
        self._soon.cancel()
        self._soon = None
        return True

    def _save_in_thread(self) -> None:
        self._soon = None
        write = asyncio.ensure_future(asyncio.to_thread(self._write, *self._take()))
        self._writes.add(write)
        write.add_done_callback(self._write_ended)

    def _write_ended(self, write: asyncio.Future[None]) -> None:
        """A worker thread's write ended: if it failed, say so once and try again later."""
        self._writes.discard(write)
        if write.cancelled():
            return
        if (exc := write.exception()) is not None:
            if not self._failing:
                log.error("settings not saved to %s (trying again every %.1f s): %s",
                          self.path, SAVE_DELAY, exc)
            self._failing = True
            self.save_soon()
        elif self._failing:
            self._failing = False
            log.info("settings saved to %s again", self.path)

    def _take(self) -> tuple[int, str]:
        """The state to write (taken on the event loop, which alone changes it), numbered."""
        self._taken += 1
        return self._taken, json.dumps(self.data, indent=1, sort_keys=True)

    def _write(self, number: int, text: str) -> None:
        """Write state ``number``, unless a newer one is on disk already."""
        with self._lock:
            if number <= self._written:
                return  # a newer state is on disk already
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".state-")
            try:
                with os.fdopen(fd, "w") as fh:
                    fh.write(text)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            self._written = number
