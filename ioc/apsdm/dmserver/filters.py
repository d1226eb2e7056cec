"""Which files of its data directory a DAQ or upload takes, from DM's daqInfo/taskInfo options
(dm-protocol.md section 1.3): ``filePathPattern``, ``skipFilePathPattern``,
``includeFileExtensions``, ``excludeFileExtensions`` and ``processHiddenFiles``.

Patterns are Unix shell wildcards on the path relative to the data directory (``*`` also
crosses ``/``); lists are comma-separated strings (``"h5,hdf5"``) or JSON lists.
Extensions are compared exactly, without their dot.
"""

from __future__ import annotations

from collections.abc import Callable
from fnmatch import fnmatchcase
from pathlib import PurePosixPath
from typing import Any

from apsdm.dm.errors import InvalidArgument

from .common import flag
from .store import Doc

FileFilter = Callable[[str], bool]  # relative path -> the transfer takes it


def _items(options: Doc, key: str) -> tuple[str, ...] | None:
    """A comma-separated (or JSON list) option as its non-empty items; None if not given."""
    value: Any = options.get(key)
    if value is None or value == "":
        return None
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidArgument(f"{key} must be a comma-separated string or a list of strings")
    return tuple(v.strip() for v in value if v.strip())


def _extensions(options: Doc, key: str) -> frozenset[str] | None:
    items = _items(options, key)
    return None if items is None else frozenset(i.lstrip(".") for i in items)


def file_filter(options: Doc) -> FileFilter:
    """The filter a transfer's options describe; InvalidArgument names a bad option."""
    hidden = flag(options, "processHiddenFiles", False)
    only, skip = _items(options, "filePathPattern"), _items(options, "skipFilePathPattern") or ()
    include = _extensions(options, "includeFileExtensions")
    exclude = _extensions(options, "excludeFileExtensions") or frozenset()

    def takes(rel: str) -> bool:
        path = PurePosixPath(rel)
        if not hidden and any(p.startswith(".") for p in path.parts):
            return False
        extension = path.suffix[1:]
        if (include is not None and extension not in include) or extension in exclude:
            return False
        if only is not None and not any(fnmatchcase(rel, p) for p in only):
            return False
        return not any(fnmatchcase(rel, p) for p in skip)

    return takes
