"""Async client for DM's REST protocol; the same code talks to production and to the
embedded service.

Login is a form POST to ``/dm/login`` per service; the session cookie is kept and a 401
triggers one re-login. Errors come back as ``Dm-Status-Code`` headers and are raised as
the typed exceptions of :mod:`apsdm.dm.errors`.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any

import httpx

from .base import DmClientBase
from .config import DmConfig
from .errors import (
    AuthenticationError,
    CommunicationError,
    ConfigurationError,
    InvalidArgument,
    NoAnswer,
    error_from_status,
)
from .records import Daq, Esaf, Experiment, Job, Proposal, Upload, Workflow
from .routes import LOGIN_PATH, ROUTES, Service

log = logging.getLogger(__name__)

#: transport errors after the request went out: DM may have received it and acted on it
_MAYBE_RECEIVED = (httpx.ReadTimeout, httpx.WriteTimeout, httpx.ReadError, httpx.WriteError,
                   httpx.RemoteProtocolError)


class _Session:
    """One service's HTTP connection and login cookie (each DM service has its own)."""

    def __init__(self, base_url: str, timeout: float, verify: ssl.SSLContext | bool) -> None:
        self.base_url = base_url
        self.http = httpx.AsyncClient(base_url=base_url, timeout=timeout, verify=verify)
        self.logged_in = False
        self.lock = asyncio.Lock()


