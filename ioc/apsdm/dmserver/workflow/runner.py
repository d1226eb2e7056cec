"""Processing-job engine of the embedded DM service: workflow checks, job records, stage runner.

Re-implements DM's processing service (dm-protocol.md section 4): stages run in sorted key
order through ``/bin/sh -c``; ``$variables`` come from argsDict, reserved names and earlier
stages' output regexes; stages may iterate over input files and repeat until a condition.
Variable values reach the shell only through the environment, so no value can inject a command.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import copy
import json
import logging
import operator
import os
import re
import signal
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from apsdm.dm.errors import InvalidArgument
from apsdm.dm.records import RESERVED_JOB_KEYS

log = logging.getLogger(__name__)

#: Top-level job fields; argsDict keys and output variables may not use these names.
RESERVED_KEYS = RESERVED_JOB_KEYS
#: DM's own message for a ``$filePath`` workflow started without a file spec.
INVALID_FILE_SPEC = "Invalid input file specification."
#: Stored stdout/stderr of a child process keeps at most this many trailing bytes.
OUTPUT_CAP = 64 * 1024
#: Seconds a child gets between SIGTERM and SIGKILL when its job is aborted.
KILL_GRACE = 2.0

_RUNTIME_STAGE_KEYS = (
    "childProcesses",
    "nQueuedChildProcesses",
    "nRunningChildProcesses",
    "nCompletedChildProcesses",
    "nFailedChildProcesses",
)
_REPEAT_KEYS = ("repeatPeriod", "repeatUntil", "maxRepeats")
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_ANY_VAR_RE = re.compile(r"\$(?:\{([A-Za-z_]\w*)\}|([A-Za-z_]\w*))")
_PLACEHOLDER_RE = re.compile(r"__dmv_(\d+)__")
_ENV_PREFIX = "DMV_"
_INT_RE = re.compile(r"\s*[-+]?\d+\s*")
_ERROR_TAIL = 1000

JobUpdate = Callable[[dict[str, Any]], None]


# ---------------------------------------------------------------- workflow definitions


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
            _parse_condition(stage["repeatUntil"])
        except InvalidArgument as exc:
            raise InvalidArgument(f"Stage {key}: {exc}") from None


def as_bool(value: Any, what: str) -> bool:
    """A bool, or the strings true/false/1/0 (workflow editors often store strings)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if isinstance(value, str | int) and text in ("true", "1", "false", "0"):
        return text in ("true", "1")
    raise InvalidArgument(f"{what} must be true or false.")


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


# ---------------------------------------------------------------- job records


def dm_timestamp(t: float) -> str:
    """DM's human-readable local time, e.g. ``2026/05/08 10:07:01 CDT``."""
    return time.strftime("%Y/%m/%d %H:%M:%S %Z", time.localtime(t))


def new_job(workflow: dict, owner: str, args: dict, job_id: str | None = None) -> dict:
    """The pending job record DM returns from startProcessingJob (args merged at top level)."""
    wf = validate_workflow(workflow)
    if not isinstance(owner, str) or not owner.strip():
        raise InvalidArgument("Job owner is missing or empty.")
    if job_id is not None and (not isinstance(job_id, str) or not job_id):
        raise InvalidArgument("Job id must be a non-empty string.")
    _check_args(args)
    now = time.time()
    job: dict[str, Any] = {
        "id": job_id or str(uuid.uuid4()),
        "owner": owner.strip(),
        "status": "pending",
        "submissionTime": now,
        "submissionTimestamp": dm_timestamp(now),
    }
    files = _file_list(args)
    job["countFiles"] = len(files) if files is not None else int("filePath" in args)
    job.update(copy.deepcopy(args))
    job["workflow"] = wf
    return job


