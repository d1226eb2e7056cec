"""DM's rule for a path inside an experiment (destDirectory, experimentFilePath): relative,
never leaving it. One definition, importable by the embedded service and the gateway alike."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

from .errors import InvalidArgument


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
