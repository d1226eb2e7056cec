"""The gateway's PVA NTTables as typed ophyd-async ``Table``s (columns as the IOC names them)."""

from collections.abc import Sequence
from typing import Any

import numpy as np
from ophyd_async.core import Array1D, Table
from pydantic import model_validator


class GatewayTable(Table):
    """A table that reads an empty NTTable: p4p gives ``None`` for an empty numeric column,
    which ophyd-async's ``Table`` refuses ("Cannot cast None to float64")."""

    @model_validator(mode="before")
    @classmethod
    def _none_is_empty(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {key: [] if column is None else column for key, column in data.items()}
        return data


class ExperimentsTable(GatewayTable):
    """``Experiments``: the station's DM experiments."""

    name: Sequence[str]
    id: Array1D[np.int32]
    station: Sequence[str]
    type: Sequence[str]
    startDate: Sequence[str]
    description: Sequence[str]


class TransfersTable(GatewayTable):
    """``DAQs`` and ``Uploads``: one row per transfer DM lists."""

    id: Sequence[str]
    experiment: Sequence[str]
    dataDirectory: Sequence[str]
    destDirectory: Sequence[str]
    status: Sequence[str]
    nFiles: Array1D[np.int32]
    nProcessed: Array1D[np.int32]
    nErrors: Array1D[np.int32]
    percent: Array1D[np.float64]


class JobsTable(GatewayTable):
    """``Jobs``: processing jobs, newest first."""

    id: Sequence[str]
    workflow: Sequence[str]
    owner: Sequence[str]
    status: Sequence[str]
    stage: Sequence[str]
    runTime: Array1D[np.float64]
    submitted: Sequence[str]
    errorMessage: Sequence[str]


class WorkflowsTable(GatewayTable):
    """``Workflows``: the workflows DM knows."""

    name: Sequence[str]
    owner: Sequence[str]
    stages: Array1D[np.int32]
    description: Sequence[str]


class StagesTable(GatewayTable):
    """``WFn:Stages``: one row per stage and child process of the slot's job."""

    stage: Sequence[str]
    child: Array1D[np.int32]
    status: Sequence[str]
    runTime: Array1D[np.float64]
    exitStatus: Array1D[np.int32]
    command: Sequence[str]
    stdOut: Sequence[str]
    stdErr: Sequence[str]
