"""The Channel Access server (caproto), built from the schema and fed by the hub.

Each CA channel is a caproto ChannelData whose client writes go through
:meth:`Hub.put`; the hub's posts come back through :meth:`CaServer.publish`.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import ctypes
import functools
import logging
import math
import re
import socket
import struct
import weakref
from collections.abc import Callable
from typing import Any

import numpy
from caproto import (
    CONNECTED,
    DBR_TYPES,
    AccessRights,
    AlarmSeverity,
    AlarmStatus,
    CaprotoConversionError,
    CaprotoNetworkError,
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
    ReadNotifyResponse,
    ReadRequest,
    SubscriptionType,
    TimeStamp,
    WriteNotifyRequest,
    WriteRequest,
    native_float_types,
    native_type,
    native_types,
)
from caproto._commands import Message, data_payload
from caproto._dbr import DbrStringArray, _LongStringChannelType
from caproto._headers import EventAddResponseHeader
from caproto._status import ensure_eca_value
from caproto.asyncio.server import AsyncioEvent, Context, VirtualCircuit
from caproto.asyncio.utils import _TransportWrapper
from caproto.server import common as caproto_server_common
from caproto.server.common import DisconnectedCircuit

from .db_template import PREC, RECORD_TYPES
from .hub import Alarm, Hub, PutRejected, Writer, current_writer, fit
from .memory import give_back_soon
from .schema import PV, STRING, Kind

log = logging.getLogger(__name__)


class NoConversion(Exception):
    """A read of a view (e.g. DBR_DOUBLE) that the PV's value cannot be converted to."""


SEVERITY_NAMES = ("NO_ALARM", "MINOR", "MAJOR", "INVALID")  # menuAlarmSevr
STATUS_NAMES = tuple(AlarmStatus.__members__)[:16]  # menuAlarmStat; CA enums carry 16


# the alarm and warning limits of DBR_GR/CTRL_FLOAT/DOUBLE: an EPICS 7 record without
# alarm limits (and every record type that has none) sends them as NaN; integer views, 0
_ALARM_LIMITS = ("upper_alarm_limit", "upper_warning_limit", "lower_warning_limit",
                 "lower_alarm_limit")
_NAN_LIMITED = frozenset({ChannelType.GR_FLOAT, ChannelType.GR_DOUBLE,
                          ChannelType.CTRL_FLOAT, ChannelType.CTRL_DOUBLE})
# the C type of upper_ctrl_limit in each DBR_CTRL_* type that has one
_CTRL_LIMIT_TYPE = {t: dict(DBR_TYPES[t]._fields_)["upper_ctrl_limit"] for t in ChannelType
                    if t.name.startswith("CTRL_") and "upper_ctrl_limit" in dict(DBR_TYPES[t]._fields_)}
# C strtod's view of text (EPICS's string-to-number conversion reads a leading number)
_LEADING_NUMBER = re.compile(
    r"\s*([+-]?(?:\d+\.?\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?|inf(?:inity)?|nan))", re.I)


def leading_number(text: str) -> float:
    """A DBF_STRING value read as a number as an EPICS IOC reads it (dbConvert): blank is
    0, else the number the text starts with ("0.1.0" is 0.1); none: NoConversion."""
    if not text:
        return 0.0
    match = _LEADING_NUMBER.match(text)
    if match is None:
        raise NoConversion(f"no number in {text[:40]!r}")
    return float(match.group(1))


