"""The DM client against the running embedded DM service: the real protocol end to end."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import BIN, DmServer

from apsdm.dm import DmClient, InvalidArgument, ObjectNotFound, wire
from apsdm.dm.routes import ROUTES


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(coro)  # type: ignore[arg-type]


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.1)


# --- the wire format, byte for byte against captures from a real DM server -----------------

def test_encoding_reproduces_captured_tokens() -> None:
    assert wire.encode("example-01") == "b'WlhoaGJYQnNaUzB3TVE9PQo='"
    assert wire.encode_json({}) == "b'ZTMwPQo='"
    assert wire.encode_json("DEFAULT") == "b'SWtSRlJrRlZURlFpCg=='"
    assert wire.encode("tetramm-testing-2026-C2") == "b'ZEdWMGNtRnRiUzEwWlhOMGFXNW5MVEl3TWpZdFF6ST0K'"
    for text in ("example-01", "a/b+c d", "x" * 200, "ünïcödé"):
        assert wire.decode(wire.encode(text)) == text


def test_routes_reproduce_captured_urls() -> None:
    assert ROUTES["listProcessingJobs"].url(
        owner="s25idcuser", queryDict={}, skip=0, limit=5000, keyList="DEFAULT") == (
        "/dm/processingJobsByOwner/s25idcuser?queryDict=b'ZTMwPQo='&skip=0&limit=5000"
        "&keyList=b'SWtSRlJrRlZURlFpCg=='")
    assert ROUTES["startProcessingJob"].url(
        owner="s25idcuser", workflowName="example-01", argsDict={"run_uid": "12345"}) == (
        "/dm/processingJobsByWorkflow/s25idcuser/b'WlhoaGJYQnNaUzB3TVE9PQo='/startProcessingJob"
        "?argsDict=b'ZXlKeWRXNWZkV2xrSWpvZ0lqRXlNelExSW4wPQo='")
    assert ROUTES["listWorkflows"].url(owner="s25idcuser", queryDict={}) == (
        "/dm/workflowsByOwner/s25idcuser?queryDict=b'ZTMwPQo='")
    # and httpx sends it as written (quotes, '+' and '/' untouched)
    import httpx

    raw = httpx.Request("GET", "http://h" + ROUTES["listWorkflows"].url(owner="o", queryDict={})).url
    assert raw.raw_path == b"/dm/workflowsByOwner/o?queryDict=b'ZTMwPQo='"


# --- experiments -----------------------------------------------------------------------

def test_experiments_and_unknown_experiment(dm_server: DmServer) -> None:
    async def go() -> None:
        async with dm_server.client() as dm:
            exp = await dm.add_experiment("exp-a.b_c", description="a/b+c & ?=ü")
            assert Path(exp.storage_directory).is_dir()
            got = await dm.get_experiment("exp-a.b_c")
            assert (got.id, got.description) == (exp.id, "a/b+c & ?=ü")
            assert "exp-a.b_c" in [e.name for e in await dm.list_experiments()]
            with pytest.raises(ObjectNotFound) as err:
                await dm.get_experiment("no-such-experiment")
            assert err.value.code == 14

    run(go())


def test_password_never_in_repr_or_errors(dm_server: DmServer) -> None:
    dm = dm_server.client()
    password = dm_server.setup_file.parent.joinpath("dm.login").read_text().split("|")[1].strip()
    assert password not in repr(dm) and password not in repr(dm.config.credentials())
    log = (dm_server.data_root.parent / "dm-server.log").read_text()
    assert password not in log


# --- DAQs ------------------------------------------------------------------------------

def test_daq_copies_200_files_written_while_it_runs(dm_server: DmServer, tmp_path: Path) -> None:
    src = tmp_path / "detector"
    src.mkdir()

    async def go() -> None:
        async with dm_server.client() as dm:
            exp = await dm.add_experiment("daq-200")
            daq = await dm.start_daq("daq-200", str(src), destDirectory="raw")
            assert daq.status in ("pending", "running")
            again = await dm.start_daq("daq-200", str(src), destDirectory="raw")
            assert again.id == daq.id  # an active DAQ on the same tree is reused
            for i in range(200):
                sub = src / f"scan{i // 50}"
                sub.mkdir(exist_ok=True)
                (sub / f"img{i:03d}.dat").write_bytes(bytes([i % 256]) * (1000 + i))
                if i % 20 == 0:
                    await asyncio.sleep(0.05)

            async def copied() -> bool:
                d = await dm.get_daq(daq.id)
                return d.n_processed >= 200
            await until(copied)
            stopped = await dm.stop_daq("daq-200", str(src))
            await until(lambda: _status(dm.get_daq(daq.id), "done"))
            final = await dm.get_daq(daq.id)
            assert (final.n_files, final.n_processed, final.n_errors, final.n_waiting) == (200, 200, 0, 0)
            assert final.percent == pytest.approx(100.0)
            assert stopped.id == daq.id
            dest = Path(exp.data_directory) / "raw"
            copies = sorted(p.relative_to(dest) for p in dest.rglob("*.dat"))
            assert copies == sorted(p.relative_to(src) for p in src.rglob("*.dat"))
            for p in src.rglob("*.dat"):
                assert (dest / p.relative_to(src)).read_bytes() == p.read_bytes()

    run(go())


async def _status(obj: Awaitable[Any], status: str) -> bool:
    return (await obj).status == status


def test_bad_daq_arguments_are_refused(dm_server: DmServer, tmp_path: Path) -> None:
    async def go() -> None:
        async with dm_server.client() as dm:
            await dm.add_experiment("daq-bad")
            with pytest.raises(InvalidArgument, match=r"\.\."):
                await dm.start_daq("daq-bad", str(tmp_path), destDirectory="../escape")
            with pytest.raises(InvalidArgument):
                await dm.start_daq("daq-bad", str(tmp_path), destDirectory="/abs")
            with pytest.raises(InvalidArgument):
                await dm.start_daq("daq-bad", str(tmp_path / "missing"))
            with pytest.raises(ObjectNotFound):
                await dm.start_daq("no-experiment", str(tmp_path))
            assert await dm.list_daqs() == []

    run(go())


# --- uploads ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["files", "directory"])
def test_directory_upload_counts(dm_server: DmServer, tmp_path: Path, mode: str) -> None:
    src = tmp_path / "scan"
    (src / "sub").mkdir(parents=True)
    for i in range(30):
        (src / ("sub" if i % 2 else "") / f"f{i}.txt").write_text(f"data {i}\n" * i)

    async def go() -> None:
        async with dm_server.client() as dm:
            exp = await dm.add_experiment(f"up-{mode}")
            up = await dm.upload(f"up-{mode}", str(src), destDirectory="u", processingMode=mode)
            await until(lambda: _finished(dm, up.id))
            final = await dm.get_upload(up.id)
            assert (final.status, final.n_files, final.n_processed, final.n_errors) == (
                "done", 30, 30, 0)
            dest = Path(exp.data_directory) / "u"
            assert sorted(p.relative_to(dest) for p in dest.rglob("*.txt")) == sorted(
                p.relative_to(src) for p in src.rglob("*.txt"))
            record = await dm.get_experiment_file(f"up-{mode}", "u/sub/f1.txt")
            assert record["fileSize"] == (src / "sub" / "f1.txt").stat().st_size

    run(go())


async def _finished(dm: DmClient, upload_id: str) -> bool:
    return (await dm.get_upload(upload_id)).finished


def test_single_file_upload(dm_server: DmServer, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "qmap.h5").write_bytes(b"\x89HDF" * 1000)
    (src / "other.h5").write_bytes(b"x")

    async def go() -> None:
        async with dm_server.client() as dm:
            exp = await dm.add_experiment("up-file")
            up = await dm.upload("up-file", str(src), experimentFilePath="qmap.h5")
            await until(lambda: _finished(dm, up.id))
            final = await dm.get_upload(up.id)
            assert (final.status, final.n_files, final.n_processed) == ("done", 1, 1)
            assert (Path(exp.data_directory) / "qmap.h5").read_bytes() == b"\x89HDF" * 1000
            assert not (Path(exp.data_directory) / "other.h5").exists()

    run(go())


# --- workflows and processing jobs -----------------------------------------------------

THREE_STAGES = {
    "name": "three", "description": "output variable handed on",
    "stages": {
        "01-STAMP": {"command": "echo stamp-$tag", "outputVariableRegexList": ["(?P<stamp>stamp-\\S+)"]},
        "02-COUNT": {"command": "echo counted"},
        "03-USE": {"command": "echo got $stamp from $id"},
    },
}


def _job_done(dm: DmClient, job_id: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return (await dm.get_processing_job(job_id)).finished
    return check


def test_three_stage_workflow_passes_output_variable(dm_server: DmServer) -> None:
    async def go() -> None:
        async with dm_server.client() as dm:
            wf = await dm.add_workflow(THREE_STAGES)
            assert wf.id and wf.owner == dm.username
            job = await dm.start_processing_job("three", {"tag": "A1"})
            assert job.status == "pending"
            await until(_job_done(dm, job.id))
            done = await dm.get_processing_job(job.id)
            assert done.status == "done", done.error_message
            assert done.raw["stamp"] == "stamp-A1"
            stages = done.raw["workflow"]["stages"]
            child = next(iter(stages["03-USE"]["childProcesses"].values()))
            assert child["stdOut"].strip() == f"got stamp-A1 from {job.id}"
            jobs = await dm.list_processing_jobs()
            assert [j.id for j in jobs] == [job.id] and jobs[0].status == "done"

    run(go())


def test_failing_stage_fails_job_with_stderr(dm_server: DmServer) -> None:
    async def go() -> None:
        async with dm_server.client() as dm:
            await dm.add_workflow({"name": "fails", "stages": {
                "01-OK": {"command": "true"},
                "02-BAD": {"command": "echo broken-input >&2; exit 3"},
                "03-NEVER": {"command": "echo never"}}})
            job = await dm.start_processing_job("fails", {})
            await until(_job_done(dm, job.id))
            failed = await dm.get_processing_job(job.id)
            assert failed.status == "failed"
            assert "02-BAD" in failed.error_message and "broken-input" in failed.error_message
            assert not failed.raw["workflow"]["stages"]["03-NEVER"].get("childProcesses")

    run(go())


def test_injection_in_args_runs_nothing(dm_server: DmServer, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    async def go() -> None:
        async with dm_server.client() as dm:
            await dm.add_workflow({"name": "echo", "stages": {"01": {"command": "echo $x"}}})
            for attack in (f"; touch {marker}", f"$(touch {marker})", f"`touch {marker}`",
                           f"a && touch {marker}"):
                job = await dm.start_processing_job("echo", {"x": attack})
                await until(_job_done(dm, job.id))
                done = await dm.get_processing_job(job.id)
                child = next(iter(done.raw["workflow"]["stages"]["01"]["childProcesses"].values()))
                assert child["stdOut"].strip() == attack
            assert not marker.exists()

    run(go())


def test_cli_mirrors_dm_tools(dm_server: DmServer, tmp_path: Path) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "apsdm"), "--setup", str(dm_server.setup_file), *args],
                              capture_output=True, text=True, timeout=60)

    out = cli("add-experiment", "--experiment", "cli-exp")
    assert out.returncode == 0 and "name=cli-exp" in out.stdout
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps({"name": "hello", "stages": {"01": {"command": "echo hi $who"}}}))
    assert cli("add-workflow", "--file", str(wf)).returncode == 0
    for _ in range(2):  # installing the demos again updates them
        out = cli("add-workflow", "--demo")
        assert out.returncode == 0, out.stderr
        assert [line.split("name=")[1].split()[0] for line in out.stdout.splitlines()] == [
            "apsdm-files-demo", "apsdm-streaming-demo", "apsdm-streaming-reference"]
    listed = cli("list-workflows").stdout
    assert listed.count("name=apsdm-files-demo ") == 1 and "name=hello " in listed
    out = cli("start-processing-job", "--workflow-name", "apsdm-files-demo", f"dataDir={tmp_path}")
    assert out.returncode == 0 and "status=pending" in out.stdout
    demo_job = out.stdout.split("id=")[1].split()[0]
    out = cli("start-processing-job", "--workflow-name", "hello", "who=you")
    assert out.returncode == 0 and "status=pending" in out.stdout
    job_id = out.stdout.split("id=")[1].split()[0]
    deadline = time.monotonic() + 30
    while "status=done" not in (got := cli("get-processing-job", "--id", job_id)).stdout:
        assert time.monotonic() < deadline, got.stdout + got.stderr
        time.sleep(0.2)
    assert job_id in cli("list-processing-jobs").stdout
    while "status=done" not in (got := cli("get-processing-job", "--id", demo_job)).stdout:
        assert time.monotonic() < deadline and "status=failed" not in got.stdout, got.stdout
        time.sleep(0.2)
    bad = cli("get-experiment", "--experiment", "nope")
    assert bad.returncode == 1 and bad.stderr.startswith("error: ObjectNotFound")
    assert len(bad.stderr.strip().splitlines()) == 1


def test_service_restart_keeps_finished_and_fails_interrupted(dm_server: DmServer) -> None:
    async def start() -> tuple[str, str]:
        async with dm_server.client() as dm:
            await dm.add_workflow({"name": "quick", "stages": {"01": {"command": "true"}}})
            await dm.add_workflow({"name": "slow", "stages": {"01": {"command": "sleep 60"}}})
            quick = await dm.start_processing_job("quick", {})
            await until(_job_done(dm, quick.id))
            slow = await dm.start_processing_job("slow", {})
            await until(lambda: _status(dm.get_processing_job(slow.id), "running"))
            return quick.id, slow.id

    quick_id, slow_id = run(start())
    dm_server.stop()
    dm_server.start()

    async def check() -> None:
        async with dm_server.client() as dm:
            assert (await dm.get_processing_job(quick_id)).status == "done"
            slow = await dm.get_processing_job(slow_id)
            assert slow.status == "failed" and "restart" in slow.error_message

    run(check())


def test_dataset_metadata_up_to_the_url_limit_is_taken_and_more_refused_clearly(
        dm_server: DmServer) -> None:
    """DM takes its arguments in the URL: 30 kB of metadata (beyond aiohttp's 8 kB request
    line) reach the catalog; what httpx will not send is refused before the call, in words."""
    async def go() -> None:
        async with dm_server.client() as dm:
            await dm.add_experiment("md")
            added = await dm.add_dataset("md", "run_uid8_big", bluesky_run_uid="u",
                                         bluesky_metadata={"k": "y" * 30_000})
            assert added["bluesky_metadata"]["k"] == "y" * 30_000
            with pytest.raises(InvalidArgument, match=r"addExperimentDataset not sent to DM: "
                                                      r".*\d+ bytes with its arguments"):
                await dm.add_dataset("md", "run_uid8_huge", bluesky_metadata={"k": "y" * 40_000})

    run(go())
