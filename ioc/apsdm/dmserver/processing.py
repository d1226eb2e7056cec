"""Processing service (PROC) of the embedded DM: workflows, and jobs run by the workflow engine."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from apsdm.dm.errors import InvalidArgument, ObjectNotFound

from .common import new_id
from .store import JOB_SUMMARY_KEYS, Doc, Store, ThrottledSaver
from .workflow.jobs import interrupted, kill_leftovers, milestone, new_job
from .workflow.runner import JobRunner
from .workflow.spec import validate_workflow

log = logging.getLogger(__name__)


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

    def __init__(self, store: Store, jobs_root: Path,
                 job_env: Mapping[str, str] | None = None) -> None:
        self._store = store
        self._jobs_root = jobs_root
        self._job_env = dict(job_env or {})  # every job's processes get these variables
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
        doc.update(id=new_id(), version=1)
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
        runner = JobRunner(job, self._update, self._jobs_root / job["id"], env=self._job_env)
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