class _RsrvReads(ChannelData):
    """caproto's reads, answered as an EPICS IOC (RSRV) answers them: NaN alarm limits,
    a bo's control range, text read as a number, long strings with their NUL and
    DBF_STRING's 40 characters as ``.VAL$``. caproto 1.3 bugs, to report upstream."""

    upper_ctrl_limit_raw: int | None = None  # a bo's: 65535 (DBF_ENUM's range), wrapped per type

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # the encoded answers to reads of the current value: (channel name, DBR type,
        # count) -> (header up to the ioid, header after it, payload); a get of an
        # unchanged PV is then one dict lookup (see _ReleasingCircuit._cached)
        self.answers: dict[tuple[str, int, int], tuple[bytes, bytes, bytes]] = {}
        self.version = 0  # counts changes; an answer read before a change is not kept

    def _changed(self) -> None:
        self.version += 1
        self.answers.clear()

    async def write_metadata(self, *args: Any, **kwargs: Any) -> Any:
        """Every change of value, alarm, timestamp or limits passes here (caproto's write
        calls it after storing the value) or through :meth:`publish`."""
        self._changed()
        return await super().write_metadata(*args, **kwargs)

    async def publish(self, flags: Any) -> Any:
        self._changed()
        return await super().publish(flags)

    async def read(self, data_type: ChannelType) -> Any:
        """A get. caproto raises when the value has no such view (text as DBR_DOUBLE), and its
        circuit answers ECA_INTERNAL, on which libca aborts the client: raise NoConversion,
        which the circuit answers ECA_GETFAIL as RSRV does."""
        try:
            return await self._rsrv_read(data_type)
        except CaprotoConversionError as exc:
            raise NoConversion(str(exc)) from None

    async def _read(self, data_type: ChannelType) -> Any:
        """The conversion of monitors (subscribe, publish): a view the value has no
        conversion to is sent zeroed (RSRV zeroes it too), never an error that ends the
        update of every other subscriber of this PV."""
        try:
            return await self._rsrv_read(data_type)
        except (CaprotoConversionError, NoConversion):
            return zeroed(data_type, 1)

    async def _rsrv_read(self, data_type: ChannelType) -> Any:
        if data_type == ChannelType.CTRL_STRING:
            # caproto maps CTRL_STRING to the TIME_STRING layout (8 bytes of timestamp the
            # client reads as text); db_access.h: dbr_ctrl_string is dbr_sts_string
            metadata, values = await ChannelData._read(self, ChannelType.STS_STRING)
        elif (self.data_type == ChannelType.STRING and data_type not in _LongStringChannelType
              and native_type(data_type) in _NUMERIC):
            # caproto fails on text that starts with a number, and would end a monitor
            values = [_NUMERIC[native_type(data_type)](leading_number(self.value))]
            metadata, _ = await ChannelData._read(self, _STRING_OF_FORM[data_type])
            if data_type not in native_types:
                metadata = self._metadata_as(data_type, metadata)
        else:
            metadata, values = await ChannelData._read(self, data_type)
        if data_type in _NAN_LIMITED:
            for name in _ALARM_LIMITS:
                setattr(metadata, name, math.nan)
        limit = _CTRL_LIMIT_TYPE.get(data_type) if self.upper_ctrl_limit_raw is not None else None
        if limit is not None:  # wrapped to the limit's C type as C does
            raw = self.upper_ctrl_limit_raw
            metadata.upper_ctrl_limit = bytes([raw & 0xFF]) if limit is ctypes.c_char else limit(raw).value
        if (count := requested_count.get()) > 1 and len(values) < count:  # RSRV pads
            values = _padded(values, count)
        if self.data_type == ChannelType.CHAR:  # a long string: its NUL is sent too (lsi)
            if isinstance(values, numpy.ndarray) and values.dtype.itemsize == 1:
                # as bytes caproto sends it as it is; an array it converts once more for
                # every client and every monitor
                values = values.tobytes()
            values = _with_nul(values)
        elif data_type in _LongStringChannelType:  # DBF_STRING as .VAL$: all 40 characters
            # (an array: caproto counts bytes of a DBF_STRING channel as one element)
            values = numpy.frombuffer(bytes(values)[:STRING].ljust(STRING, b"\0"), numpy.uint8)
        return metadata, values

    def _metadata_as(self, data_type: ChannelType, string_metadata: Any) -> Any:
        """``data_type``'s metadata for a string channel: its alarm and time (else zero)."""
        metadata = DBR_TYPES[data_type]()
        for name, _ctype in string_metadata._fields_:
            if hasattr(metadata, name) and name != "value":
                setattr(metadata, name, getattr(string_metadata, name))
        return metadata


def _with_nul(values: Any) -> Any:
    """A long string's elements and the terminating NUL an lsi sends (its LEN counts it)."""
    return _padded(values, len(values) + 1)


def _padded(values: Any, count: int) -> Any:
    """``values`` and zero elements up to ``count``: an array read for more elements than
    it holds, as RSRV sends it (caproto sends fewer than asked for)."""
    more = count - len(values)
    if isinstance(values, bytes | bytearray):
        return bytes(values) + bytes(more)
    if isinstance(values, list | DbrStringArray):
        return type(values)([*values, *[b""] * more])
    return numpy.append(values, numpy.zeros(more, values.dtype))


# the element count of the read being answered (0: as many as the value has), which
# caproto does not hand to the channel; set by the circuit for its task
requested_count: contextvars.ContextVar[int] = contextvars.ContextVar("requested_count", default=0)


_NUMERIC: dict[ChannelType, type] = {
    ChannelType.INT: int, ChannelType.CHAR: int, ChannelType.LONG: int,
    ChannelType.FLOAT: float, ChannelType.DOUBLE: float}
