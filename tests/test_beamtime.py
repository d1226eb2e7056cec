"""The ESAF and proposal of the selected experiment on the gateway's PVs (as the apsbss IOC
shows them), read from the embedded DM's APS DB service through CA, PVA, ophyd-async, and
``setup_user`` taking an ESAF or proposal id into the run's ``data_management``."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import bluesky.plan_stubs as bps
import epics
import pytest
from apsdb_sample import APS_DB
from bluesky import RunEngine
from bluesky.run_engine import call_in_bluesky_event_loop
from bluesky.utils import FailedStatus
from conftest import Ioc
from ophyd_async.core import init_devices
from plan_helpers import FAST, add_to_dm, file_detector, run
from test_ophyd_async_ioc import run_engine as run_engine  # the fixture: own PVA context

from apsdm_ophyd import DMGateway, GatewayError, UserSetup, file_collection_plan, setup_user
from apsdm_ophyd.async_devices import DMGateway as AsyncGateway
from apsdm_ophyd.async_devices import NoYes

pytestmark = pytest.mark.timeout(180)

ESAF, PROPOSAL = APS_DB["esafs"][0], APS_DB["proposals"][0]


def with_aps_db(ioc: Ioc) -> None:
    """The sample ESAFs and proposals in the embedded DM's APS DB data file."""
    (ioc.setup_file.parent / "apsdb.json").write_text(json.dumps(APS_DB))


def put(ioc: Ioc, suffix: str, value: str) -> None:
    """A CA put with callback, as caput -c."""
    epics.caput(ioc.pv(suffix), value, wait=True, timeout=20)


def get(ioc: Ioc, suffix: str) -> Any:
    """As test_ioc's caget (count 0: a long string at its used length), with more time."""
    return epics.caget(ioc.pv(suffix), as_string=True, use_monitor=False, timeout=10, count=0)


def alarm(ioc: Ioc, suffix: str) -> int:
    pv = epics.PV(ioc.pv(suffix), form="ctrl")
    pv.get(with_ctrlvars=True, use_monitor=False, timeout=10)
    return int(pv.severity or 0)


def new_experiment(dm: Any) -> str:
    name = f"exp-{uuid.uuid4().hex[:6]}"

    async def go() -> None:
        async with dm:
            await dm.add_experiment(name)

    asyncio.run(go())
    return name


def test_esaf_and_proposal_of_the_selected_experiment_on_ca_and_pva(ioc: Ioc, dm: Any) -> None:
    with_aps_db(ioc)
    put(ioc, "Esaf:Id", "271828")  # no experiment selected yet: refused, with why
    assert "no DM experiment selected" in get(ioc, "Esaf:Message_RBV")
    assert alarm(ioc, "Esaf:Message_RBV") > 0
    assert get(ioc, "Esaf:Valid_RBV") == "No"

    first, second = new_experiment(dm), new_experiment(dm)
    put(ioc, "Experiment:Name", first)
    put(ioc, "Esaf:Id", "271828")
    put(ioc, "Proposal:Id", "0077777")  # leading zeros: the same proposal
    assert get(ioc, "Esaf:Message_RBV") == "" and alarm(ioc, "Esaf:Message_RBV") == 0
    assert (get(ioc, "Esaf:Id_RBV"), get(ioc, "Esaf:Valid_RBV")) == ("271828", "Yes")
    assert get(ioc, "Esaf:Title_RBV") == ESAF["esafTitle"]
    assert get(ioc, "Esaf:Pi_RBV") == "Ada Lovelace (123456)"
    assert get(ioc, "Esaf:Users_RBV") == "Ada Lovelace (123456), Alan Turing (654321)"
    assert (get(ioc, "Esaf:StartDate_RBV"), get(ioc, "Esaf:EndDate_RBV")) == (
        ESAF["experimentStartDate"], ESAF["experimentEndDate"])
    assert (get(ioc, "Esaf:Status_RBV"), get(ioc, "Esaf:Sector_RBV")) == ("Approved", "25")
    assert (get(ioc, "Proposal:Id"), get(ioc, "Proposal:Id_RBV")) == ("77777", "77777")
    assert (get(ioc, "Proposal:Run_RBV"), get(ioc, "Proposal:Title_RBV")) == (
        "2026-1", PROPOSAL["title"])
    ctx = ioc.pva_context()
    try:
        assert ctx.get(ioc.pv("Proposal:Pi_RBV")) == "Ada Lovelace (123456)"
        assert ctx.get(ioc.pv("Esaf:StartDate_RBV")) == ESAF["experimentStartDate"]
    finally:
        ctx.close()

    for bad, why in (("x1", "not a number"), ("999", "does not exist")):
        put(ioc, "Esaf:Id", bad)  # refused with why and an alarm; the tie stays
        assert why in get(ioc, "Esaf:Message_RBV") and alarm(ioc, "Esaf:Message_RBV") > 0
        assert get(ioc, "Esaf:Id_RBV") == "271828"

    for bad, why in (("", "name the experiment"), ("a/b", "not created")):
        put(ioc, "Beamtime:Experiment", bad)  # refused with why; the selection stays
        assert why in get(ioc, "Beamtime:Message_RBV")
        assert alarm(ioc, "Beamtime:Message_RBV") > 0
        assert get(ioc, "Experiment:Name_RBV") == first

    put(ioc, "Experiment:Name", second)  # another experiment: no ESAF, no proposal
    assert (get(ioc, "Esaf:Id"), get(ioc, "Esaf:Title_RBV"), get(ioc, "Esaf:Valid_RBV")) == (
        "", "", "No")
    assert get(ioc, "Proposal:Run_RBV") == ""
    put(ioc, "Experiment:Name", first)  # back: its ties come back
    assert (get(ioc, "Esaf:Id"), get(ioc, "Esaf:Title_RBV")) == ("271828", ESAF["esafTitle"])

    data_file = ioc.setup_file.parent / "apsdb.json"
    data_file.write_text("{not json")  # an unreadable APS DB never blocks the selection
    put(ioc, "Experiment:Name", second)
    put(ioc, "Experiment:Name", first)
    assert (get(ioc, "Experiment:Name_RBV"), get(ioc, "Experiment:Message_RBV")) == (first, "")
    assert (get(ioc, "Esaf:Id"), get(ioc, "Esaf:Valid_RBV")) == ("271828", "No")  # tie kept
    with_aps_db(ioc)

    ioc.restart()  # ties are kept across restarts, looked up again at the first poll
    assert asyncio.run(_until(lambda: get(ioc, "Esaf:Id") == "271828")), "ESAF tie lost"
    assert asyncio.run(_until(lambda: get(ioc, "Proposal:Run_RBV") == "2026-1")), (
        "the restarted IOC did not show the proposal again")


