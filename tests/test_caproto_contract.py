"""The caproto internals the CA layer overrides or follows must be the ones it was written
against: an upgrade that changes one fails here, by name, instead of breaking the IOC."""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import inspect
from collections import defaultdict, deque
from importlib.metadata import version
from types import SimpleNamespace
from typing import Any

import pytest

from apsdm.gateway.ca import BATCH_LONGEST, CAPROTO_CONTRACT, WORTH_A_PACKET


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


class _Wire:
    """A circuit's client end that keeps what caproto's send loop writes to it; ``gone``:
    the client left (a send fails as on a reset socket), ``stuck``: a send never ends."""

    def __init__(self, gone: bool = False, stuck: bool = False) -> None:
        from apsdm.gateway.ca import _CaReader

        self.reader, self.sent = _CaReader(), asyncio.Queue[bytes]()
        self.gone, self.stuck = gone, stuck
        self.sends = 0  # begun

    def getsockname(self) -> tuple[str, int]:
        return "127.0.0.1", 5064

    async def send(self, data: bytes) -> None:
        self.sends += 1
        if self.gone:
            raise ConnectionResetError("reset by peer")
        if self.stuck:
            await asyncio.Event().wait()
        self.sent.put_nowait(data)

    def close(self) -> None:
        self.gone = True


class _Spec:
    """A subscription spec, as caproto's circuit uses it when it closes."""

    def __init__(self) -> None:
        self.db_entry = SimpleNamespace(max_subscription_backlog=1000, unsubscribe=self.unsubscribe)

    async def unsubscribe(self, queue: object, spec: object) -> None:
        pass


async def _monitored_circuit(wire: _Wire, updates: int, later: int = 0) -> Any:
    """A CA layer circuit over ``wire`` with one subscription, ``updates`` monitor updates
    of a short text (48 bytes each) lined up, and caproto's send loop running; ``later``
    more updates are lined up once the loop waits for them."""
    import caproto
    from caproto import ChannelType
    from caproto._commands import data_payload

    from apsdm.gateway.ca import _ReleasingCircuit, _Update

    closed: list[object] = []

    async def circuit_disconnected(circuit: object) -> None:
        closed.append(circuit)

    context = SimpleNamespace(subscription_queue=asyncio.Queue(), subscriptions=defaultdict(deque),
                              circuit_disconnected=circuit_disconnected, closed=closed)
    circuit = _ReleasingCircuit(caproto.VirtualCircuit(caproto.SERVER, ("127.0.0.1", 1), None),
                                wire, context)
    spec = _Spec()
    sub = SimpleNamespace(subscriptionid=7, db_entry=spec.db_entry)
    circuit.subscriptions[spec].append(sub)
    context.subscriptions[spec].append(sub)
    circuit.circuit.event_add_commands[7] = None
    text = b'{"m": 1234}\0'

    async def line_up(count: int) -> None:
        for _ in range(count):
            size, *buffers = data_payload(text, caproto.DBR_TYPES[ChannelType.TIME_CHAR](),
                                          ChannelType.TIME_CHAR, len(text))
            await circuit.line_up(spec, sub, _Update(size, buffers, ChannelType.TIME_CHAR,
                                                     len(text), 7))
    await line_up(updates)
    circuit._sub_task = circuit.tasks.create(circuit.subscription_queue_loop())
    if later:
        await asyncio.sleep(0.01)  # the loop takes what was lined up and waits
        await line_up(later)
    return circuit


async def _updates_sent(count: int, later: int) -> list[bytes]:
    """What caproto's send loop writes within 0.2 s of ``count`` updates lined up (and
    ``later`` more while it waits)."""
    wire = _Wire()
    circuit = await _monitored_circuit(wire, count, later)
    sent: list[bytes] = []
    try:
        while True:
            sent.append(await asyncio.wait_for(wire.sent.get(), 0.2))
    except TimeoutError:
        return sent
    finally:
        circuit._sub_task.cancel()


_BELOW = WORTH_A_PACKET // 48  # updates of 48 bytes: one more is a packet's worth


@pytest.mark.parametrize(("count", "later", "at_once"), [
    (50, 0, 50 * 48), (1, 0, 0), (_BELOW, 0, 0),
    (0, _BELOW + 1, (_BELOW + 1) * 48),  # the first one taken by a wait counts too
])
def test_a_burst_worth_a_packet_is_sent_when_it_ends(monkeypatch: pytest.MonkeyPatch, count: int,
                                                     later: int, at_once: int) -> None:
    """The CA layer ends caproto's gathering of updates (None from get_from_sub_queue) once
    WORTH_A_PACKET bytes are gathered and no more are queued; fewer wait for company (50
    monitors of one PV, against one monitor or a few). caproto's loop must send on that None.
    Quiet and first gathering time are 30 s here, so only that rule sends within 0.2 s."""
    from caproto.server import common

    from apsdm.gateway import ca

    monkeypatch.setattr(common, "HIGH_LOAD_TIMEOUT", 30.0)
    monkeypatch.setattr(ca, "_BATCH_QUIET", 30.0)
    sent = asyncio.run(_updates_sent(count, later))
    assert sum(map(len, sent)) == at_once, sent


@pytest.mark.parametrize("found_by", ["update loop", "command loop"])
def test_a_client_gone_mid_send_releases_its_circuit(found_by: str) -> None:
    """A client that leaves while its updates are being sent: found by the update loop (its
    send fails) or by the command loop (end of stream) while a send hangs. caproto's close
    cancelled and awaited the update loop from within it, or re-raised that loop's
    CancelledError in the command loop: the circuit stayed, held by its socket's reader."""
    asyncio.run(_gone_mid_send(found_by))


async def _gone_mid_send(found_by: str) -> None:
    wire = _Wire(gone=found_by == "update loop", stuck=found_by == "command loop")
    circuit = await _monitored_circuit(wire, 50)
    loop = circuit._sub_task
    if found_by == "update loop":
        await asyncio.wait_for(asyncio.wait([loop]), 5)
        assert circuit.context.closed == [circuit]
    await asyncio.sleep(0.05)  # the command loop's turn: its receive ends
    assert wire.sends == 1  # while the update loop was in its send
    await asyncio.wait_for(circuit._on_disconnect(), 5)  # raises nothing
    assert loop.done() and circuit.client.reader.answer is None
    assert not circuit.connected and circuit.subscription_queue.empty()