def _check_args(args: Any) -> None:
    """argsDict: variable-name keys not reserved, scalar values (filePathList may be a list)."""
    if not isinstance(args, dict):
        raise InvalidArgument("argsDict must be a dictionary.")
    for key, value in args.items():
        if not isinstance(key, str) or not _NAME_RE.match(key):
            raise InvalidArgument(f"argsDict key {key!r} is not a valid variable name.")
        if key in RESERVED_KEYS:
            raise InvalidArgument(f"argsDict key {key!r} is reserved.")
        if key == "filePathList" and isinstance(value, list):
            if not all(isinstance(v, str) for v in value):
                raise InvalidArgument("filePathList must be a list of strings.")
        elif not isinstance(value, str | int | float | bool):
            raise InvalidArgument(f"argsDict value of {key!r} must be a string or a number.")
        elif isinstance(value, str) and "\0" in value:
            raise InvalidArgument(f"argsDict value of {key!r} contains a NUL character.")


def _file_list(source: Mapping[str, Any]) -> list[str] | None:
    """filePathList as a list: a list, a JSON list string or a comma-separated string."""
    value = source.get("filePathList")
    if value is None or isinstance(value, list):
        return value
    text = str(value).strip()
    if not text.startswith("["):
        return [part.strip() for part in text.split(",") if part.strip()]
    try:
        parsed = json.loads(text)
    except ValueError:
        raise InvalidArgument("filePathList is not a valid JSON list.") from None
    if not isinstance(parsed, list) or not all(isinstance(p, str) for p in parsed):
        raise InvalidArgument("filePathList must be a list of strings.")
    return parsed


def interrupted(job: dict, reason: str) -> dict:
    """Fail a job left pending/running by a stopped service (in place); return it."""
    if job.get("status") in ("pending", "running"):
        _end_job(job, "failed", reason)
    return job


def milestone(job: dict) -> tuple[str, int]:
    """What must be saved at once when it changes: the status and the processes started."""
    started = sum("pid" in child for stage in (job.get("workflow") or {}).get("stages", {}).values()
                  for child in (stage.get("childProcesses") or {}).values())
    return job.get("status", ""), started


def kill_leftovers(job: dict) -> int:
    """Kill the process groups that a job's running children left when the service died
    without stopping them (SIGKILL, crash); return how many groups were killed.

    A group is killed only if one of its processes still runs in the child's working
    directory, so a process id reused since then is never touched.
    """
    killed = 0
    for stage in (job.get("workflow") or {}).get("stages", {}).values():
        for child in (stage.get("childProcesses") or {}).values():
            pgid = child.get("pid")
            if child.get("status") != "running" or not isinstance(pgid, int) or pgid <= 1:
                continue
            if any(_cwd(pid) == child.get("workingDir") for pid in _group(pgid)):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, signal.SIGKILL)
                    killed += 1
                    log.warning("job %s: killed process group %d left by a stopped service",
                                job.get("id"), pgid)
    return killed


def _group(pgid: int) -> list[int]:
    """The processes of a process group (Linux /proc; none where it does not exist)."""
    members = []
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat") as fh:
                    stat = fh.read()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()  # state, ppid, pgrp, ...
            if len(fields) > 2 and int(fields[2]) == pgid:
                members.append(int(entry.name))
    return members


