"""HTTP side of the embedded DM service, and its experiment, workflow/job and catalog handlers.

Requests are matched with :func:`apsdm.dm.routes.match` on the raw path and query, since
DM's encoded tokens are quoted ``b'...'`` text that no framework should decode. Each route
is served by the method of the same name on one handler object; DAQs and uploads live in
daq.py and upload.py.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import json
import logging
import re
import secrets
import time
from collections.abc import Iterable
from datetime import datetime
from email.utils import formatdate
from pathlib import Path, PurePosixPath
from typing import Any

from aiohttp import web

from apsdm.dm import routes
from apsdm.dm.config import Credentials
from apsdm.dm.errors import (
    AuthenticationError,
    DmError,
    InternalError,
    InvalidArgument,
    InvalidSession,
    ObjectAlreadyExists,
    ObjectNotFound,
    UrlError,
    exception_type_name,
)

from .store import JOB_SUMMARY_KEYS, Doc, Store, ThrottledSaver
from .transfer import FindExperiment, relative_path
from .workflow.runner import (
    JobRunner,
    interrupted,
    kill_leftovers,
    milestone,
    new_job,
    validate_workflow,
)

log = logging.getLogger(__name__)

SESSION_COOKIE = "session_id"
SESSION_SECONDS = 24 * 3600
MAX_SESSIONS = 1000  # beyond this a login ends the oldest session
DEFAULT_TYPE = "TEST"
_COOKIE_RE = re.compile(r"(?<![\w-])" + SESSION_COOKIE + r"=([A-Za-z0-9_-]+)")
_NAME_RE = re.compile(r"(?!\.)[A-Za-z0-9._-]{1,64}")
#: JSON arguments that must decode to an object (dict)
_JSON_OBJECTS = ("taskInfo", "daqInfo", "argsDict", "workflow", "datasetInfo", "queryDict")


def check_name(value: Any, what: str) -> str:
    """An experiment or station name: safe as one path component."""
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise InvalidArgument(
            f"{what} {value!r} is not valid: use 1-64 letters, digits, '.', '_' or '-' "
            "(not starting with '.')")
    return value


def check_label(value: Any, what: str) -> str:
    """A user, role or type name: 1-64 printable characters (never used in a path)."""
    if not isinstance(value, str) or not 0 < len(value) <= 64 or not value.isprintable():
        raise InvalidArgument(f"{what} {value!r} is not valid: use 1-64 printable characters")
    return value


def _new_id() -> str:
    """A 24-hex id like the MongoDB ids DM gives workflows, datasets and files."""
    return secrets.token_hex(12)


# --- DS: experiments ---------------------------------------------------------------------


class Experiments:
    """Experiments, their storage directories under the data root, and user roles."""

    def __init__(self, store: Store, storage_root: Path, station: str) -> None:
        self._store = store
        self._storage_root = storage_root
        self.station = station

    def _storage(self, doc: Doc) -> Path:
        return self._storage_root / doc["stationName"] / doc["name"]

    def _record(self, id: int, doc: Doc, full: bool = True) -> Doc:
        """DM's experiment object; ``full`` adds what only single-experiment answers carry."""
        record = {
            "id": id,
            "name": doc["name"],
            "description": doc["description"],
            "experimentStation": {"id": doc["experimentStationId"],
                                  "name": doc["stationName"], "description": ""},
            "experimentStationId": doc["experimentStationId"],
            "experimentType": {"id": doc["experimentTypeId"], "name": doc["typeName"],
                               "description": ""},
            "experimentTypeId": doc["experimentTypeId"],
            "startDate": doc["startDate"],
            "endDate": doc["endDate"],
            "createDate": doc["createDate"],
            "rootPath": doc["rootPath"],
        }
        if full:
            storage = self._storage(doc)
            record.update(
                stationName=doc["stationName"],
                experimentUsernameList=self._store.usernames(id),
                storageDirectory=str(storage),
                dataDirectory=str(storage / "data"),
                analysisDirectory=str(storage / "analysis"),
                storageHost="localhost",
                storageUrl=storage.as_uri(),
            )
        return record

    def find(self, name: str) -> Doc:
        """The full record of an experiment of any station; ObjectNotFound if none."""
        row = self._store.experiment(name=name)
        if row is None:
            raise ObjectNotFound(f"experiment {name} does not exist")
        return self._record(*row)

    def _at_station(self, name: str, station: str | None) -> Doc:
        """:meth:`find`, with a station (if given) that must be the experiment's."""
        record = self.find(name)
        if station and station.casefold() != record["stationName"].casefold():
            raise ObjectNotFound(f"experiment {name} does not exist at station {station}")
        return record

    def getExperimentByName(self, name: str, stationName: str) -> Doc:
        return self._at_station(name, stationName)

    def getExperimentById(self, id: str) -> Doc:
        try:
            number = int(id)
        except ValueError:
            raise InvalidArgument(f"experiment id {id!r} is not a number") from None
        row = self._store.experiment(id=number)
        if row is None:
            raise ObjectNotFound(f"experiment with id {number} does not exist")
        return self._record(*row)

    def getExperimentsByStation(self, stationName: str) -> list[Doc]:
        return [self._record(i, d, full=False) for i, d in self._store.experiments(stationName)]

    def addExperiment(self, name: str, stationName: str | None = None,
                      typeName: str | None = None, description: str | None = None,
                      rootPath: str | None = None, startDate: str | None = None,
                      endDate: str | None = None) -> Doc:
        """Create an experiment and its data and analysis directories."""
        check_name(name, "experiment name")
        station = check_name(stationName or self.station, "station name")
        type_name = check_label(typeName or DEFAULT_TYPE, "experiment type")
        if self._store.experiment(name=name) is not None:
            raise ObjectAlreadyExists(f"experiment {name} already exists")
        doc = {
            "name": name,
            "description": description or "",
            "stationName": station,
            "experimentStationId": self._store.name_id("station", station),
            "typeName": type_name,
            "experimentTypeId": self._store.name_id("type", type_name),
            "rootPath": rootPath or "",
            "startDate": startDate,
            "endDate": endDate,
            "createDate": str(datetime.now().astimezone()),
        }
        storage = self._storage(doc)
        for sub in ("data", "analysis"):
            (storage / sub).mkdir(parents=True, exist_ok=True)
        record = self._record(self._store.add_experiment(doc), doc)
        log.info("experiment %s added at station %s: %s", name, station,
                 record["storageDirectory"])
        return record

    def addUserExperimentRole(self, username: str, roleName: str, experimentName: str,
                              stationName: str | None = None) -> Doc:
        """Give a user a role on an experiment; returns the experiment with its user list."""
        check_label(username, "username")
        check_label(roleName, "role name")
        record = self._at_station(experimentName, stationName)
        self._store.add_role(record["id"], username, roleName)
        return self.find(experimentName)


