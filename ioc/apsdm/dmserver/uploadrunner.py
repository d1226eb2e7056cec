"""Upload runs of the embedded DM service: copy a tree (or one file of it) into an experiment once.

``processingMode`` "files" copies file by file and counts each; "directory" copies the whole
tree into a hidden staging directory first and moves it into place only if every file
copied, so the counters jump at once (under ``skipTransfer`` nothing is copied: both modes
take the files where they are). Files already copied (same size and mtime) are
skipped unless ``reprocessFiles`` is set, which also makes a resumed upload idempotent.
"""

from __future__ import annotations

import asyncio
import functools
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from apsdm.dm.paths import relative_path

from .common import flag
from .copying import (
    CopyAborted,
    SourceChanged,
    Staged,
    TransferFailed,
    describe,
    discard,
    fsync_dir,
    list_files,
    stage_file,
    sync_staged,
)
from .transfer import ERROR, PARALLEL_BATCHES, WAITING, Transfer

T = TypeVar("T")


async def run_upload(transfer: Transfer) -> None:
    """Copy an upload's files, then end its record: done, failed (saying which files) or aborted."""
    doc = transfer.doc
    reprocess = flag(doc, "reprocessFiles", False)
    try:
        files = await asyncio.to_thread(_files, transfer)
        transfer.set_states(files, WAITING)
        if doc["processingMode"] == "directory" and not flag(doc, "skipTransfer", False):
            await _copy_tree(transfer, sorted(files), reprocess)
        else:
            changed = await transfer.copy_all([(rel, None) for rel in sorted(files)],
                                              skip_copied=not reprocess)
            for rel in changed:
                transfer.set_state(rel, ERROR, "changed while it was being copied")
    except CopyAborted:
        if transfer.stop_requested:
            transfer.finish("aborted", "stopped by stopUpload")
        return  # otherwise the service is stopping: the next start runs it again
    errors = doc["processingErrors"]
    if errors:
        rel = next(iter(errors))
        transfer.finish("failed", f"{len(errors)} of {doc['nFiles']} files failed; "
                                  f"{rel}: {errors[rel]}")
    else:
        transfer.finish("done")


def _files(transfer: Transfer) -> list[str]:
    """The files to upload: the whole tree, or only ``experimentFilePath``."""
    one = transfer.doc.get("experimentFilePath")
    if one is None:
        return [rel for rel in list_files(transfer.source, transfer.hidden) if transfer.wanted(rel)]
    rel = str(relative_path(one, "experimentFilePath"))
    if not (transfer.source / rel).is_file():
        raise TransferFailed(f"{transfer.source / rel} no longer exists")
    return [rel]


async def _copy_tree(transfer: Transfer, files: list[str], reprocess: bool) -> None:
    """Directory mode: all files into a staging tree, synced once, then all moved into
    place, each step a few threads at once; nothing is counted before every file is there."""
    staging = transfer.target / f".dm-staging-{transfer.id}"
    parts = [files[i::PARALLEL_BATCHES] for i in range(PARALLEL_BATCHES)]
    try:
        done = await _in_threads(
            [functools.partial(_stage, transfer, part, staging, reprocess) for part in parts],
            undo=lambda done: discard(item for part in done for item in part.values()))
        staged = {rel: item for part in done for rel, item in part.items()}
        try:
            await asyncio.to_thread(sync_staged, list(staged.values()))
        except OSError as exc:
            raise TransferFailed(describe(exc)) from None
        # a directory's renames in one thread (they share its lock), directories spread out
        by_directory: dict[Path, list[tuple[str, Staged]]] = {}
        for rel, item in staged.items():
            by_directory.setdefault((transfer.target / rel).parent, []).append((rel, item))
        groups = list(by_directory.items())
        await _in_threads([functools.partial(_move_into_place, transfer, groups[i::PARALLEL_BATCHES])
                           for i in range(PARALLEL_BATCHES)])
    finally:
        await asyncio.to_thread(shutil.rmtree, staging, True)
    transfer.record_all([(rel, staged[rel].size, staged[rel].md5)
                         for rel in files if rel in staged])
    for rel in files:
        if rel not in staged:
            await transfer.found_copied(rel)


async def _in_threads(jobs: list[Callable[[], T]],
                      undo: Callable[[list[T]], None] | None = None) -> list[T]:
    """Run the jobs in worker threads at once and wait for all (none is left running behind
    a failure); the first failure is raised, after ``undo`` of what the others did."""
    results = await asyncio.gather(*(asyncio.to_thread(job) for job in jobs),
                                   return_exceptions=True)
    done = [r for r in results if not isinstance(r, BaseException)]
    if failed := next((r for r in results if isinstance(r, BaseException)), None):
        if undo is not None:
            undo(done)
        raise failed
    return done


def _stage(transfer: Transfer, files: list[str], staging: Path, reprocess: bool
           ) -> dict[str, Staged]:
    """Copy the files not yet in place into the staging tree; any failure fails the upload."""
    staged: dict[str, Staged] = {}
    try:
        for rel in files:
            try:
                item = stage_file(transfer.source / rel, staging / rel, transfer.abort,
                                  unless_copied_to=None if reprocess else transfer.target / rel)
            except SourceChanged:
                raise TransferFailed(f"{rel} changed while it was being copied") from None
            except OSError as exc:
                raise TransferFailed(f"{rel}: {describe(exc)}") from None
            if item is not None:
                staged[rel] = item
    except BaseException:
        discard(staged.values())
        raise
    return staged


def _move_into_place(transfer: Transfer, groups: list[tuple[Path, list[tuple[str, Staged]]]]
                     ) -> None:
    """Move synced staged copies to their final names, directory by directory (renames within
    one file system), then make each directory's names durable (one fsync)."""
    for directory, items in groups:
        rel = items[0][0]
        if transfer.leaves_storage(transfer.target / rel):  # it checks the file's directory
            raise TransferFailed(f"{directory} leads out of the experiment directory")
        try:
            directory.mkdir(parents=True, exist_ok=True)
            for rel, item in items:
                os.replace(item.tmp, transfer.target / rel)
        except OSError as exc:
            raise TransferFailed(f"cannot move {rel} into place: {describe(exc)}") from None
        try:
            fsync_dir(directory)
        except OSError as exc:
            raise TransferFailed(f"cannot make the names durable: {describe(exc)}") from None
