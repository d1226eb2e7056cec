"""DM options of DAQ and upload slots through real clients (pyepics, p4p) on the embedded DM:
the option PVs reach DM at Start (file filter, per-file workflow, JSON options), the jobs the
DAQ started show in the Jobs table and on the slot, and a bad options value is refused."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import Ioc
from test_ioc import MINOR, STATE, add_experiment, add_workflow, alarm, caget, caput, select, wait_until

from apsdm.gateway.checks import PutRejected, dm_options, workflow_args


def _copied(root: str) -> set[str]:
    return {str(p.relative_to(root)) for p in Path(root).rglob("*") if p.is_file()}


def _catalogued(ioc: Ioc, experiment: str, path: str) -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        async with ioc.dm_client() as dm:
            return await dm.get_experiment_file(experiment, path)
    return asyncio.run(go())


def test_daq_option_pvs_filter_and_start_a_job_per_file(ioc: Ioc, tmp_path: Path) -> None:
    exp = add_experiment(ioc, "opts-daq")
    select(ioc, "opts-daq")
    add_workflow(ioc, {"name": "per-file", "stages": {
        "01-ECHO": {"command": "/bin/echo $tag $filePath"}}})
    src = tmp_path / "det"
    src.mkdir()
    (src / "early.h5").write_bytes(b"e" * 10)
    caput(ioc, "DAQ1:DataDirectory", str(src))
    caput(ioc, "DAQ1:IncludeExtensions", "h5,hdf5")
    caput(ioc, "DAQ1:SkipPattern", "skip_*")
    caput(ioc, "DAQ1:Workflow", "per-file")
    caput(ioc, "DAQ1:WorkflowArgs", "tag:scan7")
    caput(ioc, "DAQ1:Options", json.dumps({"processExistingFiles": False}))
    caput(ioc, "DAQ1:Start", 1)
    wait_until(lambda: caget(ioc, "DAQ1:Active_RBV") == "Yes", 15, "DAQ active")
    for name in ("a.h5", "b.hdf5", "c.txt", "skip_d.h5"):
        (src / name).write_bytes(b"x" * 100)
    wait_until(lambda: int(caget(ioc, "DAQ1:NJobs_RBV")) == 2, 30, "two per-file jobs")
    caput(ioc, "DAQ1:Stop", 1)
    assert caget(ioc, "DAQ1:Status_RBV") == "done"
    assert _copied(exp.data_directory) == {"a.h5", "b.hdf5"}  # early.h5: not existing files
    assert int(caget(ioc, "DAQ1:NJobs_RBV")) == 2
    ctx = ioc.pva_context()
    try:
        def jobs() -> list[str]:
            rows = ctx.get(ioc.pv("Jobs")).value.todict()
            return [s for s, w in zip(rows["status"], rows["workflow"], strict=True)
                    if w == "per-file"]
        assert wait_until(lambda: (js := jobs()) and all(s == "done" for s in js) and js,
                          30, "jobs done in the Jobs table") == ["done", "done"]
    finally:
        ctx.close()


def test_upload_options_reach_dm(ioc: Ioc, tmp_path: Path) -> None:
    """RemoveSource and a JSON option (skipCatalog) on an upload slot."""
    exp = add_experiment(ioc, "opts-up")
    select(ioc, "opts-up")
    src = tmp_path / "scan"
    src.mkdir()
    (src / "img.tif").write_bytes(bytes(500))
    caput(ioc, "UP1:Path", str(src))
    caput(ioc, "UP1:Mode", "Directory")
    caput(ioc, "UP1:Options", json.dumps({"skipChecksum": True, "reprocessFiles": True}))
    caput(ioc, "UP1:Start", 1)
    assert caget(ioc, "UP1:Status_RBV") == "done"
    assert "md5Sum" not in _catalogued(ioc, "opts-up", "img.tif")  # skipChecksum reached DM
    caput(ioc, "UP1:Mode", "File")
    caput(ioc, "UP1:Path", str(src / "img.tif"))
    caput(ioc, "UP1:RemoveSource", "Yes")
    caput(ioc, "UP1:Start", 1)
    assert caget(ioc, "UP1:Status_RBV") == "done"
    assert _copied(exp.data_directory) == {"img.tif"}
    assert not (src / "img.tif").exists()


@pytest.mark.parametrize(("value", "words"), [
    ("{not json", "not valid JSON"),
    ('{"skipCatelog": true}', "not a DM option"),
    ('{"skipCatalog": "yes"}', "true or false"),
    ('{"workflowName": "x"}', "Workflow PV"),
])
def test_bad_options_give_message_and_alarm(ioc: Ioc, value: str, words: str) -> None:
    caput(ioc, "DAQ1:Options", value, timeout=10)
    wait_until(lambda: words.lower() in caget(ioc, "DAQ1:Message_RBV").lower(), 10, words)
    assert alarm(ioc, "DAQ1:Message_RBV") == (MINOR, STATE)
    assert caget(ioc, "DAQ1:Options") == ""


def test_dm_refusal_of_an_option_is_shown(ioc: Ioc, tmp_path: Path) -> None:
    """A value only DM can judge (a workflow it lacks): the Start is refused with DM's why."""
    add_experiment(ioc, "opts-refused")
    select(ioc, "opts-refused")
    caput(ioc, "DAQ1:DataDirectory", str(tmp_path))
    caput(ioc, "DAQ1:Workflow", "no-such-workflow")
    caput(ioc, "DAQ1:Start", 1)
    message = caget(ioc, "DAQ1:Message_RBV")
    assert "not started" in message and "no-such-workflow" in message
    assert alarm(ioc, "DAQ1:Message_RBV") == (MINOR, STATE)


@pytest.mark.parametrize("text", ["a:1 b:two", "", "path:/data/x:y"])
def test_workflow_args_accepted(text: str) -> None:
    assert workflow_args("WorkflowArgs", text) == text


@pytest.mark.parametrize(("text", "words"), [
    ("novalue", "key:value"), ("1x:2", "key:value"), ("filePath:/x", "set by DM"),
    ("id:3", "set by DM")])
def test_workflow_args_refused(text: str, words: str) -> None:
    with pytest.raises(PutRejected, match=words):
        workflow_args("WorkflowArgs", text)


def test_dm_options_types() -> None:
    assert dm_options("Options", '{"maxRunTimeInHours": 2, "skipTransfer": true}') == {
        "maxRunTimeInHours": 2, "skipTransfer": True}
    with pytest.raises(PutRejected, match="a number"):
        dm_options("Options", '{"maxRunTimeInHours": true}')
    with pytest.raises(PutRejected, match="a string"):
        dm_options("Options", '{"filePathPattern": 3}')
