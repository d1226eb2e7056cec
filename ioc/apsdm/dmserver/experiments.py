"""Storage service (DS) of the embedded DM: experiments, their storage directories, user roles."""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path

from apsdm.dm.errors import InvalidArgument, ObjectAlreadyExists, ObjectNotFound

from .common import check_label, check_name
from .store import Doc, Store

log = logging.getLogger(__name__)

DEFAULT_TYPE = "TEST"


class Experiments:
    """Experiments, their storage directories under the data root, and user roles."""

    def __init__(self, store: Store, storage_root: Path, station: str) -> None:
        self._store = store
        self._storage_root = storage_root
        self.station = station

    def _storage(self, doc: Doc) -> Path:
        return self._storage_root / doc["stationName"] / doc["name"]

    def _record(self, id: int, doc: Doc, full: bool = True) -> Doc:
        """DM's experiment object; ``full`` adds what only single-experiment answers carry."""
        record = {
            "id": id,
            "name": doc["name"],
            "description": doc["description"],
            "experimentStation": {"id": doc["experimentStationId"],
                                  "name": doc["stationName"], "description": ""},
            "experimentStationId": doc["experimentStationId"],
            "experimentType": {"id": doc["experimentTypeId"], "name": doc["typeName"],
                               "description": ""},
            "experimentTypeId": doc["experimentTypeId"],
            "startDate": doc["startDate"],
            "endDate": doc["endDate"],
            "createDate": doc["createDate"],
            "rootPath": doc["rootPath"],
        }
        if full:
            storage = self._storage(doc)
            record.update(
                stationName=doc["stationName"],
                experimentUsernameList=self._store.usernames(id),
                storageDirectory=str(storage),
                dataDirectory=str(storage / "data"),
                analysisDirectory=str(storage / "analysis"),
                storageHost="localhost",
                storageUrl=storage.as_uri(),
            )
        return record

    def find(self, name: str) -> Doc:
        """The full record of an experiment of any station; ObjectNotFound if none."""
        row = self._store.experiment(name=name)
        if row is None:
            raise ObjectNotFound(f"experiment {name} does not exist")
        return self._record(*row)

    def _at_station(self, name: str, station: str | None) -> Doc:
        """:meth:`find`, with a station (if given) that must be the experiment's."""
        record = self.find(name)
        if station and station.casefold() != record["stationName"].casefold():
            raise ObjectNotFound(f"experiment {name} does not exist at station {station}")
        return record

    def getExperimentByName(self, name: str, stationName: str) -> Doc:
        return self._at_station(name, stationName)

    def getExperimentById(self, id: str) -> Doc:
        try:
            number = int(id)
        except ValueError:
            raise InvalidArgument(f"experiment id {id!r} is not a number") from None
        row = self._store.experiment(id=number)
        if row is None:
            raise ObjectNotFound(f"experiment with id {number} does not exist")
        return self._record(*row)

    def getExperimentsByStation(self, stationName: str) -> list[Doc]:
        return [self._record(i, d, full=False) for i, d in self._store.experiments(stationName)]

    def addExperiment(self, name: str, stationName: str | None = None,
                      typeName: str | None = None, description: str | None = None,
                      rootPath: str | None = None, startDate: str | None = None,
                      endDate: str | None = None) -> Doc:
        """Create an experiment and its data and analysis directories."""
        check_name(name, "experiment name")
        station = check_name(stationName or self.station, "station name")
        type_name = check_label(typeName or DEFAULT_TYPE, "experiment type")
        if self._store.experiment(name=name) is not None:
            raise ObjectAlreadyExists(f"experiment {name} already exists")
        doc = {
            "name": name,
            "description": description or "",
            "stationName": station,
            "experimentStationId": self._store.name_id("station", station),
            "typeName": type_name,
            "experimentTypeId": self._store.name_id("type", type_name),
            "rootPath": rootPath or "",
            "startDate": startDate,
            "endDate": endDate,
            "createDate": str(datetime.now().astimezone()),
        }
        storage = self._storage(doc)
        for sub in ("data", "analysis"):
            (storage / sub).mkdir(parents=True, exist_ok=True)
        record = self._record(self._store.add_experiment(doc), doc)
        log.info("experiment %s added at station %s: %s", name, station,
                 record["storageDirectory"])
        return record

    def addUserExperimentRole(self, username: str, roleName: str, experimentName: str,
                              stationName: str | None = None) -> Doc:
        """Give a user a role on an experiment; returns the experiment with its user list."""
        check_label(username, "username")
        check_label(roleName, "role name")
        record = self._at_station(experimentName, stationName)
        self._store.add_role(record["id"], username, roleName)
        return self.find(experimentName)
