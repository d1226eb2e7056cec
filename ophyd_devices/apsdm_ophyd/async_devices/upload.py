"""``UPn:``: upload one file or a directory tree into experiment storage."""

from ophyd_async.core import StandardReadableFormat as Format

from .command import BusyCommand
from .enums import StartCommand, UploadMode
from .signals import readback, setting
from .transfer import DMTransfer


class DMUpload(DMTransfer):
    """One upload slot: ``start_upload.set(StartCommand.START)`` completes when the upload ends."""

    def add_slot_signals(self, prefix: str) -> None:
        with self.add_children_as_readables(Format.CONFIG_SIGNAL):
            self.path = setting(str, prefix, "Path")
            self.mode = setting(UploadMode, prefix, "Mode")
            self.upload_id = readback(str, prefix, "Id_RBV")
        with self.add_children_as_readables():
            self.upload_status = readback(str, prefix, "Status_RBV")
        self.start_upload = BusyCommand(StartCommand, prefix, "Start", self.message,
                                        self.upload_status)
