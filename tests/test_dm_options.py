"""DM's DAQ/upload options beyond file selection (dm-protocol.md 1.3), each with real files
through the embedded service run as ``apsdm-server``: per-file workflows, source removal,
skipped transfer/checksum/catalog, run-time limit, upload on exit, reprocessing, one file,
the analysis directory as root, and a clear DM error for every value DM cannot honour."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import DmServer

from apsdm.dm import DmError, InvalidArgument, ObjectNotFound
from apsdm.dm.records import Experiment, Upload

TIMEOUT = 30.0


def _tree(root: Path, *names: str) -> Path:
    for rel in names:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(f"data of {rel}")
    return root


def _files(root: str | Path) -> set[str]:
    base = Path(root)
    return {str(p.relative_to(base)) for p in base.rglob("*") if p.is_file()}


async def _until(what: str, get: Callable[[], Awaitable[Any]],
                 done: Callable[[Any], bool]) -> Any:
    deadline = time.monotonic() + TIMEOUT
    while not done(value := await get()):
        assert time.monotonic() < deadline, f"{what}: {value!r}"
        await asyncio.sleep(0.1)
    return value


async def _uploaded(dm: Any, name: str, source: Path, **options: Any
                    ) -> tuple[Experiment, Upload]:
    """Make an experiment, upload source into it with options, wait for the end."""
    experiment = await dm.add_experiment(name)
    upload = await dm.upload(name, str(source), **options)
    upload = await _until("upload did not end", lambda: dm.get_upload(upload.id),
                          lambda u: u.finished)
    return experiment, upload


def _run(dm_server: DmServer, go: Callable[[Any], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        async with dm_server.client() as dm:
            return await go(dm)
    return asyncio.run(main())


async def _echo_workflow(dm: Any, name: str) -> None:
    await dm.add_workflow({"name": name, "owner": dm.username, "stages": {
        "01-ECHO": {"command": "/bin/echo $tag $filePath"}}})


def _file_jobs(jobs: list[Any], workflow: str) -> dict[str, dict[str, Any]]:
    """The jobs of a workflow, by the file each was given."""
    mine = [j.raw for j in jobs if j.workflow_name == workflow]
    return {j["experimentFilePath"]: j for j in mine}


def test_daq_workflow_starts_one_job_per_file(dm_server: DmServer, tmp_path: Path) -> None:
    """workflowName/workflowArgs on a DAQ: exactly one job per copied file, given the copy's
    path as ``filePath`` and the workflow's arguments."""
    source = _tree(tmp_path / "src", "a.h5", "sub/b.h5", "c.tmp")

    async def go(dm: Any) -> tuple[Experiment, list[Any]]:
        experiment = await dm.add_experiment("daq-wf")
        await _echo_workflow(dm, "per-file")
        await dm.start_daq("daq-wf", str(source), workflowName="per-file",
                           workflowArgs="tag:T1", skipFilePathPattern="*.tmp")
        _tree(source, "late.h5")
        await _until("late file not copied", lambda: asyncio.to_thread(
            _files, experiment.data_directory), lambda found: "late.h5" in found)
        await dm.stop_daq("daq-wf", str(source))

        async def jobs() -> list[Any]:
            return await dm.list_processing_jobs(keys="ALL")
        listed = await _until("jobs did not end", jobs,
                              lambda js: len(js) >= 3 and all(j.finished for j in js))
        return experiment, listed

    experiment, jobs = _run(dm_server, go)
    by_file = _file_jobs(jobs, "per-file")
    assert len(jobs) == len(by_file) == 3
    assert set(by_file) == {"a.h5", "sub/b.h5", "late.h5"}
    for rel, job in by_file.items():
        copy = f"{experiment.data_directory}/{rel}"
        assert (job["status"], job["filePath"], job["tag"]) == ("done", copy, "T1")
        assert job["experimentName"] == "daq-wf" and job["dataDirectory"] == str(source)
        stage = job["workflow"]["stages"]["01-ECHO"]
        assert next(iter(stage["childProcesses"].values()))["stdOut"].strip() == f"T1 {copy}"


def test_upload_workflow_starts_one_job_per_file(dm_server: DmServer, tmp_path: Path) -> None:
    """The same on an upload, with workflowArgs as an object and the owner named."""
    source = _tree(tmp_path / "src", "x.h5", "y.h5")

    async def go(dm: Any) -> list[Any]:
        await _echo_workflow(dm, "up-wf")
        await _uploaded(dm, "up-wf", source, workflowName="up-wf",
                        workflowOwner=dm.username, workflowArgs={"tag": 7})
        return await _until("jobs", lambda: dm.list_processing_jobs(keys="ALL"),
                            lambda js: len(js) >= 2 and all(j.finished for j in js))

    jobs = _run(dm_server, go)
    assert set(_file_jobs(jobs, "up-wf")) == {"x.h5", "y.h5"} and len(jobs) == 2
    assert {j.raw["tag"] for j in jobs} == {"7"}


