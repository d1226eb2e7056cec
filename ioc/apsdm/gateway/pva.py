"""The PV Access server (p4p), built from the schema and fed by the hub.

Every PV is a SharedPV; scalars are NTScalar/NTEnum, lists are NTTable and the
streaming handshake PVs are small structures. Every post carries a timestamp and an
explicit alarm (p4p merges only changed fields, so an alarm left out would stick).
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
from typing import Any

from p4p import Type, Value
from p4p.nt import NTEnum, NTScalar, NTTable
from p4p.nt.common import alarm as alarm_t
from p4p.nt.common import timeStamp as timestamp_t
from p4p.server import Server, StaticProvider
from p4p.server.asyncio import SharedPV

from .db_template import PREC
from .hub import STATUS_COMM, Alarm, Hub, PutRejected, Writer, current_writer
from .schema import PV, Kind

log = logging.getLogger(__name__)

STREAM_TYPE = Type([
    ("state", "s"), ("message", "s"), ("counter", "l"), ("timestamp", "d"),
    ("alarm", alarm_t), ("timeStamp", timestamp_t),
], id="apsdm:stream:1.0")

# PVA alarm status codes: 1 DEVICE, 3 RECORD; CA's COMM has no equal, DEVICE is nearest
_PVA_STATUS = {STATUS_COMM: 1}


# display.form choices, as QSRV serves them (menuDisplayForm's order)
FORMS = ["Default", "String", "Binary", "Decimal", "Hex", "Exponential", "Engineering"]


def _qsrv_type(code: str) -> Type:
    """QSRV's NTScalar of an ai/longin record, in its field order: display (with form),
    control and valueAlarm, each limit of the value's type."""
    return Type([
        ("value", code), ("alarm", alarm_t), ("timeStamp", timestamp_t),
        ("display", ("S", None, [
            ("limitLow", code), ("limitHigh", code), ("description", "s"), ("units", "s"),
            ("precision", "i"), ("form", ("S", "enum_t", [("index", "i"), ("choices", "as")]))])),
        ("control", ("S", None, [("limitLow", code), ("limitHigh", code), ("minStep", code)])),
        ("valueAlarm", ("S", None, [
            ("active", "?"), *[(f"{side}{level}Limit", code) for side, level in _ALARM_LEVELS],
            *[(f"{side}{level}Severity", "i") for side, level in _ALARM_LEVELS],
            ("hysteresis", "d")])),
    ], id="epics:nt/NTScalar:1.0")


_ALARM_LEVELS = (("low", "Alarm"), ("low", "Warning"), ("high", "Warning"), ("high", "Alarm"))


def _nt(pv: PV) -> Any:
    """The normative type QSRV serves for this PV's record: text with display (description,
    units), numbers as :func:`_qsrv_type`, enums as NTEnum with a description."""
    f = pv.field
    if f.kind in (Kind.STRING, Kind.LONGSTRING):
        return NTScalar("s", display=True)
    if f.kind in (Kind.LONG, Kind.DOUBLE):
        nt = NTScalar("i" if f.kind is Kind.LONG else "d")
        nt.type = _qsrv_type("i" if f.kind is Kind.LONG else "d")
        return nt
    if f.kind in (Kind.ENUM, Kind.BUSY):
        nt = NTEnum()
        nt.type = Type([("value", ("S", "enum_t", [("index", "i"), ("choices", "as")])),
                        ("alarm", alarm_t), ("timeStamp", timestamp_t),
                        ("display", ("S", None, [("description", "s")]))],
                       id="epics:nt/NTEnum:1.0")
        return nt
    if f.kind is Kind.TABLE:
        return NTTable(list(f.columns))
    return None


def _metadata(pv: PV) -> dict[str, Any]:
    """The fields of a PV's NT value that describe it rather than its value (QSRV's
    display and control, from the record's DESC, EGU, PREC, HOPR and LOPR)."""
    f = pv.field
    if f.kind in (Kind.TABLE, Kind.STREAM):
        return {}
    meta: dict[str, Any] = {"display.description": f.desc}
    if f.kind in (Kind.LONG, Kind.DOUBLE):
        meta.update({"display.units": f.egu, "display.limitLow": f.low, "display.limitHigh": f.high,
                     "display.form.choices": FORMS, "display.form.index": 0,
                     "control.limitLow": f.low, "control.limitHigh": f.high})
        meta["display.precision"] = PREC if f.kind is Kind.DOUBLE else 0
        # no alarm limits in db/: EPICS 7 reports them as NaN (0 in an integer)
        unset = math.nan if f.kind is Kind.DOUBLE else 0
        meta.update({f"valueAlarm.{side}{level}Limit": unset for side, level in _ALARM_LEVELS})
    return meta


async def _host_of(address: str) -> str:
    """The host name of a peer address, as CA clients name their host: this host's name
    for a loopback peer, else a reverse lookup off the event loop, given up on after a
    second (the address then), so no slow DNS stalls the IOC."""
    if address.startswith("127.") or address == "::1":
        return socket.gethostname()
    loop = asyncio.get_running_loop()
    try:
        host, _ = await asyncio.wait_for(loop.getnameinfo((address, 0)), 1.0)
        return str(host)
    except (OSError, TimeoutError):
        return address