def _cwd(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return None


def _end_job(job: dict, status: str, error: str | None = None) -> None:
    """Set the final status and times; children still queued or running become failed."""
    now = time.time()
    for stage in (job.get("workflow") or {}).get("stages", {}).values():
        children = stage.get("childProcesses") or {}
        for child in children.values():
            if child.get("status") in ("pending", "running"):
                child["status"] = "failed"
                child["endTime"] = now
                child["runTime"] = now - child.get("startTime", now)
        if children:
            _count_children(stage)
    job["status"] = status
    job["endTime"] = now
    job["endTimestamp"] = dm_timestamp(now)
    job["runTime"] = now - job.get("startTime", now)
    if error is not None:
        job["errorMessage"] = error


def _count_children(stage: dict) -> None:
    """Refresh a stage's n*ChildProcesses counters from its children's statuses."""
    statuses = [c["status"] for c in stage.get("childProcesses", {}).values()]
    stage["nQueuedChildProcesses"] = statuses.count("pending")
    stage["nRunningChildProcesses"] = statuses.count("running")
    stage["nCompletedChildProcesses"] = statuses.count("done")
    stage["nFailedChildProcesses"] = statuses.count("failed")


# ---------------------------------------------------------------- $variable substitution


def _var_pattern(names: Iterable[str]) -> re.Pattern[str]:
    """``$name`` / ``${name}`` for known names, longest first (DM's textual replace order)."""
    ordered = sorted(set(names), key=len, reverse=True)
    if not ordered:
        return re.compile(r"(?!)")
    alt = "|".join(map(re.escape, ordered))
    return re.compile(rf"\$(?:\{{({alt})\}}|({alt}))")


def _render(command: str, pattern: re.Pattern[str], values: Mapping[str, str]) -> tuple[str, str]:
    """Return (shell text, display text) for a command.

    The shell text references each known variable as ``${DMV_name}`` (its value goes in the
    environment), keeping the author's quoting: inside '...' the quote is closed around a
    double-quoted reference. The display text is DM's plain textual substitution.
    Raises InvalidArgument for a non-integer value inside ``$((...))``, which bash would
    evaluate as an expression (its array subscripts can run commands).
    """
    shell: list[str] = []
    shown: list[str] = []
    # Contexts: "top", "cmd" $(...), "arith" $((...)), "bt" `...`, "dq" "..."; [kind, parens].
    stack: list[list[Any]] = [["top", 0]]
    i, n = 0, len(command)
    while i < n:
        ch = command[i]
        kind = stack[-1][0]
        match = pattern.match(command, i) if ch == "$" else None
        if match:
            name = match[1] or match[2]
            if kind == "arith" and not _INT_RE.fullmatch(values[name]):
                raise InvalidArgument(
                    f"${name} is used in $((...)) but its value {values[name]!r} is not an integer"
                )
            shell.append(f"${{{_ENV_PREFIX}{name}}}")
            shown.append(values[name])
            i = match.end()
            continue
        if ch == "'" and kind != "dq":
            end = command.find("'", i + 1)
            end = n if end < 0 else end
            body, close = command[i + 1 : end], command[end : end + 1]
            quoted = pattern.sub(lambda m: f"'\"${{{_ENV_PREFIX}{m[1] or m[2]}}}\"'", body)
            shell.append("'" + quoted + close)
            shown.append("'" + pattern.sub(lambda m: values[m[1] or m[2]], body) + close)
            i = end + 1
            continue
        text = ch
        if ch == "\\":
            text = command[i : i + 2]
        elif command.startswith("$((", i):
            text = "$(("
            stack.append(["arith", 0])
        elif command.startswith("$(", i):
            text = "$("
            stack.append(["cmd", 0])
        elif command.startswith("$$", i):
            text = "$$"
        elif ch == '"' or ch == "`":
            own = "dq" if ch == '"' else "bt"
            if kind == own:
                stack.pop()
            else:
                stack.append([own, 0])
        elif ch == "(" and kind in ("cmd", "arith"):
            stack[-1][1] += 1
        elif ch == ")" and kind in ("cmd", "arith"):
            if stack[-1][1]:
                stack[-1][1] -= 1
            else:
                stack.pop()
                text = "))" if kind == "arith" else ")"
        i += len(text)
        shell.append(text)
        shown.append(text)
    return "".join(shell), "".join(shown)


def _substitute(text: str, pattern: re.Pattern[str], values: Mapping[str, str]) -> str:
    """Plain textual substitution, for values that never meet a shell (workingDir)."""
    return pattern.sub(lambda m: values[m[1] or m[2]], text)


def _as_text(value: Any) -> str:
    """A variable's string form; a filePathList list becomes space-separated paths."""
    if isinstance(value, list):
        return " ".join(map(str, value))
    return str(value)


# ---------------------------------------------------------------- repeatUntil conditions

_COMPARE: dict[type[ast.cmpop], Callable[[Any, Any], Any]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
}
_ALLOWED_NODES = (
    ast.Expression,
    ast.Compare,
    ast.BoolOp,
    ast.UnaryOp,
    ast.Constant,
    ast.Name,
    ast.Load,
    ast.And,
    ast.Or,
    ast.Not,
    ast.USub,
    ast.UAdd,
    *_COMPARE,
)


def _parse_condition(expression: str) -> tuple[ast.Expression, list[str]]:
    """Parse a repeatUntil expression, each ``$var`` replaced by the placeholder
    ``__dmv_<n>__`` (n indexes the returned names); only safe node types pass."""
    names: list[str] = []

    def placeholder(match: re.Match[str]) -> str:
        names.append(match[1] or match[2])
        return f"__dmv_{len(names) - 1}__"

    text = _ANY_VAR_RE.sub(placeholder, expression.strip())
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        raise InvalidArgument(f"repeatUntil {expression!r} is not valid: {exc.msg}") from None
    for node in ast.walk(tree):
        if not isinstance(node, _ALLOWED_NODES):
            raise InvalidArgument(
                f"repeatUntil {expression!r} uses {type(node).__name__}; only comparisons, "
                "and/or/not, constants and $variables are allowed."
            )
        if isinstance(node, ast.Name) and _placeholder_name(node.id, names) is None:
            raise InvalidArgument(
                f"repeatUntil {expression!r}: bare name {node.id!r}; write ${node.id} or quote it."
            )
    return tree, names


def evaluate_condition(expression: str, values: Mapping[str, str]) -> bool:
    """Evaluate a repeatUntil expression without eval: $vars in strings are substituted,
    a bare $var is its value (a number if it reads as one)."""
    tree, names = _parse_condition(expression)
    try:
        return bool(_eval(tree.body, names, values))
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"cannot evaluate repeatUntil {expression!r}: {exc}") from None


