"""Storage service (DS) of the embedded DM: experiments, their storage directories, user roles."""

from __future__ import annotations

import getpass
import grp
import logging
import os
from datetime import datetime
from pathlib import Path

from apsdm.dm.errors import InvalidArgument, ObjectAlreadyExists, ObjectNotFound

from .common import check_label, check_name
from .store import Doc, Store

log = logging.getLogger(__name__)

DEFAULT_TYPE = "TEST"
#: the one storage of the embedded service (real DM names e.g. SOJOURNER, id 5)
PRIMARY_STORAGE = {"id": 1, "name": "LOCAL", "description": "local storage of the embedded DM"}
#: date forms accepted for startDate/endDate: ISO, and DMagic's ``%d-%b-%y``
_DATE_FORMATS = ("%d-%b-%y", "%d-%b-%Y")


def _dm_date(value: str | None, what: str) -> str | None:
    """A client's date as DM serves dates (``2026-02-13 00:00:00-06:00``, local time)."""
    if value is None or value == "":
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        for fmt in _DATE_FORMATS:
            try:
                parsed = datetime.strptime(value, fmt)
                break
            except ValueError:
                continue
        else:
            raise InvalidArgument(
                f"{what} {value!r} is not a date (use YYYY-MM-DD[ HH:MM:SS] or DD-Mon-YY)"
            ) from None
    return str(parsed.astimezone())


def _group_name() -> str:
    """The group that owns what the service stores (its auth group, in DM's terms)."""
    try:
        return grp.getgrgid(os.getgid()).gr_name
    except KeyError:
        return str(os.getgid())


class Experiments:
    """Experiments, their storage directories under the data root, and user roles."""

    def __init__(self, store: Store, storage_root: Path, station: str, account: str) -> None:
        self._store = store
        self._storage_root = storage_root
        self.station = station
        self._account = account  # the DM login: beamline user account, owner of DAQ jobs
        self._admin = getpass.getuser()  # the system account that owns the storage
        self._group = _group_name()

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
            "primaryStorage": dict(PRIMARY_STORAGE),
            "primaryStorageId": PRIMARY_STORAGE["id"],
            # clients (dmax) require both dates: an experiment made without them starts
            # when it was created and ends when it starts, until someone sets them
            "startDate": doc["startDate"] or doc["createDate"],
            "endDate": doc["endDate"] or doc["startDate"] or doc["createDate"],
            "createDate": doc["createDate"],
            "updateDate": doc.get("updateDate") or doc["createDate"],
            "authGroupName": self._group,
        }
        if doc["rootPath"]:
            record["rootPath"] = doc["rootPath"]
        if full:
            storage = self._storage(doc)
            record.update(
                stationName=doc["stationName"],
                experimentUsernameList=self._store.usernames(id),
                storageDirectory=str(storage),
                dataDirectory=str(storage / "data"),
                analysisDirectory=str(storage / "analysis"),
                systemDirectory=str(storage / "system"),
                dataDirectoryFrozen=False,
                analysisDirectoryFrozen=False,
                managedDirectoryStructure=True,
                beamlineAdminAccount=self._admin,
                beamlineUserAccount=self._account,
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
            "startDate": _dm_date(startDate, "startDate"),
            "endDate": _dm_date(endDate, "endDate"),
            "createDate": str(datetime.now().astimezone()),
        }
        doc["updateDate"] = doc["createDate"]
        storage = self._storage(doc)
        for sub in ("data", "analysis", "system"):
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
