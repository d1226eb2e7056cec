"""Writing settings and running busy commands through messages, with the IOC's refusals.

Every stub works with both device flavours (ophyd ``devices.py``, ophyd-async
``async_devices``): they differ only in where a command's PV and a message's alarm are.
"""

import logging
import posixpath
from collections.abc import Callable
from typing import Any

from bluesky import plan_stubs as bps
from bluesky.utils import MsgGenerator
from ophyd import Device, EpicsSignal
from ophyd.status import Status

from ..devices import NO_YES
from ..errors import GatewayError, WaitExpired
from ..progress import DEFAULT_POLL_PERIOD, wait_until

__all__ = ["READBACK_GRACE", "YES", "Completion", "busy", "expect", "is_busy", "pv_name", "refusal",
           "release",
           "run_command", "write"]

log = logging.getLogger("apsdm_ophyd")

#: Seconds readbacks may take to show the outcome of a completed put.
READBACK_GRACE = 2.0
YES = NO_YES[1]
#: A busy command's value while idle: ophyd reads the ``bo`` as 0, ophyd-async as its ZNAM.
IDLE = (0, "Done")


def busy(command: Any) -> Any:
    """The busy PV a command writes: an ophyd EpicsSignal itself, an ophyd-async BusyCommand's
    ``busy`` signal (its put completes when the action ends; the plans read the outcome)."""
    return getattr(command, "busy", command)


class Completion:
    """A busy PV as a Movable whose status finishes when the put completes, even when the IOC
    reports the action failed (ophyd-async's PVA put fails then, which the RunEngine would
    raise as FailedStatus; ophyd's CA put callback never fails): the plans read the outcome
    and the IOC's reason from the readbacks, the same way for both flavours."""

    parent = None

    def __init__(self, command: Any) -> None:
        self.signal = busy(command)
        self.name = self.signal.name

    def set(self, value: int) -> Status:
        """Put ``value`` with put-completion and no timeout (a job may run for hours)."""
        finished = Status()
        put = self.signal.set(value, timeout=None)
        _PUTS.add(put)  # ophyd-async's status runs in a task, which asyncio holds weakly

        def ended(_status: Any) -> None:
            _PUTS.discard(put)
            finished.set_finished()
        put.add_callback(ended)
        return finished


#: puts under way: with nothing else holding an ophyd-async put's status, the garbage
#: collector can destroy its pending task ("Task was destroyed but it is pending!", seen in
#: two CI runs, each time with a plan's workflow start failing as "not started")
_PUTS: set[Any] = set()


def is_busy(value: Any) -> bool:
    """A busy command's value (from ``bps.rd(busy(command))``) says its action runs."""
    return value not in IDLE


def pv_name(signal: Any) -> str:
    """The PV a signal writes, for messages: ophyd's ``setpoint_pvname`` or ophyd-async's source."""
    return str(getattr(signal, "setpoint_pvname", "") or signal.source.split("://")[-1])


def refusal(device: Device) -> MsgGenerator[str | None]:
    """The device's ``Message_RBV`` if it carries an alarm (the IOC refused something)."""
    reading = yield from bps.read(device.message)  # a fresh read; ophyd-async's has the alarm
    text, severity = "", 0
    if reading:  # None when the plan is only simulated
        [value] = reading.values()
        text = value["value"]
        severity = value.get("alarm_severity", getattr(device.message, "alarm_severity", 0))
    return (str(text) or "no reason given") if severity else None


def write(device: Device, **settings: Any) -> MsgGenerator[None]:
    """Write settings in order (each put completes when the IOC has it); raise if not taken.

    The IOC may normalize a path (``a/b/`` reads back as ``a/b``); any other difference
    means the write was refused (the reason is in ``Message_RBV``) or lost on the way.
    """
    for attr, value in settings.items():
        signal: EpicsSignal = getattr(device, attr)
        yield from bps.abs_set(signal, value, wait=True)
        actual = yield from bps.rd(signal, default_value=value)
        if actual == value or (isinstance(value, str) and value
                               and actual == posixpath.normpath(value)):
            continue
        why = yield from refusal(device)
        raise GatewayError(f"{pv_name(signal)} = {value!r} "
                           + (f"refused: {why}" if why else f"not taken (reads {actual!r})"))


def expect(device: Device, condition: Callable[[], MsgGenerator[bool]], failure: str,
           timeout: float = READBACK_GRACE) -> MsgGenerator[None]:
    """After a command, wait briefly for ``condition``; else raise GatewayError with the reason."""
    try:
        yield from wait_until(condition, timeout=timeout, poll_period=0.1, what=failure)
    except WaitExpired:
        why = (yield from refusal(device)) or (yield from bps.rd(device.message, default_value=""))
        raise GatewayError(f"{failure}: {why or 'no reason given'}") from None


def run_command(command: EpicsSignal, *, timeout: float,
                poll_period: float = DEFAULT_POLL_PERIOD) -> MsgGenerator[None]:
    """Write 1 to a busy command and wait (in short waits) until the IOC's action ends."""
    status = yield from bps.abs_set(Completion(command), 1)
    yield from bps.checkpoint()  # a rewind after a pause must not start it again
    yield from wait_until(lambda: _done(status), timeout=timeout, poll_period=poll_period,
                          what=pv_name(busy(command)))


def release(command: EpicsSignal, status: Status | None, why: str) -> MsgGenerator[None]:
    """Write 0 to a busy command still waiting on our put: the slot is free, DM goes on."""
    if status is None or status.done:
        return
    yield from bps.abs_set(Completion(command), 0, wait=True)
    message = f"{pv_name(busy(command))} released ({why}); the DM action itself goes on"
    log.warning(message)
    print(message)


def _done(status: Status | None) -> MsgGenerator[bool]:
    """True once the put has completed (or when simulated: no status)."""
    yield from bps.null()
    return status is None or status.done