class DmClient(DmClientBase):
    """DmApi over DM's REST protocol: one HTTP session per DM service named in the config."""

    def __init__(self, config: DmConfig) -> None:
        super().__init__(config)
        self._sessions: dict[str, _Session] = {}
        self._verify = _tls_verification(config)

    def _session(self, service: Service) -> _Session:
        url = self.config.url(service)
        if url not in self._sessions:
            self._sessions[url] = _Session(url, self.config.timeout, self._verify)
        return self._sessions[url]

    async def close(self) -> None:
        """Close every service's HTTP connection."""
        for session in self._sessions.values():
            await session.http.aclose()
        self._sessions.clear()

    async def _login(self, session: _Session) -> None:
        creds = self._creds()
        try:
            resp = await session.http.post(
                LOGIN_PATH, data={"username": creds.username, "password": creds.password})
        except httpx.HTTPError as exc:
            raise CommunicationError(f"DM at {session.base_url} is unreachable: {_why(exc)}") from None
        if resp.status_code == 401:
            raise AuthenticationError(f"DM at {session.base_url} refused login for {creds.username}")
        _check(resp, session.base_url)
        session.logged_in = True
        log.debug("logged in to %s as %s", session.base_url, creds.username)

    async def call(self, route_name: str, **values: Any) -> Any:
        """Make one DM call by route name and return the decoded JSON answer."""
        route = ROUTES[route_name]
        session = self._session(route.service)
        path = route.url(**values)
        for _attempt in (1, 2):
            if not session.logged_in:
                async with session.lock:
                    if not session.logged_in:
                        await self._login(session)
            self.requests += 1
            try:
                resp = await session.http.request(
                    route.method, path, headers={"Content-Type": "html"})
            except httpx.InvalidURL as exc:  # DM takes every argument in the URL
                raise InvalidArgument(f"{route_name} not sent to DM: {exc} ({len(path)} bytes "
                                      "with its arguments): pass less") from None
            except httpx.HTTPError as exc:
                error = NoAnswer if isinstance(exc, _MAYBE_RECEIVED) else CommunicationError
                raise error(f"DM at {session.base_url} is unreachable: {_why(exc)}") from None
            if resp.status_code != 401:
                return _check(resp, session.base_url)
            session.logged_in = False  # the session expired: log in once more
        raise AuthenticationError(f"DM at {session.base_url} keeps refusing the session")

    # --- experiments (DS) ---------------------------------------------------------------

    async def get_experiment(self, name: str) -> Experiment:
        d = await self.call("getExperimentByName", name=name, stationName=self.station)
        return Experiment.from_dict(d)

    async def get_experiment_by_id(self, experiment_id: int) -> Experiment:
        return Experiment.from_dict(await self.call("getExperimentById", id=experiment_id))

    async def list_experiments(self, station: str = "") -> list[Experiment]:
        items = await self.call("getExperimentsByStation", stationName=station or self.station)
        return [Experiment.from_dict(d) for d in items]

    async def add_experiment(self, name: str, type_name: str = "TEST", description: str = "",
                             start_date: str | None = None, end_date: str | None = None
                             ) -> Experiment:
        d = await self.call("addExperiment", name=name, stationName=self.station,
                            typeName=type_name, description=description,
                            startDate=start_date, endDate=end_date)
        return Experiment.from_dict(d)

    async def add_user_experiment_role(self, username: str, experiment: str,
                                       role: str = "User") -> dict[str, Any]:
        return await self.call("addUserExperimentRole", username=username, roleName=role,
                               experimentName=experiment, stationName=self.station)

    # --- DAQs and uploads (DAQ) ---------------------------------------------------------

    async def start_daq(self, experiment: str, data_directory: str, **task_info: Any) -> Daq:
        d = await self.call("startDaq", experimentName=experiment, dataDirectory=data_directory,
                            taskInfo=task_info)
        return Daq.from_dict(d)

    async def stop_daq(self, experiment: str, data_directory: str) -> Daq:
        d = await self.call("stopDaq", experimentName=experiment, dataDirectory=data_directory)
        return Daq.from_dict(d)

    async def list_daqs(self) -> list[Daq]:
        return [Daq.from_dict(d) for d in await self.call("listDaqs")]

    async def get_daq(self, daq_id: str) -> Daq:
        return Daq.from_dict(await self.call("getDaqInfo", id=daq_id))

    async def upload(self, experiment: str, data_directory: str, **daq_info: Any) -> Upload:
        """Start an upload; ``processingMode='directory'`` copies the tree in one transfer."""
        d = await self.call("upload", experimentName=experiment, dataDirectory=data_directory,
                            daqInfo=daq_info)
        return Upload.from_dict(d)

    async def list_uploads(self) -> list[Upload]:
        return [Upload.from_dict(d) for d in await self.call("listUploads")]

    async def get_upload(self, upload_id: str) -> Upload:
        return Upload.from_dict(await self.call("getUploadInfo", id=upload_id))

    async def stop_upload(self, upload_id: str) -> Upload:
        return Upload.from_dict(await self.call("stopUpload", id=upload_id))

    # --- workflows and processing jobs (PROC) -------------------------------------------

    async def list_workflows(self, owner: str = "") -> list[Workflow]:
        items = await self.call("listWorkflows", owner=self._owner(owner), queryDict={})
        return [Workflow.from_dict(d) for d in items]

    async def get_workflow(self, name: str, owner: str = "") -> Workflow:
        d = await self.call("getWorkflowByName", owner=self._owner(owner), name=name)
        return Workflow.from_dict(d)

    async def add_workflow(self, workflow: dict[str, Any]) -> Workflow:
        d = await self.call("addWorkflow", allowCurrentUsername=0, workflow=self._owned(workflow))
        return Workflow.from_dict(d)

    async def update_workflow(self, workflow: dict[str, Any]) -> Workflow:
        d = await self.call("updateWorkflow", allowCurrentUsername=0,
                            workflow=self._owned(workflow))
        return Workflow.from_dict(d)

    async def start_processing_job(self, workflow_name: str, args: dict[str, Any],
                                   owner: str = "") -> Job:
        d = await self.call("startProcessingJob", owner=self._owner(owner),
                            workflowName=workflow_name, argsDict=args)
        return Job.from_dict(d)

    async def get_processing_job(self, job_id: str, owner: str = "") -> Job:
        d = await self.call("getProcessingJobById", owner=self._owner(owner), id=job_id)
        return Job.from_dict(d)

    async def list_processing_jobs(self, owner: str = "", keys: str | list[str] = "DEFAULT",
                                   skip: int = 0, limit: int = 5000) -> list[Job]:
        """All of an owner's jobs in one call; ``keys='ALL'`` includes stages."""
        items = await self.call("listProcessingJobs", owner=self._owner(owner), queryDict={},
                                skip=skip, limit=limit, keyList=keys)
        return [Job.from_dict(d) for d in items]

    # --- catalog (CAT) ------------------------------------------------------------------

    async def add_dataset(self, experiment: str, dataset_name: str,
                          **fields: Any) -> dict[str, Any]:
        info = {"experimentName": experiment, "datasetName": dataset_name, **fields}
        return await self.call("addExperimentDataset", datasetInfo=info)

    async def get_experiment_file(self, experiment: str, path: str) -> dict[str, Any]:
        return await self.call("getExperimentFile", experimentName=experiment,
                               experimentFilePath=path)

    # --- APS DB: ESAFs and proposals ------------------------------------------------------

    async def list_esafs(self, beamline: str = "", year: str = "") -> list[Esaf]:
        route = "listStationEsafs" if beamline else "listStationEsafsAllBeamlines"
        items = await self.call(route, stationName=self.station, beamlineName=beamline,
                                year=year or None)
        return [Esaf.from_dict(d) for d in items]

    async def get_esaf(self, esaf_id: str) -> Esaf:
        return Esaf.from_dict(await self.call("getStationEsafById", stationName=self.station,
                                              esafId=esaf_id))

    async def list_proposals(self, beamline: str = "", run: str = "") -> list[Proposal]:
        route = "listStationProposals" if beamline else "listStationProposalsAllBeamlines"
        items = await self.call(route, stationName=self.station, beamlineName=beamline,
                                runName=run or None)
        return [Proposal.from_dict(d) for d in items]

    async def get_proposal(self, proposal_id: str, run: str = "") -> Proposal:
        d = await self.call("getStationProposalById", stationName=self.station,
                            proposalId=proposal_id, runName=run or None)
        return Proposal.from_dict(d)


