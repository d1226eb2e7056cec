"""A small in-process fake of :class:`~apsdm.dm.api.DmApi` for fast unit tests of the gateway.

It keeps experiments, DAQs, uploads, workflows and jobs as DM's JSON dicts (read back
through the real record types) whose state the test advances with :meth:`FakeDm.set`.
:meth:`FakeDm.fail` makes one call raise, before or after DM acted on it (``NoAnswer``
after acting: DM got the request but its answer never came); ``down`` makes every call
fail as an unreachable DM does.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from apsdm.dm import (
    CommunicationError,
    Daq,
    DmConfig,
    DmError,
    Experiment,
    InvalidArgument,
    Job,
    ObjectNotFound,
    Upload,
    Workflow,
)

T = TypeVar("T")


@dataclass
class Fault:
    """The error one call raises; ``acted``: DM did what was asked before it was raised."""

    error: DmError
    acted: bool = False


class FakeDm:
    """DM in dicts: every call is counted in ``requests`` and named in ``calls``."""

    def __init__(self, username: str = "dm", station: str = "TEST") -> None:
        self.config = DmConfig.single_url("http://fake-dm.invalid", station=station)
        self.requests = 0
        self.calls: list[str] = []
        self.down = False  # every call raises CommunicationError, as a DM that is not there
        self.experiments: dict[str, dict[str, Any]] = {}
        self.daqs: dict[str, dict[str, Any]] = {}
        self.uploads: dict[str, dict[str, Any]] = {}
        self.workflows: dict[str, dict[str, Any]] = {}
        self.jobs: dict[str, dict[str, Any]] = {}
        self.datasets: list[dict[str, Any]] = []
        self._username, self._station = username, station
        self._faults: dict[str, Fault] = {}
        self._ids = itertools.count(1)

    @property
    def username(self) -> str:
        return self._username

    @property
    def station(self) -> str:
        return self._station

    async def close(self) -> None:
        """Nothing to let go of."""

    # --- what the test does ---------------------------------------------------------------

    def fail(self, call: str, error: DmError, *, acted: bool = False) -> None:
        """Make the next ``call`` raise ``error``, after doing its work if ``acted``."""
        self._faults[call] = Fault(error, acted)

    def set(self, obj_id: str, **fields: Any) -> None:
        """Change a DAQ, upload or job as DM would (e.g. ``status="done"``)."""
        for kind in (self.daqs, self.uploads, self.jobs):
            if obj_id in kind:
                kind[obj_id].update(fields)
                return
        raise KeyError(obj_id)

    def add(self, name: str, **fields: Any) -> None:
        """An experiment DM knows (the test's set-up)."""
        self.experiments[name] = {"id": len(self.experiments) + 1, "name": name,
                                  "stationName": self._station, **fields}

    async def _do(self, call: str, action: Callable[[], T]) -> T:
        self.requests += 1
        self.calls.append(call)
        if self.down:
            raise CommunicationError("DM at http://fake-dm.invalid is unreachable")
        fault = self._faults.pop(call, None)
        if fault is not None and not fault.acted:
            raise fault.error
        result = action()
        if fault is not None:
            raise fault.error
        return result

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}{next(self._ids):08d}"

    @staticmethod
    def _get(kind: dict[str, dict[str, Any]], key: str, what: str) -> dict[str, Any]:
        if key not in kind:
            raise ObjectNotFound(f"{what} {key} not found")
        return kind[key]

    # --- experiments --------------------------------------------------------------------

    async def get_experiment(self, name: str) -> Experiment:
        return await self._do("get_experiment", lambda: Experiment.from_dict(
            self._get(self.experiments, name, "experiment")))

    async def get_experiment_by_id(self, experiment_id: int) -> Experiment:
        def find() -> Experiment:
            found = [e for e in self.experiments.values() if e["id"] == experiment_id]
            if not found:
                raise ObjectNotFound(f"experiment id {experiment_id} not found")
            return Experiment.from_dict(found[0])
        return await self._do("get_experiment_by_id", find)

    async def list_experiments(self, station: str = "") -> list[Experiment]:
        return await self._do("list_experiments", lambda: [
            Experiment.from_dict(e) for e in self.experiments.values()])

    async def add_experiment(self, name: str, type_name: str = "TEST", description: str = "",
                             start_date: str | None = None, end_date: str | None = None
                             ) -> Experiment:
        def add() -> Experiment:
            self.add(name, description=description, experimentType={"name": type_name})
            return Experiment.from_dict(self.experiments[name])
        return await self._do("add_experiment", add)

    async def add_user_experiment_role(self, username: str, experiment: str,
                                       role: str = "User") -> dict[str, Any]:
        def add() -> dict[str, Any]:
            exp = self._get(self.experiments, experiment, "experiment")
            exp.setdefault("experimentUsernameList", []).append(username)
            return {"username": username, "role": role}
        return await self._do("add_user_experiment_role", add)

    # --- DAQs and uploads ---------------------------------------------------------------

    def _transfer(self, kind: dict[str, dict[str, Any]], prefix: str, experiment: str,
                  data_directory: str, info: dict[str, Any]) -> dict[str, Any]:
        self._get(self.experiments, experiment, "experiment")
        obj_id = self._new_id(prefix)
        kind[obj_id] = {"id": obj_id, "experimentName": experiment,
                        "dataDirectory": data_directory, "status": "running",
                        "startTime": time.time(), **info}
        return kind[obj_id]

    async def start_daq(self, experiment: str, data_directory: str, **task_info: Any) -> Daq:
        return await self._do("start_daq", lambda: Daq.from_dict(
            self._transfer(self.daqs, "daq", experiment, data_directory, task_info)))

    async def stop_daq(self, experiment: str, data_directory: str) -> Daq:
        def stop() -> Daq:
            for daq in self.daqs.values():
                if (daq["experimentName"], daq["dataDirectory"]) == (experiment, data_directory) \
                        and daq["status"] == "running":
                    daq["status"] = "done"
                    return Daq.from_dict(daq)
            raise InvalidArgument(f"no DAQ running on {data_directory}")
        return await self._do("stop_daq", stop)

    async def list_daqs(self) -> list[Daq]:
        return await self._do("list_daqs", lambda: [Daq.from_dict(d) for d in self.daqs.values()])

    async def get_daq(self, daq_id: str) -> Daq:
        return await self._do("get_daq", lambda: Daq.from_dict(self._get(self.daqs, daq_id, "DAQ")))

    async def upload(self, experiment: str, data_directory: str, **daq_info: Any) -> Upload:
        return await self._do("upload", lambda: Upload.from_dict(
            self._transfer(self.uploads, "up", experiment, data_directory, daq_info)))

    async def list_uploads(self) -> list[Upload]:
        return await self._do("list_uploads", lambda: [
            Upload.from_dict(u) for u in self.uploads.values()])

    async def get_upload(self, upload_id: str) -> Upload:
        return await self._do("get_upload", lambda: Upload.from_dict(
            self._get(self.uploads, upload_id, "upload")))

    async def stop_upload(self, upload_id: str) -> Upload:
        def stop() -> Upload:
            upload = self._get(self.uploads, upload_id, "upload")
            upload["status"] = "aborted"
            return Upload.from_dict(upload)
        return await self._do("stop_upload", stop)

    # --- workflows and processing jobs --------------------------------------------------

    async def list_workflows(self, owner: str = "") -> list[Workflow]:
        return await self._do("list_workflows", lambda: [
            Workflow.from_dict(w) for w in self.workflows.values()])

    async def get_workflow(self, name: str, owner: str = "") -> Workflow:
        return await self._do("get_workflow", lambda: Workflow.from_dict(
            self._get(self.workflows, name, "workflow")))

    async def add_workflow(self, workflow: dict[str, Any]) -> Workflow:
        def add() -> Workflow:
            self.workflows[workflow["name"]] = {"owner": self._username, **workflow}
            return Workflow.from_dict(self.workflows[workflow["name"]])
        return await self._do("add_workflow", add)

    update_workflow = upsert_workflow = add_workflow

    async def start_processing_job(self, workflow_name: str, args: dict[str, Any],
                                   owner: str = "") -> Job:
        def start() -> Job:
            workflow = self._get(self.workflows, workflow_name, "workflow")
            job_id = self._new_id("job")
            self.jobs[job_id] = {**args, "id": job_id, "owner": owner or self._username,
                                 "status": "pending", "workflow": dict(workflow),
                                 "submissionTime": time.time()}
            return Job.from_dict(self.jobs[job_id])
        return await self._do("start_processing_job", start)

    async def get_processing_job(self, job_id: str, owner: str = "") -> Job:
        return await self._do("get_processing_job", lambda: Job.from_dict(
            self._get(self.jobs, job_id, "job")))

    async def list_processing_jobs(self, owner: str = "", keys: str | list[str] = "DEFAULT",
                                   skip: int = 0, limit: int = 5000) -> list[Job]:
        def listed() -> list[Job]:
            mine = [j for j in self.jobs.values() if j["owner"] == (owner or self._username)]
            return [Job.from_dict(j) for j in mine[skip:skip + limit]]
        return await self._do("list_processing_jobs", listed)

    # --- catalog ------------------------------------------------------------------------

    async def add_dataset(self, experiment: str, dataset_name: str,
                          **fields: Any) -> dict[str, Any]:
        def add() -> dict[str, Any]:
            self._get(self.experiments, experiment, "experiment")
            self.datasets.append({"experimentName": experiment, "datasetName": dataset_name,
                                  **fields})
            return self.datasets[-1]
        return await self._do("add_dataset", add)

    async def get_experiment_file(self, experiment: str, path: str) -> dict[str, Any]:
        def find() -> dict[str, Any]:
            raise ObjectNotFound(f"{experiment}:{path} not catalogued")
        return await self._do("get_experiment_file", find)