_STRING_OF_FORM = {t: ChannelType.STRING if t in native_types else
                   ChannelType.STS_STRING if t.name.startswith(("STS_", "GR_", "CTRL_"))
                   else ChannelType.TIME_STRING for t in ChannelType if t.value <= 34}


class _ReadOnlyField(_RsrvReads):
    """A record field other than VAL: clients read it, only the gateway writes it. Its
    time is its record's (as a record's fields are read from an IOC), so a change of the
    record need not write every field."""

    record: ChannelData | None = None

    def check_access(self, hostname: str, username: str) -> AccessRights:
        return AccessRights.READ

    @property
    def epics_timestamp(self) -> Any:
        return super().epics_timestamp if self.record is None else self.record.epics_timestamp

    @property
    def timestamp(self) -> float:
        return super().timestamp if self.record is None else self.record.timestamp


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

    def _changed(self) -> None:
        super()._changed()  # type: ignore[misc]
        for field in getattr(self, "fields", {}).values():  # they carry this record's time
            field._changed()

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

    async def write(self, value: Any, **_kwargs: Any) -> Any:
        """A client write, for the hub (which shows values through :meth:`_store`).

        It goes to the hub alone, which checks, stores and publishes it; caproto's
        ``write`` would mark a refusal WRITE/MAJOR on this PV, where the design says
        STATE/MINOR on the slot's Message_RBV (the hub posts that).
        """
        writer = current_writer.get() or Writer("ca", "", "")
        await self.hub.put(self.pv.name, self.preprocess_value(value), writer)  # type: ignore[attr-defined]

    async def _store(self, value: Any, timestamp: float, status: AlarmStatus,
                     severity: AlarmSeverity) -> None:
        """caproto's ``write(verify_value=False)`` of a value the hub has checked, less what
        does nothing here and cost a quarter of a put: its verify and update hooks, a loop
        over ten metadata keywords, and an alarm rewritten and published when unchanged.
        A write a client's sync filter waits on (a snapshot to take) is caproto's own."""
        if self._fill_at_next_write:  # type: ignore[attr-defined]
            await super().write(value, verify_value=False,  # type: ignore[misc]
                                timestamp=timestamp, status=status, severity=severity)
            return
        value = self.preprocess_value(value)  # type: ignore[attr-defined]
        # what changed, as an EPICS record posts it (a monitor's mask picks what it gets)
        flags = _VALUE_POST if _differ(self._data["value"], value) else 0  # type: ignore[attr-defined]
        self._data["value"] = value  # type: ignore[attr-defined]
        self._data["timestamp"] = TimeStamp.from_flexible_value(timestamp)  # type: ignore[attr-defined]
        alarm = self.alarm  # type: ignore[attr-defined]
        if (alarm.status, alarm.severity) != (status, severity):
            await alarm.write(status=status, severity=severity, publish=False)
            await alarm.publish(SubscriptionType.DBE_ALARM, except_for=(self,))
            flags |= SubscriptionType.DBE_ALARM
        # a new time alone is posted as a value is (an EPICS record with MDEL -1 does)
        await self.publish(flags or _VALUE_POST)  # type: ignore[attr-defined]

    async def show(self, value: Any, alarm: Alarm, timestamp: float) -> None:
        """Show a hub value, and the record fields that follow it (SEVR, STAT, LEN, NORD); a
        text longer than the char waveform (PVA may hold more) shows its first bytes."""
        if self.pv.field.kind is Kind.LONGSTRING:
            value = fit(str(value), self.pv.field.max_length - 1)
        await self._store(value, timestamp, AlarmStatus(alarm.status),
                          AlarmSeverity(alarm.severity))
        live = {"SEVR": SEVERITY_NAMES[alarm.severity], "STAT": STATUS_NAMES[alarm.status]}
        if self.pv.field.kind is Kind.LONGSTRING:  # the NUL counts (lsi's LEN)
            live["LEN"] = live["NORD"] = len(str(value).encode("utf-8")) + 1
        for name, shown in live.items():
            field = self.fields[name]
            if field.value != shown:  # RSRV posts a field's monitors only when it changes
                await field.write(shown, verify_value=False, timestamp=timestamp)


_VALUE_POST = SubscriptionType.DBE_VALUE | SubscriptionType.DBE_LOG


