"""File copies of the embedded DM's transfers: atomic copy with md5, tree listing, clean-up.

A file is copied through a hidden temporary name and an atomic rename, so no partial file
is ever visible; its size and mtime are kept, which is how a resumed transfer knows a file
is already in place. Copies are staged, then committed in batches: one sync per batch
before the renames shares the cost of durability among its files.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import itertools
import os
import re
import stat
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

_CHUNK = 1 << 20
_OVERLAP_BYTES = 8 << 20  # from this size on, a file is hashed and written in two threads

FileStat = tuple[int, int]  # (size, mtime_ns): a file's version

#: suffixes of temporary names, from a random start (O_EXCL still refuses any clash)
_tmp_numbers = itertools.count(int.from_bytes(os.urandom(4)))


class TransferFailed(Exception):
    """A transfer cannot go on (e.g. its data directory vanished); the message says why."""


class SourceChanged(Exception):
    """The source file was not the expected version, or changed while it was copied."""


class CopyAborted(Exception):
    """The transfer was told to stop (stopUpload, or service shutdown) in mid-copy."""


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


@dataclass(frozen=True)
class Staged:
    """A copy written under its temporary name: not yet synced, renamed nor counted."""

    tmp: Path
    dst: Path
    size: int
    md5: str


def stage_file(src: Path, dst: Path, abort: threading.Event, expect: FileStat | None = None,
               unless_copied_to: Path | None = None) -> Staged | None:
    """Copy src beside dst under a hidden temporary name, with its md5 from the same read.

    Returns None without copying if ``unless_copied_to`` already holds this version.
    Raises SourceChanged if the source is not version ``expect`` or changes meanwhile.
    """
    if abort.is_set():
        raise CopyAborted(str(src))
    fin = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fin)
        version = file_stat(st)
        if expect is not None and version != expect:
            raise SourceChanged(str(src))
        if unless_copied_to is not None and _is_copy_of(version, unless_copied_to):
            return None
        tmp = dst.with_name(f".{dst.name}.dmpart-{next(_tmp_numbers) & 0xFFFFFFFF:08x}")
        fout = _create(tmp)
        try:
            try:
                size, md5 = _copy_data(fin, fout, st.st_size, abort, src)
                # a resumed transfer trusts size+mtime: the copy keeps both
                os.fchmod(fout, stat.S_IMODE(st.st_mode))
                os.utime(fout, ns=(st.st_atime_ns, st.st_mtime_ns))
            finally:
                os.close(fout)
            if file_stat(os.fstat(fin)) != version:
                raise SourceChanged(str(src))
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    finally:
        os.close(fin)
    return Staged(tmp, dst, size, md5)


def _create(path: Path) -> int:
    """Create a new file for writing, and its directories if they are missing."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    try:
        return os.open(path, flags, 0o600)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, flags, 0o600)


def _copy_data(fin: int, fout: int, size_hint: int, abort: threading.Event, src: Path
               ) -> tuple[int, str]:
    """Copy fin to fout in one read pass that also feeds the md5; return (size, md5).

    A large file's chunks are written (and their write-back to disk started) by a second
    thread while this one hashes them: md5 and write each let go of the GIL, so on two CPUs
    the copy takes about as long as the md5 alone, and the sync at commit finds little left.
    """
    digest = hashlib.md5(usedforsecurity=False)
    large = size_hint >= _OVERLAP_BYTES
    buffers = [memoryview(bytearray(min(_CHUNK, size_hint + 1))) for _ in range(1 + large)]
    size = 0
    with contextlib.ExitStack() as stack:
        writer = stack.enter_context(ThreadPoolExecutor(1, "dm-copy")) if large else None
        writing: Future[None] | None = None
        for view in itertools.cycle(buffers):
            n = os.readv(fin, [view])
            if not n:
                break
            if abort.is_set():
                raise CopyAborted(str(src))
            if writer is None:
                _write_all(fout, view[:n])
            else:  # the other buffer's chunk is written before this one's write starts
                if writing is not None:
                    writing.result()
                writing = writer.submit(_write_back, fout, view[:n], size)
            digest.update(view[:n])
            size += n
            if size >= size_hint:  # all it held when opened: growth shows in the version check
                break
        if writing is not None:
            writing.result()
    return size, digest.hexdigest()