async def _until(condition: Any, timeout: float = 60) -> bool:
    """Whether ``condition`` comes true within ``timeout`` s (the IOC restarts, clients
    reconnect by themselves)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        if condition():
            return True
        await asyncio.sleep(0.2)
    return False


def test_ophyd_async_devices_read_the_esaf_and_proposal(ioc: Ioc, dm: Any,
                                                        run_engine: RunEngine) -> None:
    with_aps_db(ioc)
    put(ioc, "Experiment:Name", new_experiment(dm))
    with init_devices():
        gw = AsyncGateway(ioc.prefix)
    run_engine(bps.mv(gw.proposal.beamtime_id, "77777"))
    read = run_engine(read_all(gw.proposal)).plan_result
    assert read[gw.proposal.beamtime_id.name]["value"] == "77777"
    assert read[gw.proposal.valid.name]["value"] is NoYes.YES
    config = call_in_bluesky_event_loop(gw.proposal.read_configuration())
    assert config[gw.proposal.run.name]["value"] == "2026-1"
    assert config[gw.proposal.pi.name]["value"] == "Ada Lovelace (123456)"
    with pytest.raises(FailedStatus, match="does not exist"):  # refused: the put fails
        run_engine(bps.mv(gw.esaf.beamtime_id, "999"))


def read_all(device: Any) -> Any:
    """A plan that returns the device's read()."""
    yield from bps.null()
    return (yield from bps.read(device))


def test_setup_user_takes_an_esaf_or_proposal_id_into_the_run_metadata(
        ioc: Ioc, dm: Any, gateway: DMGateway, RE: RunEngine, tmp_path: Path) -> None:
    with_aps_db(ioc)
    add_to_dm(dm, "unused", {"name": "quick", "stages": {"01": {"command": "true"}}})
    setup: UserSetup = run(RE, setup_user(gateway, proposal_id=77777, esaf_id="271828"))
    assert (setup.experiment, setup.esaf_id, setup.proposal_id) == (
        "proposal-77777", "271828", "77777")
    assert gateway.experiment.experiment_name.get() == "proposal-77777"  # created in DM
    assert gateway.proposal.title.get() == PROPOSAL["title"]

    starts: list[dict[str, Any]] = []
    RE.subscribe(lambda name, doc: starts.append(doc) if name == "start" else None)
    run(RE, file_collection_plan(gateway, [file_detector(tmp_path)], 1, "quick",
                                 expected_files=0, **FAST))
    dm_md = starts[-1]["data_management"]
    assert (dm_md["experiment"], dm_md["esaf_id"], dm_md["proposal_id"]) == (
        "proposal-77777", "271828", "77777")

    with pytest.raises(GatewayError, match="does not exist"):  # an unknown id: clear error
        RE(setup_user(gateway, esaf_id="314159"))
    again: UserSetup = run(RE, setup_user(gateway, proposal_id="77777"))  # selected, not re-made
    assert again.experiment == "proposal-77777"
    assert gateway.esaf.beamtime_id.get() == "271828"  # its ties come with it