# --- PROC: workflows and processing jobs -------------------------------------------------


def _query(query: Doc | None) -> Doc:
    """DM's queryDict, as far as the embedded service supports it: equality of top-level keys."""
    for key, value in (query or {}).items():
        if key.startswith("$") or (isinstance(value, dict)
                                   and any(str(k).startswith("$") for k in value)):
            raise InvalidArgument("queryDict operators ($...) are not supported; "
                                  "use plain key: value equality")
    return query or {}


def _matches(doc: Doc, query: Doc) -> bool:
    return all(doc.get(key) == value for key, value in query.items())


def _key_list(value: Any) -> tuple[str, ...] | None:
    """listProcessingJobs' keyList: None for whole jobs, else the keys to return."""
    if value is None or value == "ALL":
        return None
    if value == "DEFAULT":
        return JOB_SUMMARY_KEYS
    if isinstance(value, str):
        value = [k.strip() for k in value.split(",") if k.strip()]
    if isinstance(value, list) and value and all(isinstance(k, str) for k in value):
        return tuple(value)
    raise InvalidArgument('keyList must be "ALL", "DEFAULT" or a list of key names')


def _count(value: str | None, what: str) -> int | None:
    if value is None:
        return None
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise InvalidArgument(f"{what} must be a whole number >= 0, not {value!r}")
    return number


