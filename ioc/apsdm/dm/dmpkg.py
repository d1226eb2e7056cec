"""DmApi over the conda ``dm`` package (aps-dm-api), beside the REST :class:`DmClient`.

Selected with ``apsdm-ioc --dm dm-package`` where that package is importable; every
blocking vendor call runs in a worker thread so the IOC's loop never waits on it.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Callable
from typing import Any

from .base import DmClientBase
from .config import DmConfig
from .errors import ERRORS_BY_NAME, CommunicationError, DmError, NoAnswer
from .records import Daq, Experiment, Job, Upload, Workflow
from .routes import Service

# our name -> (vendor module, vendor class, DM service whose URL it takes)
_APIS = {
    "ds": ("dm.ds_web_service.api.experimentDsApi", "ExperimentDsApi", Service.DS),
    "user": ("dm.ds_web_service.api.userDsApi", "UserDsApi", Service.DS),
    "daq": ("dm.daq_web_service.api.experimentDaqApi", "ExperimentDaqApi", Service.DAQ),
    "proc": ("dm.proc_web_service.api.workflowProcApi", "WorkflowProcApi", Service.PROC),
    "dataset": ("dm.cat_web_service.api.datasetCatApi", "DatasetCatApi", Service.CAT),
    "file": ("dm.cat_web_service.api.fileCatApi", "FileCatApi", Service.CAT),
}


def _dict(obj: Any) -> dict[str, Any]:
    """A vendor DmObject (or plain dict) as a dict."""
    if isinstance(obj, dict):
        return obj
    rep = getattr(obj, "getDictRep", None)
    return dict(rep() if rep else getattr(obj, "data", {}))


class DmPackageClient(DmClientBase):
    """DmApi through the vendor package's API classes; same methods and records as DmClient."""

    def __init__(self, config: DmConfig) -> None:
        super().__init__(config)
        self._apis: dict[str, Any] = {}

    def _api(self, name: str) -> Any:
        if name not in self._apis:
            module, cls, service = _APIS[name]
            creds = self._creds()
            api_class = getattr(importlib.import_module(module), cls)
            self._apis[name] = api_class(username=creds.username, password=creds.password,
                                         url=self.config.url(service))
        return self._apis[name]

    async def _run(self, api: str, method: str, *args: Any, **kwargs: Any) -> Any:
        fn: Callable[..., Any] = getattr(self._api(api), method)
        self.requests += 1
        try:
            # a hung vendor call must not stall the poller: give up after the client timeout
            return await asyncio.wait_for(asyncio.to_thread(fn, *args, **kwargs),
                                          self.config.timeout)
        except DmError:
            raise
        except TimeoutError:  # the vendor call goes on in its thread: DM may yet act on it
            raise NoAnswer(
                f"dm package call {method} did not answer in {self.config.timeout} s") from None
        except Exception as exc:
            # the vendor's exception classes carry DM's names
            name = type(exc).__name__
            if name in ERRORS_BY_NAME:
                raise ERRORS_BY_NAME[name](str(exc)) from None
            raise CommunicationError(f"dm package call {method} failed: {name}: {exc}") from None

    async def close(self) -> None:
        """Drop the vendor API objects (they hold no connection between calls)."""
        self._apis.clear()

    async def get_experiment(self, name: str) -> Experiment:
        return Experiment.from_dict(_dict(await self._run("ds", "getExperimentByName", name)))

    async def get_experiment_by_id(self, experiment_id: int) -> Experiment:
        return Experiment.from_dict(_dict(await self._run("ds", "getExperimentById", experiment_id)))

    async def list_experiments(self, station: str = "") -> list[Experiment]:
        items = await self._run("ds", "getExperimentsByStation", station or self.station)
        return [Experiment.from_dict(_dict(e)) for e in items]

    async def add_experiment(self, name: str, type_name: str = "TEST", description: str = "",
                             start_date: str | None = None, end_date: str | None = None
                             ) -> Experiment:
        d = await self._run("ds", "addExperiment", name, self.station, type_name, description,
                            None, None, None, start_date, end_date)
        return Experiment.from_dict(_dict(d))

    async def add_user_experiment_role(self, username: str, experiment: str,
                                       role: str = "User") -> dict[str, Any]:
        return _dict(await self._run("user", "addUserExperimentRole", username, role, experiment))

    async def start_daq(self, experiment: str, data_directory: str, **task_info: Any) -> Daq:
        return Daq.from_dict(_dict(await self._run("daq", "startDaq", experiment, data_directory,
                                                   task_info)))

    async def stop_daq(self, experiment: str, data_directory: str) -> Daq:
        return Daq.from_dict(_dict(await self._run("daq", "stopDaq", experiment, data_directory)))

    async def list_daqs(self) -> list[Daq]:
        return [Daq.from_dict(_dict(d)) for d in await self._run("daq", "listDaqs")]

    async def get_daq(self, daq_id: str) -> Daq:
        return Daq.from_dict(_dict(await self._run("daq", "getDaqInfo", daq_id)))

    async def upload(self, experiment: str, data_directory: str, **daq_info: Any) -> Upload:
        return Upload.from_dict(_dict(await self._run("daq", "upload", experiment, data_directory,
                                                      daq_info)))

    async def list_uploads(self) -> list[Upload]:
        return [Upload.from_dict(_dict(d)) for d in await self._run("daq", "listUploads")]

    async def get_upload(self, upload_id: str) -> Upload:
        return Upload.from_dict(_dict(await self._run("daq", "getUploadInfo", upload_id)))

    async def stop_upload(self, upload_id: str) -> Upload:
        return Upload.from_dict(_dict(await self._run("daq", "stopUpload", upload_id)))

    async def list_workflows(self, owner: str = "") -> list[Workflow]:
        items = await self._run("proc", "listWorkflows", self._owner(owner))
        return [Workflow.from_dict(_dict(w)) for w in items]

    async def get_workflow(self, name: str, owner: str = "") -> Workflow:
        d = await self._run("proc", "getWorkflowByName", self._owner(owner), name)
        return Workflow.from_dict(_dict(d))

    async def add_workflow(self, workflow: dict[str, Any]) -> Workflow:
        d = await self._run("proc", "addWorkflow", self._owned(workflow))
        return Workflow.from_dict(_dict(d))

    async def update_workflow(self, workflow: dict[str, Any]) -> Workflow:
        d = await self._run("proc", "updateWorkflow", self._owned(workflow))
        return Workflow.from_dict(_dict(d))

    async def start_processing_job(self, workflow_name: str, args: dict[str, Any],
                                   owner: str = "") -> Job:
        d = await self._run("proc", "startProcessingJob", workflowOwner=self._owner(owner),
                            workflowName=workflow_name, argsDict=args)
        return Job.from_dict(_dict(d))

    async def get_processing_job(self, job_id: str, owner: str = "") -> Job:
        d = await self._run("proc", "getProcessingJobById", self._owner(owner), job_id)
        return Job.from_dict(_dict(d))

    async def list_processing_jobs(self, owner: str = "", keys: str | list[str] = "DEFAULT",
                                   skip: int = 0, limit: int = 5000) -> list[Job]:
        items = await self._run("proc", "listProcessingJobs", self._owner(owner),
                                skip=skip, limit=limit, keyList=keys)
        return [Job.from_dict(_dict(j)) for j in items]

    async def add_dataset(self, experiment: str, dataset_name: str,
                          **fields: Any) -> dict[str, Any]:
        info = {"experimentName": experiment, "datasetName": dataset_name, **fields}
        return _dict(await self._run("dataset", "addExperimentDataset", info))

    async def get_experiment_file(self, experiment: str, path: str) -> dict[str, Any]:
        return _dict(await self._run("file", "getExperimentFile", experiment, path))