def _eval(node: ast.AST, names: list[str], values: Mapping[str, str]) -> Any:
    """Evaluate one node of a tree already checked by _parse_condition."""
    match node:
        case ast.Constant(value=str() as text):
            return _PLACEHOLDER_RE.sub(lambda m: _in_string(m, names, values), text)
        case ast.Constant(value=value):
            return value
        case ast.Name(id=placeholder):
            name = _placeholder_name(placeholder, names) or ""
            if name not in values:
                raise ValueError(f"unknown variable ${name}")
            return _typed(values[name])
        case ast.UnaryOp(op=ast.Not(), operand=operand):
            return not _eval(operand, names, values)
        case ast.UnaryOp(op=ast.USub(), operand=operand):
            return -_eval(operand, names, values)
        case ast.UnaryOp(operand=operand):
            return +_eval(operand, names, values)
        case ast.BoolOp(op=op, values=operands):
            result: Any = None
            for operand in operands:
                result = _eval(operand, names, values)
                if bool(result) == isinstance(op, ast.Or):
                    break
            return result
        case ast.Compare(left=left, ops=ops, comparators=comparators):
            a = _eval(left, names, values)
            for op, right in zip(ops, comparators, strict=True):
                b = _eval(right, names, values)
                if not _COMPARE[type(op)](a, b):
                    return False
                a = b
            return True
    raise ValueError(f"unsupported expression {type(node).__name__}")


def _placeholder_name(text: str, names: list[str]) -> str | None:
    """The variable a ``__dmv_<n>__`` placeholder stands for (None if it is not one)."""
    match = _PLACEHOLDER_RE.fullmatch(text)
    return names[int(match[1])] if match and int(match[1]) < len(names) else None


def _in_string(match: re.Match[str], names: list[str], values: Mapping[str, str]) -> str:
    """A placeholder inside a string constant: the value; an unknown variable stays ``$name``."""
    name = _placeholder_name(match[0], names)
    return match[0] if name is None else values.get(name, "$" + name)


def _typed(text: str) -> Any:
    """A variable's value as a number or bool when it reads as one, else the string."""
    for convert in (int, float):
        with contextlib.suppress(ValueError):
            return convert(text)
    return {"True": True, "False": False}.get(text, text)


# ---------------------------------------------------------------- running a job


class _Tail:
    """The last OUTPUT_CAP bytes of a stream."""

    def __init__(self) -> None:
        self.data = bytearray()

    async def drain(self, stream: asyncio.StreamReader | None) -> None:
        """Read the stream to EOF, keeping only the tail."""
        while stream is not None and (chunk := await stream.read(OUTPUT_CAP)):
            self.data += chunk
            del self.data[:-OUTPUT_CAP]

    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")


