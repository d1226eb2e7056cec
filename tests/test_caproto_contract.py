"""The caproto internals the CA layer overrides or follows must be the ones it was written
against: an upgrade that changes one fails here, by name, instead of breaking the IOC."""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import inspect
from importlib.metadata import version

import pytest

from apsdm.gateway.ca import BATCH_LONGEST, CAPROTO_CONTRACT


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


def test_the_update_batching_limit_is_still_the_global_caproto_reads() -> None:
    """ca.py caps how long caproto gathers updates by setting caproto's module global; its
    send loop (in CAPROTO_CONTRACT) must still read that global for the cap to hold."""
    from caproto.server import common

    loop = inspect.getsource(common.VirtualCircuit.subscription_queue_loop)
    assert common.MAX_LATENCY == BATCH_LONGEST and "min(MAX_LATENCY, latency_limit * 2)" in loop


def test_received_bytes_are_offered_to_the_circuit_before_caproto_reads_them() -> None:
    """The CA layer's get fast path (ca._CaReader) rests on asyncio's stream protocol
    handing each received chunk to its reader's feed_data, and on the reader's _buffer."""
    asyncio.run(_offer_three_chunks())


async def _offer_three_chunks() -> None:
    from apsdm.gateway.ca import _CaReader

    offered: list[bytes] = []

    def answer(data: bytes) -> int:
        offered.append(data)
        return 16 if data.startswith(b"get") else 0  # "answered" the first 16 bytes

    reader = _CaReader()
    reader.answer = answer
    protocol = asyncio.StreamReaderProtocol(reader)
    protocol.data_received(b"get".ljust(16) + b"write")
    protocol.data_received(b"get".ljust(16))  # behind bytes not yet read: not offered
    assert offered == [b"get".ljust(16) + b"write"]
    assert await reader.read(100) == b"write" + b"get".ljust(16)
    protocol.data_received(b"get".ljust(16))  # all read: offered, answered, nothing kept
    assert len(offered) == 2
    protocol.eof_received()
    assert await reader.read(100) == b""
