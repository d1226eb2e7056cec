"""State -> PVs: one publisher walks the schema and posts every readback and table from
the DM-side state, says in a slot's Message_RBV when its DM object changes status, and
shows DM outages as COMM alarms (given back when DM answers again).
"""

from __future__ import annotations

from typing import Any

from .hub import MAJOR, OK, STATUS_COMM, Alarm, Hub, comm_alarm, state_alarm
from .schema import PV, Kind, Record, failed_status
from .state import DmState

SLOT_RECORDS = (Record.DAQ, Record.UPLOAD, Record.JOB)


class Publisher:
    """Shows the state on the hub's PVs (the state's observer)."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self._shown = [pv for pv in hub.pvs.values() if _declared(pv) is not None]
        self._slots: dict[str, tuple[Record, str]] = {  # slot -> (record, its Message_RBV)
            f"{pv.group}{pv.slot}": (record, hub.message_pv(pv))
            for pv in self._shown if (record := _declared(pv)) in SLOT_RECORDS}
        status = {pv.suffix: name for name, pv in hub.pvs.items() if pv.group == "Status"}
        self._connected, self._message = status["Connected_RBV"], status["Message_RBV"]
        self._stale = True  # nothing shown yet, or COMM shown since: post everything anew
        self._before_comm: dict[str, Alarm] = {}  # alarms that COMM covers while DM is down
        self._last_status: dict[str, str] = {}  # slot -> "id:status" last said

    async def changed(self, state: DmState, only: Record | None = None) -> None:
        """Post every readback and table (``only``: those of one record) from ``state``."""
        post, force = self.hub.post, self._stale and only is None
        if only is None:
            await post(self._connected, 1)
            await post(self._message, "OK", force=force)
        for pv in self._shown:
            record = _declared(pv)
            if only is None or record is only:
                value, alarm = _value(pv, _record_of(state, pv, record))
                await post(pv.name, value, alarm, force=force)
        if only is None:
            for slot, (record, message) in self._slots.items():
                obj = state.followed(record, slot)
                if obj is not None:
                    await self._transition(slot, message, obj, force)
            await self._restore_alarms()
            self._stale = False

    async def _transition(self, slot: str, message: str, obj: Any, force: bool) -> None:
        """Say in Message_RBV when a slot's DM object changes status (not every poll)."""
        key = f"{obj.id}:{obj.status}"
        why = failed_status(obj)
        alarm = state_alarm(why) if why else OK
        if self._last_status.get(slot) != key:
            self._last_status[slot] = key
            error = obj.error_message
            await self.hub.post(message, f"{obj.id[:8]} {obj.status}" + (f": {error}" if error else ""),
                                alarm)
        elif force:  # after a reconnection: replace the COMM alarm
            await self.hub.post(message, self.hub[message], alarm, force=True)

    async def lost(self, why: str) -> None:
        """DM unreachable: say why, and put every readback and table outside Status: in COMM."""
        await self.hub.post(self._connected, 0, Alarm(MAJOR, STATUS_COMM, why))
        await self.hub.post(self._message, why, Alarm(MAJOR, STATUS_COMM, why))
        alarm = comm_alarm(why)
        for name, pv in self.hub.pvs.items():
            if (pv.is_rbv or pv.field.kind is Kind.TABLE) and pv.group != "Status":
                if self.hub.alarms[name].status != alarm.status:
                    self._before_comm[name] = self.hub.alarms[name]
                await self.hub.set_alarm(name, alarm)
        self._stale = True

    async def poll_failed(self, why: str) -> None:
        """DM answered a poll with a refusal (or something unreadable): say so."""
        await self.hub.post(self._message, f"DM poll failed: {why}", state_alarm(why))

    async def _restore_alarms(self) -> None:
        """After a reconnection, give back the alarm each PV had before COMM (for PVs the
        publisher does not post anew, such as messages and Metadata readbacks)."""
        saved, self._before_comm = self._before_comm, {}
        for name, alarm in saved.items():
            if self.hub.alarms[name].status == STATUS_COMM:
                await self.hub.set_alarm(name, alarm)


def _declared(pv: PV) -> Record | None:
    """The record a readback or table reads (None: it is not the publisher's)."""
    declared = pv.field.source or pv.field.table
    return declared.record if declared is not None else None


def _record_of(state: DmState, pv: PV, record: Record | None) -> Any:
    if record is Record.EXPERIMENT:
        return state.experiment
    if record is Record.SNAPSHOT:
        return state.snapshot
    if record is Record.ESAF:
        return state.esaf
    if record is Record.PROPOSAL:
        return state.proposal
    assert record is not None
    return state.followed(record, f"{pv.group}{pv.slot}")


def _value(pv: PV, obj: Any) -> tuple[Any, Alarm]:
    """A readback's or table's value and alarm from its record (absent: the initial value)."""
    f = pv.field
    if obj is None:
        return f.initial, OK
    if f.table is not None:
        return [{c.name: c.get(row) for c in f.table.columns} for row in f.table.rows(obj)], OK
    assert f.source is not None
    why = f.source.alarm(obj) if f.source.alarm else ""
    return f.source.get(obj), state_alarm(why) if why else OK
