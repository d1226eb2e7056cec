"""What DAQ and upload slots share: a destination in the experiment and copy progress."""

from ophyd_async.core import StandardReadable
from ophyd_async.core import StandardReadableFormat as Format

from .enums import NoYes
from .signals import readback, setting


class DMTransfer(StandardReadable):
    """The readbacks common to ``DAQn:`` and ``UPn:``; subclasses add their id, status, settings
    and commands in :meth:`add_slot_signals` (named as on the ophyd devices, which the plans use),
    where the message signal exists already."""

    def __init__(self, prefix: str, name: str = "") -> None:
        self.prefix = prefix
        with self.add_children_as_readables(Format.CONFIG_SIGNAL):
            self.dest_directory = setting(str, prefix, "DestDirectory")
            # the DM options Start passes: the common ones, the rest as a JSON object
            self.include_extensions = setting(str, prefix, "IncludeExtensions")
            self.skip_pattern = setting(str, prefix, "SkipPattern")
            self.workflow = setting(str, prefix, "Workflow")
            self.workflow_owner = setting(str, prefix, "WorkflowOwner")
            self.workflow_args = setting(str, prefix, "WorkflowArgs")
            self.remove_source = setting(NoYes, prefix, "RemoveSource")
            self.options = setting(str, prefix, "Options")
        with self.add_children_as_readables():
            self.n_files = readback(int, prefix, "NFiles_RBV")
            self.n_errors = readback(int, prefix, "NErrors_RBV")
            self.percent = readback(float, prefix, "Percent_RBV")
            self.n_jobs = readback(int, prefix, "NJobs_RBV")  # started by per-file workflow
        with self.add_children_as_readables(Format.HINTED_SIGNAL):
            self.n_processed = readback(int, prefix, "NProcessed_RBV")
        self.message = readback(str, prefix, "Message_RBV")
        self.add_slot_signals(prefix)
        super().__init__(name)

    def add_slot_signals(self, prefix: str) -> None:
        """Add the signals only this kind of slot has."""
        raise NotImplementedError
