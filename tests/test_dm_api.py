"""Both DM access implementations, the REST DmClient and the dm-package adapter, are DmApi:
every operation of the protocol exists on each with the same parameters."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from apsdm.dm.api import DmApi
from apsdm.dm.client import DmClient
from apsdm.dm.config import DmConfig
from apsdm.dm.dmpkg import DmPackageClient

IMPLEMENTATIONS = [DmClient, DmPackageClient]


def _protocol_methods() -> dict[str, inspect.Signature]:
    """DmApi's methods (properties and data attributes apart), by name."""
    return {name: inspect.signature(member, eval_str=True)
            for name, member in vars(DmApi).items()
            if inspect.isfunction(member) and not name.startswith("_")}


def test_protocol_lists_the_dm_operations() -> None:
    assert {"close", "get_experiment", "start_daq", "upload", "upsert_workflow",
            "list_processing_jobs", "get_experiment_file"} <= _protocol_methods().keys()


@pytest.mark.parametrize("cls", IMPLEMENTATIONS, ids=lambda c: c.__name__)
def test_implementation_is_a_dm_api(cls: type, tmp_path: Path) -> None:
    login = tmp_path / "login"
    login.write_text("alice|s3cret")
    client = cls(DmConfig.single_url("https://dm:1", str(login), "ST"))
    assert isinstance(client, DmApi)
    assert (client.username, client.station, client.requests) == ("alice", "ST", 0)
    for name, expected in _protocol_methods().items():
        method = getattr(cls, name)
        assert inspect.signature(method, eval_str=True) == expected, f"{cls.__name__}.{name}"
        assert inspect.iscoroutinefunction(method), f"{cls.__name__}.{name} is not async"


def test_neither_implementation_inherits_the_other() -> None:
    assert not issubclass(DmPackageClient, DmClient)
    assert not issubclass(DmClient, DmPackageClient)
