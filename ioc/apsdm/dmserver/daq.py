"""DAQ service of the embedded DM: DAQs (watch a tree, copy what appears) and uploads (copy
a tree once). Their runs live in daqrunner.py and uploadrunner.py."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from apsdm.dm.errors import DmError, InvalidArgument, ObjectNotFound
from apsdm.dm.paths import relative_path

from . import options as opts
from .common import FindExperiment, existing_directory, flag, local_directory
from .daqrunner import DaqRunner
from .filters import file_filter
from .processing import Processing
from .store import Doc, Store
from .transfer import CatalogFiles, Transfer, TransferService
from .uploadrunner import run_upload
from .watch import WatchHub

log = logging.getLogger(__name__)

MODES = ("files", "directory")  # an upload's processingMode

StartUpload = Callable[[str, str, Doc], Doc]  # experiment, data directory, daqInfo


class DaqService(TransferService):
    """startDaq, stopDaq, listDaqs, getDaqInfo."""

    kind = "daq"

    def __init__(self, store: Store, find_experiment: FindExperiment, catalog: CatalogFiles,
                 hub: WatchHub, processing: Processing, upload: StartUpload) -> None:
        super().__init__(store, find_experiment, catalog, processing)
        self._hub = hub
        self._upload = upload  # for uploadDataDirectoryOnExit
        self._runners: dict[str, DaqRunner] = {}

    def _work(self, transfer: Transfer) -> Coroutine[Any, Any, None]:
        runner = DaqRunner(transfer, self._hub)
        self._runners[transfer.id] = runner
        return self._run(runner)

    async def _run(self, runner: DaqRunner) -> None:
        doc = runner.transfer.doc
        limit = opts.run_time_seconds(doc)  # maxRunTimeInHours: the DAQ stops itself
        timer = None if limit is None else asyncio.get_running_loop().call_later(
            max(0.0, float(doc["startTime"]) + limit - time.time()), runner.stop)
        try:
            await runner.run()
        finally:
            if timer is not None:
                timer.cancel()
            self._runners.pop(runner.transfer.id, None)
        if doc["status"] == "done":
            self._upload_on_exit(doc)

    def _upload_on_exit(self, doc: Doc) -> None:
        """uploadDataDirectoryOnExit: upload that directory once the DAQ has ended."""
        wanted = opts.exit_upload(doc)
        if wanted is None:
            return
        directory, info = wanted
        try:
            upload = self._upload(doc["experimentName"], directory, info)
        except DmError as exc:
            doc["errorMessage"] = f"upload on exit of {directory} not started: {exc.message}"
            log.warning("daq %s: %s", doc["id"], doc["errorMessage"])
            self._saver.save(doc)
            return
        log.info("daq %s ended: upload %s of %s started", doc["id"], upload["id"], directory)

    def _active(self, experiment: str, source: Path) -> DaqRunner | None:
        for runner in self._runners.values():
            doc = runner.transfer.doc
            if doc["experimentName"] == experiment and doc["dataDirectory"] == str(source):
                return runner
        return None

    def startDaq(self, experimentName: str, dataDirectory: str,
                 taskInfo: Doc | None = None) -> Doc:
        """Start watching dataDirectory for the experiment, or return the DAQ already doing it."""
        experiment = self._find(experimentName)
        source = existing_directory(dataDirectory)
        running = self._active(experiment["name"], source)
        if running is not None:
            return running.transfer.doc
        options = dict(taskInfo or {})
        flag(options, "processExistingFiles", True)  # refuse a bad value now, not in the DAQ
        file_filter(options)
        self._check_options(options, experiment)
        doc = self._new_doc(opts.root(experiment, options), source, options)
        transfer = self._transfer(doc)
        self._launch(transfer)
        log.info("daq %s: %s -> %s", transfer.id, source, transfer.target)
        return doc

    async def stopDaq(self, experimentName: str, dataDirectory: str) -> Doc:
        """End the experiment's DAQ on dataDirectory after copying what it has seen."""
        experiment = self._find(experimentName)
        runner = self._active(experiment["name"], local_directory(dataDirectory))
        if runner is None:
            raise ObjectNotFound(
                f"no active DAQ of experiment {experimentName} on {dataDirectory}")
        runner.stop()
        task = self._tasks.get(runner.transfer.id)
        if task is not None:
            await asyncio.shield(task)  # a client that gives up does not cut the drain short
        return runner.transfer.doc

    def listDaqs(self) -> list[Doc]:
        return self._list()

    def getDaqInfo(self, id: str) -> Doc:
        return self._get(id)


class UploadService(TransferService):
    """upload, listUploads, getUploadInfo, stopUpload."""

    kind = "upload"

    def upload(self, experimentName: str, dataDirectory: str, daqInfo: Doc | None = None
               ) -> Doc:
        """Start copying dataDirectory (or its ``experimentFilePath``) into the experiment."""
        experiment = self._find(experimentName)
        source = existing_directory(dataDirectory)
        options = dict(daqInfo or {})
        options.setdefault("processingMode", "files")
        if options["processingMode"] not in MODES:
            raise InvalidArgument(f"processingMode must be one of {', '.join(MODES)}")
        flag(options, "reprocessFiles", False)  # refuse a bad value now, not in the upload
        file_filter(options)
        self._check_options(options, experiment)
        if options.get("experimentFilePath") is not None:
            one = relative_path(options["experimentFilePath"], "experimentFilePath")
            if not (source / one).is_file():
                raise InvalidArgument(f"experimentFilePath {one} is not a file in {source}")
        doc = self._new_doc(opts.root(experiment, options), source, options)
        self._launch(self._transfer(doc))
        return doc

    def listUploads(self) -> list[Doc]:
        return self._list()

    def getUploadInfo(self, id: str) -> Doc:
        return self._get(id)

    async def stopUpload(self, id: str) -> Doc:
        """Abort a running upload (its status becomes "aborted"); a finished one is returned."""
        transfer = self._live.get(id)
        if transfer is None:
            return self._get(id)
        transfer.stop_requested = True
        transfer.abort.set()
        task = self._tasks.get(id)
        if task is not None:
            await asyncio.shield(task)
        return transfer.doc

    def _work(self, transfer: Transfer) -> Coroutine[Any, Any, None]:
        return run_upload(transfer)