class Processing:
    """Workflows, and processing jobs run by JobRunner in tasks of this loop."""

    def __init__(self, store: Store, jobs_root: Path) -> None:
        self._store = store
        self._jobs_root = jobs_root
        self._saver = ThrottledSaver(store.save_job, milestone=milestone)
        self._live: dict[str, Doc] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._closing = False

    def listWorkflows(self, owner: str, queryDict: Doc | None = None) -> list[Doc]:
        query = _query(queryDict)
        return [w for w in self._store.workflows(owner) if _matches(w, query)]

    def getWorkflowByName(self, owner: str, name: str) -> Doc:
        workflow = self._store.workflow(owner, name)
        if workflow is None:
            raise ObjectNotFound(f"workflow {name} of owner {owner} does not exist")
        return workflow

    def addWorkflow(self, workflow: Doc) -> Doc:
        """Store a new workflow with a fresh id and version 1."""
        doc = validate_workflow(workflow)
        doc.update(id=_new_id(), version=1)
        self._store.add_workflow(doc)
        log.info("workflow %s of %s added", doc["name"], doc["owner"])
        return doc

    def updateWorkflow(self, workflow: Doc) -> Doc:
        """Replace a workflow's definition, keeping its id and bumping its version."""
        doc = validate_workflow(workflow)
        old = self.getWorkflowByName(doc["owner"], doc["name"])
        doc.update(id=old["id"], version=int(old.get("version") or 0) + 1)
        self._store.replace_workflow(doc)
        log.info("workflow %s of %s updated to version %d", doc["name"], doc["owner"],
                 doc["version"])
        return doc

    def startProcessingJob(self, owner: str, workflowName: str,
                           argsDict: Doc | None = None) -> Doc:
        """Create a pending job and run it in the background; returns it as submitted."""
        job = new_job(self.getWorkflowByName(owner, workflowName), owner, argsDict or {})
        self._store.save_job(job)
        runner = JobRunner(job, self._update, self._jobs_root / job["id"])
        self._live[job["id"]] = job
        self._tasks[job["id"]] = asyncio.create_task(self._run(runner))
        log.info("job %s: workflow %s of %s started", job["id"], workflowName, owner)
        return job

    def _update(self, job: Doc) -> None:
        if not self._closing:  # after shutdown the next start marks the job interrupted
            self._saver.save(job)

    async def _run(self, runner: JobRunner) -> None:
        job = runner.job  # its last on_update (a new status) is written at once
        try:
            await runner.run()
            log.info("job %s %s", job["id"], job["status"])
        finally:
            self._live.pop(job["id"], None)
            self._tasks.pop(job["id"], None)

    def _latest(self, job: Doc) -> Doc:
        """A running job as it is this instant (its stored record may be a moment old)."""
        return self._live.get(job["id"], job)

    def getProcessingJobById(self, owner: str, id: str) -> Doc:
        job = self._live.get(id) or self._store.job(id)
        if job is None or job["owner"] != owner:
            raise ObjectNotFound(f"processing job {id} of owner {owner} does not exist")
        return job

    def listProcessingJobs(self, owner: str, queryDict: Doc | None = None,
                           skip: str | None = None, limit: str | None = None,
                           keyList: Any = None) -> list[Doc]:
        """An owner's jobs in submission order (all of them in one call unless limited)."""
        keys, query = _key_list(keyList), _query(queryDict)
        first, count = _count(skip, "skip") or 0, _count(limit, "limit")
        summary = keys == JOB_SUMMARY_KEYS and not query
        if query:
            jobs = [j for j in map(self._latest, self._store.jobs(owner)) if _matches(j, query)]
            jobs = jobs[first:] if count is None else jobs[first:first + count]
        else:  # the store skips and limits: a client polling what is new reads only that
            jobs = list(map(self._latest, self._store.jobs(owner, summary, first, count)))
        if keys is None:
            return jobs
        return [{k: j[k] for k in keys if k in j} for j in jobs]

    def recover(self) -> None:
        """At start: jobs that were pending or running cannot be resumed, so they failed."""
        for job in self._store.active_jobs():
            kill_leftovers(job)  # after a crash its processes may still run
            self._store.save_job(interrupted(job, "interrupted: DM service restarted"))
            log.info("job %s marked failed: interrupted by a restart", job["id"])

    async def shutdown(self) -> None:
        """Stop every running job (its processes are killed); records stay as they were."""
        self._saver.flush()
        self._closing = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# --- CAT: datasets and files -------------------------------------------------------------