def test_remove_source_files(dm_server: DmServer, tmp_path: Path) -> None:
    source = _tree(tmp_path / "src", "a.h5", "sub/b.h5")
    experiment, upload = _run(dm_server, lambda dm: _uploaded(
        dm, "remove", source, removeSourceFiles=True))
    assert upload.status == "done"
    assert _files(experiment.data_directory) == {"a.h5", "sub/b.h5"}
    assert _files(source) == set()


def test_daq_remove_source_files(dm_server: DmServer, tmp_path: Path) -> None:
    source = _tree(tmp_path / "src", "a.h5")

    async def go(dm: Any) -> Experiment:
        experiment = await dm.add_experiment("daq-remove")
        await dm.start_daq("daq-remove", str(source), removeSourceFiles="true")
        await _until("source not removed", lambda: asyncio.to_thread(_files, source),
                     lambda found: not found)
        await dm.stop_daq("daq-remove", str(source))
        return experiment

    assert _files(_run(dm_server, go).data_directory) == {"a.h5"}


@pytest.mark.parametrize("mode", ["files", "directory"])
def test_skip_transfer_catalogues_files_in_place(dm_server: DmServer, tmp_path: Path,
                                                 mode: str) -> None:
    source = _tree(tmp_path / "src", "a.h5")

    async def go(dm: Any) -> tuple[Experiment, dict[str, Any]]:
        experiment, upload = await _uploaded(dm, "in-place", source, skipTransfer=True,
                                             processingMode=mode)
        assert (upload.status, upload.n_processed) == ("done", 1)
        return experiment, await dm.get_experiment_file("in-place", "a.h5")

    experiment, record = _run(dm_server, go)
    assert _files(experiment.data_directory) == set()
    assert _files(source) == {"a.h5"}
    assert (record["fileSize"], len(record["md5Sum"])) == (len("data of a.h5"), 32)


def test_skip_checksum_catalogues_without_md5(dm_server: DmServer, tmp_path: Path) -> None:
    source = _tree(tmp_path / "src", "a.h5")

    async def go(dm: Any) -> dict[str, Any]:
        await _uploaded(dm, "no-md5", source, skipChecksum=True)
        return await dm.get_experiment_file("no-md5", "a.h5")

    record = _run(dm_server, go)
    assert "md5Sum" not in record and record["fileSize"] == len("data of a.h5")


def test_skip_catalog(dm_server: DmServer, tmp_path: Path) -> None:
    source = _tree(tmp_path / "src", "a.h5")

    async def go(dm: Any) -> Experiment:
        experiment, _ = await _uploaded(dm, "no-cat", source, skipCatalog=True)
        with pytest.raises(ObjectNotFound):
            await dm.get_experiment_file("no-cat", "a.h5")
        return experiment

    assert _files(_run(dm_server, go).data_directory) == {"a.h5"}


def test_max_run_time_stops_the_daq(dm_server: DmServer, tmp_path: Path) -> None:
    """maxRunTimeInHours: the DAQ ends by itself (here after about 1.8 s), files copied."""
    source = _tree(tmp_path / "src", "a.h5")

    async def go(dm: Any) -> tuple[Experiment, Any]:
        experiment = await dm.add_experiment("limited")
        daq = await dm.start_daq("limited", str(source), maxRunTimeInHours=0.0005)
        daq = await _until("DAQ did not stop itself", lambda: dm.get_daq(daq.id),
                           lambda d: d.finished)
        return experiment, daq

    experiment, daq = _run(dm_server, go)
    assert (daq.status, daq.n_processed) == ("done", 1)
    assert daq.raw["runTime"] >= 1.7
    assert _files(experiment.data_directory) == {"a.h5"}


def test_upload_on_exit(dm_server: DmServer, tmp_path: Path) -> None:
    """uploadDataDirectoryOnExit/uploadDestDirectoryOnExit: stopping the DAQ starts an upload
    of that directory into that experiment subdirectory."""
    source = _tree(tmp_path / "src", "a.h5")
    extra = _tree(tmp_path / "extra", "notes.txt", "cfg/setup.json")

    async def go(dm: Any) -> tuple[Experiment, list[Upload]]:
        experiment = await dm.add_experiment("on-exit")
        await dm.start_daq("on-exit", str(source), uploadDataDirectoryOnExit=str(extra),
                           uploadDestDirectoryOnExit="final")
        assert await dm.list_uploads() == []
        await _until("file not copied", lambda: asyncio.to_thread(
            _files, experiment.data_directory), lambda found: "a.h5" in found)
        await dm.stop_daq("on-exit", str(source))
        uploads = await _until("no upload on exit", dm.list_uploads,
                               lambda us: len(us) == 1 and us[0].finished)
        return experiment, uploads

    experiment, uploads = _run(dm_server, go)
    assert (uploads[0].status, uploads[0].data_directory) == ("done", str(extra))
    assert _files(experiment.data_directory) == {
        "a.h5", "final/notes.txt", "final/cfg/setup.json"}


