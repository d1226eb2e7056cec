"""DAQ service of the embedded DM: the file-transfer core it shares with uploads, and DAQs.

A transfer copies files from a local tree into ``<experiment dataDirectory>/<destDirectory>``
through a hidden temporary name and an atomic rename, so no partial file is ever visible,
and catalogues each copy. A DAQ watches its tree (inotify through watchdog, with periodic
rescans as the safety net) and copies every new or changed file once it stopped changing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import shutil
import stat
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine
from pathlib import Path, PurePosixPath
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver, ObservedWatch

from apsdm.dm.errors import DmError, InvalidArgument, ObjectNotFound
from apsdm.dm.records import ACTIVE_STATUSES

from .store import Doc, Store, ThrottledSaver
from .workflow.runner import as_bool, dm_timestamp

log = logging.getLogger(__name__)

STABLE_SECONDS = 0.5  # a DAQ copies a file once its size and mtime stayed unchanged this long
PARALLEL_COPIES = 4  # files a DAQ copies at once (many small files are latency-bound)
TICK_SECONDS = 0.1  # shortest pause between two passes of a DAQ (coalesces bursts of events)
RESCAN_SECONDS = 5.0  # full rescan period while inotify works: catches anything it missed
POLL_SECONDS = 1.0  # full rescan period when the tree cannot be watched
DRAIN_SECONDS = 30.0  # stopDaq waits at most this long for files that are still changing
_CHUNK = 1 << 20

WAITING, DONE, ERROR = "waiting", "done", "error"

FileStat = tuple[int, int]  # (size, mtime_ns): a file's version
FindExperiment = Callable[[str], Doc]  # experiment name -> full record, or ObjectNotFound
CatalogFile = Callable[[str, str, int, str], None]  # experiment, experimentFilePath, size, md5
Catalogued = Callable[[str, str], bool]  # experiment, experimentFilePath -> in the catalog


class TransferFailed(Exception):
    """A transfer cannot go on (e.g. its data directory vanished); the message says why."""


class SourceChanged(Exception):
    """The source file was not the expected version, or changed while it was copied."""


class CopyAborted(Exception):
    """The transfer was told to stop (stopUpload, or service shutdown) in mid-copy."""


# --- argument checks ---------------------------------------------------------------------


def flag(options: Doc, key: str, default: bool) -> bool:
    """A boolean taskInfo/daqInfo option (true/false/1/0 strings accepted)."""
    return default if options.get(key) is None else as_bool(options[key], key)


def relative_path(value: Any, what: str) -> PurePosixPath:
    """A path that stays inside its root (None, "" and "." are the root itself)."""
    if value is None:
        return PurePosixPath()
    if not isinstance(value, str) or "\0" in value:
        raise InvalidArgument(f"{what} must be a path string")
    path = PurePosixPath(value)
    if path.is_absolute() or ".." in path.parts:
        raise InvalidArgument(
            f"{what} {value!r} must be a relative path inside the experiment "
            "(no leading '/', no '..')")
    return path


def local_directory(value: Any) -> Path:
    """A DAQ's or upload's dataDirectory: an absolute local path, normalized."""
    if not isinstance(value, str) or not value.strip() or "\0" in value:
        raise InvalidArgument("dataDirectory must be a non-empty path")
    if value.startswith("@") or "://" in value:
        raise InvalidArgument(
            f"dataDirectory {value!r}: the embedded DM service copies local directories only")
    if not os.path.isabs(value):
        raise InvalidArgument(f"dataDirectory {value!r} must be an absolute path")
    return Path(os.path.normpath(value))


def existing_directory(value: Any) -> Path:
    """:func:`local_directory` that must exist now (a new DAQ or upload reads it)."""
    path = local_directory(value)
    if not path.is_dir():
        raise InvalidArgument(f"data directory {path} does not exist or is not a directory")
    return path


def destination(experiment: Doc, dest: PurePosixPath, source: Path) -> Path:
    """Where a transfer's files go; it must stay in the experiment and outside the source."""
    root = Path(experiment["dataDirectory"])
    target = root / dest
    resolved = target.resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise InvalidArgument(f"destDirectory {str(dest)!r} leaves the experiment directory")
    if resolved.is_relative_to(source.resolve()):
        raise InvalidArgument(
            f"the destination {target} lies inside the data directory {source}: "
            "copies would be copied again")
    return target


