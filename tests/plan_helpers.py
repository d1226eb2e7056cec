"""Fixtures and helpers shared by the RunEngine tests of apsdm_ophyd (test_plans*.py)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from bluesky import RunEngine
from ophyd.sim import SynSignalWithRegistry

from apsdm_ophyd import DMGateway, setup_user, workflows

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
