"""The status vocabularies agree: the bluesky package's copies (it knows only PV names, so
it cannot import the IOC or DM access) match ``apsdm.dm.status`` and the PV schema."""

from __future__ import annotations

import ast
from pathlib import Path

from apsdm.dm import status
from apsdm.dm.records import Job, Upload
from apsdm.gateway.schema import STREAM_STATES
from apsdm_ophyd import plans, pva

OPHYD = Path(plans.__file__).parent


def test_plans_end_a_job_when_dm_does() -> None:
    assert plans.JOB_END_STATES == status.JOB_END_STATUSES
    assert status.JOB_END_STATUSES <= status.TERMINAL_STATUSES


def test_stream_states_are_the_schemas() -> None:
    assert pva.STATES == STREAM_STATES


def test_records_end_and_fail_by_the_vocabulary() -> None:
    for end in status.TERMINAL_STATUSES:
        assert Job("j", "dm", end).finished and Upload("u", "e", "/d", end).finished
    for active in status.ACTIVE_STATUSES:
        assert Upload("u", "e", "/d", active).active and not Job("j", "dm", active).finished


def test_ophyd_package_imports_neither_the_ioc_nor_dm_access() -> None:
    for path in OPHYD.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "apsdm" or n.startswith("apsdm.") for n in names), path
