"""Runs of the plans written to a real Tiled server (``tiled serve catalog``) by bluesky-tiled-plugins'
TiledWriter, then found by a Tiled search on their ``data_management`` metadata (README "Run metadata")."""

import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bluesky.plans as bp
import httpx
import pytest
from bluesky import RunEngine
from bluesky_tiled_plugins import TiledWriter
from conftest import BIN, _stop, free_port
from plan_helpers import FAST, demo, file_detector, new_user, run
from tiled.client import from_uri
from tiled.queries import Key, Like

from apsdm_ophyd import DMGateway, RunReport, file_collection_plan, streaming_collection_plan

pytestmark = pytest.mark.timeout(480)

#: ``tiled serve`` imports much before it listens (half a minute on a loaded 2-core machine).
TILED_READY_TIMEOUT = 120.0


@dataclass
class TiledServer:
    """A ``tiled serve`` process and how to reach it."""

    proc: subprocess.Popen[str]
    url: str
    api_key: str
    log: Path


@pytest.fixture
def tiled_server(tmp_path: Path) -> Iterator[TiledServer]:
    """``tiled serve catalog`` with its own SQLite catalog and writable storage in ``tmp_path``,
    on a free loopback port with an API key (it may read detector files anywhere in
    ``tmp_path``); started, not waited for, so it loads while the IOC starts."""
    port, key, root = free_port(udp=False), secrets.token_hex(16), tmp_path / "tiled"
    (root / "data").mkdir(parents=True)
    log = tmp_path / "tiled.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(BIN / "tiled"), "serve", "catalog", str(root / "catalog.db"), "--init",
             "--write", str(root / "data"), "--write", f"sqlite:///{root / 'tables.db'}",
             "--read", str(tmp_path), "--api-key", key, "--host", "127.0.0.1",
             "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        yield TiledServer(proc, f"http://127.0.0.1:{port}", key, log)
    finally:
        _stop(proc)


@pytest.fixture
def tiled(tiled_server: TiledServer) -> Any:
    """A client of the server that may write, once it answers."""
    deadline = time.monotonic() + TILED_READY_TIMEOUT
    while True:
        assert tiled_server.proc.poll() is None, f"tiled serve exited:\n{tiled_server.log.read_text()}"
        try:
            if httpx.get(f"{tiled_server.url}/api/v1/", timeout=2).status_code == 200:
                return from_uri(tiled_server.url, api_key=tiled_server.api_key)
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"tiled serve not ready in {TILED_READY_TIMEOUT} s"
        time.sleep(0.5)


def found(catalog: Any, *queries: Any) -> set[str]:
    """Uids of the runs the server finds for all ``queries``."""
    for query in queries:
        catalog = catalog.search(query)
    return set(catalog)


def test_runs_are_found_in_tiled_by_dm_experiment_and_job_id(
        tiled_server: TiledServer, dm: Any, gateway: DMGateway, RE: RunEngine, tiled: Any,
        tmp_path: Path) -> None:
    """``tiled_server`` comes first, so the server loads while the IOC and DM start."""
    data = tmp_path / "detector"
    experiment = new_user(dm, gateway, RE, demo("files-demo"), demo("streaming-demo"), data=data)
    RE.subscribe(TiledWriter(tiled))
    files: RunReport = run(RE, file_collection_plan(
        gateway, [file_detector(data)], 2, "apsdm-files-demo", md={"sample": "tiled"}, **FAST))
    (tmp_path / "frames").mkdir()
    streamed: RunReport = run(RE, streaming_collection_plan(
        gateway, [file_detector(tmp_path / "frames")], 2, "apsdm-streaming-demo",
        workflow_args={"pythonExe": sys.executable}, **FAST))
    assert files.job.ok and streamed.job.ok, (files.job.describe(), streamed.job.describe())
    [plain_uid] = RE(bp.count([file_detector(tmp_path / "frames")], 1)).run_start_uids  # no DM

    assert set(tiled) == {files.run_uid, streamed.run_uid, plain_uid}
    by_experiment = Key("start.data_management.experiment") == experiment
    assert found(tiled, by_experiment) == {files.run_uid, streamed.run_uid}
    assert found(tiled, Key("start.data_management.experiment") == f"not-{experiment}") == set()
    # the streaming job starts before its run opens: its id is in the start document
    assert found(tiled, Key("start.data_management.job_id") == streamed.job.job_id) == {
        streamed.run_uid}
    # a file-based job starts after the data: its id is in the stop reason and the dm stream
    assert found(tiled, by_experiment, Like("stop.reason", f"% job {files.job.job_id} %")) == {
        files.run_uid}
    assert found(tiled, Key("start.data_management.job_id") == files.job.job_id) == set()

    entry = tiled[files.run_uid]
    start = entry.metadata["start"]
    assert start["sample"] == "tiled" and start["plan_name"] == "file_collection_plan"
    assert start["data_management"]["workflow"] == "apsdm-files-demo"
    assert start["data_management"]["daq_id"] == files.data_management["daq_id"] != ""
    assert start["data_management"]["detector_directories"] == [str(data)]
    assert entry.metadata["stop"]["exit_status"] == "success"
    job = entry["dm"].read()
    assert list(job["dm_job_id"]) == [files.job.job_id]
    assert list(job["dm_job_status"]) == ["done"]
    assert list(job["dm_experiment"]) == [experiment]
    assert len(entry["primary"].read()["image"]) == 2  # the frames, read from their files
    assert tiled[streamed.run_uid].metadata["start"]["data_management"]["job_id"] == \
        streamed.job.job_id != ""