class JobRunner:
    """Runs one processing job to its end, mutating the job dict and reporting each change."""

    def __init__(
        self, job: dict, on_update: JobUpdate, work_dir: Path, max_parallel: int = 4
    ) -> None:
        if max_parallel < 1:
            raise ValueError("max_parallel must be at least 1")
        self.job = job
        self.work_dir = Path(work_dir)
        self._on_update = on_update
        self._slots = asyncio.Semaphore(max_parallel)
        self._next_child = 0

    def _notify(self) -> None:
        """Report a state change; a failing callback is logged, never fatal to the job."""
        try:
            self._on_update(self.job)
        except Exception:
            log.exception("job %s: on_update failed", self.job.get("id"))

    def _finish(self, status: str, error: str | None = None) -> None:
        _end_job(self.job, status, error)
        self._notify()

    async def run(self) -> None:
        """Run every stage in sorted order; failures end up in the job, cancellation aborts it."""
        try:
            error = await self._run_stages()
        except asyncio.CancelledError:
            self._finish("failed", "aborted")
            raise
        except Exception as exc:  # a malformed job record must still end, not stay running
            log.exception("job %s: engine error", self.job.get("id"))
            error = f"Internal error: {exc}"
        self._finish("failed" if error else "done", error)

    async def _run_stages(self) -> str | None:
        """Start the job and run its stages; return the job's error message, if it failed."""
        job = self.job
        now = time.time()
        job.update(status="running", startTime=now, startTimestamp=dm_timestamp(now))
        stages: dict[str, dict] = job["workflow"]["stages"]
        for stage in stages.values():
            stage.setdefault("childProcesses", {})
            _count_children(stage)
        self._notify()
        try:
            self.work_dir.mkdir(parents=True, exist_ok=True)
            files = _file_list(job)
        except OSError as exc:
            return f"Cannot create job working directory: {exc}"
        except InvalidArgument as exc:
            return exc.message
        variables = {k: _as_text(v) for k, v in job.items() if k not in RESERVED_KEYS}
        variables.update(id=job["id"], owner=job["owner"], status="running")
        for key in sorted(stages):
            job["stage"] = variables["stage"] = key
            error = await self._run_stage(key, stages[key], variables, files)
            self._notify()
            if error:
                return error
        return None

    async def _run_stage(
        self, key: str, stage: dict, variables: dict[str, str], files: list[str] | None
    ) -> str | None:
        """Run a stage (once per file, repeated while its repeatUntil is false); return error."""
        command = stage["command"]
        uses_file = any(
            (m[1] or m[2]) == "filePath"
            for m in _var_pattern([*variables, "filePath"]).finditer(command)
        )
        bindings: list[dict[str, str]] = [{}]
        if uses_file and files:
            bindings = [{"filePath": path} for path in files]
        elif uses_file and (files is not None or "filePath" not in variables):
            return INVALID_FILE_SPEC
        runs = 0
        while True:
            runs += 1
            error = await self._run_children(key, stage, variables, bindings)
            if error or "repeatUntil" not in stage:
                return error
            try:
                if evaluate_condition(stage["repeatUntil"], variables):
                    return None
            except InvalidArgument as exc:
                return f"Stage {key} failed: {exc.message}"
            if runs >= stage["maxRepeats"]:
                return (
                    f"Stage {key} failed: repeatUntil {stage['repeatUntil']!r} still false "
                    f"after {runs} runs (maxRepeats {stage['maxRepeats']})."
                )
            await asyncio.sleep(stage["repeatPeriod"])

    async def _run_children(
        self, key: str, stage: dict, variables: dict[str, str], bindings: list[dict[str, str]]
    ) -> str | None:
        """Queue one child per binding, run them (in parallel if allowed); return error."""
        prepared = []
        for binding in bindings:
            values = {**variables, **binding}
            pattern = _var_pattern(values)
            try:
                shell_text, shown = _render(stage["command"], pattern, values)
            except InvalidArgument as exc:
                return f"Stage {key} failed: {exc.message}"
            cwd = self.work_dir / _substitute(stage.get("workingDir") or ".", pattern, values)
            prepared.append((values, shell_text, shown, os.path.normpath(cwd)))
        queued: list[tuple[dict, str, dict[str, str]]] = []
        for values, shell_text, shown, cwd in prepared:
            child: dict[str, Any] = {
                "stageId": key,
                "childProcessNumber": self._next_child,
                "command": shown,
                "workingDir": cwd,
                "status": "pending",
                "submitTime": time.time(),
            }
            if user := self.job["workflow"].get("userAccount"):
                child["userAccount"] = user
            stage["childProcesses"][str(self._next_child)] = child
            self._next_child += 1
            queued.append((child, shell_text, values))
        _count_children(stage)
        self._notify()
        if stage.get("parallelExec", True) and len(queued) > 1:
            async with asyncio.TaskGroup() as group:
                for item in queued:
                    group.create_task(self._run_child(stage, *item, variables))
        else:
            for item in queued:
                await self._run_child(stage, *item, variables)
        failed = [child for child, _, _ in queued if child["status"] == "failed"]
        return _failure_message(key, failed[0]) if failed else None

    async def _run_child(
        self,
        stage: dict,
        child: dict,
        shell_text: str,
        values: dict[str, str],
        variables: dict[str, str],
    ) -> None:
        """Run one child process; on success its output variables update ``variables``."""
        async with self._slots:
            child["status"] = "running"
            child["startTime"] = time.time()
            _count_children(stage)
            self._notify()
            env = dict(os.environ)
            env.update({_ENV_PREFIX + name: value for name, value in values.items()})
            if not os.path.isdir(child["workingDir"]):
                error = f"No such working directory: {child['workingDir']}"
                self._end_child(stage, child, None, "", error)
                return
            try:
                proc = await asyncio.create_subprocess_exec(
                    "/bin/sh",
                    "-c",
                    shell_text,
                    cwd=child["workingDir"],
                    env=env,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                    start_new_session=True,
                )
            except (OSError, ValueError) as exc:
                self._end_child(stage, child, None, "", f"Cannot start command: {exc}")
                return
            child["pid"] = proc.pid  # its process group, killed at restart if orphaned
            self._notify()
            out, err = _Tail(), _Tail()
            try:
                await asyncio.gather(out.drain(proc.stdout), err.drain(proc.stderr))
                code = await proc.wait()
            except asyncio.CancelledError:
                await _terminate(proc)
                self._end_child(stage, child, proc.returncode, out.text(), err.text())
                raise
            if code == 0:
                self._collect_outputs(stage, out.text(), variables)
            self._end_child(stage, child, code, out.text(), err.text())

    def _end_child(
        self, stage: dict, child: dict, code: int | None, stdout: str, stderr: str
    ) -> None:
        """Record a child's end; it is done only with exit status 0."""
        now = time.time()
        child.update(
            status="done" if code == 0 else "failed",
            endTime=now,
            runTime=now - child["startTime"],
            exitStatus=code,
            stdOut=stdout,
            stdErr=stderr,
        )
        _count_children(stage)
        self._notify()

    def _collect_outputs(self, stage: dict, stdout: str, variables: dict[str, str]) -> None:
        """Apply the stage's output regexes to stdout; named groups become job variables."""
        text = stdout.strip()
        for pattern in stage.get("outputVariableRegexList", []):
            match = re.search(pattern, text, re.MULTILINE)
            for name, value in (match.groupdict() if match else {}).items():
                if value is not None:
                    variables[name] = value
                    self.job[name] = value


async def _terminate(proc: asyncio.subprocess.Process) -> None:
    """Stop a child's whole process group: SIGTERM, a short grace period, then SIGKILL
    (sent even if the shell is gone, for processes it left in the group)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), KILL_GRACE)
    finally:  # even if cancelled again while waiting
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    await proc.wait()


def _failure_message(key: str, child: dict) -> str:
    """DM-style job error for a failed child: stage, exit status, tail of stderr."""
    code = child.get("exitStatus")
    stderr = (child.get("stdErr") or "").strip()
    if code is None:
        return f"Stage {key} failed: {stderr}"
    reason = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
    tail = stderr[-_ERROR_TAIL:]
    return f"Stage {key} failed: {reason}" + (f": {tail}" if tail else "")
