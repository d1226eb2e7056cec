"""The APS DB service (ESAFs, proposals) of the embedded DM through the gateway's client and
the ``apsdm`` CLI, and the records the client parses from the embedded service, every field
kept."""

from __future__ import annotations

import asyncio
import json
import subprocess
from typing import Any

import pytest
from apsdb_sample import APS_DB
from conftest import BIN, DmServer

from apsdm.dm import Daq, Experiment, ObjectNotFound
from apsdm.dm.errors import ConfigurationError, InvalidArgument


def test_esafs_and_proposals_by_station_beamline_year_and_run(dm_server: DmServer) -> None:
    data_file = dm_server.data_root / "apsdb.json"

    async def go() -> None:
        async with dm_server.client() as dm:
            assert await dm.list_esafs() == []  # no data file yet: nothing, no error
            data_file.write_text(json.dumps(APS_DB))
            (esaf,) = await dm.list_esafs("25-ID-C", "2026")
            assert (esaf.id, esaf.pi, esaf.start) == (
                "271828", "Ada Lovelace (123456)", "2026-02-03 08:00:00")
            assert esaf.users == ("Ada Lovelace (123456)", "Alan Turing (654321)")
            assert await dm.list_esafs("25-ID-C", "2025") == []
            assert await dm.list_esafs("2-BM-A") == []
            assert (await dm.get_esaf("271828")).raw == APS_DB["esafs"][0]
            (proposal,) = await dm.list_proposals(run="2026-1")
            assert (proposal.id, proposal.run, proposal.pi) == (
                "77777", "2026-1", "Ada Lovelace (123456)")
            assert await dm.list_proposals("25-ID-C", "2025-3") == []
            assert (await dm.get_proposal("0077777")).title == proposal.title
            with pytest.raises(ObjectNotFound, match="run 2025-3"):
                await dm.get_proposal("77777", "2025-3")
            with pytest.raises(InvalidArgument, match="not a number"):
                await dm.get_esaf("x1")
            data_file.write_text("{not json")  # staff's edits are read at once, bad ones refused
            with pytest.raises(ConfigurationError, match=r"apsdb\.json"):
                await dm.list_proposals()

    asyncio.run(go())


def test_cli_lists_and_gets_esafs_and_proposals(dm_server: DmServer) -> None:
    (dm_server.data_root / "apsdb.json").write_text(json.dumps(APS_DB))

    def cli(*args: str) -> str:
        out = subprocess.run([str(BIN / "apsdm"), "--setup", str(dm_server.setup_file), *args],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout

    assert cli("list-esafs", "--year", "2026").startswith("id=271828 title=XANES")
    assert "users=Ada Lovelace (123456); Alan Turing (654321)" in cli("get-esaf", "--id", "271828")
    assert "id=77777" in cli("list-proposals", "--beamline", "25-ID-C", "--run", "2026-1")
    assert "run=2026-1" in cli("get-proposal", "--id", "0077777")
    assert "DM_APS_DB_WEB_SERVICE_URL=" in dm_server.setup_file.read_text()


def _unparsed(record: Any, raw: dict[str, Any]) -> None:
    """The record keeps the whole answer, and its typed fields are filled from it."""
    assert record.raw == raw
    assert type(record).from_dict(json.loads(json.dumps(raw))) == record


def test_client_parses_complete_records(dm_server: DmServer, tmp_path: Any) -> None:
    source = tmp_path / "src"
    source.mkdir()

    async def go() -> tuple[Experiment, Experiment, Daq, str]:
        async with dm_server.client() as dm:
            added = await dm.add_experiment("rec", start_date="2026-02-03")
            daq = await dm.start_daq("rec", str(source))
            await dm.stop_daq("rec", str(source))
            return added, (await dm.list_experiments())[0], daq, dm.username

    full, summary, daq, account = asyncio.run(go())
    for record in (full, summary, daq):
        _unparsed(record, record.raw)
    assert full.start_date.startswith("2026-02-03 00:00:00") and full.end_date == full.start_date
    assert full.update_date and full.primary_storage == "LOCAL" and not full.root_path
    assert "rootPath" not in full.raw  # only when set, as DM serves it
    assert full.raw["beamlineUserAccount"] == account and full.raw["systemDirectory"]
    assert summary.primary_storage == "LOCAL" and "storageDirectory" not in summary.raw
    assert (daq.storage_url, daq.storage_directory, daq.workflow_job_owner) == (
        full.storage_url, full.data_directory, account)


def test_experiment_dates_are_served_as_dm_serves_them(dm_server: DmServer) -> None:
    """ISO and DMagic's DD-Mon-YY dates are stored in DM's form; a non-date is refused."""

    async def go() -> Experiment:
        async with dm_server.client() as dm:
            with pytest.raises(InvalidArgument, match="endDate 'soon' is not a date"):
                await dm.add_experiment("bad-date", end_date="soon")
            return await dm.add_experiment("dmagic", start_date="03-Feb-26",
                                           end_date="2026-02-06 08:00:00")

    experiment = asyncio.run(go())
    assert experiment.start_date.startswith("2026-02-03 00:00:00")
    assert experiment.end_date.startswith("2026-02-06 08:00:00")
