"""Stage runner of the processing-job engine: runs a job's stages through ``/bin/sh -c``.

Re-implements DM's processing service (dm-protocol.md section 4): stages run in sorted key
order; ``$variables`` come from argsDict, reserved names and earlier stages' output regexes;
stages may iterate over input files and repeat until a condition.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from apsdm.dm.errors import InvalidArgument

from ..common import dm_timestamp
from .conditions import evaluate_condition
from .jobs import count_children, end_job, file_list
from .shell import ENV_PREFIX, as_text, render, substitute, var_pattern
from .spec import RESERVED_KEYS

log = logging.getLogger(__name__)

#: DM's own message for a ``$filePath`` workflow started without a file spec.
INVALID_FILE_SPEC = "Invalid input file specification."
#: Stored stdout/stderr of a child process keeps at most this many trailing bytes.
OUTPUT_CAP = 64 * 1024
#: Seconds a child gets between SIGTERM and SIGKILL when its job is aborted.
KILL_GRACE = 2.0
_ERROR_TAIL = 1000

JobUpdate = Callable[[dict[str, Any]], None]


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
        self, job: dict, on_update: JobUpdate, work_dir: Path, max_parallel: int = 4,
        env: Mapping[str, str] | None = None,
    ) -> None:
        if max_parallel < 1:
            raise ValueError("max_parallel must be at least 1")
        self.job = job
        self.env = dict(env or {})  # the service's job environment, over its own
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
        end_job(self.job, status, error)
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
            count_children(stage)
        self._notify()
        try:
            self.work_dir.mkdir(parents=True, exist_ok=True)
            files = file_list(job)
        except OSError as exc:
            return f"Cannot create job working directory: {exc}"
        except InvalidArgument as exc:
            return exc.message
        variables = {k: as_text(v) for k, v in job.items() if k not in RESERVED_KEYS}
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
            for m in var_pattern([*variables, "filePath"]).finditer(command)
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
            pattern = var_pattern(values)
            try:
                shell_text, shown = render(stage["command"], pattern, values)
            except InvalidArgument as exc:
                return f"Stage {key} failed: {exc.message}"
            cwd = self.work_dir / substitute(stage.get("workingDir") or ".", pattern, values)
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
                # DM's clients require these of every child; set for real when it ends
                "exitStatus": 0,
                "stdOut": "",
                "stdErr": "",
            }
            if user := self.job["workflow"].get("userAccount"):
                child["userAccount"] = user
            stage["childProcesses"][str(self._next_child)] = child
            self._next_child += 1
            queued.append((child, shell_text, values))
        count_children(stage)
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
            count_children(stage)
            self._notify()
            env = {**os.environ, **self.env}
            env.update({ENV_PREFIX + name: value for name, value in values.items()})
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
        count_children(stage)
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
