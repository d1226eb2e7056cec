"""File copies of the embedded DM's transfers: atomic copy with md5, tree listing, clean-up.

A file is copied through a hidden temporary name and an atomic rename, so no partial file
is ever visible; its size and mtime are kept, which is how a resumed transfer knows a file
is already in place.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import stat
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

_CHUNK = 1 << 20

FileStat = tuple[int, int]  # (size, mtime_ns): a file's version


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
