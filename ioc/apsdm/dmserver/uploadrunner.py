"""Upload runs of the embedded DM service: copy a tree (or one file of it) into an experiment once.

``processingMode`` "files" copies file by file and counts each; "directory" copies every file
under a hidden temporary name first and gives them their names only if every file copied,
so the counters jump at once (under ``skipTransfer`` nothing is copied: both modes
take the files where they are). Files already copied (same size and mtime) are
skipped unless ``reprocessFiles`` is set, which also makes a resumed upload idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
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
    commit,
    describe,
    discard,
    list_files,
    stage_file,
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
    """Directory mode: every file staged beside its final name under a hidden temporary
    name (a few threads at once), then one sync, the renames and one fsync per directory:
    nothing is in place under its name, or counted, before every file has been copied."""
    made = await asyncio.to_thread(_directories, transfer, files)
    try:
        staged = await _stage_all(transfer, files, reprocess)
    except BaseException:
        await asyncio.to_thread(_remove_empty, made)
        raise
    transfer.record_all([(rel, staged[rel].size, staged[rel].md5)
                         for rel in files if rel in staged])
    for rel in files:
        if rel not in staged:
            await transfer.found_copied(rel)


async def _stage_all(transfer: Transfer, files: list[str], reprocess: bool
                     ) -> dict[str, Staged]:
    """Stage every file (a few threads at once), then sync them and give them their names;
    the first failure fails the upload."""
    parts = [files[i::PARALLEL_BATCHES] for i in range(PARALLEL_BATCHES)]
    done = await _in_threads(
        [functools.partial(_stage, transfer, part, reprocess) for part in parts],
        undo=lambda done: discard(item for part in done for item in part.values()))
    staged = {rel: item for part in done for rel, item in part.items()}
    try:
        failures = await asyncio.to_thread(commit, list(staged.values()))
    except OSError as exc:  # the sync failed: the staged copies are gone
        raise TransferFailed(describe(exc)) from None
    for rel, error in zip(staged, failures, strict=True):
        if error is not None:
            raise TransferFailed(f"cannot move {rel} into place: {describe(error)}")
    return staged


def _directories(transfer: Transfer, files: list[str]) -> list[Path]:
    """Make the destination directories the files need, each checked to stay in the
    experiment's storage; return those made (parents first), to remove if nothing comes."""
    first_file = {}  # each destination directory, named by a file that goes in it
    for rel in files:
        first_file.setdefault((transfer.target / rel).parent, transfer.target / rel)
    made: list[Path] = []
    for directory in sorted(first_file):
        if transfer.leaves_storage(first_file[directory]):
            raise TransferFailed(f"{directory} leads out of the experiment directory")
        missing = [d for d in (directory, *directory.parents) if not d.exists()]
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TransferFailed(f"cannot make {directory}: {describe(exc)}") from None
        made += reversed(missing)
    return made


def _remove_empty(made: list[Path]) -> None:
    """Remove the directories an upload made, deepest first, where it left them empty."""
    for directory in reversed(made):
        with contextlib.suppress(OSError):
            directory.rmdir()


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


def _stage(transfer: Transfer, files: list[str], reprocess: bool) -> dict[str, Staged]:
    """Copy the files not yet in place beside their final names; any failure fails the
    upload (and removes what this thread staged)."""
    staged: dict[str, Staged] = {}
    try:
        for rel in files:
            dst = transfer.target / rel
            try:
                item = stage_file(transfer.source / rel, dst, transfer.abort,
                                  unless_copied_to=None if reprocess else dst)
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
