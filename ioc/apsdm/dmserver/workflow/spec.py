"""Workflow definitions: the checks DM makes on addWorkflow/updateWorkflow, and their
normalized form (booleans and numbers that editors store as strings)."""

from __future__ import annotations

import copy
import re
from typing import Any

from apsdm.dm.errors import InvalidArgument
from apsdm.dm.records import RESERVED_JOB_KEYS

from ..common import as_bool
from .conditions import parse_condition

#: Top-level job fields; argsDict keys and output variables may not use these names.
RESERVED_KEYS = RESERVED_JOB_KEYS

_RUNTIME_STAGE_KEYS = (
    "childProcesses",
    "nQueuedChildProcesses",
    "nRunningChildProcesses",
    "nCompletedChildProcesses",
    "nFailedChildProcesses",
)
_REPEAT_KEYS = ("repeatPeriod", "repeatUntil", "maxRepeats")


def validate_workflow(workflow: dict) -> dict:
    """Check a workflow definition the way DM does on add/update; return a normalized copy.

    Raises InvalidArgument naming the offending key, so the client sees why it was refused.
    """
    if not isinstance(workflow, dict):
        raise InvalidArgument("Workflow must be a dictionary.")
    out = copy.deepcopy(workflow)
    for key in ("name", "owner"):
        value = out.get(key)
        if not isinstance(value, str) or not value.strip():
            raise InvalidArgument(f"Workflow {key} is missing or empty.")
        out[key] = value.strip()
    for key in ("description", "userAccount"):
        if out.get(key) is not None and not isinstance(out[key], str):
            raise InvalidArgument(f"Workflow {key} must be a string.")
    stages = out.get("stages")
    if not isinstance(stages, dict) or not stages:
        raise InvalidArgument("Workflow stages must be a non-empty dictionary.")
    for key, stage in stages.items():
        _validate_stage(key, stage)
    return out


def _validate_stage(key: Any, stage: Any) -> None:
    """Check (and normalize in place) one stage definition."""
    if not isinstance(key, str) or not key:
        raise InvalidArgument("Workflow stage keys must be non-empty strings.")
    if key == "workflow":
        raise InvalidArgument("Stage key 'workflow' is reserved.")
    if not isinstance(stage, dict):
        raise InvalidArgument(f"Stage {key}: definition must be a dictionary.")
    for runtime_key in _RUNTIME_STAGE_KEYS:
        stage.pop(runtime_key, None)
    if not isinstance(stage.get("command"), str) or not stage["command"].strip():
        raise InvalidArgument(f"Stage {key}: 'command' must be a non-empty string.")
    if "workingDir" in stage and not isinstance(stage["workingDir"], str):
        raise InvalidArgument(f"Stage {key}: workingDir must be a string.")
    if "parallelExec" in stage:
        stage["parallelExec"] = as_bool(stage["parallelExec"], f"Stage {key}: parallelExec")
    regexes = stage.get("outputVariableRegexList", [])
    if not isinstance(regexes, list):
        raise InvalidArgument(f"Stage {key}: outputVariableRegexList must be a list.")
    for pattern in regexes:
        if not isinstance(pattern, str):
            raise InvalidArgument(
                f"Stage {key}: output variable regex {pattern!r} is not a string."
            )
        try:
            names = re.compile(pattern).groupindex
        except re.error as exc:
            raise InvalidArgument(f"Stage {key}: invalid regex {pattern!r}: {exc}") from None
        if clash := sorted(RESERVED_KEYS.intersection(names)):
            raise InvalidArgument(f"Stage {key}: output variable name {clash[0]!r} is reserved.")
    present = [k for k in _REPEAT_KEYS if k in stage]
    if present and len(present) != len(_REPEAT_KEYS):
        raise InvalidArgument(
            f"Stage {key}: repeatPeriod, repeatUntil and maxRepeats must be used together."
        )
    if present:
        stage["repeatPeriod"] = _as_number(stage["repeatPeriod"], f"Stage {key}: repeatPeriod")
        max_repeats = _as_number(stage["maxRepeats"], f"Stage {key}: maxRepeats")
        if max_repeats != int(max_repeats) or max_repeats < 1:
            raise InvalidArgument(f"Stage {key}: maxRepeats must be a positive integer.")
        stage["maxRepeats"] = int(max_repeats)
        if not isinstance(stage["repeatUntil"], str) or not stage["repeatUntil"].strip():
            raise InvalidArgument(f"Stage {key}: repeatUntil must be a non-empty string.")
        try:
            parse_condition(stage["repeatUntil"])
        except InvalidArgument as exc:
            raise InvalidArgument(f"Stage {key}: {exc}") from None


def _as_number(value: Any, what: str) -> float:
    """A non-negative int/float, or a string holding one."""
    if isinstance(value, bool):
        raise InvalidArgument(f"{what} must be a number.")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InvalidArgument(f"{what} must be a number.") from None
    if not number >= 0 or number == float("inf"):
        raise InvalidArgument(f"{what} must be a finite number >= 0.")
    return int(number) if number == int(number) else number
