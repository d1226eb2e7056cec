"""The Channel Access server (caproto), built from the schema and fed by the hub.

Each CA channel is a caproto ChannelData whose client writes go through
:meth:`Hub.put`; the hub's posts come back through :meth:`CaServer.publish`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
from typing import Any

from caproto import (
    DBR_TYPES,
    AccessRights,
    AlarmSeverity,
    AlarmStatus,
    CaprotoConversionError,
    CAStatus,
    ChannelChar,
    ChannelData,
    ChannelDouble,
    ChannelEnum,
    ChannelInteger,
    ChannelShort,
    ChannelString,
    ChannelType,
    ErrorResponse,
    EventAddResponse,
    ReadNotifyRequest,
    native_float_types,
    native_type,
    native_types,
)
from caproto.asyncio.server import Context, VirtualCircuit

from .db_template import PREC, RECORD_TYPES
from .hub import Alarm, Hub, PutRejected, Writer, current_writer, fit
from .schema import PV, STRING, Kind

log = logging.getLogger(__name__)


class NoConversion(Exception):
    """A read of a view (e.g. DBR_DOUBLE) that the PV's value cannot be converted to."""


SEVERITY_NAMES = ("NO_ALARM", "MINOR", "MAJOR", "INVALID")  # menuAlarmSevr
STATUS_NAMES = tuple(AlarmStatus.__members__)[:16]  # menuAlarmStat; CA enums carry 16


class _ReadOnlyField(ChannelData):
    """A record field other than VAL: clients read it, only the gateway writes it."""

    def check_access(self, hostname: str, username: str) -> AccessRights:
        return AccessRights.READ


@functools.cache
def _field_class(base: type[ChannelData]) -> type[ChannelData]:
    return type(f"Field{base.__name__}", (_ReadOnlyField, base), {})


def _field_channel(base: type[ChannelData], **kw: Any) -> ChannelData:
    return _field_class(base)(**kw)


class _GatewayChannel:
    """Mixin: access rights from the hub, client writes handed to the hub, reads and
    record fields answered as an EPICS IOC (RSRV) answers them."""

    hub: Hub
    pv: PV
    fields: dict[str, ChannelData]

    def check_access(self, hostname: str, username: str) -> AccessRights:
        if self.hub.may_write(self.pv, hostname, username):
            return AccessRights.READ | AccessRights.WRITE
        return AccessRights.READ

    def get_field(self, name: str) -> ChannelData:
        """``PV.FIELD``: caproto's Context looks record fields up here (KeyError: none)."""
        if name == "VAL":
            return self  # type: ignore[return-value]
        return self.fields[name]

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

    async def write(self, value: Any, *, verify_value: bool = True, **kwargs: Any) -> Any:
        """The hub showing a value (``verify_value=False``), or a client write for the hub.

        A client write goes to the hub alone, which checks, stores and publishes it;
        caproto's ``write`` would mark a refusal WRITE/MAJOR on this PV, where the
        design says STATE/MINOR on the slot's Message_RBV (the hub posts that).
        """
        if not verify_value:
            return await super().write(value, verify_value=False, **kwargs)  # type: ignore[misc]
        writer = current_writer.get() or Writer("ca", "", "")
        await self.hub.put(self.pv.name, self.preprocess_value(value), writer)  # type: ignore[attr-defined]

    async def read(self, data_type: ChannelType) -> Any:
        """A get. caproto raises when the value has no such view (text as DBR_DOUBLE), and its
        circuit answers ECA_INTERNAL, on which libca aborts the client: raise NoConversion,
        which the circuit answers ECA_GETFAIL as RSRV does."""
        try:
            return await self._convert(data_type)
        except CaprotoConversionError as exc:
            raise NoConversion(str(exc)) from None

    async def _read(self, data_type: ChannelType) -> Any:
        """caproto's conversion for monitors (subscribe, publish): a view the value has no
        conversion to is sent zeroed (RSRV zeroes it too), never an error that ends the
        update of every other subscriber of this PV."""
        try:
            return await self._convert(data_type)
        except CaprotoConversionError:
            return zeroed(data_type, 1)

    async def _convert(self, data_type: ChannelType) -> Any:
        """caproto's conversion, with DBR_CTRL_STRING in EPICS's layout: caproto maps it to
        DBR_TIME_STRING (8 bytes of timestamp the client reads as text); db_access.h
        defines ``dbr_ctrl_string`` as ``dbr_sts_string``."""
        if data_type == ChannelType.CTRL_STRING:
            return await super()._read(ChannelType.STS_STRING)  # type: ignore[misc]
        return await super()._read(data_type)  # type: ignore[misc]

    async def show(self, value: Any, alarm: Alarm, timestamp: float) -> None:
        """Show a hub value, and the record fields that follow it (SEVR, STAT, NORD); a
        text longer than the char waveform (PVA may hold more) shows its first bytes."""
        if self.pv.field.kind is Kind.LONGSTRING:
            value = fit(str(value), self.pv.field.max_length - 1)
        await self.write(value, verify_value=False, timestamp=timestamp,
                         status=AlarmStatus(alarm.status), severity=AlarmSeverity(alarm.severity))
        live = {"SEVR": SEVERITY_NAMES[alarm.severity], "STAT": STATUS_NAMES[alarm.status]}
        if self.pv.field.kind is Kind.LONGSTRING:
            live["NORD"] = len(str(value).encode("utf-8"))
        for name, shown in live.items():
            await self.fields[name].write(shown, verify_value=False, timestamp=timestamp)


