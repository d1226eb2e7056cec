"""The ophyd-async devices agree with the IOC's PV schema: every signal is a served PV with the
right direction and datatype, every PV of the schema (PVA-only ones too) has a signal, and the
devices import nothing of the IOC."""

import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import pytest
from ophyd_async.core import Device, Signal, SignalR, SignalW, StrictEnum
from ophyd_async.epics.core import PvaSignalBackend
from test_ophyd_schema import LAYOUTS, schema

from apsdm.gateway.schema import PV, STREAM_STATES, Kind, Layout
from apsdm_ophyd.async_devices import BusyCommand, DMGateway, GatewayTable, StreamMemberBackend

SCALARS = {Kind.STRING: str, Kind.LONGSTRING: str, Kind.LONG: int, Kind.DOUBLE: float}
COLUMN_SAMPLES = {"s": (["x"], "U"), "i": ([7], "i"), "d": ([1.5], "f")}


def gateway(layout: Layout) -> DMGateway:
    return DMGateway(layout.prefix, n_daq=layout.n_daq, n_upload=layout.n_upload,
                     n_workflow=layout.n_workflow, name="gw")


def walk(device: Device) -> Iterator[Device]:
    yield device
    for _, child in device.children():
        yield from walk(child)


def backend(sig: Signal) -> PvaSignalBackend:
    found = sig._connector.backend  # the one place its PV names are kept
    assert isinstance(found, PvaSignalBackend), f"{sig.name} is not over PVA"
    return found


def assert_datatype(sig: Signal, pv: PV) -> None:
    """The signal's Python type is the one the PV's kind is served as."""
    datatype, field = sig.datatype, pv.field
    if field.kind in SCALARS:
        assert datatype is SCALARS[field.kind], sig.name
    elif field.kind in (Kind.ENUM, Kind.BUSY):
        assert issubclass(datatype, StrictEnum), sig.name
        assert tuple(member.value for member in datatype) == field.enums, sig.name
    elif field.kind is Kind.TABLE:
        assert issubclass(datatype, GatewayTable), sig.name
        row = datatype(**{name: COLUMN_SAMPLES[code][0] for name, code in field.columns})
        assert list(type(row).model_fields) == [name for name, _ in field.columns], sig.name
        for name, code in field.columns:
            assert np.asarray(getattr(row, name)).dtype.kind == COLUMN_SAMPLES[code][1], name
    elif issubclass(datatype, StrictEnum):  # the handshake's state member
        assert tuple(member.value for member in datatype) == STREAM_STATES, sig.name
    else:  # another member of the handshake: typed as its initial value
        assert datatype is type(field.initial[backend(sig).member]), sig.name  # type: ignore[attr-defined]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: lay.prefix)
def test_every_signal_is_a_served_pv_of_its_type(layout: Layout) -> None:
    pvs = schema(layout)
    for sig in (dev for dev in walk(gateway(layout)) if isinstance(dev, Signal)):
        found = backend(sig)
        read = pvs.get(found.read_pv)
        assert read is not None, f"{sig.name}: {found.read_pv} is not served"
        assert_datatype(sig, read)
        if isinstance(sig, SignalW):
            write = pvs[found.write_pv]
            assert write.field.writable, f"{sig.name} writes read-only {write.name}"
            assert read is write or (read.is_rbv and not read.field.writable
                                     and read.name == write.name + "_RBV"), sig.name
        else:
            assert isinstance(sig, SignalR) and not read.field.writable, sig.name


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: lay.prefix)
def test_every_pv_has_a_signal(layout: Layout) -> None:
    used: set[str] = set()
    for sig in (dev for dev in walk(gateway(layout)) if isinstance(dev, Signal)):
        used |= {backend(sig).read_pv, backend(sig).write_pv}
    assert set(schema(layout)) - used == set()
    assert used - set(schema(layout)) == set()


def test_busy_commands_are_movables_that_wait() -> None:
    pvs = schema(Layout())
    commands = [dev for dev in walk(gateway(Layout())) if isinstance(dev, BusyCommand)]
    assert {backend(cmd.busy).write_pv for cmd in commands} == {
        name for name, pv in pvs.items() if pv.field.kind is Kind.BUSY}
    assert all(backend(cmd.busy).options.wait is True for cmd in commands)


def test_stream_members_cover_the_handshake() -> None:
    pvs = schema(Layout())
    members: dict[str, set[str]] = {}
    for sig in (dev for dev in walk(gateway(Layout())) if isinstance(dev, Signal)):
        if isinstance(found := backend(sig), StreamMemberBackend):
            members.setdefault(found.read_pv, set()).add(found.member)
    assert members == {name: set(pv.field.initial) for name, pv in pvs.items()
                       if pv.field.kind is Kind.STREAM}


def test_devices_import_nothing_of_the_ioc() -> None:
    code = ("import sys, apsdm_ophyd.async_devices; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'apsdm'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
