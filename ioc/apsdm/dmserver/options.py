"""DM's DAQ/upload options that act around the copies (dm-protocol.md section 1.3), checked
when a transfer starts so a bad value is a clear DM error and never a failure later on:

* ``workflowName``/``workflowOwner``/``workflowArgs``: one processing job per file, with the
  file's ``filePath`` (where it lies in the experiment storage), ``experimentFilePath``,
  ``experimentName`` and ``dataDirectory`` (the transfer's source) besides the arguments,
  counted in the record's ``nProcessingJobs``;
* ``skipCatalog``, ``skipChecksum`` (catalogued without ``md5Sum``), ``skipTransfer`` (files
  are catalogued and processed where they are), ``removeSourceFiles`` (after a verified copy);
* ``useAnalysisDirectoryAsRoot``, ``maxRunTimeInHours``, ``uploadDataDirectoryOnExit`` and
  ``uploadDestDirectoryOnExit`` (the DAQ's services use :func:`run_time_seconds`,
  :func:`root` and :func:`exit_upload`).
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

from apsdm.dm.errors import DmError, InvalidArgument
from apsdm.dm.paths import relative_path
from apsdm.dm.records import RESERVED_JOB_KEYS

from .common import flag, local_directory
from .copying import _is_copy_of, file_stat
from .store import Doc

log = logging.getLogger(__name__)

StartJob = Callable[[str, str, Doc], Doc]  # owner, workflow name, argsDict -> the new job
FindWorkflow = Callable[[str, str], Doc]  # owner, workflow name -> workflow, or ObjectNotFound
CatalogFiles = Callable[[str, list[tuple[str, int, str]]], None]

#: the arguments each per-file job gets from the transfer; workflowArgs may not set them
FILE_ARGS = ("filePath", "experimentFilePath", "experimentName", "dataDirectory")
_VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def workflow_args(value: Any) -> dict[str, str]:
    """``workflowArgs``: ``"<key>:<value>"`` items separated by spaces (DM's form), or an
    object of string/number values; InvalidArgument says what is wrong."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        pairs = []
        for item in value.split():
            key, sep, text = item.partition(":")
            if not sep:
                raise InvalidArgument(
                    f"workflowArgs item {item!r} is not <key>:<value> (items separated by spaces)")
            pairs.append((key, text))
        args = dict(pairs)
    elif isinstance(value, dict):
        args = value
    else:
        raise InvalidArgument('workflowArgs must be "<key>:<value> ..." or an object')
    for key, text in args.items():
        if not isinstance(key, str) or not _VARIABLE.fullmatch(key):
            raise InvalidArgument(f"workflowArgs key {key!r} is not a variable name")
        if key in RESERVED_JOB_KEYS or key in FILE_ARGS:
            raise InvalidArgument(f"workflowArgs key {key!r} is reserved (DM sets it)")
        if isinstance(text, bool) or not isinstance(text, str | int | float) or "\0" in str(text):
            raise InvalidArgument(f"workflowArgs value of {key!r} must be a string or a number")
    return {key: str(text) for key, text in args.items()}


def run_time_seconds(options: Doc) -> float | None:
    """``maxRunTimeInHours`` in seconds (None: no limit); a positive number of hours."""
    value = options.get("maxRunTimeInHours")
    if value is None or value == "":
        return None
    try:
        hours = float(value)
    except (TypeError, ValueError):
        hours = math.nan
    if isinstance(value, bool) or not math.isfinite(hours) or hours <= 0:
        raise InvalidArgument(f"maxRunTimeInHours must be a number of hours > 0, not {value!r}")
    return hours * 3600.0


def check(options: Doc, kind: str, find_workflow: FindWorkflow, owner: str) -> None:
    """Refuse (InvalidArgument, ObjectNotFound for a missing workflow) any option value the
    transfer could not honour; ``owner`` owns the jobs when ``workflowOwner`` is not given."""
    for key in ("removeSourceFiles", "skipTransfer", "skipChecksum", "skipCatalog",
                "useAnalysisDirectoryAsRoot"):
        flag(options, key, False)
    if flag(options, "removeSourceFiles", False):
        if flag(options, "skipTransfer", False):
            raise InvalidArgument("removeSourceFiles with skipTransfer would delete the only copy")
        if options.get("processingMode") == "directory":
            raise InvalidArgument("removeSourceFiles is not available in directory mode")
    name = options.get("workflowName")
    if name in (None, ""):
        for key in ("workflowOwner", "workflowArgs"):
            if options.get(key) not in (None, ""):
                raise InvalidArgument(f"{key} needs workflowName (they are used together)")
    else:
        if not isinstance(name, str):
            raise InvalidArgument("workflowName must be a string")
        job_owner = options.get("workflowOwner") or owner
        if not isinstance(job_owner, str):
            raise InvalidArgument("workflowOwner must be a user name")
        workflow_args(options.get("workflowArgs"))
        find_workflow(job_owner, name)
    if kind == "daq":
        run_time_seconds(options)
        on_exit = options.get("uploadDataDirectoryOnExit")
        if on_exit not in (None, ""):
            local_directory(on_exit)
        elif options.get("uploadDestDirectoryOnExit") not in (None, ""):
            raise InvalidArgument("uploadDestDirectoryOnExit needs uploadDataDirectoryOnExit")
        relative_path(options.get("uploadDestDirectoryOnExit"), "uploadDestDirectoryOnExit")


def root(experiment: Doc, options: Doc) -> Doc:
    """The experiment as a transfer sees it: its analysis directory in place of its data
    directory under ``useAnalysisDirectoryAsRoot``."""
    if flag(options, "useAnalysisDirectoryAsRoot", False):
        return {**experiment, "dataDirectory": experiment["analysisDirectory"]}
    return experiment


def exit_upload(doc: Doc) -> tuple[str, Doc] | None:
    """The upload a finished DAQ asks for: (data directory, daqInfo), or None."""
    directory = doc.get("uploadDataDirectoryOnExit")
    if directory in (None, ""):
        return None
    return str(directory), {"destDirectory": doc.get("uploadDestDirectoryOnExit") or ""}


class AfterCopy:
    """What a transfer's options ask for each batch of files it copied (or, under
    skipTransfer, found): catalogue it, start a job per file, remove the sources."""

    def __init__(self, doc: Doc, target: Path, catalog: CatalogFiles,
                 start_job: StartJob) -> None:
        self._doc = doc
        self._source = Path(doc["dataDirectory"])
        self._target = target
        self._prefix = PurePosixPath(doc["destDirectory"] or ".")
        self._catalog = catalog
        self._start_job = start_job
        self._in_place = flag(doc, "skipTransfer", False)
        self._skip_catalog = flag(doc, "skipCatalog", False)
        self._checksum = not flag(doc, "skipChecksum", False)
        self._remove = flag(doc, "removeSourceFiles", False)
        self._workflow = doc.get("workflowName") or ""
        self._args = workflow_args(doc.get("workflowArgs")) if self._workflow else {}

    def __call__(self, experiment: str, entries: list[tuple[str, int, str]]) -> None:
        if not self._skip_catalog:
            self._catalog(experiment, entries if self._checksum
                          else [(path, size, "") for path, size, _ in entries])
        if not (self._workflow or self._remove):
            return
        for path, _, _ in entries:
            rel = str(PurePosixPath(path).relative_to(self._prefix))
            if self._workflow:
                self._job(experiment, path, rel)
            if self._remove:
                self._remove_source(rel)

    def _job(self, experiment: str, path: str, rel: str) -> None:
        """Start the file's processing job; a refusal is logged (the copy stands)."""
        where = self._source if self._in_place else self._target
        args = {**self._args, "filePath": str(where / rel), "experimentFilePath": path,
                "experimentName": experiment, "dataDirectory": str(self._source)}
        owner = str(self._doc["workflowJobOwner"])
        try:
            self._start_job(owner, self._workflow, args)
        except DmError as exc:
            log.warning("%s: no processing job for %s: %s", self._doc["id"], rel, exc.message)
            return
        # an addition of the embedded service (DM's record has no such count): slots show it
        self._doc["nProcessingJobs"] = int(self._doc.get("nProcessingJobs") or 0) + 1

    def _remove_source(self, rel: str) -> None:
        """Delete a source file whose copy holds its current version (size and mtime)."""
        src = self._source / rel
        try:
            if not _is_copy_of(file_stat(os.stat(src)), self._target / rel):
                log.warning("%s: %s changed since its copy: not removed", self._doc["id"], src)
                return
            os.unlink(src)
        except OSError as exc:
            log.warning("%s: source %s not removed: %s", self._doc["id"], src, exc.strerror)
