"""``Esaf:``, ``Proposal:``, ``Beamtime:``: the ESAF and proposal of the selected experiment
(DM's APS DB service, as the apsbss IOC shows them) and selecting the experiment for them."""

from ophyd_async.core import StandardReadable
from ophyd_async.core import StandardReadableFormat as Format

from .enums import NoYes
from .signals import readback, setting


class _Beamtime(StandardReadable):
    """What ESAFs and proposals share; writing ``beamtime_id`` ties the id to the selected
    experiment (``message`` says why not)."""

    def __init__(self, prefix: str, name: str = "") -> None:
        with self.add_children_as_readables():  # read() says which id, and if DM knows it
            self.beamtime_id = setting(str, prefix, "Id", rbv=True)
            self.valid = readback(NoYes, prefix, "Valid_RBV")
        with self.add_children_as_readables(Format.CONFIG_SIGNAL):
            self.title = readback(str, prefix, "Title_RBV")
            self.pi = readback(str, prefix, "Pi_RBV")
            self.users = readback(str, prefix, "Users_RBV")
            self.start_date = readback(str, prefix, "StartDate_RBV")
            self.end_date = readback(str, prefix, "EndDate_RBV")
            self._add_fields(prefix)
        self.message = readback(str, prefix, "Message_RBV")
        super().__init__(name)

    def _add_fields(self, prefix: str) -> None:
        """The kind's own readbacks (configuration)."""


class DMEsaf(_Beamtime):
    """``Esaf:`` — the Experiment Safety Approval Form of the selected experiment."""

    def _add_fields(self, prefix: str) -> None:
        self.esaf_status = readback(str, prefix, "Status_RBV")
        self.sector = readback(str, prefix, "Sector_RBV")


class DMProposal(_Beamtime):
    """``Proposal:`` — the beamtime proposal of the selected experiment."""

    def _add_fields(self, prefix: str) -> None:
        self.run = readback(str, prefix, "Run_RBV")


class DMBeamtime(StandardReadable):
    """``Beamtime:`` — writing ``experiment_name`` selects that experiment, creating it in DM
    if DM has none."""

    def __init__(self, prefix: str, name: str = "") -> None:
        self.experiment_name = setting(str, prefix, "Experiment")
        self.message = readback(str, prefix, "Message_RBV")
        super().__init__(name)