def _differ(old: Any, new: Any) -> bool:
    """Whether a value changed (arrays element by element)."""
    if isinstance(old, numpy.ndarray) or isinstance(new, numpy.ndarray):
        return not numpy.array_equal(old, new)
    return bool(old != new)


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
    if f.kind in (Kind.LONG, Kind.DOUBLE):  # HOPR, LOPR: EGU, PREC and the range of the field's DBF
        if f.kind is Kind.DOUBLE:
            number, cast, span = ChannelDouble, float, {"precision": PREC, **_range(1e300)}
        else:
            number, cast, span = ChannelInteger, int, _range(2**31 - 1)
        fields["EGU"] = _field_channel(ChannelString, value=f.egu)
        fields["HOPR"] = _field_channel(number, value=cast(f.high), units=f.egu, **span)
        fields["LOPR"] = _field_channel(number, value=cast(f.low), units=f.egu, **span)
    if f.kind is Kind.DOUBLE:
        fields["PREC"] = _field_channel(ChannelShort, value=PREC, **_range(2**15 - 1))
    if f.kind is Kind.LONGSTRING:  # lsi/lso: LEN (with the NUL), SIZV; and as a waveform
        for name in ("LEN", "NORD"):
            fields[name] = _field_channel(ChannelInteger, value=1)
        for name in ("SIZV", "NELM"):
            fields[name] = _field_channel(ChannelInteger, value=f.max_length)
    return fields


def _range(high: float) -> dict[str, float]:
    """Display and control limits of a field of a numeric DBF without limits of its own."""
    low = -high - (1 if isinstance(high, int) else 0)
    return {"upper_disp_limit": high, "lower_disp_limit": low,
            "upper_ctrl_limit": high, "lower_ctrl_limit": low}


def _channel(pv: PV, hub: Hub) -> Any:
    """The caproto channel for one schema PV, with its record fields."""
    f = pv.field
    if f.kind is Kind.STRING:  # UTF-8 as on PVA (caproto's default is latin-1)
        base, kw = ChannelString, {"value": "", "string_encoding": "utf-8",
                                   "long_string_max_length": STRING}
    elif f.kind is Kind.LONGSTRING:
        base, kw = ChannelChar, {"value": "", "max_length": f.max_length,
                                 "string_encoding": "utf-8"}
    elif f.kind is Kind.LONG:
        base, kw = ChannelInteger, {"value": 0, "units": f.egu, "upper_disp_limit": int(f.high),
                                    "lower_disp_limit": int(f.low)}
    elif f.kind is Kind.DOUBLE:
        base, kw = ChannelDouble, {"value": 0.0, "units": f.egu, "precision": PREC,
                                   "upper_disp_limit": f.high, "lower_disp_limit": f.low,
                                   "upper_ctrl_limit": f.high, "lower_ctrl_limit": f.low}
    else:  # ENUM, BUSY
        base, kw = ChannelEnum, {"value": f.enums[0], "enum_strings": list(f.enums)}
    rtype = RECORD_TYPES[f.kind][f.writable]
    cls = type(f"Gateway{base.__name__}", (_GatewayChannel, _RsrvReads, base), {})
    chan = cls(reported_record_type=rtype, **kw)
    chan.hub, chan.pv, chan.fields = hub, pv, _record_fields(pv, rtype)
    for field in chan.fields.values():
        field.record = chan
    if f.kind is Kind.BUSY:  # a bo's VAL is DBF_ENUM, whose control range is 0..65535
        chan.upper_ctrl_limit_raw = 65535
    return chan


