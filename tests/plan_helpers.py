"""Fixtures and helpers shared by the RunEngine tests of apsdm_ophyd (test_plans*.py)."""

from __future__ import annotations

import asyncio
import json
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
