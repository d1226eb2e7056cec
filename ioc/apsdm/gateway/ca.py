"""The Channel Access server (caproto), built from the schema and fed by the hub.

Each CA channel is a caproto ChannelData whose client writes go through
:meth:`Hub.put`; the hub's posts come back through :meth:`CaServer.publish`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

from caproto import (
    AccessRights,
    AlarmSeverity,
    AlarmStatus,
    ChannelChar,
    ChannelDouble,
    ChannelEnum,
    ChannelInteger,
    ChannelString,
    ChannelType,
    EventAddResponse,
)
from caproto._data import SkipWrite
from caproto._dbr import native_float_types, native_type
from caproto.asyncio.server import Context, VirtualCircuit

from .hub import Alarm, Hub, PutRejected, Writer, current_writer
from .schema import PV, Kind

log = logging.getLogger(__name__)


class _GatewayChannel:
    """Mixin: access rights from the hub, and client writes handed to the hub."""

    hub: Hub
    pv: PV

    def check_access(self, hostname: str, username: str) -> AccessRights:
        if self.hub.may_write(self.pv, hostname, username):
            return AccessRights.READ | AccessRights.WRITE
        return AccessRights.READ

    async def auth_write(self, hostname: str, username: str, data: Any, data_type: Any,
                         metadata: Any, *, flags: int = 0, user_address: Any = None) -> Any:
        address = user_address[0] if user_address else ""
        token = current_writer.set(Writer("ca", hostname, username, address))
        try:
            return await super().auth_write(  # type: ignore[misc]
                hostname, username, data, data_type, metadata, flags=flags,
                user_address=user_address)
        finally:
            current_writer.reset(token)

    async def write_from_dbr(self, data: Any, data_type: Any, metadata: Any, *,
                             flags: int = 0) -> Any:
        """A client write from the wire; one caproto cannot convert is refused via the hub."""
        try:
            # caproto 1.3 cannot convert an all-NUL CHAR array (an empty string) from the
            # wire; that is how CA clients clear a long string, so take it as ""
            if data_type in (ChannelType.CHAR, ChannelType.TIME_CHAR) and not any(bytes(data)):
                return await self.write("", flags=flags)
            # caproto would cast a float to a choice index (NaN and 1.5 included): let the
            # hub check the number itself, as it does for PVA
            if (self.pv.field.kind in (Kind.ENUM, Kind.BUSY) and len(data) == 1
                    and native_type(data_type) in native_float_types):
                return await self.write(float(data[0]), flags=flags)
            return await super().write_from_dbr(  # type: ignore[misc]
                data, data_type, metadata, flags=flags)
        except (UnicodeError, ValueError, TypeError) as exc:  # before the hub saw the value
            why = str(exc) or str(exc.__cause__ or "") or type(exc).__name__
            refusal = PutRejected(f"{self.pv.name}: value refused ({why})")
            await self.hub.refused(self.pv, refusal, current_writer.get() or Writer("ca", "", ""))
            raise refusal from None

    async def write(self, *args: Any, **kwargs: Any) -> Any:
        # caproto marks a refused write WRITE/MAJOR on this channel only; show the hub's
        # alarm instead, so CA and PVA agree and no stale alarm sticks to a setting
        try:
            return await super().write(*args, **kwargs)  # type: ignore[misc]
        except Exception:
            alarm = self.hub.alarms[self.pv.name]
            await self.alarm.write(status=AlarmStatus(alarm.status),  # type: ignore[attr-defined]
                                   severity=AlarmSeverity(alarm.severity))
            raise

    async def verify_value(self, value: Any) -> Any:
        writer = current_writer.get() or Writer("ca", "", "")
        await self.hub.put(self.pv.name, value, writer)
        raise SkipWrite()  # the hub has stored and published the value already


def _channel(pv: PV, hub: Hub) -> Any:
    """The caproto channel for one schema PV."""
    f = pv.field
    if f.kind is Kind.STRING:  # UTF-8 as on PVA (caproto's default is latin-1)
        base, kw = ChannelString, {"value": "", "string_encoding": "utf-8"}
    elif f.kind is Kind.LONGSTRING:
        base, kw = ChannelChar, {"value": "", "max_length": f.max_length,
                                 "string_encoding": "utf-8"}
    elif f.kind is Kind.LONG:
        base, kw = ChannelInteger, {"value": 0, "units": f.egu}
    elif f.kind is Kind.DOUBLE:
        base, kw = ChannelDouble, {"value": 0.0, "units": f.egu, "precision": 2}
    else:  # ENUM, BUSY
        base, kw = ChannelEnum, {"value": f.enums[0], "enum_strings": list(f.enums)}
    cls = type(f"Gateway{base.__name__}", (_GatewayChannel, base), {})
    chan = cls(**kw)
    chan.hub, chan.pv = hub, pv
    return chan


class _ReleasingCircuit(VirtualCircuit):
    """caproto's circuit, letting go of each monitor update once it is on the wire.

    caproto keeps the newest ``max_subscription_backlog`` (1,000) updates of every
    subscription so that a slow client gets the latest news first, but it never drops
    them after sending: every monitored PV then holds 1,000 old updates, and the IOC's
    memory grows with uptime. Here only updates not yet sent count against the backlog.
    """

    async def send(self, *commands: Any) -> None:
        await super().send(*commands)
        for command in commands:
            if isinstance(command, EventAddResponse):
                # updates of one subscription are sent in the order they were queued, so
                # one still held (not pushed out by newer ones) is the oldest held
                held = self.unexpired_updates.get(command.subscriptionid)
                if held and held[0] is command:
                    held.popleft()

    async def _cull_subscriptions(self, db_entry: Any, func: Any) -> Any:
        removed = await super()._cull_subscriptions(db_entry, func)
        for _spec, sub in removed:  # a cancelled subscription's queue goes with it
            self.unexpired_updates.pop(sub.subscriptionid, None)
        return removed

    async def _on_disconnect(self) -> None:
        await super()._on_disconnect()
        # nothing sends this queue any more: empty it, so an update being queued (the
        # context waits while a queue is full) cannot hold up every other client
        self.unexpired_updates.clear()
        while not self.subscription_queue.empty():
            self.subscription_queue.get_nowait()


class _NoDelayContext(Context):
    """caproto's context with TCP_NODELAY on client sockets (else 40 ms put stalls),
    whose circuits release monitor updates once sent, and whose update loop outlives
    clients that leave in mid-burst."""

    CircuitClass = _ReleasingCircuit

    async def _subscription_queue_iteration(self, sub_specs: Any, metadata: Any, values: Any,
                                            flags: int, sub: Any) -> None:
        """Hand one update to every subscription it is for. caproto walks the live list of
        subscriptions while it waits on each circuit's queue; a client that disconnects
        meanwhile changes that list, and the error ended caproto's update loop for good
        (no monitor got anything after). Walk a copy, and skip circuits that are gone."""
        if sub is not None:  # the first update of one new subscription
            await super()._subscription_queue_iteration(sub_specs, metadata, values, flags, sub)
            return
        for spec in sub_specs:
            for each in tuple(self.subscriptions[spec]):
                if each.circuit.connected:
                    await self._subscription_queue_send(spec, each, metadata=metadata,
                                                        values=values, flags=flags)

    async def server_accept_loop(self, sock: socket.socket) -> None:
        # Linux hands the listening socket's TCP_NODELAY on to every accepted socket
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await super().server_accept_loop(sock)


class CaServer:
    """Serves every non-PVA-only schema PV over Channel Access on the given interfaces."""

    def __init__(self, hub: Hub, interfaces: list[str]) -> None:
        self.hub = hub
        self.channels = {pv.name: _channel(pv, hub) for pv in hub.pvs.values()
                         if not pv.field.pva_only}
        self.context = _NoDelayContext(self.channels, interfaces)
        self._task: asyncio.Task[None] | None = None
        hub.sinks.append(self)

    async def start(self) -> int:
        """Start serving; returns the TCP port once it is bound."""
        ready = asyncio.Event()

        async def startup(_async_lib: Any) -> None:
            ready.set()

        self._task = asyncio.create_task(self.context.run(startup_hook=startup))
        await asyncio.wait([self._task, asyncio.create_task(ready.wait())],
                           return_when=asyncio.FIRST_COMPLETED)
        if self._task.done():
            self._task.result()  # raise the bind error
        return int(self.context.port)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def publish(self, pv: PV, value: Any, alarm: Alarm, timestamp: float) -> None:
        chan = self.channels.get(pv.name)
        if chan is None:
            return
        if pv.field.kind in (Kind.ENUM, Kind.BUSY):
            value = pv.field.enums[int(value)]
        await chan.write(value, verify_value=False, timestamp=timestamp,
                         status=AlarmStatus(alarm.status),
                         severity=AlarmSeverity(alarm.severity))

