"""APS DB service of the embedded DM: ESAFs and beamtime proposals (BSS) per station,
beamline and run, read from a JSON file that beamline staff fill or export.

The file is ``<data-root>/apsdb.json`` (missing: no ESAFs, no proposals); it is read again
whenever it changes, so edits need no restart. Its form::

    {"esafs": [{"stationName": "25IDC", "beamlineName": "25-ID-C", "esafId": 279007,
                "esafTitle": "...", "description": "...", "sector": "25",
                "esafStatus": "Approved", "experimentStartDate": "2026-02-03 08:00:00",
                "experimentEndDate": "2026-02-06 08:00:00",
                "experimentUsers": [{"badge": "123456", "firstName": "...",
                                     "lastName": "...", "email": "...", "piFlag": "Yes"}]}],
     "proposals": [{"stationName": "25IDC", "beamlineName": "25-ID-C", "runName": "2026-1",
                    "id": 158394, "title": "...", "startTime": "2026-02-03T08:00:00-06:00",
                    "endTime": "2026-02-06T08:00:00-06:00", "duration": 259200,
                    "mailInFlag": "No", "proprietaryFlag": "No",
                    "experimenters": [{"badge": "123456", "firstName": "...", "lastName": "...",
                                       "institution": "...", "piFlag": "Y"}]}]}

Every record is served as written: DM's own fields, plus the station, beamline (and run)
that place it. An ESAF's year is that of its ``experimentStartDate``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from apsdm.dm.errors import ConfigurationError, ObjectNotFound
from apsdm.dm.records import numeric_id

from .store import Doc

log = logging.getLogger(__name__)

DATA_FILE = "apsdb.json"


def _same(value: Any, wanted: str | None) -> bool:
    """Whether a record's station/beamline/run is the one asked for (none asked: any)."""
    return not wanted or str(value or "").casefold() == wanted.casefold()


class ApsDb:
    """listStationEsafs, getStationEsafById, listStationProposals, getStationProposalById."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._stamp: tuple[int, int] | None = None  # (mtime_ns, size) of what is loaded
        self._data: dict[str, list[Doc]] = {"esafs": [], "proposals": []}

    def _records(self, kind: str) -> list[Doc]:
        """The file's ESAFs or proposals, reloaded if the file changed since last read."""
        try:
            st = self._path.stat()
        except FileNotFoundError:
            return []
        if self._stamp != (st.st_mtime_ns, st.st_size):
            try:
                data = json.loads(self._path.read_text())
            except (OSError, ValueError) as exc:
                raise ConfigurationError(f"APS DB file {self._path} is unreadable: {exc}") from None
            if not isinstance(data, dict) or not all(
                    isinstance(data.get(k, []), list) for k in self._data):
                raise ConfigurationError(
                    f"APS DB file {self._path} must be an object of 'esafs' and 'proposals' lists")
            self._data = {k: [r for r in data.get(k, []) if isinstance(r, dict)]
                          for k in self._data}
            self._stamp = (st.st_mtime_ns, st.st_size)
            log.info("APS DB file %s: %d ESAFs, %d proposals", self._path,
                     len(self._data["esafs"]), len(self._data["proposals"]))
        return self._data[kind]

    def listStationEsafs(self, stationName: str, beamlineName: str = "",
                         year: str | None = None) -> list[Doc]:
        return [e for e in self._records("esafs")
                if _same(e.get("stationName"), stationName)
                and _same(e.get("beamlineName"), beamlineName)
                and (not year or str(e.get("experimentStartDate", "")).startswith(year))]

    def listStationEsafsAllBeamlines(self, stationName: str, year: str | None = None
                                     ) -> list[Doc]:
        return self.listStationEsafs(stationName, "", year)

    def getStationEsafById(self, stationName: str, esafId: str) -> Doc:
        number = numeric_id(esafId, "ESAF id")
        for esaf in self.listStationEsafs(stationName):
            if esaf.get("esafId") == number or str(esaf.get("esafId")) == esafId:
                return esaf
        raise ObjectNotFound(f"ESAF {esafId} of station {stationName} does not exist")

    def listStationProposals(self, stationName: str, beamlineName: str = "",
                             runName: str | None = None) -> list[Doc]:
        return [p for p in self._records("proposals")
                if _same(p.get("stationName"), stationName)
                and _same(p.get("beamlineName"), beamlineName)
                and _same(p.get("runName"), runName)]

    def listStationProposalsAllBeamlines(self, stationName: str, runName: str | None = None
                                         ) -> list[Doc]:
        return self.listStationProposals(stationName, "", runName)

    def getStationProposalById(self, stationName: str, proposalId: str,
                               runName: str | None = None) -> Doc:
        number = numeric_id(proposalId, "proposal id")
        for proposal in self.listStationProposals(stationName, "", runName):
            if proposal.get("id") == number or str(proposal.get("id")) == proposalId:
                return proposal
        run = f" in run {runName}" if runName else ""
        raise ObjectNotFound(f"proposal {proposalId} of station {stationName}{run} does not exist")
