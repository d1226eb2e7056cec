"""Real DM responses replayed: the gateway's REST client parses every captured record into its
typed record with no field lost, ``apsdm-ioc --dm rest`` against the replay publishes the
captured values on its PVs, and every route is either verified by a capture or marked a guess."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import epics
import pytest
from conftest import make_ioc
from replay_dm import USERNAME, ReplayDm, load_captures

from apsdm.dm import (
    Daq,
    DmClient,
    DmConfig,
    Esaf,
    Experiment,
    Job,
    ObjectNotFound,
    Proposal,
    Workflow,
    routes,
)
from apsdm.dm.records import RESERVED_JOB_KEYS

pytestmark = pytest.mark.timeout(120)

Typed = dict[str, tuple[str, Callable[[Any], Any]]]  # JSON key -> (attribute, expected value)
name_of: Callable[[Any], Any] = lambda v: v["name"]  # noqa: E731

#: every JSON key a typed record reads, with the attribute it goes to and what that must hold
TYPED: dict[type, Typed] = {
    Experiment: {
        "id": ("id", int), "name": ("name", str), "description": ("description", str),
        "stationName": ("station", str), "experimentStation": ("station", name_of),
        "experimentType": ("type", name_of), "startDate": ("start_date", str),
        "endDate": ("end_date", str), "updateDate": ("update_date", str),
        "dataDirectory": ("data_directory", str),
        "analysisDirectory": ("analysis_directory", str),
        "storageDirectory": ("storage_directory", str), "storageUrl": ("storage_url", str),
        "rootPath": ("root_path", str), "primaryStorage": ("primary_storage", name_of),
        "experimentUsernameList": ("users", tuple)},
    Daq: {
        "id": ("id", str), "experimentName": ("experiment_name", str),
        "dataDirectory": ("data_directory", str), "status": ("status", str),
        "countFiles": ("n_files", int), "nProcessedFiles": ("n_processed", int),
        "nProcessingErrors": ("n_errors", int), "startTime": ("start_time", float),
        "storageDirectory": ("storage_directory", str), "storageUrl": ("storage_url", str),
        "workflowJobOwner": ("workflow_job_owner", str)},
    Workflow: {
        "name": ("name", str), "owner": ("owner", str), "id": ("id", str),
        "description": ("description", str), "stages": ("stages", dict)},
    Job: {
        "id": ("id", str), "owner": ("owner", str), "status": ("status", str),
        "workflow": ("workflow_name", name_of), "stage": ("stage", str),
        "runTime": ("run_time", float), "errorMessage": ("error_message", str),
        "submissionTime": ("submission_time", float)},
    Esaf: {
        "esafId": ("id", str), "esafTitle": ("title", str),
        "experimentStartDate": ("start", str), "experimentEndDate": ("end", str),
        "description": ("description", str), "sector": ("sector", str),
        "esafStatus": ("status", str),
        "experimentUsers": ("users", lambda v: tuple(
            f"{u['firstName']} {u['lastName']} ({u['badge']})" for u in v))},
    Proposal: {
        "id": ("id", str), "title": ("title", str), "startTime": ("start", str),
        "endTime": ("end", str), "runName": ("run", str),
        "experimenters": ("users", lambda v: tuple(
            f"{u['firstName']} {u['lastName']} ({u['badge']})" for u in v))},
}
#: JSON keys each record keeps only in ``raw`` (served to PVs and callers from there)
RAW_ONLY: dict[type, frozenset[str]] = {
    Experiment: frozenset({
        "analysisDirectoryFrozen", "authGroupName", "beamlineAdminAccount",
        "beamlineUserAccount", "createDate", "dataDirectoryFrozen", "experimentStationId",
        "experimentTypeId", "managedDirectoryStructure", "primaryStorageId", "storageHost",
        "systemDirectory"}),
    Daq: frozenset({"experimentStationName", "startTimestamp", "storageHost"}),
    Workflow: frozenset({"userAccount"}),
    # and every job variable (argsDict keys, output variables): any key DM does not reserve
    Job: RESERVED_JOB_KEYS - {"id", "owner", "status", "workflow", "stage", "runTime",
                              "errorMessage", "submissionTime"},
    Esaf: frozenset(),
    Proposal: frozenset({"activities", "duration", "mailInFlag", "proprietaryFlag",
                         "submittedDate", "totalShiftsRequested"}),
}


def _args(capture: dict[str, Any]) -> dict[str, Any]:
    url = urlsplit(capture["url"])
    found = routes.match(capture["method"], url.path, url.query)
    assert found is not None, f"{capture['url']} is no route of ours"
    return found[1]


#: route -> the client call that makes it, from the capture's own arguments
CALLS: dict[str, Callable[[DmClient, dict[str, Any]], Any]] = {
    "getExperimentsByStation": lambda dm, a: dm.list_experiments(a["stationName"]),
    "getExperimentByName": lambda dm, a: dm.get_experiment(a["name"]),
    "getExperimentById": lambda dm, a: dm.get_experiment_by_id(a["id"]),
    "startDaq": lambda dm, a: dm.start_daq(a["experimentName"], a["dataDirectory"],
                                           **a["taskInfo"]),
    "listWorkflows": lambda dm, a: dm.list_workflows(a["owner"]),
    "getWorkflowByName": lambda dm, a: dm.get_workflow(a["name"], a["owner"]),
    "addWorkflow": lambda dm, a: dm.add_workflow(a["workflow"]),
    "updateWorkflow": lambda dm, a: dm.update_workflow(a["workflow"]),
    "startProcessingJob": lambda dm, a: dm.start_processing_job(a["workflowName"],
                                                                a["argsDict"], a["owner"]),
    "listProcessingJobs": lambda dm, a: dm.list_processing_jobs(a["owner"]),
    "getProcessingJobById": lambda dm, a: dm.get_processing_job(a["id"], a["owner"]),
    "listStationEsafs": lambda dm, a: dm.list_esafs(a["beamlineName"], a.get("year", "")),
    "getStationEsafById": lambda dm, a: dm.get_esaf(a["esafId"]),
    "listStationProposals": lambda dm, a: dm.list_proposals(a["beamlineName"],
                                                            a.get("runName", "")),
    "getStationProposalById": lambda dm, a: dm.get_proposal(a["proposalId"],
                                                            a.get("runName", "")),
}


@pytest.fixture
def replay(tmp_path: Path) -> Iterator[tuple[ReplayDm, Path]]:
    """The replay server and a dm.setup.sh naming it."""
    server = ReplayDm()
    url = server.start()
    yield server, server.write_setup(tmp_path, url)
    server.stop()


def test_every_route_is_verified_by_a_capture_or_marked_a_guess() -> None:
    captures = load_captures()
    for route in routes.ROUTES.values():
        assert route.verified == (route.name in routes.VERIFIED_BY), route.name
    for name, evidence in routes.VERIFIED_BY.items():
        named = [c for c in captures if evidence.endswith(c["source"].split("tests/")[-1])]
        assert [c["route"] for c in named] == [name], f"{name}: {evidence} is not kept"
        # the URL the real client sent is this route, and ours carries the same arguments
        args = _args(named[0])
        ours = routes.ROUTES[name].url(**args)
        mine = urlsplit(ours)
        assert routes.match(routes.ROUTES[name].method, mine.path, mine.query) == (
            routes.ROUTES[name], {k: v for k, v in args.items() if v is not None})


def test_client_parses_every_capture_with_no_field_lost(
        replay: tuple[ReplayDm, Path]) -> None:
    server, setup = replay
    captures = load_captures()
    assert set(CALLS) == {c["route"] for c in captures}  # each capture is parsed

    async def go() -> None:
        async with DmClient(DmConfig.from_env({}, setup_file=str(setup))) as dm:
            for capture in captures:
                answer = await CALLS[capture["route"]](dm, _args(capture))
                parsed = answer if isinstance(answer, list) else [answer]
                sent = capture["response"]
                assert [r.raw for r in parsed] == (sent if isinstance(sent, list) else [sent])
                for record in parsed:
                    _check_fields(record, capture["source"])
            with pytest.raises(ObjectNotFound, match="no capture of getExperimentByName"):
                await dm.get_experiment("never-captured")

    asyncio.run(go())
    assert sorted(set(server.served)) == sorted(CALLS)
    assert server.missed == ["getExperimentByName"]


def _check_fields(record: Any, source: str) -> None:
    """Every key is read into a typed field with its value, or listed as kept in raw."""
    typed, raw_only = TYPED[type(record)], RAW_ONLY[type(record)]
    for key, value in record.raw.items():
        if key in typed:
            attr, expected = typed[key]
            assert getattr(record, attr) == expected(value), f"{source}: {key} -> {attr}"
        elif isinstance(record, Job) and key not in RESERVED_JOB_KEYS:
            continue  # a job variable, kept in raw (the Stages table shows its effect)
        else:
            assert key in raw_only, f"{source}: {type(record).__name__} drops {key!r}"


def test_ioc_on_the_replay_publishes_the_captured_values(
        tmp_path: Path, replay: tuple[ReplayDm, Path]) -> None:
    server, setup = replay
    by_route = {c["route"]: c["response"] for c in load_captures()}
    exp, esaf, proposal = (by_route["getExperimentByName"], by_route["getStationEsafById"],
                           by_route["getStationProposalById"])
    ioc = make_ioc(tmp_path, "--dm", "rest", "--dm-setup", str(setup))
    try:
        def get(suffix: str) -> Any:
            return epics.caget(ioc.pv(suffix), as_string=True, use_monitor=False, timeout=10)

        def put(suffix: str, value: str) -> None:
            epics.caput(ioc.pv(suffix), value, wait=True, timeout=20)

        put("Experiment:Name", exp["name"])
        assert get("Experiment:Message_RBV") == ""
        assert get("Experiment:Id_RBV") == str(exp["id"])
        assert get("Experiment:Description_RBV") == exp["description"]
        assert (get("Experiment:Station_RBV"), get("Experiment:Type_RBV")) == ("25IDC", "25IDC")
        assert get("Experiment:DataDirectory_RBV") == exp["dataDirectory"]
        assert get("Experiment:StorageDirectory_RBV") == exp["storageDirectory"]
        assert get("Experiment:StartDate_RBV") == exp["startDate"]
        assert get("Experiment:Users_RBV") == ",".join(exp["experimentUsernameList"])
        put("Esaf:Id", str(esaf["esafId"]))
        put("Proposal:Id", "0158394")  # as dmax's capture asked for it
        assert get("Esaf:Title_RBV") == esaf["esafTitle"]
        assert get("Esaf:Pi_RBV") == "Rosalind Franklin (123456)"
        assert get("Esaf:StartDate_RBV") == esaf["experimentStartDate"]
        assert get("Proposal:Title_RBV") == proposal["title"]
        assert get("Proposal:Pi_RBV") == "Rosalind Franklin (456789)"
        assert get("Status:Connected_RBV") == "Connected"

        ctx = ioc.pva_context()
        try:
            def rows(table: str) -> list[dict[str, Any]]:
                columns = ctx.get(ioc.pv(table)).value.todict()
                return [dict(zip(columns, values, strict=True))
                        for values in zip(*columns.values(), strict=True)]

            names = [row["name"] for row in rows("Experiments")]
            assert names == [e["name"] for e in by_route["getExperimentsByStation"]]
            jobs = {row["id"]: row for row in rows("Jobs")}
            for job in by_route["listProcessingJobs"]:
                row = jobs[job["id"]]
                assert (row["status"], row["owner"], row["workflow"]) == (
                    job["status"], job["owner"], job["workflow"]["name"])
                assert row["errorMessage"] == job.get("errorMessage", "")
            assert [(w["name"], w["stages"]) for w in rows("Workflows")] == [
                (w["name"], len(w["stages"])) for w in by_route["listWorkflows"]]
        finally:
            ctx.close()
    finally:
        ioc.stop()
    assert USERNAME in setup.with_name("replay.login").read_text()
    assert not set(server.missed) - {"listDaqs", "listUploads"}, server.missed