# The caproto methods the classes above and below override or follow, with the sha256 of
# their source in the pinned caproto (pyproject.toml): tests/test_caproto_contract.py fails
# when an upgrade changes one, so each workaround is looked at again, not silently broken.
# Upstream: none of the caproto 1.3.0 bugs worked around here (each named at its override:
# ECA_INTERNAL for a failed conversion, CTRL_STRING in the TIME_STRING layout, WRITE/MAJOR
# on any refused put, sent updates kept, a disconnect ending the update loop, a closed
# circuit never released, no TCP_NODELAY, a monitor's mask ignored, updates held up to 1 s
# under a stream; and in _RsrvReads: 0 where EPICS 7 sends NaN alarm limits, text starting
# with a number refused as a number, an array read for more elements than it holds sent
# short, DBF_STRING's .VAL$ 81 elements long) has an issue in caproto's tracker as of
# 2026-12-03; each is to be reported. Nor have the costs per request that the overrides
# below avoid (issue 12, Speed): a task and a timer per get for a write-lock wait that is
# nearly always free, each get converted anew, each monitor update encoded, checked and run
# through the circuit's state machine once per subscriber, a wait_for per queued update, a
# turn of the event loop, a task switch, a parse and a queue per get, a task, two passes
# of the state machine and a response object per write, and each value shown run through
# write's hooks, a loop over ten metadata keywords and an unchanged alarm.
CAPROTO_CONTRACT = {
    "caproto.server.common.VirtualCircuit._process_command": "89a0a95c53667d18",
    "caproto.server.common.VirtualCircuit.command_queue_loop": "8c2d5e3a641ad40b",
    "caproto.server.common.VirtualCircuit._command_queue_iteration": "ceea4a0747ecd659",
    "caproto.server.common.VirtualCircuit.recv": "a4867616ecf8bf5b",
    "caproto.server.common.Context.tcp_handler": "a54b07f6b88eefd2",
    "caproto.asyncio.server.VirtualCircuit._wake_new_command": "074964feb7c92378",
    "caproto._circuit.VirtualCircuit._process_command": "55489c8659cef168",
    "caproto._circuit.VirtualCircuit.send": "1f8c4a6fd5f4cf4f",
    "caproto._commands.EventAddResponse.__init__": "2877c7621a867e09",
    "caproto.asyncio.server.VirtualCircuit.__init__": "010585fef692c1ea",
    "caproto.asyncio.server.AsyncioEvent.wait": "07db0b738ee91bfb",
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
    "caproto._data.ChannelData.write_metadata": "df7d9efa3725cc35",
    "caproto._data.ChannelData.publish": "9137bfaec8830c62",
    "caproto._data.ChannelData.write_from_dbr": "0c24f87816c10b15",
    "caproto._data.ChannelData.auth_write": "aa62a7a715e965a2",
    "caproto._circuit.ServerChannel.write": "c9b51e125fd71eac",
    "caproto.server.common.Context.circuit_disconnected": "6f52c1cc2a058783",
    "caproto._data.ChannelAlarm.write": "5694ce2f94f99fd2",
    "caproto._circuit.VirtualCircuit.recv": "f9342c0eb9b86f6e",
    "caproto.asyncio.utils._TransportWrapper.__init__": "d3843c5fca2603ca",
    "caproto.asyncio.utils._TransportWrapper.recv": "a898577c86343c76",
}