class _Handler:
    """Put handler of one PV: hands the write to the hub, completes when it returns."""

    def __init__(self, server: PvaServer, pv: PV) -> None:
        self.server, self.pv = server, pv

    async def put(self, shared: SharedPV, op: Any) -> None:
        ip = op.peer().rsplit(":", 1)[0]
        writer = Writer("pva", await _host_of(ip), op.account(), ip)
        token = current_writer.set(writer)
        try:
            self.server.hub.check_writer(self.pv, writer)  # before the value is even read
            try:
                value = self.server.value_of_put(self.pv, op.value())
            except (UnicodeError, ValueError, TypeError) as exc:  # e.g. text that is not UTF-8
                refusal = PutRejected(f"{self.pv.name}: value refused ({exc})")
                await self.server.hub.refused(self.pv, refusal, writer)
                raise refusal from None
            await self.server.hub.put(self.pv.name, value, writer)
        except PutRejected as exc:
            op.done(error=str(exc))
        except Exception as exc:  # never leave a client waiting
            log.exception("PVA put to %s failed", self.pv.name)
            op.done(error=f"internal error: {exc}")
        else:
            op.done()
        finally:
            current_writer.reset(token)


class PvaServer:
    """Serves every schema PV over PV Access; create inside the running asyncio loop."""

    def __init__(self, hub: Hub, conf: dict[str, str]) -> None:
        self.hub = hub
        self.provider = StaticProvider("apsdm")
        self.shared: dict[str, SharedPV] = {}
        self.nts: dict[str, Any] = {name: _nt(pv) for name, pv in hub.pvs.items()}
        self.metadata = {name: _metadata(pv) for name, pv in hub.pvs.items()}
        for pv in hub.pvs.values():
            handler = _Handler(self, pv) if pv.field.writable else None
            nt = self.nts[pv.name]
            if nt is None:  # the streaming structures
                shared = SharedPV(handler=handler, initial=self._stream_value(
                    hub.values[pv.name], hub.alarms[pv.name], hub.stamps[pv.name]))
            else:
                shared = SharedPV(handler=handler, nt=nt, initial=self._wrap(
                    pv, nt, hub.values[pv.name], hub.alarms[pv.name], hub.stamps[pv.name]))
            self.shared[pv.name] = shared
            self.provider.add(pv.name, shared)
        self.conf = conf
        self.server: Server | None = None
        hub.sinks.append(self)

    def start(self) -> tuple[int, int]:
        """Start serving; returns the TCP port and the UDP search port."""
        self.server = Server(providers=[self.provider], conf=self.conf, useenv=False)
        conf = self.server.conf()
        return int(conf["EPICS_PVAS_SERVER_PORT"]), int(conf["EPICS_PVAS_BROADCAST_PORT"])

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def value_of_put(self, pv: PV, value: Any) -> Any:
        """The plain Python value a PVA client wrote (merging partial structure puts)."""
        if pv.field.kind is Kind.STREAM:
            raw = value if isinstance(value, Value) else getattr(value, "raw", value)
            merged = dict(self.hub.values[pv.name])
            for key in ("state", "message", "counter", "timestamp"):
                if raw.changed(key):
                    merged[key] = raw[key]
            return merged
        if pv.field.kind in (Kind.ENUM, Kind.BUSY):
            return int(value)  # ntenum: the index
        raw = getattr(value, "raw", None)  # NT wrappers print with their timestamp
        return raw["value"] if raw is not None else value

    def _wrap(self, pv: PV, nt: Any, value: Any, alarm: Alarm, timestamp: float, *,
              metadata: bool = True) -> Value:
        """``value`` as the PV's NT structure; ``metadata=False`` leaves display and control
        unmarked, for a post (the SharedPV keeps the fields a post does not mark)."""
        if pv.field.kind in (Kind.ENUM, Kind.BUSY):
            v = nt.wrap({"index": int(value), "choices": list(pv.field.enums)}, timestamp=timestamp)
        else:
            v = nt.wrap(value, timestamp=timestamp)
        if metadata:
            for key, shown in self.metadata[pv.name].items():
                v[key] = shown
        return self._alarmed(v, alarm)

    def _stream_value(self, value: dict[str, Any], alarm: Alarm, timestamp: float) -> Value:
        v = Value(STREAM_TYPE, {k: value[k] for k in ("state", "message", "counter", "timestamp")})
        seconds = int(timestamp)
        v["timeStamp.secondsPastEpoch"] = seconds
        v["timeStamp.nanoseconds"] = int((timestamp - seconds) * 1e9)
        return self._alarmed(v, alarm)

    @staticmethod
    def _alarmed(v: Value, alarm: Alarm) -> Value:
        v["alarm.severity"] = alarm.severity
        v["alarm.status"] = _PVA_STATUS.get(alarm.status, 3 if alarm.status else 0)
        v["alarm.message"] = alarm.message
        return v

    async def publish(self, pv: PV, value: Any, alarm: Alarm, timestamp: float) -> None:
        shared = self.shared[pv.name]
        nt = self.nts[pv.name]
        if nt is None:
            shared.post(self._stream_value(value, alarm, timestamp))
        else:
            shared.post(self._wrap(pv, nt, value, alarm, timestamp, metadata=False))