def test_upload_on_exit_of_a_vanished_directory(dm_server: DmServer, tmp_path: Path) -> None:
    """The directory is gone when the DAQ ends: the DAQ's record says why no upload ran."""
    source = _tree(tmp_path / "src", "a.h5")
    extra = _tree(tmp_path / "extra", "notes.txt")

    async def go(dm: Any) -> Any:
        await dm.add_experiment("exit-gone")
        daq = await dm.start_daq("exit-gone", str(source), uploadDataDirectoryOnExit=str(extra))
        (extra / "notes.txt").unlink()
        extra.rmdir()
        await dm.stop_daq("exit-gone", str(source))
        assert await dm.list_uploads() == []
        return await dm.get_daq(daq.id)

    daq = _run(dm_server, go)
    assert daq.status == "done"
    assert "upload on exit" in daq.raw["errorMessage"] and "does not exist" in daq.raw["errorMessage"]


def test_reprocess_files(dm_server: DmServer, tmp_path: Path) -> None:
    """A file already copied (same size and mtime) is copied again only with reprocessFiles."""
    source = _tree(tmp_path / "src", "a.h5")
    original = (source / "a.h5").read_text()

    async def go(dm: Any) -> list[str]:
        experiment, _ = await _uploaded(dm, "again", source)
        copy = Path(experiment.data_directory) / "a.h5"
        st = copy.stat()
        copy.write_text("X" * len(original))  # same size; mtime put back below
        os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns))
        seen = []
        for reprocess in (False, True):
            upload = await dm.upload("again", str(source), reprocessFiles=reprocess)
            await _until("upload", lambda u=upload: dm.get_upload(u.id), lambda u: u.finished)
            seen.append(copy.read_text())
        return seen

    assert _run(dm_server, go) == ["X" * len(original), original]


def test_experiment_file_path(dm_server: DmServer, tmp_path: Path) -> None:
    source = _tree(tmp_path / "src", "a.h5", "sub/b.h5")
    experiment, upload = _run(dm_server, lambda dm: _uploaded(
        dm, "one-file", source, experimentFilePath="sub/b.h5"))
    assert (upload.status, upload.n_files) == ("done", 1)
    assert _files(experiment.data_directory) == {"sub/b.h5"}


def test_analysis_directory_as_root(dm_server: DmServer, tmp_path: Path) -> None:
    source = _tree(tmp_path / "src", "a.h5")
    experiment, upload = _run(dm_server, lambda dm: _uploaded(
        dm, "analysis", source, useAnalysisDirectoryAsRoot=True, destDirectory="r1"))
    assert upload.status == "done"
    assert _files(experiment.analysis_directory) == {"r1/a.h5"}
    assert _files(experiment.data_directory) == set()


@pytest.mark.parametrize(("options", "error", "words"), [
    ({"removeSourceFiles": "maybe"}, InvalidArgument, "removeSourceFiles"),
    ({"skipCatalog": 2}, InvalidArgument, "skipCatalog"),
    ({"maxRunTimeInHours": -1}, InvalidArgument, "maxRunTimeInHours"),
    ({"maxRunTimeInHours": "soon"}, InvalidArgument, "maxRunTimeInHours"),
    ({"workflowOwner": "someone"}, InvalidArgument, "needs workflowName"),
    ({"workflowName": "missing"}, ObjectNotFound, "missing"),
    ({"workflowName": "ok", "workflowArgs": "novalue"}, InvalidArgument, "<key>:<value>"),
    ({"workflowName": "ok", "workflowArgs": "filePath:/x"}, InvalidArgument, "reserved"),
    ({"removeSourceFiles": True, "skipTransfer": True}, InvalidArgument, "only copy"),
    ({"uploadDataDirectoryOnExit": "relative/dir"}, InvalidArgument, "absolute"),
    ({"uploadDestDirectoryOnExit": "x"}, InvalidArgument, "uploadDataDirectoryOnExit"),
])
def test_bad_option_value_is_a_clear_dm_error(dm_server: DmServer, tmp_path: Path,
                                              options: dict[str, Any], error: type[DmError],
                                              words: str) -> None:
    """Refused at startDaq with a message naming what is wrong; nothing is started."""
    async def go(dm: Any) -> None:
        await dm.add_experiment("bad")
        await _echo_workflow(dm, "ok")
        with pytest.raises(error, match=words):
            await dm.start_daq("bad", str(tmp_path), **options)
        assert await dm.list_daqs() == []

    _run(dm_server, go)


def test_directory_mode_refuses_remove_source(dm_server: DmServer, tmp_path: Path) -> None:
    async def go(dm: Any) -> None:
        await dm.add_experiment("dir-remove")
        with pytest.raises(InvalidArgument, match="directory mode"):
            await dm.upload("dir-remove", str(tmp_path), processingMode="directory",
                            removeSourceFiles=True)

    _run(dm_server, go)