class _ReleasingCircuit(VirtualCircuit):
    """caproto's circuit, letting go of each monitor update once it is on the wire, and
    answering a read that has no conversion as RSRV does.

    caproto keeps the newest ``max_subscription_backlog`` (1,000) updates of every
    subscription so that a slow client gets the latest news first, but it never drops
    them after sending: every monitored PV then holds 1,000 old updates, and the IOC's
    memory grows with uptime. Here only updates not yet sent count against the backlog.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.write_event = _WriteDone()
        self._gathered = 0  # bytes of updates taken from the queue since the last send
        self._busy = False  # the command loop is between taking a command and its answer
        self.client.reader.answer = self.answer_at_once

    def answer_at_once(self, data: bytes) -> int:
        """Answer the gets of unchanged values at the front of ``data`` (just received)
        straight from the socket's receive callback, while nothing of this client is
        waiting or under way (so in order); returns how many bytes that took. A get then
        costs no task switch, no queue and no command object."""
        transport = self.client.writer.transport
        if (self._busy or not self.command_queue.empty() or self.circuit._data
                or transport.is_closing() or transport.get_write_buffer_size()):
            return 0  # in line behind something, or the client is not reading: caproto's way
        answers, end = [], 0
        while end + 16 <= len(data):
            command, size, data_type, count, sid, ioid = _HEADER.unpack_from(data, end)
            if command != _READ_NOTIFY or size or (
                    answer := self._cached(sid, data_type, count, ioid)) is None:
                break
            answers.append(answer)
            end += 16
        if answers:
            transport.write(b"".join(answers))
        return end

    async def _command_queue_iteration(self, command: Any) -> Any:
        """A get of an unchanged value, and a write of a setting, are answered before
        caproto's channel state machine (which neither moves) sees them."""
        self._busy = True
        kind = type(command)
        if kind is ReadNotifyRequest and (answer := self._cached(
                command.sid, command.data_type, command.data_count, command.ioid)):
            return [answer]
        if kind in (WriteNotifyRequest, WriteRequest) and (chan := self._setting_channel(command)):
            return await self._write_setting(command, *chan)
        return await super()._command_queue_iteration(command)

    def _setting_channel(self, command: Any) -> tuple[Any, Any] | None:
        """The channel and PV of a write that is answered at once: a setting (no command
        runs, so the hub is done with it quickly), not a record field nor ``$`` view, while
        no other write of this client is under way (so writes end in the order sent)."""
        if not self.write_event.is_set() or (chan := self._connected(command.sid)) is None:
            return None
        entry = self.context.pvdb.get(chan.name)
        pv = getattr(entry, "pv", None)
        if pv is None or pv.field.command or pv.field.kind is Kind.BUSY:
            return None
        return chan, entry

    async def _write_setting(self, command: Any, chan: Any, entry: Any) -> list[Any] | None:
        """caproto's write (its task, the state machine on the way in and out, a response
        built per write) without what costs most and does nothing for a setting: the value
        goes through the same access check and conversion to the hub, and the answer is
        the one caproto sends, written straight to the socket."""
        try:
            status = await entry.auth_write(
                self.client_hostname, self.client_username, command.data, command.data_type,
                command.metadata, user_address=self.circuit.address)
        except Exception as exc:  # as caproto answers a failed write
            return [ErrorResponse(command, chan.cid, status=CAStatus.ECA_PUTFAIL,
                                  error_message=f"Python exception: {type(exc).__name__} {exc}")]
        if type(command) is WriteNotifyRequest:
            response = chan.write(ioid=command.ioid, status=True if status is None else status,
                                  data_count=entry.length)
            await self._send_raw(memoryview(response.header), *response.buffers)
        return None

    async def _wake_new_command(self) -> None:
        """caproto's command loop calls this once a command is answered."""
        self._busy = False
        await super()._wake_new_command()

    async def _process_command(self, command: Any) -> Any:
        """caproto answers any exception of a read with ECA_INTERNAL, on which libca calls
        abort(): answer a read the value has no conversion for with ECA_GETFAIL and zeroed
        data, as RSRV's read_notify_reply does (a get the client survives). A get of a
        value read before is answered with the bytes sent then (see _RsrvReads)."""
        reading = isinstance(command, ReadNotifyRequest | ReadRequest)
        if not reading:
            return await super()._process_command(command)
        token = requested_count.set(command.data_count)
        try:
            chan, entry = self._get_db_entry_from_command(command)
            version = getattr(entry, "version", None)
            responses = await super()._process_command(command)
            if version is not None and version == entry.version:
                self._keep_answer(chan, entry, command, responses)
            return responses
        except NoConversion as exc:
            chan, _db_entry = self._get_db_entry_from_command(command)
            if not isinstance(command, ReadNotifyRequest):  # the old ca_array_get
                return [ErrorResponse(command, chan.cid, status=CAStatus.ECA_GETFAIL,
                                      error_message=str(exc))]
            metadata, data = zeroed(command.data_type, command.data_count)
            return [chan.read(data=data, data_type=command.data_type,
                              data_count=command.data_count, status=CAStatus.ECA_GETFAIL,
                              ioid=command.ioid, metadata=metadata, notify=True)]
        finally:
            requested_count.reset(token)

    def _connected(self, sid: int) -> Any:
        """The channel of server id ``sid``, if it is connected (else caproto's state
        machine answers the request)."""
        chan = self.circuit.channels_sid.get(sid)
        if chan is None or any(state is not CONNECTED for state in chan.states.states.values()):
            return None
        return chan

    def _cache_key(self, chan: Any, data_type: int, count: int) -> tuple[str, int, int] | None:
        """What a cached answer to a get is filed under; None: not cacheable (a timestamp
        filter stamps each read anew, an old client's counts differ)."""
        if chan.channel_filter.ts or self.circuit.protocol_version < 13:
            return None
        return chan.name, data_type, count

    def _cached(self, sid: int, data_type: int, count: int, ioid: int) -> bytes | None:
        """The bytes answering a get of an unchanged value, with this request's ioid; None
        when there are none, or a client write is under way (caproto then lets the write
        finish first)."""
        if not self.write_event.is_set() or (chan := self._connected(sid)) is None:
            return None
        entry = self.context.pvdb.get(chan.name)
        if entry is None:  # a record field (PV.DESC): caproto's lookup of the record
            try:
                entry = self.context[chan.name]
            except KeyError:
                return None
        answers = getattr(entry, "answers", None)
        key = self._cache_key(chan, data_type, count) if answers else None
        hit = answers.get(key) if key is not None else None  # type: ignore[union-attr]
        if hit is None:
            return None
        before, after, payload = hit
        return before + ioid.to_bytes(4, "big") + after + payload

    def _keep_answer(self, chan: Any, entry: Any, command: Any, responses: Any) -> None:
        """File caproto's answer to a get, as bytes without its ioid, on the channel."""
        answers = getattr(entry, "answers", None)
        if answers is None or type(command) is not ReadNotifyRequest or not responses:
            return
        key = self._cache_key(chan, command.data_type, command.data_count)
        if key is None or len(responses) != 1:
            return
        response = responses[0]
        if not isinstance(response, ReadNotifyResponse) or response.header.parameter1 != 1:
            return
        header = bytes(response.header)  # the ioid (parameter2) is bytes 12..16
        if len(answers) >= 64:  # a client asking for every count: keep it bounded
            answers.clear()
        answers[key] = (header[:12], header[16:], b"".join(bytes(b) for b in response.buffers))

    async def line_up(self, spec: Any, sub: Any, update: EventAddResponse) -> None:
        """Put a monitor update in line for this client: held among the newest
        ``max_subscription_backlog`` of its subscription (an older one still waiting is
        dropped unsent: the client gets the latest news first), and referenced weakly
        from the circuit's queue, which the send loop empties."""
        held = self.unexpired_updates.get(sub.subscriptionid)
        if held is None:
            held = self.unexpired_updates[sub.subscriptionid] = collections.deque(
                maxlen=sub.db_entry.max_subscription_backlog)
        held.append(update)
        await self.subscription_queue.put(
            weakref.ref(update, functools.partial(self._dropped, spec, sub)))

    def _dropped(self, spec: Any, sub: Any, _update: Any) -> None:
        """An update dropped unsent while the client had turned events off: the
        subscription is sent anew when it turns them on."""
        if not self.events_on.is_set():
            waiting = self.subscriptions_to_resend.setdefault(spec, [])
            if sub not in waiting:
                waiting.append(sub)

    async def _send_raw(self, *buffers: Any) -> None:
        """Encoded commands to the client, failing as caproto's send fails."""
        if self.connected:
            try:
                await self._send_buffers(*buffers)
            except (OSError, CaprotoNetworkError) as exc:
                raise DisconnectedCircuit(f"Circuit disconnected: {exc}") from exc

    async def get_from_sub_queue(self, timeout: float | None = None) -> Any:
        """caproto's wait for the next update. When a client leaves abruptly, the cancel of
        this wait can be lost (seen: the task 'cancelling' yet waiting again), and the
        closing command loop then awaits it forever: the circuit, its channels and held
        updates stay (about 0.6 MB per client). So the wait also ends once closed.

        With a timeout, caproto asks whether more updates come to send with those it has
        gathered, and waits 10 ms (``HIGH_LOAD_TIMEOUT``): the last updates of every burst
        then reach the client 10 ms late. 2 ms still batches a stream of updates. A burst
        that ended with a packet's worth gathered (``WORTH_A_PACKET``) is sent at once (None:
        caproto's loop sends what it has); small updates wait for company, so a stream of
        puts that each post one small update does not cost a socket write per put."""
        if not self.subscription_queue.empty():  # no wait (caproto's makes a task and a timer)
            ref = self.subscription_queue.get_nowait()
        elif timeout is not None:
            if self._gathered >= WORTH_A_PACKET:
                return None
            ref = await super().get_from_sub_queue(min(timeout, _BATCH_QUIET))
        else:
            ref = None
            while ref is None:
                if not self.connected:
                    raise asyncio.CancelledError  # caproto's loop ends on it
                ref = await super().get_from_sub_queue(1.0)
        if ref is not None and (update := ref()) is not None:
            self._gathered += len(update)
        return ref

    async def send(self, *commands: Any) -> None:
        """caproto's send, but cached answers (bytes) and monitor updates go straight to
        the socket: for an update caproto's circuit only checks it against the
        subscription it was made for, logs it and moves no state, which cost more than
        the update's encoding (tens of microseconds per update, times subscribers)."""
        if commands and type(commands[0]) is bytes:
            await self._send_raw(*commands)
            return
        known = self.circuit.event_add_commands
        updates = all(isinstance(c, EventAddResponse) for c in commands)  # the update loop's
        if updates:
            self._gathered = 0
        if updates and all(c.subscriptionid in known for c in commands):
            await self._send_raw(*[b for c in commands for b in (memoryview(c.header), *c.buffers)])
        else:
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
        """caproto leaves a closed circuit's queues full of updates nobody will send.

        And its close cancels the update loop and awaits it, which raises the loop's
        CancelledError in the closing task when the loop was cancelled in mid-send, and
        cancels the loop itself when it is the loop that found the client gone (a send
        failed): the rest of the close was skipped, and under uvloop the socket's reader
        kept the circuit, about 30 kB per client that left (caproto 1.3 bug, to report
        upstream). Here the loop is cancelled by another task only, and its end awaited
        without its error."""
        update_loop, self._sub_task = self._sub_task, None  # so caproto's cancel is skipped
        await super()._on_disconnect()
        self.client.reader.answer = None
        # nothing sends this queue any more: empty it, so an update being queued (the
        # context waits while a queue is full) cannot hold up every other client
        self.unexpired_updates.clear()
        while not self.subscription_queue.empty():
            self.subscription_queue.get_nowait()
        if update_loop is not None and update_loop is not asyncio.current_task():
            update_loop.cancel()
            await asyncio.wait([update_loop])  # its end, without raising its CancelledError