def _tls_verification(config: DmConfig) -> ssl.SSLContext | bool:
    """Verify HTTPS certificates against the configured CA file (DM_CA_FILE); without one,
    do as the vendor client does (DM serves self-signed certificates): no verification.
    Says which, once, when a service is reached over HTTPS."""
    https = any(url.startswith("https:") for url in config.urls.values())
    if not config.ca_file:
        if https:
            log.info("DM over HTTPS: certificates not verified (no DM_CA_FILE), "
                     "as the vendor client")
        return False
    try:
        context = ssl.create_default_context(cafile=config.ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(f"DM_CA_FILE {config.ca_file} unusable: {exc}") from None
    if https:
        log.info("DM over HTTPS: certificates verified against %s", config.ca_file)
    return context


def _why(exc: httpx.HTTPError) -> str:
    """A short reason for a transport error, without the request (which may hold cookies)."""
    return type(exc).__name__ + (f": {exc}" if str(exc) else "")


def _check(resp: httpx.Response, base_url: str) -> Any:
    """Raise the typed DM error the response carries, else return its JSON body."""
    code = resp.headers.get("Dm-Status-Code")
    if code not in (None, "", "0"):
        try:
            number = int(code)
        except ValueError:
            number = 1
        raise error_from_status(number, resp.headers.get("Dm-Status-Message", ""),
                                resp.headers.get("Dm-Exception-Type", ""))
    if resp.status_code != 200:
        raise CommunicationError(f"DM at {base_url} answered HTTP {resp.status_code}")
    if not resp.content:
        return {}
    try:
        body = resp.json()
    except ValueError:
        raise CommunicationError(f"DM at {base_url} sent a body that is not JSON") from None
    if isinstance(body, dict) and body.get("errorCode") not in (None, 0):
        raise error_from_status(int(body["errorCode"]), str(body.get("errorMessage", "")),
                                str(body.get("exceptionType", "")))
    return body
