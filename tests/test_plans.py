"""The ophyd devices and bluesky plans in a real RunEngine against the IOC on the embedded DM.

Simulated detectors write real files into the DAQ's directory; the workflows are real
child processes of the embedded DM service (the demo workflows of apsdm_ophyd).
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from bluesky import RunEngine
from plan_helpers import (
    FAST,
    add_to_dm,
    check_file_based_flow,
    demo,
    failing_workflow,
    file_detector,
    run,
)

from apsdm_ophyd import (
    DMGateway,
    GatewayError,
    RunReport,
    WorkflowFailed,
    file_collection_plan,
    pva,
    setup_user,
    streaming_collection_plan,
)

pytestmark = pytest.mark.timeout(180)


def test_setup_user_then_file_plan_ends_with_done_job_that_saw_the_files(
        ioc: Any, dm: Any, gateway: DMGateway, RE: RunEngine, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    check_file_based_flow(RE, gateway, dm, tmp_path, caplog)


@pytest.mark.parametrize("raise_on_failure", [True, False])
def test_failing_workflow_is_reported_clearly(
        ioc: Any, dm: Any, gateway: DMGateway, RE: RunEngine,
        raise_on_failure: bool, caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    experiment = f"exp-{uuid.uuid4().hex[:6]}"
    add_to_dm(dm, experiment, failing_workflow())
    run(RE, setup_user(gateway, experiment))
    plan = file_collection_plan(gateway, [file_detector(tmp_path)], 1,
                                "always-fails", expected_files=0,
                                raise_on_failure=raise_on_failure, **FAST)
    if raise_on_failure:
        with pytest.raises(WorkflowFailed, match=r"always-fails job \S+ failed at stage 02-FAIL"):
            RE(plan)
        return
    with caplog.at_level(logging.ERROR, logger="apsdm_ophyd"):
        report: RunReport = run(RE, plan)
    assert report.job.status == "failed" and report.job.stage == "02-FAIL"
    failed = [row for row in report.job.stages if row["stage"] == "02-FAIL"]
    assert failed[0]["exitStatus"] == 3 and "no such calibration" in failed[0]["stdErr"]
    assert report.dataset  # the metadata is shared even though the workflow failed
    assert any("02-FAIL" in r.message and "raise_on_failure=False" in r.message
               for r in caplog.records)


def test_unknown_experiment_fails_fast(gateway: DMGateway, RE: RunEngine) -> None:
    begin = time.monotonic()
    with pytest.raises(GatewayError, match="no-such-experiment") as raised:
        RE(setup_user(gateway, "no-such-experiment", data_directory="/tmp"))
    assert time.monotonic() - begin < 5
    assert "refused" in str(raised.value)
    assert gateway.daq1.active.get() == "No"  # nothing was started


def test_streaming_plan_completes_the_handshake(
        dm: Any, gateway: DMGateway, RE: RunEngine, ctx: Any, tmp_path: Path) -> None:
    experiment = f"exp-{uuid.uuid4().hex[:6]}"
    add_to_dm(dm, experiment, demo("streaming-demo"))
    run(RE, setup_user(gateway, experiment))
    report: RunReport = run(RE, streaming_collection_plan(
        gateway, [file_detector(tmp_path)], 5, "apsdm-streaming-demo",
        workflow_args={"pythonExe": sys.executable}, ready_timeout=60, **FAST))
    assert report.job.ok, report.job.describe()
    assert report.workflow_stream is not None
    assert report.workflow_stream.state == "done"
    assert report.workflow_stream.counter == 5
    assert "consumed 5 frames" in report.workflow_stream.message
    names = pva.StreamNames.for_prefix(gateway.prefix)
    assert pva.read(ctx, names.bluesky).state == "done"
    assert "consumed 5 frames" in report.job.stages[0]["stdOut"]


def test_streaming_plan_gives_up_on_a_workflow_that_is_never_ready(
        dm: Any, gateway: DMGateway, RE: RunEngine, ctx: Any, tmp_path: Path) -> None:
    experiment = f"exp-{uuid.uuid4().hex[:6]}"
    add_to_dm(dm, experiment, {"name": "silent", "stages": {"01": {"command": "sleep 3"}}})
    run(RE, setup_user(gateway, experiment))
    with pytest.raises(WorkflowFailed, match="did not become ready within 1 s"):
        RE(streaming_collection_plan(gateway, [file_detector(tmp_path)], 2, "silent",
                                     ready_timeout=1, **FAST))
    names = pva.StreamNames.for_prefix(gateway.prefix)
    assert pva.read(ctx, names.bluesky).state == "error"


def test_demo_workflow_times_out_with_error_state(ioc: Any, ctx: Any) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "apsdm_ophyd.streaming_workflow", "--prefix", ioc.prefix,
         "--timeout", "1"], env={**ioc.env, "PATH": "/usr/bin:/bin"}, capture_output=True,
        text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    state = pva.read(ctx, pva.StreamNames.for_prefix(ioc.prefix).workflow)
    assert state.state == "error" and "timed out" in state.message


def test_devices_long_strings_and_busy_commands(
        ioc: Any, dm: Any, gateway: DMGateway, ctx: Any, tmp_path: Path) -> None:
    long_dir = tmp_path / ("d" * 120) / ("e" * 120)
    long_dir.mkdir(parents=True)
    gateway.daq1.data_directory.set(str(long_dir)).wait(5)
    assert gateway.daq1.data_directory.get() == str(long_dir)
    assert ctx.get(ioc.pv("DAQ1:DataDirectory")) == str(long_dir)  # the same value over PVA

    experiment = f"exp-{uuid.uuid4().hex[:6]}"
    add_to_dm(dm, experiment)
    gateway.experiment.experiment_name.set(experiment).wait(10)
    assert gateway.experiment.valid.get() == "Yes"
    status = gateway.daq1.start_daq.set(1)
    status.wait(30)  # put completion: done once the DAQ runs
    assert status.success and gateway.daq1.start_daq.get() == 0
    assert gateway.daq1.active.get() == "Yes" and gateway.daq1.daq_id.get()
    assert "dm_daq1_n_processed" in gateway.daq1.hints["fields"]
    assert {"dm_daq1_daq_status", "dm_daq1_n_processed"} <= set(gateway.daq1.read())
    assert {"dm_daq1_data_directory", "dm_daq1_daq_id"} <= set(gateway.daq1.read_configuration())
    assert "dm_daq1_message" not in gateway.daq1.read()  # text, not data

    gateway.wf1.workflow_name.set("").wait(5)
    refused = gateway.wf1.start_job.set(1)
    refused.wait(10)  # pyepics hides the CA put failure: the reason is in Message_RBV
    assert "Name is empty" in gateway.wf1.message.get()
    assert gateway.wf1.message.alarm_severity > 0


def test_long_string_can_be_cleared_over_ca(gateway: DMGateway) -> None:
    gateway.daq1.dest_directory.set("raw").wait(5)
    gateway.daq1.dest_directory.set("").wait(5)
    assert gateway.daq1.dest_directory.get() == ""


def test_wait_for_others_starts_after_the_running_job_of_the_workflow(
        ioc: Any, dm: Any, gateway: DMGateway, RE: RunEngine, tmp_path: Path) -> None:
    experiment = f"exp-{uuid.uuid4().hex[:6]}"
    add_to_dm(dm, experiment, {"name": "exclusive", "stages": {"01": {"command": "sleep 2"}}})
    run(RE, setup_user(gateway, experiment))
    other = gateway.workflow(2)
    other.workflow_name.set("exclusive").wait(5)
    running = other.start_job.set(1)
    deadline = time.monotonic() + 10
    while other.job_status.get() != "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    report: RunReport = run(RE, file_collection_plan(
        gateway, [file_detector(tmp_path)], 1, "exclusive", expected_files=0,
        wait_for_others=True, **FAST))
    assert running.done and report.job.ok

    async def times() -> tuple[Any, Any]:
        async with ioc.dm_client() as client:
            return (await client.get_processing_job(other.job_id.get()),
                    await client.get_processing_job(report.job.job_id))

    first, second = asyncio.run(times())
    assert second.raw["startTime"] >= first.raw["endTime"]
