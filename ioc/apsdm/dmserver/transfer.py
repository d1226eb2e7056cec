"""What DAQs and uploads share: a transfer's record and per-file counters, and the service
base that keeps the live transfers, their tasks, recovery and shutdown.

A transfer copies files from a local tree into ``<experiment dataDirectory>/<destDirectory>``
and catalogues each copy.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from apsdm.dm.errors import DmError, InvalidArgument, ObjectNotFound
from apsdm.dm.paths import relative_path
from apsdm.dm.status import ACTIVE_STATUSES

from .common import FindExperiment, dm_timestamp, flag
from .copying import (
    FileStat,
    SourceChanged,
    Staged,
    TransferFailed,
    commit,
    describe,
    discard,
    remove_leftovers,
    size_md5,
    stage_file,
)
from .filters import file_filter
from .options import AfterCopy, check, root
from .processing import Processing
from .store import Doc, FileStates, Store, ThrottledSaver

log = logging.getLogger(__name__)

WAITING, DONE, ERROR = "waiting", "done", "error"

CatalogEntry = tuple[str, int, str]  # a file's path, size, md5
CatalogFiles = Callable[[str, list[CatalogEntry]], None]  # experiment, its new copies
Catalogued = Callable[[str, str], bool]  # experiment, experimentFilePath -> in the catalog
Wanted = tuple[str, FileStat | None]  # a file to copy (relative path), the version expected

BATCH_FILES = 256  # files a batch commits with one sync and one catalog transaction
BATCH_BYTES = 64 << 20  # and the bytes it may hold, so a sync never waits on too much data
# batches a transfer copies at once: half the CPUs (one stays for the service's loop), at most 8.
# On 2 CPUs that is one: two batches staging small files into one directory at once took 1.6x
# as long as one after the other (each create and rename waits for the directory's lock, and
# each batch's syncfs writes out the other's half-staged data too).
PARALLEL_BATCHES = max(1, min(8, (os.cpu_count() or 1) // 2))


@dataclass
class _Outcome:
    """What became of each file of a batch."""

    copied: list[CatalogEntry] = field(default_factory=list)  # relative path, size, md5
    present: list[str] = field(default_factory=list)  # already in place before the batch
    changed: list[str] = field(default_factory=list)  # not the version expected: not copied
    errors: list[tuple[str, str]] = field(default_factory=list)


def _batches(files: Sequence[Wanted]) -> Iterator[list[Wanted]]:
    """Files in batches of at most BATCH_FILES and (unless one file is larger) BATCH_BYTES."""
    batch: list[Wanted] = []
    size = 0
    for wanted in files:
        version = wanted[1]
        if batch and (len(batch) >= BATCH_FILES or size >= BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(wanted)
        size += version[0] if version else 0
    if batch:
        yield batch


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


class Transfer:
    """A DAQ or upload record, and the per-file states behind its counters: the states in
    the store, only their counts in memory."""

    def __init__(self, kind: str, doc: Doc, target: Path, save: Callable[[Doc], None],
                 catalog: CatalogFiles, catalogued: Catalogued, files: FileStates) -> None:
        self.kind = kind
        self.doc = doc
        self.source = Path(doc["dataDirectory"])
        self.target = target
        self.hidden = flag(doc, "processHiddenFiles", False)
        self.wanted = file_filter(doc)  # whether a file (relative path) is taken
        self.abort = threading.Event()  # stops copies in their worker threads
        self.stop_requested = False
        self._save = save
        self._catalog = catalog
        self._catalogued = catalogued
        prefix = str(PurePosixPath(doc["destDirectory"] or "."))
        self._prefix = "" if prefix == "." else prefix + "/"  # + a relative path: its catalog path
        self.files = files  # each file's state and the version it was handled at
        files.drop()  # a resumed transfer counts its files anew
        self._counts: Counter[str] = Counter()
        doc["processingErrors"] = {}  # a resumed transfer retries its failed files
        self._update_counters()

    @property
    def id(self) -> str:
        return str(self.doc["id"])

    def set_state(self, rel: str, state: str, error: str = "",
                  version: FileStat | None = None) -> None:
        """Put one file in a state (DONE or ERROR: handled at ``version``, if known)."""
        self._set_all([(rel, state, error)], {rel: version})

    def set_states(self, rels: Iterable[str], state: str) -> None:
        """Put many files in one state, publishing the counters once."""
        self._set_all([(rel, state, "") for rel in rels])

    def _set_all(self, changes: Sequence[tuple[str, str, str]],
                 versions: Mapping[str, FileStat | None] | None = None) -> None:
        """Change files' states (path, state, error) in the store in one transaction, keep
        the counts, and publish the counters once."""
        latest = {rel: (state, error) for rel, state, error in changes}
        if not latest:
            return
        old = self.files.get(latest)
        errors = self.doc["processingErrors"]
        for rel, (state, error) in latest.items():
            if rel in old:
                self._counts[old[rel][0]] -= 1
            self._counts[state] += 1
            if state == ERROR:
                errors[rel] = error
                log.warning("%s %s: %s: %s", self.kind, self.id, rel, error)
            else:
                errors.pop(rel, None)
        versions = versions or {}
        self.files.put([(rel, state, None if state == WAITING else versions.get(rel))
                        for rel, (state, _) in latest.items()])
        self._update_counters()

    def forget(self, rel: str) -> None:
        """Drop a file that vanished before it could be copied."""
        if self.files.get([rel]).get(rel, ("", None))[0] == WAITING:
            self.files.drop([rel])
            self._counts[WAITING] -= 1
            self._update_counters()

    def seen(self, rels: Iterable[str]) -> dict[str, FileStat | None]:
        """The files among rels this transfer has seen, each with the version it was copied
        or failed at (None while it waits)."""
        return {rel: version for rel, (_, version) in self.files.get(rels).items()}

    def record(self, rel: str, size: int, md5: str, version: FileStat | None = None) -> None:
        """A file was copied: catalogue it and count it."""
        self.record_all([(rel, size, md5)], {rel: version})

    def record_all(self, copied: Sequence[CatalogEntry],
                   versions: Mapping[str, FileStat | None] | None = None) -> None:
        """Files (relative path, size, md5) were copied, each at its version if known:
        catalogue them, one transaction per BATCH_FILES, and count them."""
        for start in range(0, len(copied), BATCH_FILES):
            self._catalog(self.doc["experimentName"],
                          [(self._prefix + rel, size, md5)
                           for rel, size, md5 in copied[start:start + BATCH_FILES]])
        self._set_all([(rel, DONE, "") for rel, _, _ in copied], versions)

    async def found_copied(self, rel: str, version: FileStat | None = None) -> None:
        """A file already in place (copied before a restart): count it, and catalogue it if
        a crash came between its copy and its catalogue entry."""
        if self._catalogued(self.doc["experimentName"], self._prefix + rel):
            self.set_state(rel, DONE, version=version)
            return
        try:
            self.record(rel, *await asyncio.to_thread(size_md5, self.target / rel), version)
        except OSError as exc:
            self.set_state(rel, ERROR, describe(exc), version)

    def leaves_storage(self, path: Path) -> bool:
        """Whether path's directory, symlinks resolved, lies outside the experiment's storage
        (a link planted under the destination after the transfer was checked and started)."""
        storage = Path(self.doc.get("storageDirectory") or self.target).resolve()
        return not path.parent.resolve().is_relative_to(storage)

    async def copy_all(self, files: Sequence[Wanted], skip_copied: bool = True) -> list[str]:
        """Copy files in batches, a few at once, and record each outcome; return the files
        that were not the version expected (neither copied nor counted). A batch is recorded
        (catalogued and counted, on the event loop) while the next one copies."""
        gate = asyncio.Semaphore(PARALLEL_BATCHES)

        async def one(batch: list[Wanted]) -> list[str]:
            async with gate:
                outcome = await self._copy_batch(batch, skip_copied)
            await asyncio.sleep(0)  # the next batch, let through the gate, starts its copy first
            return await self._record(batch, outcome)

        results = await asyncio.gather(*(one(batch) for batch in _batches(files)),
                                       return_exceptions=True)
        changed: list[str] = []
        for result in results:
            if isinstance(result, BaseException):
                raise result
            changed += result
        return changed

    async def _copy_batch(self, batch: list[Wanted], skip_copied: bool) -> _Outcome:
        """Copy one batch, in a worker thread (one sync for all)."""
        if flag(self.doc, "skipTransfer", False):
            return await asyncio.to_thread(self._in_place, batch)
        return await asyncio.to_thread(self._stage_and_commit, batch, skip_copied)

    async def _record(self, batch: list[Wanted], outcome: _Outcome) -> list[str]:
        """Catalogue and count a copied batch in one go; return the files that changed."""
        versions = dict(batch)
        self._set_all([(rel, ERROR, error) for rel, error in outcome.errors], versions)
        self.record_all(outcome.copied, versions)
        for rel in outcome.present:
            await self.found_copied(rel, versions[rel])
        return outcome.changed

    def _in_place(self, batch: list[Wanted]) -> _Outcome:
        """In a worker thread, under skipTransfer: take each file where it lies (its size,
        and its md5 unless skipChecksum), copying nothing."""
        outcome = _Outcome()
        checksum = not flag(self.doc, "skipChecksum", False)
        for rel, _ in batch:
            try:
                if checksum:
                    outcome.copied.append((rel, *size_md5(self.source / rel)))
                else:
                    outcome.copied.append((rel, (self.source / rel).stat().st_size, ""))
            except OSError as exc:
                outcome.errors.append((rel, describe(exc)))
        return outcome

    def _stage_and_commit(self, batch: list[Wanted], skip_copied: bool) -> _Outcome:
        """In a worker thread: stage every file of a batch, then commit them together."""
        outcome = _Outcome()
        staged: list[tuple[str, Staged]] = []
        outside: dict[Path, bool] = {}  # per destination directory, checked once a batch
        try:
            for rel, expect in batch:
                dst = self.target / rel
                if dst.parent not in outside:
                    outside[dst.parent] = self.leaves_storage(dst)
                if outside[dst.parent]:
                    outcome.errors.append(
                        (rel, f"{dst.parent} leads out of the experiment directory"))
                    continue
                try:
                    item = stage_file(self.source / rel, dst, self.abort, expect,
                                      dst if skip_copied else None)
                except SourceChanged:
                    outcome.changed.append(rel)
                    continue
                except OSError as exc:
                    outcome.errors.append((rel, describe(exc)))
                    continue
                if item is None:
                    outcome.present.append(rel)
                else:
                    staged.append((rel, item))
        except BaseException:
            discard(item for _, item in staged)
            raise
        try:
            results = commit([item for _, item in staged])
        except OSError as exc:
            outcome.errors += [(rel, describe(exc)) for rel, _ in staged]
            return outcome
        for (rel, item), error in zip(staged, results, strict=True):
            if error is None:
                outcome.copied.append((rel, item.size, item.md5))
            else:
                outcome.errors.append((rel, describe(error)))
        return outcome

    def _update_counters(self) -> None:
        doc, counts = self.doc, self._counts
        total = counts[WAITING] + counts[DONE] + counts[ERROR]
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
        self.files.drop()  # the counts in the record are all that is kept of its files
        self._update_counters()
        log.info("%s %s %s%s", self.kind, self.id, status,
                 f": {error}" if error else "")


class TransferService:
    """What the DAQ and upload services share: records, the live transfers, their tasks."""

    kind = ""  # "daq" or "upload": the record kind in the store

    def __init__(self, store: Store, find_experiment: FindExperiment,
                 catalog: CatalogFiles, processing: Processing) -> None:
        self._store = store
        self._find = find_experiment
        self._catalog = catalog
        self._processing = processing  # runs the jobs of per-file workflows
        self._saver = ThrottledSaver(lambda doc: store.save_transfer(self.kind, doc))
        self._live: dict[str, Transfer] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def _work(self, transfer: Transfer) -> Coroutine[Any, Any, None]:
        """The coroutine that carries a transfer out (DAQ watch, or upload copy)."""
        raise NotImplementedError

    def _check_options(self, options: Doc, experiment: Doc) -> None:
        """Refuse option values the transfer could not honour (see :func:`options.check`)."""
        check(options, self.kind, self._processing.getWorkflowByName,
              experiment["beamlineUserAccount"])

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
            "storageUrl": experiment["storageUrl"],  # the experiment root, as DM has it
            "workflowJobOwner": options.get("workflowOwner") or experiment["beamlineUserAccount"],
        }

    def _transfer(self, doc: Doc) -> Transfer:
        """Bind a record to its experiment and destination (checks both)."""
        experiment = root(self._find(doc["experimentName"]), doc)
        dest = relative_path(doc["destDirectory"], "destDirectory")
        target = destination(experiment, dest, Path(doc["dataDirectory"]))
        after_copy = AfterCopy(doc, target, self._catalog, self._processing.startProcessingJob)
        return Transfer(self.kind, doc, target, self._saver.save, after_copy,
                        self._catalogued, FileStates(self._store, doc["id"]))

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
                FileStates(self._store, doc["id"]).drop()
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
