"""What every service of the embedded DM shares: argument checks (names, flags, local data
directories), ids and DM timestamps. Paths inside an experiment: :mod:`apsdm.dm.paths`.

Each check raises InvalidArgument with a message that names the argument, so the client
learns why DM refused it. Arguments come first, then ``what`` names them.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from apsdm.dm.errors import InvalidArgument

from .store import Doc

_NAME_RE = re.compile(r"(?!\.)[A-Za-z0-9._-]{1,64}")

FindExperiment = Callable[[str], Doc]  # experiment name -> full record, or ObjectNotFound


def check_name(value: Any, what: str) -> str:
    """An experiment or station name: safe as one path component."""
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise InvalidArgument(
            f"{what} {value!r} is not valid: use 1-64 letters, digits, '.', '_' or '-' "
            "(not starting with '.')")
    return value


def check_label(value: Any, what: str) -> str:
    """A user, role or type name: 1-64 printable characters (never used in a path)."""
    if not isinstance(value, str) or not 0 < len(value) <= 64 or not value.isprintable():
        raise InvalidArgument(f"{what} {value!r} is not valid: use 1-64 printable characters")
    return value


def as_bool(value: Any, what: str) -> bool:
    """A bool, or the strings true/false/1/0 (workflow editors often store strings)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if isinstance(value, str | int) and text in ("true", "1", "false", "0"):
        return text in ("true", "1")
    raise InvalidArgument(f"{what} must be true or false.")


def flag(options: Doc, key: str, default: bool) -> bool:
    """A boolean taskInfo/daqInfo option (true/false/1/0 strings accepted)."""
    return default if options.get(key) is None else as_bool(options[key], key)


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


def new_id() -> str:
    """A 24-hex id like the MongoDB ids DM gives workflows, datasets and files."""
    return secrets.token_hex(12)


def dm_timestamp(t: float) -> str:
    """DM's human-readable local time, e.g. ``2026/05/08 10:07:01 CDT``."""
    return time.strftime("%Y/%m/%d %H:%M:%S %Z", time.localtime(t))
