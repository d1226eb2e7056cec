"""``DAQn:``: a DAQ that copies new files of a local tree into experiment storage."""

from ophyd_async.core import StandardReadableFormat as Format

from .command import BusyCommand
from .enums import NoYes, StartCommand, StopCommand
from .signals import readback, setting
from .transfer import DMTransfer


class DMDaq(DMTransfer):
    """One DAQ slot: ``start_daq.set(StartCommand.START)`` starts (or reuses) the DAQ."""

    def add_slot_signals(self, prefix: str) -> None:
        with self.add_children_as_readables(Format.CONFIG_SIGNAL):
            self.data_directory = setting(str, prefix, "DataDirectory")
            self.daq_id = readback(str, prefix, "Id_RBV")
        with self.add_children_as_readables():
            self.daq_status = readback(str, prefix, "Status_RBV")
            self.n_waiting = readback(int, prefix, "NWaiting_RBV")
            self.active = readback(NoYes, prefix, "Active_RBV")
        self.start_daq = BusyCommand(StartCommand, prefix, "Start", self.message, self.daq_status)
        self.stop_daq = BusyCommand(StopCommand, prefix, "Stop", self.message, self.daq_status)