class Catalog:
    """Datasets added by clients, and a record of every file DAQs and uploads copied."""

    def __init__(self, store: Store, find_experiment: FindExperiment) -> None:
        self._store = store
        self._find = find_experiment

    def addExperimentDataset(self, datasetInfo: Doc) -> Doc:
        """Store a dataset (experimentName and datasetName required, unique together)."""
        for key in ("experimentName", "datasetName"):
            if not isinstance(datasetInfo.get(key), str) or not datasetInfo[key]:
                raise InvalidArgument(f"datasetInfo needs a non-empty {key}")
        self._find(datasetInfo["experimentName"])  # ObjectNotFound for an unknown experiment
        doc = {**datasetInfo, "id": _new_id()}
        self._store.add_dataset(doc)
        return doc

    def getExperimentFile(self, experimentName: str, experimentFilePath: str) -> Doc:
        path = str(relative_path(experimentFilePath, "experimentFilePath"))
        doc = self._store.file(experimentName, path)
        if doc is None:
            raise ObjectNotFound(f"file {path} of experiment {experimentName} is not catalogued")
        return doc

    def add_file(self, experiment: str, path: str, size: int, md5: str) -> None:
        """Catalogue a copied file (a copy of a newer version updates its record)."""
        old = self._store.file(experiment, path)
        self._store.save_file({
            "id": old["id"] if old else _new_id(),
            "fileName": PurePosixPath(path).name,
            "experimentFilePath": path,
            "fileSize": size,
            "md5Sum": md5,
            "experimentName": experiment,
        })


# --- HTTP --------------------------------------------------------------------------------


class Sessions:
    """Logins to the service's one account, and the session cookies they hand out."""

    def __init__(self, credentials: Credentials) -> None:
        self._credentials = credentials
        self._expiry: dict[str, float] = {}  # token -> time.time() it expires

    def login(self, username: str, password: str) -> str | None:
        """A new session token, or None if the credentials are wrong."""
        user_ok = hmac.compare_digest(username.encode(), self._credentials.username.encode())
        password_ok = hmac.compare_digest(password.encode(),
                                          self._credentials.password.encode())
        if not (user_ok and password_ok):
            return None
        now = time.time()
        self._expiry = {t: e for t, e in self._expiry.items() if e > now}
        while len(self._expiry) >= MAX_SESSIONS:
            del self._expiry[next(iter(self._expiry))]
        token = secrets.token_urlsafe(32)
        self._expiry[token] = now + SESSION_SECONDS
        return token

    def valid(self, cookie_header: str) -> bool:
        """Whether a Cookie header carries a live session (the vendor client sends back the
        whole Set-Cookie string, so the header is searched rather than parsed)."""
        now = time.time()
        return any(self._expiry.get(t, 0) > now for t in _COOKIE_RE.findall(cookie_header))