# --- copying -----------------------------------------------------------------------------


def file_stat(st: os.stat_result) -> FileStat:
    return st.st_size, st.st_mtime_ns


def list_files(root: Path, hidden: bool, known: Callable[[str, FileStat], bool] | None = None
               ) -> dict[str, tuple[FileStat, float]]:
    """Every regular file under root: relative path -> (version, ctime); dot-files if asked,
    and none that ``known`` says is already handled at this version."""
    if not root.is_dir():
        raise TransferFailed(f"data directory {root} no longer exists")
    found: dict[str, tuple[FileStat, float]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if not hidden:
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not hidden and name.startswith("."):
                continue
            path = os.path.join(dirpath, name)
            with contextlib.suppress(OSError):  # gone since listed: nothing to copy
                st = os.stat(path)
                if stat.S_ISREG(st.st_mode):
                    rel, version = os.path.relpath(path, root), file_stat(st)
                    if known is None or not known(rel, version):
                        found[rel] = (version, st.st_ctime)
    return found


def _is_copy_of(version: FileStat, path: Path) -> bool:
    """True if ``path`` holds this version already (copies keep size and mtime)."""
    try:
        st = path.stat()
    except OSError:
        return False
    return st.st_size == version[0] and abs(st.st_mtime_ns - version[1]) < 1_000_000


def copy_file(src: Path, dst: Path, abort: threading.Event, expect: FileStat | None = None,
              unless_copied_to: Path | None = None) -> tuple[int, str] | None:
    """Copy src to dst via a hidden temporary name and an atomic rename; return (size, md5).

    Returns None without copying if ``unless_copied_to`` already holds this version.
    Raises SourceChanged if the source is not version ``expect`` or changes meanwhile.
    """
    if abort.is_set():
        raise CopyAborted(str(src))
    with open(src, "rb") as fin:
        st = os.fstat(fin.fileno())
        version = file_stat(st)
        if expect is not None and version != expect:
            raise SourceChanged(str(src))
        if unless_copied_to is not None and _is_copy_of(version, unless_copied_to):
            return None
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.dmpart-{uuid.uuid4().hex[:8]}")
        digest = hashlib.md5(usedforsecurity=False)
        try:
            with open(tmp, "wb") as fout:
                while chunk := fin.read(_CHUNK):
                    if abort.is_set():
                        raise CopyAborted(str(src))
                    digest.update(chunk)
                    fout.write(chunk)
                fout.flush()
                os.fsync(fout.fileno())  # a resumed transfer trusts size+mtime: make them true
            if file_stat(os.fstat(fin.fileno())) != version:
                raise SourceChanged(str(src))
            os.chmod(tmp, stat.S_IMODE(st.st_mode))
            os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
            os.replace(tmp, dst)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return version[0], digest.hexdigest()


#: names of copy_file's temporary files and of directory-mode uploads' staging trees
_LEFTOVER = re.compile(r"\..+\.dmpart-[0-9a-f]{8}|\.dm-staging-[0-9a-f-]{36}")


def remove_leftovers(root: Path) -> int:
    """Delete the temporary files and staging trees under root that copies cut short by a
    crash (SIGKILL, power loss) left behind; return how many. Only safe while no transfer
    writes under root, i.e. when the service starts."""
    removed = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [d for d in dirnames if _LEFTOVER.fullmatch(d)]:
            dirnames.remove(name)
            shutil.rmtree(os.path.join(dirpath, name), ignore_errors=True)
            removed += 1
        for name in filenames:
            if _LEFTOVER.fullmatch(name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(dirpath, name))
                removed += 1
    return removed


def size_md5(path: Path) -> tuple[int, str]:
    """A file's size and md5, as a copy catalogues them."""
    digest = hashlib.md5(usedforsecurity=False)
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def describe(exc: OSError) -> str:
    """An OSError in words, without Python's class name."""
    return f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")


class Transfer:
    """A DAQ or upload record, and the per-file states behind its counters."""

    def __init__(self, kind: str, doc: Doc, target: Path, save: Callable[[Doc], None],
                 catalog: CatalogFile, catalogued: Catalogued) -> None:
        self.kind = kind
        self.doc = doc
        self.source = Path(doc["dataDirectory"])
        self.target = target
        self.hidden = flag(doc, "processHiddenFiles", False)
        self.abort = threading.Event()  # stops copies in their worker threads
        self.stop_requested = False
        self._save = save
        self._catalog = catalog
        self._catalogued = catalogued
        self._prefix = PurePosixPath(doc["destDirectory"] or ".")
        self._states: dict[str, str] = {}
        self._counts: Counter[str] = Counter()
        doc["processingErrors"] = {}  # a resumed transfer retries its failed files
        self._update_counters()

    @property
    def id(self) -> str:
        return str(self.doc["id"])

    def wanted(self, rel: str) -> bool:
        """Whether a file (relative path) belongs to this transfer (dot-files only if asked)."""
        return self.hidden or not any(p.startswith(".") for p in PurePosixPath(rel).parts)

    def set_state(self, rel: str, state: str, error: str = "") -> None:
        old = self._states.get(rel)
        if old is not None:
            self._counts[old] -= 1
        self._states[rel] = state
        self._counts[state] += 1
        errors = self.doc["processingErrors"]
        if state == ERROR:
            errors[rel] = error
            log.warning("%s %s: %s: %s", self.kind, self.id, rel, error)
        else:
            errors.pop(rel, None)
        self._update_counters()

    def forget(self, rel: str) -> None:
        """Drop a file that vanished before it could be copied."""
        if self._states.get(rel) == WAITING:
            del self._states[rel]
            self._counts[WAITING] -= 1
            self._update_counters()

    def record(self, rel: str, size: int, md5: str) -> None:
        """A file was copied: catalogue it and count it."""
        self._catalog(self.doc["experimentName"], str(self._prefix / rel), size, md5)
        self.set_state(rel, DONE)

    async def found_copied(self, rel: str) -> None:
        """A file already in place (copied before a restart): count it, and catalogue it if
        a crash came between its copy and its catalogue entry."""
        if self._catalogued(self.doc["experimentName"], str(self._prefix / rel)):
            self.set_state(rel, DONE)
            return
        try:
            self.record(rel, *await asyncio.to_thread(size_md5, self.target / rel))
        except OSError as exc:
            self.set_state(rel, ERROR, describe(exc))

    def leaves_storage(self, path: Path) -> bool:
        """Whether path's directory, symlinks resolved, lies outside the experiment's storage
        (a link planted under the destination after the transfer was checked and started)."""
        storage = Path(self.doc.get("storageDirectory") or self.target).resolve()
        return not path.parent.resolve().is_relative_to(storage)

    async def copy(self, rel: str, expect: FileStat | None = None, skip_copied: bool = True
                   ) -> bool:
        """Copy one file and record the outcome; False if it was not version ``expect``."""
        dst = self.target / rel
        if self.leaves_storage(dst):
            self.set_state(rel, ERROR, f"{dst.parent} leads out of the experiment directory")
            return True
        try:
            result = await asyncio.to_thread(copy_file, self.source / rel, dst, self.abort,
                                             expect, dst if skip_copied else None)
        except SourceChanged:
            return False
        except OSError as exc:
            self.set_state(rel, ERROR, describe(exc))
            return True
        if result is None:
            await self.found_copied(rel)
        else:
            self.record(rel, *result)
        return True

    def _update_counters(self) -> None:
        doc, counts = self.doc, self._counts
        total = len(self._states)
        finished = counts[DONE] + counts[ERROR]
        doc.update(nFiles=total, countFiles=total, nProcessedFiles=counts[DONE],
                   nProcessingErrors=counts[ERROR], nWaitingFiles=counts[WAITING])
        if total:
            doc["percentageComplete"] = round(100.0 * finished / total, 2)
        else:
            doc["percentageComplete"] = 0.0 if doc["status"] in ACTIVE_STATUSES else 100.0
        self._save(doc)

    def start(self) -> None:
        self.doc["status"] = "running"
        self._save(self.doc)

    def finish(self, status: str, error: str = "") -> None:
        now = time.time()
        self.doc.update(status=status, endTime=now, endTimestamp=dm_timestamp(now),
                        runTime=round(now - self.doc["startTime"], 3))
        if error:
            self.doc["errorMessage"] = error
        self._update_counters()
        log.info("%s %s %s%s", self.kind, self.id, status,
                 f": {error}" if error else "")


class TransferService:
    """What the DAQ and upload services share: records, the live transfers, their tasks."""

    kind = ""  # "daq" or "upload": the record kind in the store

    def __init__(self, store: Store, find_experiment: FindExperiment,
                 catalog: CatalogFile) -> None:
        self._store = store
        self._find = find_experiment
        self._catalog = catalog
        self._saver = ThrottledSaver(lambda doc: store.save_transfer(self.kind, doc))
        self._live: dict[str, Transfer] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def _work(self, transfer: Transfer) -> Coroutine[Any, Any, None]:
        """The coroutine that carries a transfer out (DAQ watch, or upload copy)."""
        raise NotImplementedError

    def _new_doc(self, experiment: Doc, source: Path, options: Doc) -> Doc:
        """A new record: the caller's options echoed, then DM's fields."""
        now = time.time()
        dest = relative_path(options.get("destDirectory"), "destDirectory")
        return {
            **options,
            "id": str(uuid.uuid4()),
            "experimentName": experiment["name"],
            "experimentStationName": experiment["stationName"],
            "dataDirectory": str(source),
            "destDirectory": "" if not dest.parts else str(dest),
            "status": "pending",
            "startTime": now,
            "startTimestamp": dm_timestamp(now),
            "storageDirectory": experiment["dataDirectory"],
            "storageHost": experiment["storageHost"],
            "storageUrl": Path(experiment["dataDirectory"]).as_uri(),
        }

    def _transfer(self, doc: Doc) -> Transfer:
        """Bind a record to its experiment and destination (checks both)."""
        experiment = self._find(doc["experimentName"])
        dest = relative_path(doc["destDirectory"], "destDirectory")
        target = destination(experiment, dest, Path(doc["dataDirectory"]))
        return Transfer(self.kind, doc, target, self._saver.save, self._catalog,
                        self._catalogued)

    def _catalogued(self, experiment: str, path: str) -> bool:
        return self._store.file(experiment, path) is not None

    def _launch(self, transfer: Transfer) -> None:
        """Mark a transfer running and carry it out in its own task."""
        transfer.start()
        self._live[transfer.id] = transfer
        self._tasks[transfer.id] = asyncio.create_task(self._guard(transfer))

    async def _guard(self, transfer: Transfer) -> None:
        """Run a transfer's work; whatever goes wrong ends in its record, never in the log only."""
        try:
            await self._work(transfer)
        except TransferFailed as exc:
            transfer.finish("failed", str(exc))
        except Exception as exc:
            log.exception("%s %s: internal error", self.kind, transfer.id)
            transfer.finish("failed", f"internal error: {exc}")
        finally:
            self._live.pop(transfer.id, None)
            self._tasks.pop(transfer.id, None)

    def recover(self) -> None:
        """At start: carry on every transfer that was pending or running when we stopped."""
        for doc in self._store.transfers(self.kind, ACTIVE_STATUSES):
            try:
                transfer = self._transfer(doc)
            except DmError as exc:
                now = time.time()
                doc.update(status="failed", errorMessage=f"cannot resume: {exc.message}",
                           endTime=now, endTimestamp=dm_timestamp(now))
                self._store.save_transfer(self.kind, doc)
                continue
            log.info("resuming %s %s of experiment %s", self.kind, doc["id"],
                     doc["experimentName"])
            if removed := remove_leftovers(transfer.target):  # before any copy starts
                log.info("removed %d temporary files left by copies cut short under %s",
                         removed, transfer.target)
            self._launch(transfer)

    async def shutdown(self) -> None:
        """Stop every transfer without ending it: the next start resumes it."""
        for transfer in self._live.values():
            transfer.abort.set()
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._saver.flush()

    def _list(self) -> list[Doc]:
        """Every record, live ones as they are this instant."""
        live = self._live
        return [live[d["id"]].doc if d["id"] in live else d
                for d in self._store.transfers(self.kind)]

    def _get(self, id: str) -> Doc:
        if id in self._live:
            return self._live[id].doc
        doc = self._store.transfer(self.kind, id)
        if doc is None:
            raise ObjectNotFound(f"{self.kind} {id} does not exist")
        return doc


# --- DAQs --------------------------------------------------------------------------------


class _Fanout(FileSystemEventHandler):
    """Watchdog handler of one tree: hands each event to the DAQs on the asyncio loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.callbacks: list[Callable[[str | None], None]] = []

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return
        if event.is_directory:  # a tree came, went or moved: rescan rather than trust events
            paths: list[str | None] = [None] if event.event_type != "modified" else []
        else:
            paths = [os.fsdecode(p) for p in (event.src_path, event.dest_path) if p]
        for path in paths:
            with contextlib.suppress(RuntimeError):  # the loop is closing
                self._loop.call_soon_threadsafe(self._deliver, path)

    def _deliver(self, path: str | None) -> None:
        for callback in list(self.callbacks):
            callback(path)


class WatchHub:
    """One watchdog observer for every DAQ; DAQs on the same tree share its watch."""

    def __init__(self) -> None:
        self._observer: BaseObserver | None = None
        self._trees: dict[Path, tuple[ObservedWatch, _Fanout]] = {}
        self._lock = asyncio.Lock()

    async def watch(self, root: Path, callback: Callable[[str | None], None]) -> bool:
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
                                                    recursive=True)
                except OSError as exc:
                    log.warning("cannot watch %s (%s): polling it every %.0f s", root,
                                exc.strerror or exc, POLL_SECONDS)
                    return False
                self._trees[root] = (watch, fanout)
            self._trees[root][1].callbacks.append(callback)
            return True

    async def unwatch(self, root: Path, callback: Callable[[str | None], None]) -> None:
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


class DaqRunner:
    """Watches one DAQ's tree and copies each new or changed file once it is stable."""

    def __init__(self, transfer: Transfer, hub: WatchHub) -> None:
        self.transfer = transfer
        self._hub = hub
        self._existing = flag(transfer.doc, "processExistingFiles", True)
        self._started = float(transfer.doc["startTime"])
        self._processed: dict[str, FileStat] = {}  # the version each file was handled at
        self._waiting: dict[str, tuple[FileStat, float]] = {}  # version seen, unchanged since
        self._dirty: set[str] = set()  # paths named by watch events since the last pass
        self._rescan = True
        self._wake = asyncio.Event()
        self._stop_at: float | None = None

    def notify(self, path: str | None) -> None:
        """A watch event: a file that changed, or None when a whole directory appeared."""
        if path is None:
            self._rescan = True
        else:
            rel = os.path.relpath(path, self.transfer.source)
            if not rel.startswith("..") and self.transfer.wanted(rel):
                self._dirty.add(rel)
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
        next_scan, final = 0.0, False
        while not self.transfer.abort.is_set():
            rescan = self._rescan or time.monotonic() >= next_scan
            if rescan:
                final = self._stop_at is not None
                self._rescan = False
                next_scan = time.monotonic() + period
            await self._pass(rescan)
            await self._copy_stable()
            if final and (not self._waiting or self._drain_expired()):
                self.transfer.finish("done")
                return
            await self._pause(next_scan)

    async def _pass(self, rescan: bool) -> None:
        """Look at the whole tree (rescan) or at the files events named and those waiting.

        A rescan leaves out, in its worker thread, files already handled at their current
        version: its cost in memory follows what changed, not the size of the tree.
        """
        dirty, self._dirty = self._dirty, set()
        if rescan:
            found = await asyncio.to_thread(list_files, self.transfer.source,
                                            self.transfer.hidden, self._handled)
            checked = found.keys() | self._waiting.keys()
        else:
            checked = dirty | self._waiting.keys()
            found = await asyncio.to_thread(self._stat, checked)
        self._observe(found, checked)

    def _handled(self, rel: str, version: FileStat) -> bool:
        """Whether a file was copied at this version and is not waiting (read from the
        rescan's thread: single dict lookups, safe under the GIL)."""
        return self._processed.get(rel) == version and rel not in self._waiting

    def _stat(self, rels: set[str]) -> dict[str, tuple[FileStat, float]]:
        """The current version of some files (those that are gone or not files are left out)."""
        found = {}
        for rel in rels:
            with contextlib.suppress(OSError):
                st = os.stat(self.transfer.source / rel)
                if stat.S_ISREG(st.st_mode):
                    found[rel] = (file_stat(st), st.st_ctime)
        return found

    def _observe(self, found: dict[str, tuple[FileStat, float]], checked: set[str]) -> None:
        """Start or restart the stability clock of every new or changed file."""
        now = time.monotonic()
        for rel in checked - found.keys():
            if self._waiting.pop(rel, None) is not None:
                self.transfer.forget(rel)
        for rel, (version, ctime) in found.items():
            if self._processed.get(rel) == version:
                continue
            seen = self._waiting.get(rel)
            if seen is None:
                if rel not in self._processed and not self._existing and ctime < self._started:
                    continue  # untouched since before the DAQ started
                self.transfer.set_state(rel, WAITING)
            if seen is None or seen[0] != version:
                # untouched for STABLE_SECONDS already (by the clock of its last change):
                # stable at first sight, no need to watch it settle
                age = time.time() - max(version[1] / 1e9, ctime)
                self._waiting[rel] = (version, now - STABLE_SECONDS if seen is None
                                      and age >= STABLE_SECONDS else now)

    async def _copy_stable(self) -> None:
        now = time.monotonic()
        stable = sorted(rel for rel, (_, since) in self._waiting.items()
                        if now - since >= STABLE_SECONDS)
        gate = asyncio.Semaphore(PARALLEL_COPIES)

        async def copy(rel: str) -> None:
            version, _ = self._waiting.pop(rel)
            async with gate:
                copied = await self.transfer.copy(rel, expect=version)
            if copied:
                self._processed[rel] = version
            else:
                self._dirty.add(rel)  # changed again: look at it anew

        await asyncio.gather(*(copy(rel) for rel in stable))

    def _drain_expired(self) -> bool:
        """After DRAIN_SECONDS of stopping, files still changing are given up as errors."""
        assert self._stop_at is not None
        if time.monotonic() - self._stop_at < DRAIN_SECONDS:
            return False
        for rel in self._waiting:
            self.transfer.set_state(rel, ERROR, "still changing when the DAQ was stopped")
        return True

    async def _pause(self, next_scan: float) -> None:
        """Sleep one tick, then until an event, a stable-file check or the next rescan."""
        await asyncio.sleep(TICK_SECONDS)
        if self._waiting or self._dirty or self._rescan or self.transfer.abort.is_set():
            return
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), max(0.0, next_scan - time.monotonic()))


