"""MIGRATION.md maps every DM helper of apstools 1.7.12 (the names
``apstools.utils.aps_data_management`` exports and every attribute of
``apstools.devices.DM_WorkflowConnector``), each to its counterpart or marked missing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

MIGRATION = Path(__file__).resolve().parents[1] / "ophyd_devices" / "MIGRATION.md"

#: ``__all__`` of apstools/utils/aps_data_management.py in apstools 1.7.12
UTILS_1_7_12 = [
    "build_run_metadata_dict", "dm_add_workflow", "dm_api_cat", "dm_api_daq",
    "dm_api_dataset_cat", "dm_api_ds", "dm_api_file", "dm_api_filecat", "dm_api_proc",
    "dm_daq_wait_upload_plan", "dm_file_ready_to_process", "dm_get_daqs",
    "dm_get_experiment_datadir_active_daq", "dm_get_experiment_file", "dm_get_experiment_path",
    "dm_get_experiments", "dm_get_workflow", "dm_setup", "dm_source_environ", "dm_start_daq",
    "dm_station_name", "dm_stop_daq", "dm_update_workflow", "dm_upload",
    "get_workflow_last_stage", "share_bluesky_metadata_with_dm",
    "validate_experiment_dataDirectory", "wait_dm_upload", "DEFAULT_UPLOAD_TIMEOUT",
    "DEFAULT_UPLOAD_POLL_PERIOD", "DM_WorkflowCache"
]
#: DM_WorkflowCache's attributes and methods in apstools 1.7.12
CACHE_1_7_12 = [
    "cache", "define_workflow", "print_cache_summary", "report_dm_workflow_output",
    "wait_workflows", "_update_processing_data"
]
#: DM_WorkflowConnector's attributes, components and methods in apstools 1.7.12
CONNECTOR_1_7_12 = [
    "job", "api", "owner", "workflow", "workflow_args", "job_id", "run_time", "stage_id",
    "status", "polling_period", "reporting_period", "concise_reporting", "__repr__",
    "put_if_different", "getJob", "_update_processing_data", "idle", "report_status",
    "start_workflow", "run_as_plan", "processing_jobs", "workflows", "report_processing_stages",
    "start_time"
]


def rows(section: str) -> dict[str, str]:
    """First cell -> second cell of the table rows under the heading that starts with ``section``."""
    text = MIGRATION.read_text()
    body = text[text.index(f"## {section}"):]
    body = body[:body.find("\n## ", 3)] if "\n## " in body[3:] else body
    cells = (line.split(" | ", 1) for line in body.splitlines() if line.startswith("| `"))
    return {first: rest for first, rest in cells}


def covered(name: str, table: dict[str, str]) -> bool:
    """``name`` is named (as code) in a first cell whose row says what it maps to."""
    pattern = re.compile(rf"(?<![\w.]){re.escape(name)}(?![\w])")
    return any(pattern.search(" ".join(re.findall(r"`([^`]*)`", first)))
               and rest.strip(" |") for first, rest in table.items())


@pytest.mark.parametrize("name", UTILS_1_7_12 + [f"DM_WorkflowCache.{n}" for n in CACHE_1_7_12])
def test_every_apstools_dm_utility_is_mapped(name: str) -> None:
    table = rows("`apstools.utils`")
    assert covered(name, table) or covered(name.rpartition(".")[2], table), name


@pytest.mark.parametrize("name", CONNECTOR_1_7_12)
def test_every_dm_workflow_connector_attribute_is_mapped(name: str) -> None:
    assert covered(name, rows("`apstools.devices.DM_WorkflowConnector`")), name
