"""The caproto internals the CA layer overrides or follows must be the ones it was written
against: an upgrade that changes one fails here, by name, instead of breaking the IOC."""

from __future__ import annotations

import hashlib
import importlib
import inspect
from importlib.metadata import version

import pytest

from apsdm.gateway.ca import CAPROTO_CONTRACT


def _upstream(path: str) -> object:
    module, cls, method = path.rsplit(".", 2)
    return getattr(getattr(importlib.import_module(module), cls), method)


@pytest.mark.parametrize("path", sorted(CAPROTO_CONTRACT))
def test_overridden_caproto_method_is_unchanged(path: str) -> None:
    try:
        method = _upstream(path)
    except AttributeError:
        pytest.fail(f"caproto {version('caproto')} no longer has {path}: see apsdm/gateway/ca.py")
    digest = hashlib.sha256(inspect.getsource(method).encode()).hexdigest()[:16]  # type: ignore[arg-type]
    assert digest == CAPROTO_CONTRACT[path], (
        f"caproto {version('caproto')} changed {path}{inspect.signature(method)}: "  # type: ignore[arg-type]
        "recheck the override in apsdm/gateway/ca.py, then update CAPROTO_CONTRACT")


def test_caproto_is_the_pinned_minor_release() -> None:
    assert version("caproto").startswith("1.3."), "ca.py was checked against caproto 1.3"
