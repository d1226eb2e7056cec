"""Every DM REST route the gateway uses, shared by the client and the embedded service.

This is the one place to correct a route. ``verified=False`` marks a guess: the DAQ
service's stop/upload/list/get routes and the catalog routes were never seen in a capture
(dm-protocol.md section 2.4), so they follow the style of the verified ones. Every other
route names what verifies it in :data:`VERIFIED_BY`: a real capture in dmax's tests, which
tests/data/dm_captures.json keeps and tests/replay_dm.py serves back to the client.
tests/test_dmax.py drives every route dmax knows with dmax itself.

Templates: ``{x}`` is a plain segment, ``{x:e}`` a DM-encoded free-text segment.
Query parameters keep their order; kind ``e`` is encoded text, ``j`` encoded JSON,
``p`` plain.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any
from urllib.parse import quote, unquote

from . import wire


class Service(StrEnum):
    """The DM web services; each has its own URL (``DM_<NAME>_WEB_SERVICE_URL``)."""

    DS = "ds"
    DAQ = "daq"
    PROC = "proc"
    CAT = "cat"
    APS_DB = "apsdb"


_FIELD = re.compile(r"\{(\w+)(?::(e))?\}")
# match a whole b'...' token first: other clients may send tokens with any base64 symbol
_ENCODED_SEGMENT = r"(b'[^']*'|[^/]+)"
_PLAIN_SEGMENT = r"([^/]+)"


@dataclass(frozen=True)
class Route:
    """One DM call: method, service, path template and query parameters."""

    name: str
    method: str
    service: Service
    template: str
    query: tuple[tuple[str, str], ...] = ()
    verified: bool = True

    @property
    def path_fields(self) -> list[tuple[str, bool]]:
        """(field, encoded) for every placeholder in the template, in order."""
        return [(m.group(1), m.group(2) == "e") for m in _FIELD.finditer(self.template)]

    def url(self, **values: Any) -> str:
        """The path and query exactly as the vendor client writes them."""

        def segment(m: re.Match[str]) -> str:
            value = str(values[m.group(1)])  # a plain one is %-quoted: "a/b" stays one segment
            return wire.encode(value) if m.group(2) == "e" else quote(value, safe="")

        path = _FIELD.sub(segment, self.template)
        parts = []
        for key, kind in self.query:
            if key not in values or values[key] is None:
                continue
            value = values[key]
            if kind == "j":
                text = wire.encode_json(value)
            elif kind == "e":
                text = wire.encode(str(value))
            else:
                text = str(value)
            parts.append(f"{key}={text}")
        return path + ("?" + "&".join(parts) if parts else "")

    @property
    def pattern(self) -> re.Pattern[str]:
        """Regex over the raw request path (no query) that captures each field."""
        regex, pos = "", 0
        for m in _FIELD.finditer(self.template):
            regex += re.escape(self.template[pos : m.start()])
            regex += _ENCODED_SEGMENT if m.group(2) == "e" else _PLAIN_SEGMENT
            pos = m.end()
        regex += re.escape(self.template[pos:])
        return re.compile(f"^{regex}$")

    def parse(self, raw_path: str, raw_query: str) -> dict[str, Any] | None:
        """Decode a raw request into field values, or None if it is not this route."""
        m = self.pattern.match(raw_path)
        if m is None:
            return None
        values: dict[str, Any] = {}
        for (field, encoded), token in zip(self.path_fields, m.groups(), strict=True):
            values[field] = wire.decode(token) if encoded else unquote(token)
        query = {}
        for item in raw_query.split("&") if raw_query else []:
            key, _, text = item.partition("=")
            query[unquote(key)] = text
        for key, kind in self.query:
            if key not in query:
                continue
            if kind == "j":
                values[key] = wire.decode_json(query[key])
            elif kind == "e":
                values[key] = wire.decode(query[key])
            else:
                values[key] = unquote(query[key])
        return values


def _r(name: str, method: str, service: Service, template: str, *query: str,
       verified: bool = True) -> Route:
    """Shorthand: query items are ``name:kind``."""
    pairs = tuple(tuple(q.split(":")) for q in query)
    return Route(name, method, service, template, pairs, verified)  # type: ignore[arg-type]


DS, DAQ, PROC, CAT, APS_DB = Service.DS, Service.DAQ, Service.PROC, Service.CAT, Service.APS_DB

ROUTES: dict[str, Route] = {
    r.name: r
    for r in (
        # DS service
        _r("getExperimentByName", "GET", DS, "/dm/experimentsByName/{name:e}/{stationName}"),
        _r("getExperimentById", "GET", DS, "/dm/experimentsById/{id}"),
        _r("getExperimentsByStation", "GET", DS, "/dm/experimentsByStation/{stationName}"),
        _r("addExperiment", "POST", DS, "/dm/experiments/addExperiment",
           "name:e", "stationName:p", "typeName:e", "description:e", "rootPath:e",
           "startDate:e", "endDate:e", verified=False),
        _r("addUserExperimentRole", "POST", DS,
           "/dm/usersByUsername/{username}/experimentRoles/{roleName}/{experimentName:e}",
           "stationName:p", verified=False),
        # DAQ service
        _r("startDaq", "POST", DAQ, "/dm/experimentsByName/{experimentName:e}/startDaq/{dataDirectory:e}",
           "taskInfo:j"),
        _r("stopDaq", "POST", DAQ, "/dm/experimentsByName/{experimentName:e}/stopDaq/{dataDirectory:e}",
           verified=False),
        _r("listDaqs", "GET", DAQ, "/dm/experimentDaqs", verified=False),
        _r("getDaqInfo", "GET", DAQ, "/dm/experimentDaqs/{id}", verified=False),
        _r("upload", "POST", DAQ, "/dm/experimentsByName/{experimentName:e}/upload/{dataDirectory:e}",
           "daqInfo:j", verified=False),
        _r("listUploads", "GET", DAQ, "/dm/experimentUploads", verified=False),
        _r("getUploadInfo", "GET", DAQ, "/dm/experimentUploads/{id}", verified=False),
        _r("stopUpload", "POST", DAQ, "/dm/experimentUploads/stopUpload/{id}", verified=False),
        # PROC service
        _r("listWorkflows", "GET", PROC, "/dm/workflowsByOwner/{owner}", "queryDict:j"),
        _r("getWorkflowByName", "GET", PROC, "/dm/workflowsByOwner/{owner}/{name:e}"),
        _r("addWorkflow", "POST", PROC, "/dm/workflows/addWorkflow",
           "allowCurrentUsername:p", "workflow:j"),
        _r("updateWorkflow", "PUT", PROC, "/dm/workflows/updateWorkflow",
           "allowCurrentUsername:p", "workflow:j"),
        _r("startProcessingJob", "POST", PROC,
           "/dm/processingJobsByWorkflow/{owner}/{workflowName:e}/startProcessingJob", "argsDict:j"),
        _r("listProcessingJobs", "GET", PROC, "/dm/processingJobsByOwner/{owner}",
           "queryDict:j", "skip:p", "limit:p", "keyList:j"),
        _r("getProcessingJobById", "GET", PROC, "/dm/processingJobsByOwner/{owner}/{id}"),
        # CAT service
        _r("addExperimentDataset", "POST", CAT, "/dm/datasets/addExperimentDataset",
           "datasetInfo:j", verified=False),
        _r("getExperimentFile", "GET", CAT, "/dm/filesByExperiment/{experimentName:e}/{experimentFilePath:e}",
           verified=False),
        # APS DB service: station and beamline encoded. The station-only forms are what
        # dmax sends for no beamline (it drops "/b''").
        _r("listStationEsafs", "GET", APS_DB,
           "/dm/esaf/stationEsafs/{stationName:e}/{beamlineName:e}", "year:p"),
        _r("listStationEsafsAllBeamlines", "GET", APS_DB, "/dm/esaf/stationEsafs/{stationName:e}",
           "year:p", verified=False),
        _r("getStationEsafById", "GET", APS_DB, "/dm/esaf/stationEsafsById/{stationName:e}/{esafId}"),
        _r("listStationProposals", "GET", APS_DB,
           "/dm/bss/stationProposals/{stationName:e}/{beamlineName:e}", "runName:p"),
        _r("listStationProposalsAllBeamlines", "GET", APS_DB,
           "/dm/bss/stationProposals/{stationName:e}", "runName:p", verified=False),
        _r("getStationProposalById", "GET", APS_DB,
           "/dm/bss/stationProposalsById/{stationName:e}/{proposalId}", "runName:p"),
    )
}

_CAPTURE = "a real DM response and URL captured in dmax 0.0.10 tests/"
#: What verifies each route not marked ``verified=False`` (tests/test_replay.py checks that
#: every route is one or the other, and that each capture named is in tests/data/).
VERIFIED_BY: dict[str, str] = {
    "getExperimentByName": _CAPTURE + "test_data_storage.py::test_get_experiment_by_name",
    "getExperimentById": _CAPTURE + "test_data_storage.py::test_get_experiment_by_id",
    "getExperimentsByStation": _CAPTURE + "test_data_storage.py::test_get_experiments",
    "startDaq": _CAPTURE + "test_data_archive.py::test_start_data_archive_queue",
    "listWorkflows": _CAPTURE + "test_processing.py::test_get_workflows",
    "getWorkflowByName": _CAPTURE + "test_processing.py::test_get_workflow",
    "addWorkflow": _CAPTURE + "test_processing.py::test_add_new_workflow",
    "updateWorkflow": _CAPTURE + "test_processing.py::test_set_workflow",
    "startProcessingJob": _CAPTURE + "test_processing.py::test_submit_processing_job",
    "listProcessingJobs": _CAPTURE + "test_processing.py::test_get_processing_jobs",
    "getProcessingJobById": _CAPTURE + "test_processing.py::test_get_processing_job",
    "listStationEsafs": _CAPTURE + "test_scheduling.py::test_get_esafs",
    "getStationEsafById": _CAPTURE + "test_scheduling.py::test_get_esaf",
    "listStationProposals": _CAPTURE + "test_scheduling.py::test_get_proposals",
    "getStationProposalById": _CAPTURE + "test_scheduling.py::test_get_proposal",
}

LOGIN_PATH = "/dm/login"


def match(method: str, raw_path: str, raw_query: str) -> tuple[Route, dict[str, Any]] | None:
    """Find the route a raw request is for and decode its arguments (server side)."""
    for route in ROUTES.values():
        if route.method != method:
            continue
        values = route.parse(raw_path, raw_query)
        if values is not None:
            return route, values
    return None
