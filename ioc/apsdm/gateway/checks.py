"""Checks of client writes, named by the schema: each takes the PV name (for the message)
and the coerced value, and returns the value to store or raises :class:`PutRejected` with why.

They run before any DM call, so DM never sees an invalid argument.
"""

from __future__ import annotations

import json
import math
import posixpath
import re
import time
from collections.abc import Callable
from typing import Any

from apsdm.dm import paths as dm_paths
from apsdm.dm.errors import InvalidArgument
from apsdm.dm.records import RESERVED_JOB_KEYS, numeric_id

#: a DM account name (workflow owner): it becomes a URL path segment, so no '/', '?', ' ', ...
_USERNAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._@-]*")
#: a job argument: a ``$name`` variable of the workflow's commands
_VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: DM daqInfo options a slot's ``Options`` PV may carry (dm-protocol.md 1.3), by value type;
#: the common ones have their own PVs and are refused here, naming the PV
DM_OPTIONS: dict[str, type | tuple[type, ...]] = {
    "processExistingFiles": bool, "processHiddenFiles": bool, "reprocessFiles": bool,
    "skipTransfer": bool, "skipChecksum": bool, "skipCatalog": bool,
    "useAnalysisDirectoryAsRoot": bool, "excludeFileExtensions": str, "filePathPattern": str,
    "maxRunTimeInHours": (int, float), "uploadDataDirectoryOnExit": str,
    "uploadDestDirectoryOnExit": str,
}
OWN_PVS = {"includeFileExtensions": "IncludeExtensions", "skipFilePathPattern": "SkipPattern",
           "workflowName": "Workflow", "workflowOwner": "WorkflowOwner",
           "workflowArgs": "WorkflowArgs",
           "removeSourceFiles": "RemoveSource", "destDirectory": "DestDirectory",
           "experimentFilePath": "Path and Mode", "processingMode": "Mode"}
#: the states of a streaming handshake (``Stream:*``); apsdm_ophyd.pva.STATES copies them
STREAM_STATES = ("idle", "ready", "acquiring", "done", "error")

Check = Callable[[str, Any], Any]


class PutRejected(Exception):
    """A client write that the gateway refuses; the message tells the client why."""


def absolute_path(label: str, path: str) -> str:
    """A local path DM can use: absolute, no ``..``; refused with a reason otherwise."""
    if not path:
        raise PutRejected(f"{label} is empty")
    if not path.startswith("/"):
        raise PutRejected(f"{label} must be an absolute path: {path!r}")
    if ".." in path.split("/"):
        raise PutRejected(f"{label} must not contain '..': {path!r}")
    return posixpath.normpath(path)


def relative_path(label: str, path: str) -> str:
    """A destination inside the experiment by DM's own rule (:mod:`apsdm.dm.paths`)."""
    try:
        return str(dm_paths.relative_path(path, label)) if path else ""
    except InvalidArgument as exc:
        raise PutRejected(exc.message) from None


def digits(label: str, value: str) -> str:
    """An ESAF or proposal id as DM's APS DB service takes it: digits (blank: none)."""
    try:
        return str(numeric_id(value.strip(), label))  # DM's ids are numbers: no leading zeros
    except InvalidArgument as exc:
        raise PutRejected(exc.message) from None


def is_username(name: str) -> bool:
    """Whether ``name`` can be a DM account name."""
    return bool(_USERNAME.fullmatch(name))


def username(label: str, name: str) -> str:
    """A DM account name, or blank for the DM user; anything else is refused with why."""
    if name and not is_username(name):
        raise PutRejected(f"{label} {name!r} is not a DM user name "
                          "(letters, digits, '.', '_', '@', '-')")
    return name


def json_object(label: str, text: str) -> dict[str, Any]:
    """Parse a JSON object (``{}`` when blank); anything else is refused with why."""
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PutRejected(f"{label} is not valid JSON: {exc.msg} at character {exc.pos}") from None
    except RecursionError:
        raise PutRejected(f"{label} is nested too deeply") from None
    if not isinstance(value, dict):
        raise PutRejected(f"{label} must be a JSON object, not {type(value).__name__}")
    return value


def job_args(label: str, text: str) -> dict[str, Any]:
    """WFn:Args as DM takes them: a JSON object of variables with string or number values
    (``filePathList`` may be a list of strings); anything else is refused with why."""
    args = json_object(label, text)
    for key, value in args.items():
        if key in RESERVED_JOB_KEYS:
            raise PutRejected(f"{label}: {key!r} is a job field that DM reserves")
        if not _VARIABLE.fullmatch(key):
            raise PutRejected(f"{label}: {key!r} is not a variable name (letters, digits, '_')")
        if key == "filePathList" and isinstance(value, list):
            ok = all(isinstance(v, str) and "\0" not in v for v in value)
        else:
            ok = isinstance(value, int | float) or (isinstance(value, str) and "\0" not in value)
        if not ok:
            raise PutRejected(f"{label}: the value of {key} must be a string or a number")
    return args


def workflow_args(label: str, text: str) -> str:
    """DM's ``workflowArgs``: ``key:value`` items separated by spaces, keys variable names
    that DM does not set itself; anything else is refused with why."""
    for item in text.split():
        key, sep, _value = item.partition(":")
        if not sep or not _VARIABLE.fullmatch(key):
            raise PutRejected(f"{label}: {item!r} is not key:value (items separated by spaces)")
        if key in RESERVED_JOB_KEYS or key in ("filePath", "experimentFilePath",
                                                "experimentName", "dataDirectory"):
            raise PutRejected(f"{label}: {key!r} is set by DM for each file")
    return text


def dm_options(label: str, text: str) -> dict[str, Any]:
    """A slot's ``Options``: a JSON object of DM options it may carry, each of its type;
    an unknown key, or one that has its own PV, is refused with why."""
    options = json_object(label, text)
    for key, value in options.items():
        if key in OWN_PVS:
            raise PutRejected(f"{label}: set {key} with the slot's {OWN_PVS[key]} PV")
        wanted = DM_OPTIONS.get(key)
        if wanted is None:
            raise PutRejected(f"{label}: {key!r} is not a DM option; known: "
                              + ", ".join(sorted(DM_OPTIONS)))
        if not isinstance(value, wanted) or (isinstance(value, bool) and wanted is not bool):
            kind = {bool: "true or false", str: "a string"}.get(wanted, "a number")
            raise PutRejected(f"{label}: {key} must be {kind}, not {json.dumps(value)}")
    return options


def as_text(parse: Callable[[str, str], object]) -> Check:
    """A check that parses a text only to refuse bad input, and stores the text as written."""
    def check(label: str, text: str) -> str:
        parse(label, text)
        return text
    return check


json_object_text = as_text(json_object)
job_args_text = as_text(job_args)
dm_options_text = as_text(dm_options)


def stream_value(label: str, value: dict[str, Any]) -> dict[str, Any]:
    """A streaming handshake write: a known state, a bounded message, a finite timestamp."""
    state = value.get("state")
    if state not in STREAM_STATES:
        raise PutRejected(f"{label}: state {state!r} is not one of {', '.join(STREAM_STATES)}")
    if len(str(value.get("message", ""))) > 4000:
        raise PutRejected(f"{label}: message too long")
    timestamp = float(value.get("timestamp") or time.time())
    if not math.isfinite(timestamp):
        raise PutRejected(f"{label}: timestamp {timestamp} is not a finite number")
    return {**value, "timestamp": timestamp}
