"""Processing-job records: a new job as DM returns it, its end, and what a restart must
clean up (jobs left running, their orphaned process groups)."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import re
import signal
import time
import uuid
from collections.abc import Mapping
from typing import Any

from apsdm.dm.errors import InvalidArgument

from ..common import dm_timestamp
from .spec import RESERVED_KEYS, validate_workflow

log = logging.getLogger(__name__)

_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


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
    files = file_list(args)
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


def file_list(source: Mapping[str, Any]) -> list[str] | None:
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
        end_job(job, "failed", reason)
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


def end_job(job: dict, status: str, error: str | None = None) -> None:
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
            count_children(stage)
    job["status"] = status
    job["endTime"] = now
    job["endTimestamp"] = dm_timestamp(now)
    job["runTime"] = now - job.get("startTime", now)
    if error is not None:
        job["errorMessage"] = error


def count_children(stage: dict) -> None:
    """Refresh a stage's n*ChildProcesses counters from its children's statuses."""
    statuses = [c["status"] for c in stage.get("childProcesses", {}).values()]
    stage["nQueuedChildProcesses"] = statuses.count("pending")
    stage["nRunningChildProcesses"] = statuses.count("running")
    stage["nCompletedChildProcesses"] = statuses.count("done")
    stage["nFailedChildProcesses"] = statuses.count("failed")