def zeroed(data_type: ChannelType, count: int) -> tuple[Any, list[int]]:
    """The metadata and ``count`` zero elements of ``data_type``: RSRV's failed read."""
    if data_type in native_types:
        return b"", [0] * count
    layout = ChannelType.STS_STRING if data_type == ChannelType.CTRL_STRING else data_type
    return DBR_TYPES[layout](), [0] * count


def _record_fields(pv: PV, rtype: str) -> dict[str, ChannelData]:
    """The fields (beyond VAL) of ``pv``'s record in db/apsdm.db, as CA channels."""
    f = pv.field
    text = {"NAME": fit(pv.name, STRING - 1), "DESC": f.desc, "RTYP": rtype}
    fields: dict[str, ChannelData] = {
        name: _field_channel(ChannelString, value=value) for name, value in text.items()}
    fields["SEVR"] = _field_channel(ChannelEnum, value="NO_ALARM", enum_strings=SEVERITY_NAMES)
    fields["STAT"] = _field_channel(ChannelEnum, value="NO_ALARM", enum_strings=STATUS_NAMES)
    if f.kind in (Kind.LONG, Kind.DOUBLE):
        number, cast = (ChannelDouble, float) if f.kind is Kind.DOUBLE else (ChannelInteger, int)
        fields["EGU"] = _field_channel(ChannelString, value=f.egu)
        fields["HOPR"] = _field_channel(number, value=cast(f.high))
        fields["LOPR"] = _field_channel(number, value=cast(f.low))
    if f.kind is Kind.DOUBLE:
        fields["PREC"] = _field_channel(ChannelShort, value=PREC)
    if f.kind is Kind.LONGSTRING:
        fields["NELM"] = _field_channel(ChannelInteger, value=f.max_length)
        fields["NORD"] = _field_channel(ChannelInteger, value=0)
    return fields


def _channel(pv: PV, hub: Hub) -> Any:
    """The caproto channel for one schema PV, with its record fields."""
    f = pv.field
    if f.kind is Kind.STRING:  # UTF-8 as on PVA (caproto's default is latin-1)
        base, kw = ChannelString, {"value": "", "string_encoding": "utf-8"}
    elif f.kind is Kind.LONGSTRING:
        base, kw = ChannelChar, {"value": "", "max_length": f.max_length,
                                 "string_encoding": "utf-8"}
    elif f.kind is Kind.LONG:
        base, kw = ChannelInteger, {"value": 0, "units": f.egu, "upper_disp_limit": int(f.high),
                                    "lower_disp_limit": int(f.low)}
    elif f.kind is Kind.DOUBLE:
        base, kw = ChannelDouble, {"value": 0.0, "units": f.egu, "precision": PREC,
                                   "upper_disp_limit": f.high, "lower_disp_limit": f.low}
    else:  # ENUM, BUSY
        base, kw = ChannelEnum, {"value": f.enums[0], "enum_strings": list(f.enums)}
    rtype = RECORD_TYPES[f.kind][f.writable]
    cls = type(f"Gateway{base.__name__}", (_GatewayChannel, base), {})
    chan = cls(reported_record_type=rtype, **kw)
    chan.hub, chan.pv, chan.fields = hub, pv, _record_fields(pv, rtype)
    return chan