class DaqService(TransferService):
    """startDaq, stopDaq, listDaqs, getDaqInfo."""

    kind = "daq"

    def __init__(self, store: Store, find_experiment: FindExperiment, catalog: CatalogFile,
                 hub: WatchHub) -> None:
        super().__init__(store, find_experiment, catalog)
        self._hub = hub
        self._runners: dict[str, DaqRunner] = {}

    def _work(self, transfer: Transfer) -> Coroutine[Any, Any, None]:
        runner = DaqRunner(transfer, self._hub)
        self._runners[transfer.id] = runner
        return self._run(runner)

    async def _run(self, runner: DaqRunner) -> None:
        try:
            await runner.run()
        finally:
            self._runners.pop(runner.transfer.id, None)

    def _active(self, experiment: str, source: Path) -> DaqRunner | None:
        for runner in self._runners.values():
            doc = runner.transfer.doc
            if doc["experimentName"] == experiment and doc["dataDirectory"] == str(source):
                return runner
        return None

    def startDaq(self, experimentName: str, dataDirectory: str,
                 taskInfo: Doc | None = None) -> Doc:
        """Start watching dataDirectory for the experiment, or return the DAQ already doing it."""
        experiment = self._find(experimentName)
        source = existing_directory(dataDirectory)
        running = self._active(experiment["name"], source)
        if running is not None:
            return running.transfer.doc
        options = dict(taskInfo or {})
        flag(options, "processExistingFiles", True)  # refuse a bad value now, not in the DAQ
        doc = self._new_doc(experiment, source, options)
        transfer = self._transfer(doc)
        self._launch(transfer)
        log.info("daq %s: %s -> %s", transfer.id, source, transfer.target)
        return doc

    async def stopDaq(self, experimentName: str, dataDirectory: str) -> Doc:
        """End the experiment's DAQ on dataDirectory after copying what it has seen."""
        experiment = self._find(experimentName)
        runner = self._active(experiment["name"], local_directory(dataDirectory))
        if runner is None:
            raise ObjectNotFound(
                f"no active DAQ of experiment {experimentName} on {dataDirectory}")
        runner.stop()
        task = self._tasks.get(runner.transfer.id)
        if task is not None:
            await asyncio.shield(task)  # a client that gives up does not cut the drain short
        return runner.transfer.doc

    def listDaqs(self) -> list[Doc]:
        return self._list()

    def getDaqInfo(self, id: str) -> Doc:
        return self._get(id)
