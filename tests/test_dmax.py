"""The embedded DM service driven by dmax, an independent DM client written against real APS
DM servers: every dmax operation, sync and async, and every record validates as its model.

dmax is configured only from the service's ``dm.setup.sh`` (its ``export DM_*`` lines), as a
beamline would configure it against production DM.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dmax
import pytest
from apsdb_sample import APS_DB
from conftest import DmServer
from dmax.processing import Workflow

from apsdm.dm.config import read_setup_file

EXPERIMENT, UNDATED = "dmax-exp", "dmax-undated"
WORKFLOW = {
    "name": "dmax-wf",
    "description": "two stages, the second one slow enough to be seen running",
    "stages": {
        "01-HELLO": {"command": "echo hello $who", "outputVariableRegexList": ["hello (?P<greeted>.*)"]},
        "02-WAIT": {"command": "sleep 1.5; echo waited"},
    },
}


class Dmax:
    """A dmax client, sync or async, called alike; async calls share one event loop."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self._loop = asyncio.Runner()

    def __call__(self, method: str, *args: Any, **kwargs: Any) -> Any:
        result = getattr(self.client, method)(*args, **kwargs)
        return self._loop.run(result) if inspect.isawaitable(result) else result

    def close(self) -> None:
        self._loop.close()


@pytest.fixture(params=["sync", "async"])
def dmax_client(request: pytest.FixtureRequest, dm_server: DmServer,
                monkeypatch: pytest.MonkeyPatch) -> Iterator[Dmax]:
    """A dmax client configured from dm.setup.sh alone, with an experiment, a workflow and
    the APS DB data file in place."""
    (dm_server.data_root / "apsdb.json").write_text(json.dumps(APS_DB))
    for key in [k for k in os.environ if k.startswith("DM_")]:
        monkeypatch.delenv(key)
    for key, value in read_setup_file(dm_server.setup_file).items():
        monkeypatch.setenv(key, value)

    async def prepare() -> None:
        async with dm_server.client() as dm:
            await dm.add_experiment(EXPERIMENT, description="driven by dmax",
                                    start_date="2026-02-03", end_date="2026-02-06")
            await dm.add_experiment(UNDATED)  # still served with both dates
            # real workflows name the account their jobs run as (dmax requires it)
            await dm.add_workflow({**WORKFLOW, "userAccount": dm.username})

    asyncio.run(prepare())
    caller = Dmax(dmax.Client() if request.param == "sync" else dmax.AsyncClient())
    yield caller
    caller.close()


def _experiment(call: Dmax) -> None:
    (listed,) = [e for e in call("experiments") if e.name == EXPERIMENT]
    by_name = call("experiment", name=EXPERIMENT)
    by_id = call("experiment", id=str(listed.id))
    assert by_name == by_id
    assert by_name.primary_storage.name and by_name.updated and by_name.end
    assert Path(by_name.data_path) == Path(by_name.storage_path) / "data"
    assert Path(by_name.data_path).is_dir()
    undated = call("experiment", name=UNDATED)
    assert undated.start == undated.end == undated.created


def _daq(call: Dmax, tmp_path: Path) -> None:
    source = tmp_path / "daq-source"
    source.mkdir()
    daq = call("start_data_archive_queue", source_directory=source,
                experiment_name=EXPERIMENT, skip="*.tmp")
    assert daq.status == "running" and daq.skip_file_path_pattern == "*.tmp"
    assert daq.storage_directory.endswith("/data") and daq.workflow_job_owner


def _workflows(call: Dmax) -> None:
    (listed,) = [w for w in call("workflows") if w.name == WORKFLOW["name"]]
    one = call("workflow", WORKFLOW["name"])
    assert one.id == listed.id and one.stages.keys() == WORKFLOW["stages"].keys()
    copy = one.model_copy(update={"name": "dmax-wf-copy"})
    added = call("add_workflow", copy)
    assert added.name == "dmax-wf-copy" and added.id != one.id
    new_text = one.model_copy(update={"description": "set by dmax"})
    assert call("set_workflow", one.name, new_text).description == "set by dmax"
    updated = call("update_workflow", one.name, {"description": "updated by dmax"})
    assert updated.description == "updated by dmax"
    assert isinstance(updated, Workflow)


def _jobs(call: Dmax) -> None:
    job = call("submit_processing_job", WORKFLOW["name"], who="dmax")
    assert job.status == "pending"
    deadline, seen_running = time.monotonic() + 30, False
    while job.status not in ("done", "failed"):
        assert time.monotonic() < deadline, "job did not end"
        time.sleep(0.2)
        job = call("processing_job", job.id)  # validates running children too
        seen_running |= job.status == "running"
    assert job.status == "done" and seen_running
    children = [c for s in job.workflow.stages.values() for c in s.child_processes.values()]
    assert [c.exit_status for c in children] == [0, 0]
    assert any(j.id == job.id for j in call("processing_jobs"))
    assert call("processing_jobs", limit=1, offset=0)


def _esafs(call: Dmax) -> None:
    for esafs in (call("esafs", beamline="25-ID-C", year="2026"),
                  call("esafs")):
        (esaf,) = esafs
        assert esaf.id == "271828" and esaf.users[0].is_pi
    assert call("esafs", beamline="25-ID-C", year="2025") == []
    assert call("esaf", "271828").title == "XANES of test samples"


def _proposals(call: Dmax) -> None:
    (proposal,) = call("proposals", beamline="25-ID-C", cycle="2026-1")
    assert proposal.proposal_id == "0077777" and proposal.users[0].is_pi
    assert call("proposals", beamline="25-ID-C", cycle="2025-3") == []
    assert call("proposal", "0077777", cycle="2026-1").title.startswith("Charge")
    assert call("proposal", "77777").duration.days == 3


CHECKS: dict[str, Callable[..., None]] = {
    "experiments": _experiment, "daq": _daq, "workflows": _workflows, "jobs": _jobs,
    "esafs": _esafs, "proposals": _proposals,
}


@pytest.mark.parametrize("check", CHECKS)
def test_dmax_operation(check: str, dmax_client: Dmax, tmp_path: Path) -> None:
    """One group of dmax operations against the embedded service (each record is validated
    by dmax's pydantic model as it is built)."""
    fn = CHECKS[check]
    if "tmp_path" in inspect.signature(fn).parameters:
        fn(dmax_client, tmp_path)
    else:
        fn(dmax_client)