class _Update(EventAddResponse, register=False):
    """A monitor update made of payload parts shared by every subscriber of one view
    (already checked when they were encoded), knowing its own length."""

    __slots__ = ("_length",)

    def __init__(self, size: int, buffers: list[Any], data_type: ChannelType, count: int,
                 subscriptionid: int) -> None:
        header = EventAddResponseHeader(size, data_type, count, _ECA_NORMAL, subscriptionid)
        Message.__init__(self, header, *buffers, validate=False)
        self._length = ctypes.sizeof(header) + size

    def __len__(self) -> int:
        return self._length


_ECA_NORMAL = ensure_eca_value(CAStatus.ECA_NORMAL)
_BATCH_QUIET = 0.002  # s without a new update after which gathered updates are sent
# bytes of gathered updates sent as soon as no more are queued: about what one Ethernet
# frame carries (1,448 bytes of TCP payload); 50 monitors of a short text make 2.4 kB
WORTH_A_PACKET = 1024
# caproto's send loop doubles how long it gathers a client's updates with each batch sent
# while they keep coming, up to MAX_LATENCY (1 s): under a steady stream (a scan's puts,
# readbacks at 100 Hz) monitors then got their updates up to a second late, where an EPICS
# IOC sends them at once. Gather for at most 20 ms (its loop reads the module's global).
BATCH_LONGEST = 0.02
caproto_server_common.MAX_LATENCY = BATCH_LONGEST
_HEADER = struct.Struct(">HHHHII")  # command, payload size, data type, count, 2 parameters
_READ_NOTIFY = ReadNotifyRequest.ID


