"""``Experiment:``: select the DM experiment by name and read its fields."""

from ophyd_async.core import StandardReadable
from ophyd_async.core import StandardReadableFormat as Format

from .enums import NoYes
from .signals import readback, setting


class DMExperiment(StandardReadable):
    """The selected DM experiment; writing ``experiment_name`` looks it up in DM
    (``message`` says why not)."""

    def __init__(self, prefix: str, name: str = "") -> None:
        with self.add_children_as_readables():  # read() says which experiment, and if valid
            self.experiment_name = setting(str, prefix, "Name", rbv=True)
            self.valid = readback(NoYes, prefix, "Valid_RBV")
        with self.add_children_as_readables(Format.CONFIG_SIGNAL):
            self.experiment_id = readback(int, prefix, "Id_RBV")
            self.description = readback(str, prefix, "Description_RBV")
            self.station = readback(str, prefix, "Station_RBV")
            self.experiment_type = readback(str, prefix, "Type_RBV")
            self.data_directory = readback(str, prefix, "DataDirectory_RBV")
            self.storage_directory = readback(str, prefix, "StorageDirectory_RBV")
            self.start_date = readback(str, prefix, "StartDate_RBV")
            self.users = readback(str, prefix, "Users_RBV")
        self.message = readback(str, prefix, "Message_RBV")
        super().__init__(name)
