"""``Metadata:``: add a run's metadata (a JSON object) to DM's dataset catalog."""

from ophyd_async.core import StandardReadable
from ophyd_async.core import StandardReadableFormat as Format

from .command import BusyCommand
from .enums import UploadCommand
from .signals import readback, setting


class DMMetadata(StandardReadable):
    """Write ``json``, then ``upload.set(UploadCommand.UPLOAD)``; ``dataset_name`` names the entry."""

    def __init__(self, prefix: str, name: str = "") -> None:
        self.json = setting(str, prefix, "Json")
        with self.add_children_as_readables(Format.CONFIG_SIGNAL):
            self.dataset_name = readback(str, prefix, "DatasetName_RBV")
        self.message = readback(str, prefix, "Message_RBV")
        self.upload = BusyCommand(UploadCommand, prefix, "Upload", self.message)
        super().__init__(name)