class _WriteDone(AsyncioEvent):
    """The circuit's "no client write under way" event. caproto waits on it before every
    read (with a 1 ms timeout), which costs a task and a timer per get even when it is
    set, as it nearly always is: return at once then."""

    async def wait(self, timeout: float | None = None) -> bool:
        if self.is_set():
            return True
        return await super().wait(timeout)


class _CaReader(asyncio.StreamReader):
    """A CA client's receive buffer, which first offers what arrives to its circuit
    (``answer``: gets it answers at once), then keeps the rest for caproto's receive."""

    answer: Callable[[bytes], int] | None = None

    def feed_data(self, data: bytes) -> None:
        if self.answer is not None and not self._buffer:  # type: ignore[attr-defined]
            data = data[self.answer(data):]
        super().feed_data(data)


class _NoDelayContext(Context):
    """caproto's context with TCP_NODELAY on client sockets (else 40 ms put stalls),
    whose circuits release monitor updates once sent, whose update loop outlives clients
    that leave in mid-burst, and which has the heap give back what clients that left held."""

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
            if flags and not flags & spec.mask:  # caproto sends every update to every mask
                continue
            encoded: dict[int, tuple[int, list[Any]]] = {}  # count -> payload size, parts
            for each in tuple(self.subscriptions[spec]):
                circuit, filters = each.circuit, each.channel_filter
                if not circuit.connected:
                    continue
                if (not circuit.events_on.is_set() or filters.arr is not None
                        or filters.dbnd is not None or filters.sync is not None):
                    await self._subscription_queue_send(spec, each, metadata=metadata,
                                                        values=values, flags=flags)
                    continue
                # the common case: every subscriber of this view gets the same bytes,
                # encoded once per update (caproto encodes and checks them per subscriber)
                count = each.data_count or len(values)
                if (parts := encoded.get(count)) is None:
                    size, *buffers = data_payload(
                        values if count == len(values) else values[:count], metadata,
                        each.data_type, count)
                    parts = encoded[count] = (size, buffers)
                await circuit.line_up(spec, each, _Update(*parts, each.data_type, count,
                                                          each.subscriptionid))

    async def circuit_disconnected(self, circuit: Any) -> None:
        """A client left: what it held is freed; have the heap give it back soon."""
        await super().circuit_disconnected(circuit)
        give_back_soon()

    async def server_accept_loop(self, sock: socket.socket) -> None:
        """caproto's accept loop, with a receive buffer that answers gets at once
        (_CaReader), and TCP_NODELAY: caproto binds its listening socket with proto=0, so
        asyncio never sets it on accepted sockets (Nagle + delayed ACK: 40 ms put-callback
        stalls while a monitor is active); Linux hands the listening socket's option on."""
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def new_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            client = _TransportWrapper(reader, writer)
            self.server_tasks.create(self.tcp_handler(client, client.getpeername()))

        await asyncio.get_running_loop().create_server(
            lambda: asyncio.StreamReaderProtocol(_CaReader(), new_client), sock=sock)


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
