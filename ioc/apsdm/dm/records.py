"""Typed views of DM's objects. Each keeps the whole dict DM sent in ``raw``.

Field names follow DM's JSON (dm-protocol.md sections 1.3, 1.6, 4.2).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .status import ACTIVE_STATUSES, TERMINAL_STATUSES

# top-level fields of a processing job: argsDict keys (merged into the job) may not use them
RESERVED_JOB_KEYS = frozenset({
    "id", "owner", "status", "stage", "workflow", "submissionTime", "submissionTimestamp",
    "startTime", "startTimestamp", "endTime", "endTimestamp", "runTime", "countFiles",
    "errorMessage",
})


def _num(d: dict[str, Any], key: str, default: float = 0) -> float:
    value = d.get(key, default)
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


@dataclass(frozen=True)
class Experiment:
    """A DM experiment; the directory fields are only in single-experiment answers."""

    id: int
    name: str
    description: str = ""
    station: str = ""
    type: str = ""
    start_date: str = ""
    data_directory: str = ""
    storage_directory: str = ""
    users: tuple[str, ...] = ()
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Experiment:
        station = d.get("stationName") or (d.get("experimentStation") or {}).get("name", "")
        return cls(
            id=int(d.get("id", 0) or 0),
            name=str(d.get("name", "")),
            description=str(d.get("description") or ""),
            station=str(station or ""),
            type=str((d.get("experimentType") or {}).get("name", "")),
            start_date=str(d.get("startDate") or ""),
            data_directory=str(d.get("dataDirectory") or ""),
            storage_directory=str(d.get("storageDirectory") or ""),
            users=tuple(d.get("experimentUsernameList") or ()),
            raw=d,
        )


@dataclass(frozen=True)
class _Transfer:
    """Fields shared by DAQs and uploads (both are DAQ-service transfers)."""

    id: str
    experiment_name: str
    data_directory: str
    status: str
    dest_directory: str = ""
    n_files: int = 0
    n_processed: int = 0
    n_errors: int = 0
    n_waiting: int = 0
    percent: float = 0.0
    error_message: str = ""
    start_time: float = 0.0
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]):  # type: ignore[no-untyped-def]
        return cls(
            id=str(d.get("id", "")),
            experiment_name=str(d.get("experimentName", "")),
            data_directory=str(d.get("dataDirectory", "")),
            status=str(d.get("status", "")),
            dest_directory=str(d.get("destDirectory") or ""),
            n_files=int(_num(d, "nFiles", _num(d, "countFiles"))),
            n_processed=int(_num(d, "nProcessedFiles")),
            n_errors=int(_num(d, "nProcessingErrors")),
            n_waiting=int(_num(d, "nWaitingFiles")),
            percent=_num(d, "percentageComplete"),
            error_message=str(d.get("errorMessage") or ""),
            start_time=_num(d, "startTime"),
            raw=d,
        )

    @property
    def active(self) -> bool:
        return self.status in ACTIVE_STATUSES

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL_STATUSES


class Daq(_Transfer):
    """A DAQ: watches a local tree and copies new files into experiment storage."""


class Upload(_Transfer):
    """An upload of a file or a directory into experiment storage."""


@dataclass(frozen=True)
class Stage:
    """One workflow stage of a job, with counts of its child processes."""

    id: str
    command: str
    status: str
    children: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class Job:
    """A processing job: a run of a workflow with its arguments."""

    id: str
    owner: str
    status: str
    workflow_name: str = ""
    stage: str = ""
    run_time: float = 0.0
    error_message: str = ""
    submission_time: float = 0.0
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Job:
        return cls(
            id=str(d.get("id", "")),
            owner=str(d.get("owner", "")),
            status=str(d.get("status", "")),
            workflow_name=str((d.get("workflow") or {}).get("name") or d.get("workflowName") or ""),
            stage=str(d.get("stage") or ""),
            run_time=_num(d, "runTime"),
            error_message=str(d.get("errorMessage") or ""),
            submission_time=_num(d, "submissionTime"),
            raw=d,
        )

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def stages(self) -> list[Stage]:
        """Stages in execution (sorted key) order, with their child processes."""
        defs = (self.raw.get("workflow") or {}).get("stages") or {}
        out = []
        for key in sorted(defs):
            st = defs[key] or {}
            children = tuple((st.get("childProcesses") or {}).values())
            if any(c.get("status") == "failed" for c in children):
                status = "failed"
            elif children and all(c.get("status") == "done" for c in children):
                status = "done"
            elif children:
                status = "running"
            else:
                status = "pending"
            out.append(Stage(key, str(st.get("command", "")), status, children))
        return out


@dataclass(frozen=True)
class Workflow:
    """A workflow definition: named stages run in sorted key order."""

    name: str
    owner: str
    id: str = ""
    description: str = ""
    stages: dict[str, Any] = field(default_factory=dict, compare=False)
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Workflow:
        return cls(
            name=str(d.get("name", "")),
            owner=str(d.get("owner", "")),
            id=str(d.get("id", "")),
            description=str(d.get("description") or ""),
            stages=dict(d.get("stages") or {}),
            raw=d,
        )