# The caproto methods the classes above and below override or follow, with the sha256 of
# their source in the pinned caproto (pyproject.toml): tests/test_caproto_contract.py fails
# when an upgrade changes one, so each workaround is looked at again, not silently broken.
# Upstream: none of the caproto 1.3.0 bugs worked around here (each named at its override:
# ECA_INTERNAL for a failed conversion, CTRL_STRING in the TIME_STRING layout, WRITE/MAJOR
# on any refused put, sent updates kept, a disconnect ending the update loop, a closed
# circuit never released, no TCP_NODELAY) has an issue in caproto's tracker as of
# 2026-12-02; each is to be reported.
CAPROTO_CONTRACT = {
    "caproto.server.common.VirtualCircuit._process_command": "89a0a95c53667d18",
    "caproto.server.common.VirtualCircuit._cull_subscriptions": "e064982f67823273",
    "caproto.server.common.VirtualCircuit._on_disconnect": "2ad02294d15535e9",
    "caproto.server.common.VirtualCircuit.send": "54f6a3a555bfed63",
    "caproto.server.common.VirtualCircuit.subscription_queue_loop": "74dfdc49755e3d43",
    "caproto.asyncio.server.VirtualCircuit.get_from_sub_queue": "71678a18f5cf6188",
    "caproto.asyncio.server.VirtualCircuit._on_disconnect": "b818afa66500f8f9",
    "caproto.server.common.Context._subscription_queue_iteration": "86379b92d50fbbe4",
    "caproto.server.common.Context._subscription_queue_send": "6a7f5658052ea27b",
    "caproto.server.common.Context.__getitem__": "26d664db4565a9e2",
    "caproto.asyncio.server.Context.server_accept_loop": "34069b7c6cf827fd",
    "caproto._data.ChannelData._read": "854b3d71abead0c5",
    "caproto._data.ChannelData.read": "be757bb7d2bfd4b1",
    "caproto._data.ChannelData.write": "e2df3ddb190a8e8f",
    "caproto._data.ChannelData.write_from_dbr": "0c24f87816c10b15",
    "caproto._data.ChannelData.auth_write": "aa62a7a715e965a2",
}


class _ReleasingCircuit(VirtualCircuit):
    """caproto's circuit, letting go of each monitor update once it is on the wire, and
    answering a read that has no conversion as RSRV does.

    caproto keeps the newest ``max_subscription_backlog`` (1,000) updates of every
    subscription so that a slow client gets the latest news first, but it never drops
    them after sending: every monitored PV then holds 1,000 old updates, and the IOC's
    memory grows with uptime. Here only updates not yet sent count against the backlog.
    """

    async def _process_command(self, command: Any) -> Any:
        """caproto answers any exception of a read with ECA_INTERNAL, on which libca calls
        abort(): answer a read the value has no conversion for with ECA_GETFAIL and zeroed
        data, as RSRV's read_notify_reply does (a get the client survives)."""
        try:
            return await super()._process_command(command)
        except NoConversion as exc:
            chan, _db_entry = self._get_db_entry_from_command(command)
            if not isinstance(command, ReadNotifyRequest):  # the old ca_array_get
                return [ErrorResponse(command, chan.cid, status=CAStatus.ECA_GETFAIL,
                                      error_message=str(exc))]
            metadata, data = zeroed(command.data_type, command.data_count)
            return [chan.read(data=data, data_type=command.data_type,
                              data_count=command.data_count, status=CAStatus.ECA_GETFAIL,
                              ioid=command.ioid, metadata=metadata, notify=True)]

    async def get_from_sub_queue(self, timeout: float | None = None) -> Any:
        """caproto's wait for the next update. When a client leaves abruptly, the cancel of
        this wait can be lost (seen: the task 'cancelling' yet waiting again), and the
        closing command loop then awaits it forever: the circuit, its channels and held
        updates stay (about 0.6 MB per client). So the wait also ends once closed."""
        if timeout is not None:
            return await super().get_from_sub_queue(timeout)
        while self.connected:
            ref = await super().get_from_sub_queue(1.0)
            if ref is not None:
                return ref
        raise asyncio.CancelledError  # caproto's loop ends on it

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
        """caproto removes a cancelled subscription but keeps its queue of held updates."""
        removed = await super()._cull_subscriptions(db_entry, func)
        for _spec, sub in removed:  # a cancelled subscription's queue goes with it
            self.unexpired_updates.pop(sub.subscriptionid, None)
        return removed

    async def _on_disconnect(self) -> None:
        """caproto leaves a closed circuit's queues full of updates nobody will send."""
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
        """caproto binds its listening socket with proto=0, so asyncio never sets
        TCP_NODELAY on accepted sockets (Nagle + delayed ACK: 40 ms put-callback stalls
        while a monitor is active). Linux hands the listening socket's option on."""
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
        await chan.show(value, alarm, timestamp)

