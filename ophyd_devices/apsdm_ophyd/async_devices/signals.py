"""Signals of the gateway's PVs, all over PV Access.

PVA serves every PV of the gateway (tables and the stream handshake only exist there),
carries long strings as plain strings, and fails a put the IOC refuses, which CA's
put-callback does not report to aioca; so one protocol serves every device.
"""

from ophyd_async.core import SignalDatatypeT, SignalR, SignalRW
from ophyd_async.epics.core import epics_signal_r, epics_signal_rw


def address(prefix: str, suffix: str) -> str:
    """The ophyd-async address of PV ``prefix + suffix`` over PVA."""
    return f"pva://{prefix}{suffix}"


def readback(datatype: type[SignalDatatypeT], prefix: str, suffix: str) -> SignalR[SignalDatatypeT]:
    """A read-only PV (an ``_RBV`` readback or a table)."""
    return epics_signal_r(datatype, address(prefix, suffix))


def setting(datatype: type[SignalDatatypeT], prefix: str, suffix: str,
            rbv: bool = False) -> SignalRW[SignalDatatypeT]:
    """A writable PV, read back from ``suffix_RBV`` if ``rbv``; a put completes once the IOC
    has taken (or refused) the value."""
    read = f"{suffix}_RBV" if rbv else suffix
    return epics_signal_rw(datatype, address(prefix, read), address(prefix, suffix))