def _write_all(fout: int, data: memoryview) -> None:
    written = 0
    while written < len(data):
        written += os.write(fout, data[written:])


def _write_back(fout: int, data: memoryview, offset: int) -> None:
    """Write a chunk of a large file (which starts at ``offset``) and start its write-back
    to disk (sync_file_range without waiting), so that the commit's sync is short."""
    _write_all(fout, data)
    if _sync_file_range is not None:
        _sync_file_range(fout, offset, len(data), _SYNC_FILE_RANGE_WRITE)


def discard(staged: Iterable[Staged]) -> None:
    """Remove copies staged but not committed (their batch was aborted or failed)."""
    for item in staged:
        item.tmp.unlink(missing_ok=True)


def commit(staged: Sequence[Staged]) -> list[OSError | None]:
    """Make a batch of staged copies durable, then visible: one sync of their file systems,
    the renames, then one fsync per directory that received names; per file, its failure.

    A failed sync fails (and removes) the whole batch: nothing in it counts as copied.
    """
    if not staged:
        return []
    sync_staged(staged)
    outcome: list[OSError | None] = []
    renamed_into: set[Path] = set()
    for item in staged:
        try:
            os.replace(item.tmp, item.dst)
            outcome.append(None)
            renamed_into.add(item.dst.parent)
        except OSError as exc:
            item.tmp.unlink(missing_ok=True)
            outcome.append(exc)
    failed_dirs: dict[Path, OSError] = {}
    for directory in renamed_into:
        try:
            fsync_dir(directory)
        except OSError as exc:
            failed_dirs[directory] = exc
    return [error or failed_dirs.get(item.dst.parent)
            for item, error in zip(staged, outcome, strict=True)]


def sync_staged(staged: Sequence[Staged]) -> None:
    """Put staged copies' data on disk (one sync of their file systems); if that fails,
    remove them and raise."""
    try:
        _sync_file_systems({item.tmp.parent for item in staged})
    except OSError:
        discard(staged)
        raise


def fsync_dir(directory: Path) -> None:
    """Make the names in a directory durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_libc = ctypes.CDLL(None, use_errno=True)
_syncfs = getattr(_libc, "syncfs", None)
_sync_file_range = getattr(_libc, "sync_file_range", None)  # Linux: start write-back
if _sync_file_range is not None:
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_SYNC_FILE_RANGE_WRITE = 2  # <fcntl.h>: start writing the range's dirty pages, do not wait


def _sync_file_systems(directories: set[Path]) -> None:
    """Write out every dirty page of the file systems holding these directories: one syncfs
    per file system (its errors, ENOSPC or EIO, fail the call); plain sync where it is missing."""
    if _syncfs is None:
        os.sync()
        return
    devices: set[int] = set()
    for directory in directories:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            device = os.fstat(fd).st_dev
            if device not in devices:
                devices.add(device)
                if _syncfs(fd) != 0:
                    errno = ctypes.get_errno()
                    raise OSError(errno, os.strerror(errno), str(directory))
        finally:
            os.close(fd)


#: names of stage_file's temporary files
_LEFTOVER = re.compile(r"\..+\.dmpart-[0-9a-f]{8}")


def remove_leftovers(root: Path) -> int:
    """Delete the temporary files under root that copies cut short by a crash (SIGKILL,
    power loss) left behind; return how many. Only safe while no transfer writes under
    root, i.e. when the service starts."""
    removed = 0
    for dirpath, _dirnames, filenames in os.walk(root):
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
