"""What the plans hand back and print: plain, JSON-able records of setups, jobs and runs.

Readbacks arrive as numpy scalars; :func:`plain` turns them into Python numbers, so
``json.dumps(report.to_dict())`` always works.
"""

import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .pva import StreamState

__all__ = ["JobReport", "RunReport", "UserSetup", "plain"]


def plain(value: Any) -> Any:
    """``value`` with numpy scalars/arrays and tuples turned into JSON types (recursively)."""
    if isinstance(value, Mapping):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [plain(item) for item in value]
    if hasattr(value, "tolist"):  # numpy scalar or array
        return plain(value.tolist())
    return value


@dataclass(frozen=True)
class UserSetup:
    """What ``setup_user`` selected and started (blank ids: nothing was asked for)."""

    experiment: str
    daq_id: str = ""
    upload_id: str = ""
    esaf_id: str = ""
    proposal_id: str = ""


@dataclass(frozen=True)
class JobReport:
    """How a processing job ended, with its stages table (rows of ``WFn:Stages``)."""

    workflow: str
    job_id: str
    status: str
    stage: str
    run_time: float
    message: str
    stages: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """The job ended ``done``."""
        return self.status == "done"

    def describe(self) -> str:
        """One line for logs and exceptions: workflow, job, status, stage, time and message."""
        return (f"workflow {self.workflow} job {self.job_id or '(none)'} {self.status or 'unknown'}"
                f" at stage {self.stage or '-'} after {self.run_time:.1f} s: {self.message}")

    def stage_lines(self) -> list[str]:
        """One line per stage and child process, for the detailed report."""
        return [f"  stage {row['stage']} child {row['child']} {row['status']} exit "
                f"{row['exitStatus']} {float(row['runTime']):.1f} s: {row['command']}"
                for row in self.stages]


@dataclass(frozen=True)
class RunReport:
    """The outcome of a run with a DM workflow: the bluesky run, the job, the catalog entry.

    ``data_management`` is the dict recorded in the run's start document (and completed in
    its ``dm`` stream); ``to_dict()`` is JSON-able.
    """

    run_uid: str
    job: JobReport
    dataset: str = ""
    workflow_stream: StreamState | None = None
    data_management: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON types."""
        return plain(dataclasses.asdict(self))


class DMRecord:
    """A readable view of a finished job, read once into the run's ``dm`` event stream."""

    parent = None

    def __init__(self, job: JobReport, data_management: Mapping[str, Any],
                 name: str = "dm") -> None:
        self.name = name
        self._values = {"job_id": job.job_id, "workflow": job.workflow,
                        "job_status": job.status, "job_stage": job.stage,
                        "job_run_time": float(job.run_time), "job_message": job.message,
                        "experiment": str(data_management.get("experiment", "")),
                        "daq_id": str(data_management.get("daq_id", "")),
                        **{key: value for key, value in data_management.items()
                           if key.startswith("stream_")}}  # a streaming workflow's results

    def read(self) -> dict[str, dict[str, Any]]:
        now = time.time()
        return {f"{self.name}_{key}": {"value": value, "timestamp": now}
                for key, value in self._values.items()}

    def describe(self) -> dict[str, dict[str, Any]]:
        return {f"{self.name}_{key}": {"source": "apsdm_ophyd", "shape": [],
                                       "dtype": "number" if isinstance(value, float | int)
                                       else "string"}
                for key, value in self._values.items()}
