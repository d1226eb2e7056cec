"""The adapter over the conda ``dm`` package, against a small fake ``dm`` that records calls."""

from __future__ import annotations

import asyncio
import sys
import textwrap
from pathlib import Path

import pytest

from apsdm.dm import ObjectNotFound
from apsdm.dm.config import DmConfig
from apsdm.dm.dmpkg import _APIS, DmPackageClient

FAKE = '''
CALLS = []

class ObjectNotFound(Exception):
    pass

class Api:
    """Records every call; answers like DM would, from what it was given."""
    def __init__(self, username, password, url):
        CALLS.append((type(self).__name__, "__init__", (username, url), {}))
    def __getattr__(self, method):
        def call(*args, **kwargs):
            CALLS.append((type(self).__name__, method, args, kwargs))
            if method == "getExperimentByName" and args[0] == "missing":
                raise ObjectNotFound("Experiment missing does not exist.")
            if method.startswith("list") or method.endswith("ByStation"):
                return [{"id": "1", "name": "e1", "status": "running"}]
            return {"id": "j1", "name": args[0] if args else "", "status": "pending"}
        return call
'''


@pytest.fixture
def fake_dm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[list[tuple], DmConfig]:
    """A fake vendor package on sys.path, and a configuration naming a login file."""
    root = tmp_path / "fake" / "dm"
    root.mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "_fake.py").write_text(textwrap.dedent(FAKE))
    for module, cls, _service in _APIS.values():
        path = root.parent.joinpath(*module.split("."))
        for parent in list(path.parents)[: len(module.split(".")) - 1]:
            parent.mkdir(parents=True, exist_ok=True)
            (parent / "__init__.py").touch()
        path.with_suffix(".py").write_text(f"from dm._fake import Api\nclass {cls}(Api):\n    pass\n")
    monkeypatch.syspath_prepend(str(root.parent))
    for name in [m for m in sys.modules if m == "dm" or m.startswith("dm.")]:
        monkeypatch.delitem(sys.modules, name)
    login = tmp_path / "login"
    login.write_text("alice|s3cret")
    import dm._fake  # type: ignore[import-not-found]

    return dm._fake.CALLS, DmConfig.single_url("https://dm:1", str(login), "ST")


def test_adapter_calls_vendor_api_with_dm_argument_order(
        fake_dm: tuple[list[tuple], DmConfig]) -> None:
    calls_made, config = fake_dm
    client = DmPackageClient(config)

    async def go() -> None:
        job = await client.start_processing_job("wf", {"a": "1"})
        assert (job.id, job.status) == ("j1", "pending")
        daqs = await client.list_daqs()
        assert daqs[0].active
        await client.start_daq("e1", "/data", destDirectory="raw")
        with pytest.raises(ObjectNotFound, match="does not exist"):
            await client.get_experiment("missing")

    asyncio.run(go())
    calls = [(c[0], c[1], c[2], c[3]) for c in calls_made if c[1] != "__init__"]
    assert calls == [
        ("WorkflowProcApi", "startProcessingJob", (),
         {"workflowOwner": "alice", "workflowName": "wf", "argsDict": {"a": "1"}}),
        ("ExperimentDaqApi", "listDaqs", (), {}),
        ("ExperimentDaqApi", "startDaq", ("e1", "/data", {"destDirectory": "raw"}), {}),
        ("ExperimentDsApi", "getExperimentByName", ("missing",), {}),
    ]
    inits = [c for c in calls_made if c[1] == "__init__"]
    assert ("WorkflowProcApi", "__init__", ("alice", "https://dm:1"), {}) in inits
    assert all("s3cret" not in repr(c) for c in calls_made)  # recorded without the password
    assert client.requests == 4


def test_adapter_reaches_esafs_and_proposals_as_the_station_gui_does(
        fake_dm: tuple[list[tuple], DmConfig]) -> None:
    calls_made, config = fake_dm
    client = DmPackageClient(config)

    async def go() -> None:
        await client.list_esafs("25-ID-C", "2026")
        await client.get_esaf("0271828")
        await client.list_proposals(run="2026-1")
        await client.get_proposal("77777", "2026-1")

    asyncio.run(go())
    calls = [(c[0], c[1], c[2], c[3]) for c in calls_made if c[1] != "__init__"]
    assert calls == [
        ("EsafApsDbApi", "listStationEsafs", ("ST",), {"beamlineName": "25-ID-C", "year": "2026"}),
        ("EsafApsDbApi", "getStationEsafById", ("ST", 271828), {}),
        ("BssApsDbApi", "listStationProposals", ("ST",), {"runName": "2026-1"}),
        ("BssApsDbApi", "getStationProposalById", ("ST", 77777), {"runName": "2026-1"}),
    ]
