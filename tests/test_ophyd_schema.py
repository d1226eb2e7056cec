"""The ophyd devices agree with the IOC's PV schema: every component PV exists with the
right writability and representation, and every CA PV of the schema has a component."""

from __future__ import annotations

import pytest
from ophyd import EpicsSignal, EpicsSignalRO

from apsdm.gateway.schema import PV, Kind, Layout, build
from apsdm_ophyd.devices import NO_YES, UPLOAD_MODES, DMGateway

LAYOUTS = [Layout(), Layout(prefix="BL9:DM:", n_daq=2, n_upload=1, n_workflow=3)]
TEXT_KINDS = {Kind.STRING, Kind.LONGSTRING, Kind.ENUM}


def signals(layout: Layout) -> list[EpicsSignalRO | EpicsSignal]:
    gateway = DMGateway(layout.prefix, n_daq=layout.n_daq, n_upload=layout.n_upload,
                        n_workflow=layout.n_workflow, name="gw")
    return [walk.item for walk in gateway.walk_signals()]


def schema(layout: Layout) -> dict[str, PV]:
    return {pv.name: pv for pv in build(layout)}


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: lay.prefix)
def test_every_component_pv_is_in_the_schema(layout: Layout) -> None:
    pvs = schema(layout)
    for sig in signals(layout):
        read = pvs.get(sig.pvname)
        assert read is not None, f"{sig.name}: {sig.pvname} is not served"
        assert not read.field.pva_only
        assert sig.as_string == (read.field.kind in TEXT_KINDS), sig.name
        if isinstance(sig, EpicsSignal):
            write = pvs.get(sig.setpoint_pvname)
            assert write is not None, f"{sig.name}: {sig.setpoint_pvname} is not served"
            assert write.field.writable, f"{sig.name} writes read-only {write.name}"
            assert sig.put_complete, f"{sig.name}: writes must complete on the IOC"
            if read is not write:
                assert read.is_rbv and not read.field.writable
                assert read.name == write.name + "_RBV"
        else:
            assert not read.field.writable, f"{sig.name}: writable {read.name} as read-only"


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: lay.prefix)
def test_every_ca_pv_has_a_component(layout: Layout) -> None:
    used: set[str] = set()
    for sig in signals(layout):
        used.add(sig.pvname)
        if isinstance(sig, EpicsSignal):
            used.add(sig.setpoint_pvname)
    served = {name for name, pv in schema(layout).items() if not pv.field.pva_only}
    assert served - used == set()
    assert used - served == set()


def test_busy_commands_use_put_completion() -> None:
    pvs = schema(Layout())
    busy = [sig for sig in signals(Layout()) if pvs[sig.pvname].field.kind is Kind.BUSY]
    assert len(busy) == 2 * 4 + 4 + 4 + 1  # DAQ Start/Stop, UP Start, WF Start, Metadata Upload
    assert all(isinstance(sig, EpicsSignal) and sig.put_complete for sig in busy)


def test_enum_strings_the_plans_use() -> None:
    fields = {(pv.group, pv.suffix): pv.field for pv in build(Layout())}
    for key in [("Experiment", "Valid_RBV"), ("DAQ", "Active_RBV"), ("WF", "WaitForOthers"),
                ("DAQ", "RemoveSource"), ("UP", "RemoveSource")]:
        assert fields[key].enums == NO_YES
    assert fields[("UP", "Mode")].enums == UPLOAD_MODES


def test_slots_are_reachable_by_number() -> None:
    gateway = DMGateway("X:", n_daq=2, n_upload=1, n_workflow=3, name="gw")
    assert gateway.daq(2).prefix == "X:DAQ2:"
    assert gateway.workflow(3).start_job.setpoint_pvname == "X:WF3:Start"
    assert type(gateway) is type(DMGateway("Y:", n_daq=2, n_upload=1, n_workflow=3, name="g2"))
    assert isinstance(gateway, DMGateway)
    with pytest.raises(ValueError, match="no slot up2"):
        gateway.upload(2)
    assert repr(gateway) == ("DMGateway(prefix='X:', name='gw', n_daq=2, n_upload=1, "
                             "n_workflow=3)")
