"""Catalog service (CAT) of the embedded DM: datasets added by clients, and copied files."""

from __future__ import annotations

from apsdm.dm.errors import InvalidArgument, ObjectNotFound
from apsdm.dm.paths import relative_path

from .common import FindExperiment, new_id
from .store import Doc, Store


class Catalog:
    """Datasets added by clients, and a record of every file DAQs and uploads copied."""

    def __init__(self, store: Store, find_experiment: FindExperiment) -> None:
        self._store = store
        self._find = find_experiment

    def addExperimentDataset(self, datasetInfo: Doc) -> Doc:
        """Store a dataset (experimentName and datasetName required, unique together)."""
        for key in ("experimentName", "datasetName"):
            if not isinstance(datasetInfo.get(key), str) or not datasetInfo[key]:
                raise InvalidArgument(f"datasetInfo needs a non-empty {key}")
        self._find(datasetInfo["experimentName"])  # ObjectNotFound for an unknown experiment
        doc = {**datasetInfo, "id": new_id()}
        self._store.add_dataset(doc)
        return doc

    def getExperimentFile(self, experimentName: str, experimentFilePath: str) -> Doc:
        path = str(relative_path(experimentFilePath, "experimentFilePath"))
        doc = self._store.file(experimentName, path)
        if doc is None:
            raise ObjectNotFound(f"file {path} of experiment {experimentName} is not catalogued")
        return doc

    def add_files(self, experiment: str, entries: list[tuple[str, int, str]]) -> None:
        """Catalogue copied files (path, size, md5; "" for none) in one transaction; a copy
        of a newer version updates its record."""
        old = self._store.files(experiment, [path for path, _, _ in entries])
        docs = []
        for path, size, md5 in entries:
            docs.append({
                "id": old[path]["id"] if path in old else new_id(),
                "fileName": path.rpartition("/")[2],  # paths are normalised: no trailing /
                "experimentFilePath": path,
                "fileSize": size,
                **({"md5Sum": md5} if md5 else {}),  # none under skipChecksum
                "experimentName": experiment,
            })
        self._store.save_files(docs)
