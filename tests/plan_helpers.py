"""Fixtures and helpers shared by the RunEngine tests of apsdm_ophyd (test_plans*.py)."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bluesky import RunEngine
from bluesky import plan_stubs as bps
from ophyd.sim import SynSignalWithRegistry

from apsdm_ophyd import DMGateway, RunReport, UserSetup, file_collection_plan, setup_user, workflows

FAST = {"reporting_period": 0.5, "poll_period": 0.1}


def file_detector(directory: Path) -> SynSignalWithRegistry:
    """ophyd's simulated detector that saves each triggered 8x8 image as a .npy file."""
    return SynSignalWithRegistry(func=lambda: np.random.default_rng().random((8, 8)),
                                 name="image", save_path=str(directory))


def add_to_dm(dm: Any, experiment: str, *definitions: dict[str, Any]) -> Any:
    """Create an experiment and workflows in the embedded DM; returns the experiment."""

    async def go() -> Any:
        async with dm:
            await dm.add_experiment(experiment)
            for definition in definitions:
                await dm.upsert_workflow(definition)
            return await dm.get_experiment(experiment)

    return asyncio.run(go())


def demo(name: str) -> dict[str, Any]:
    """A demo workflow definition shipped with apsdm_ophyd."""
    return json.loads(workflows.path(name).read_text())


def failing_workflow() -> dict[str, Any]:
    """A workflow whose second stage fails with a message on stderr."""
    return {"name": "always-fails", "stages": {
        "01-OK": {"command": "echo fine"},
        "02-FAIL": {"command": "echo 'no such calibration' >&2; exit 3"},
    }}


def run(RE: RunEngine, plan: Any) -> Any:
    """Run a plan that must succeed; returns its return value."""
    result = RE(plan)
    assert result.exit_status == "success"
    return result.plan_result


def new_user(dm: Any, gateway: DMGateway, RE: RunEngine, *definitions: dict[str, Any],
             data: Path | None = None) -> str:
    """A new DM experiment with these workflows, selected by setup_user (with a DAQ on
    ``data`` if given); returns its name."""
    experiment = f"exp-{uuid.uuid4().hex[:6]}"
    add_to_dm(dm, experiment, *definitions)
    if data is not None:
        data.mkdir(exist_ok=True)
    run(RE, setup_user(gateway, experiment, data_directory=None if data is None else str(data)))
    return experiment


def catalogued(ioc: Any, experiment: str, dataset: str) -> dict[str, Any] | None:
    """The dataset as the IOC's embedded DM service stored it in its catalog (None: absent),
    read from the service's own database (DM has no read route for datasets here)."""
    path = ioc.data_root / "dm" / "dm.sqlite"
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        row = db.execute("SELECT doc FROM datasets WHERE experiment = ? AND name = ?",
                         (experiment, dataset)).fetchone()
    return None if row is None else dict(json.loads(row[0]))


def rd(RE: RunEngine, signal: Any) -> Any:
    """A readback through the RunEngine (``bps.rd``), the same for both device flavours."""
    return RE(bps.rd(signal)).plan_result


def check_file_based_flow(RE: RunEngine, gateway: Any, dm: Any, tmp_path: Path,
                          caplog: pytest.LogCaptureFixture) -> None:
    """setup_user (DAQ reused, upload) then file_collection_plan to a ``done`` job that saw
    the files; ``gateway`` is either device flavour (ophyd or ophyd-async DMGateway)."""
    experiment = f"exp-{uuid.uuid4().hex[:6]}"
    exp = add_to_dm(dm, experiment, demo("files-demo"))
    data = tmp_path / "detector"
    data.mkdir()
    qmap = tmp_path / "user" / "qmap.txt"  # away from the IOC's storage (DM refuses that)
    qmap.parent.mkdir()
    qmap.write_text("q-map for the analysis\n")

    setup: UserSetup = run(RE, setup_user(gateway, experiment, data_directory=str(data),
                                          daq_dest="raw", upload_file=str(qmap),
                                          upload_dest="setup"))
    assert setup.experiment == experiment and setup.daq_id and setup.upload_id
    assert rd(RE, gateway.daq(1).active) == "Yes"
    assert (Path(exp.data_directory) / "setup" / "qmap.txt").read_text() == qmap.read_text()
    again: UserSetup = run(RE, setup_user(gateway, experiment, data_directory=str(data),
                                          daq_dest="raw"))
    assert again.daq_id == setup.daq_id  # the active DAQ is reused, not started twice

    caplog.set_level(logging.INFO, logger="apsdm_ophyd")
    report: RunReport = run(RE, file_collection_plan(
        gateway, [file_detector(data)], 3, "apsdm-files-demo", md={"sample": "demo"},
        expected_files=3, **FAST))  # the DAQ may not have seen the last file yet
    job = report.job
    assert job.ok, job.describe()
    written = sorted(p.name for p in data.iterdir())
    copied = sorted(p.name for p in (Path(exp.data_directory) / "raw").iterdir())
    assert len(written) == 3 and copied == written
    outputs = {row["stage"]: row["stdOut"] for row in job.stages}
    assert outputs["02-COUNT"].strip() == "3"
    assert all(name in outputs["03-MD5SUM"] for name in copied)
    assert report.dataset == f"run_uid8_{report.run_uid[:8]}"
    assert rd(RE, gateway.workflow(1).job_status) == "done"
    assert any("job" in r.message and "stage" in r.message for r in caplog.records)