def error_response(err: DmError, status: int = 200) -> web.Response:
    """DM's answer for a handled error: status headers and a JSON body."""
    name = exception_type_name(err)
    one_line = " ".join(err.message.split())
    # printable ASCII only: a control character (e.g. from a name the client sent) would
    # make the HTTP layer drop the answer, which the client would take for DM being down
    header = one_line.encode("unicode_escape").decode("ascii")[:1000]
    body = {"errorMessage": err.message, "errorCode": err.code, "exceptionType": name}
    return web.json_response(body, status=status, headers={
        "Dm-Status-Code": str(err.code), "Dm-Status-Message": header,
        "Dm-Exception-Type": name})


class _Dispatcher:
    """Serves every request: login, session check, route match, handler call, DM answer."""

    def __init__(self, sessions: Sessions, handlers: dict[str, Any]) -> None:
        self._sessions = sessions
        self._handlers = handlers
        self._signatures = {name: inspect.signature(h) for name, h in handlers.items()}

    async def handle(self, request: web.Request) -> web.Response:
        path, _, query = request.raw_path.partition("?")
        if path == routes.LOGIN_PATH and request.method == "POST":
            return await self._login(request)
        if not self._sessions.valid(request.headers.get("Cookie", "")):
            return error_response(InvalidSession("no valid DM session: log in first"), 401)
        try:
            found = routes.match(request.method, path, query)
            if found is None:
                return error_response(UrlError(f"no DM route {request.method} {path}"), 404)
            route, values = found
            body = json.dumps(await self._call(route.name, values))
        except DmError as err:
            return error_response(err)
        except Exception as exc:
            log.exception("%s %s failed", request.method, path)
            return error_response(InternalError(f"internal error: {exc}"))
        return web.Response(text=body, content_type="application/json",
                            headers={"Dm-Status-Code": "0"})

    async def _call(self, name: str, values: dict[str, Any]) -> Any:
        """Call a route's handler with the arguments it declares (others are ignored)."""
        for key in _JSON_OBJECTS:
            if key in values and not isinstance(values[key], dict):
                raise InvalidArgument(f"{key} must be a JSON object")
        signature = self._signatures[name]
        try:
            bound = signature.bind(**{k: v for k, v in values.items()
                                      if k in signature.parameters})
        except TypeError as exc:
            raise InvalidArgument(f"{name}: {exc}") from None
        result = self._handlers[name](*bound.args, **bound.kwargs)
        return await result if inspect.isawaitable(result) else result

    async def _login(self, request: web.Request) -> web.Response:
        try:
            form = await request.post()
        except ValueError:
            form = None
        username = str(form.get("username", "")) if form else ""
        password = str(form.get("password", "")) if form else ""
        token = self._sessions.login(username, password)
        if token is None:
            log.warning("refused DM login as %r from %s", username[:64], request.remote)
            return error_response(AuthenticationError("invalid username or password"), 401)
        log.info("DM login as %s from %s", username, request.remote)
        response = web.json_response({}, headers={"Dm-Status-Code": "0"})
        response.set_cookie(SESSION_COOKIE, token, path="/", httponly=True,
                            expires=formatdate(time.time() + SESSION_SECONDS, usegmt=True))
        return response


def build_app(sessions: Sessions, services: Iterable[object]) -> web.Application:
    """The web application: each route of routes.ROUTES served by the one service naming it."""
    services = list(services)
    handlers = {}
    for name in routes.ROUTES:
        owners = [s for s in services if callable(getattr(s, name, None))]
        if len(owners) != 1:
            raise RuntimeError(f"DM route {name} has {len(owners)} handlers, not 1")
        handlers[name] = getattr(owners[0], name)
    app = web.Application()
    # every path, a decoded newline included ('.' would leave those to aiohttp's plain 404)
    app.router.add_route("*", r"/{tail:[\s\S]*}", _Dispatcher(sessions, handlers).handle)
    return app
