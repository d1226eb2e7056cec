"""The whole gateway as one ophyd-async device: experiment, slots, metadata, health, tables,
stream, ESAF and proposal."""

from typing import Generic, TypeVar

from ophyd_async.core import Device, DeviceVector, StandardReadable
from p4p.client.thread import Context

from ..pva import PvaChannels
from .beamtime import DMBeamtime, DMEsaf, DMProposal
from .daq import DMDaq
from .experiment import DMExperiment
from .health import DMHealth
from .metadata import DMMetadata
from .signals import readback
from .stream import DMStream
from .tables import ExperimentsTable, JobsTable, TransfersTable, WorkflowsTable
from .upload import DMUpload
from .workflow import DMWorkflow

DeviceT = TypeVar("DeviceT", bound=Device)

class Slots(DeviceVector[DeviceT], Generic[DeviceT]):
    """Numbered slots: ``slots[n]`` or, as on the ophyd gateway the plans also take, ``slots(n)``."""

    def __call__(self, n: int) -> DeviceT:
        try:
            return self[int(n)]
        except KeyError:
            raise ValueError(f"{self.name} has no slot {n}") from None


class DMGateway(StandardReadable):
    """Every PV of a gateway with this prefix and these slot counts (the IOC's configuration);
    slots are ``daq[n]``, ``upload[n]``, ``workflow[n]``, numbered from 1 as in the PV names.
    ``pva_context`` reaches the PVA-only PVs the plans read through :attr:`pva` (None: one
    context from the ``EPICS_PVA_*`` environment), so apsdm_ophyd's plans take this device too."""

    def __init__(self, prefix: str = "DM:", *, n_daq: int = 4, n_upload: int = 4,
                 n_workflow: int = 4, pva_context: Context | None = None, name: str = "") -> None:
        self.prefix, self.pva_context = prefix, pva_context
        self.experiment = DMExperiment(f"{prefix}Experiment:")
        self.daq = Slots({n: DMDaq(f"{prefix}DAQ{n}:") for n in range(1, n_daq + 1)})
        self.upload = Slots({n: DMUpload(f"{prefix}UP{n}:") for n in range(1, n_upload + 1)})
        self.workflow = Slots({n: DMWorkflow(f"{prefix}WF{n}:") for n in range(1, n_workflow + 1)})
        self.metadata = DMMetadata(f"{prefix}Metadata:")
        self.health = DMHealth(f"{prefix}Status:")
        self.stream = DMStream(f"{prefix}Stream:")
        self.esaf = DMEsaf(f"{prefix}Esaf:")
        self.proposal = DMProposal(f"{prefix}Proposal:")
        self.beamtime = DMBeamtime(f"{prefix}Beamtime:")
        self.experiments = readback(ExperimentsTable, prefix, "Experiments")
        self.daqs = readback(TransfersTable, prefix, "DAQs")
        self.uploads = readback(TransfersTable, prefix, "Uploads")
        self.jobs = readback(JobsTable, prefix, "Jobs")
        self.workflows = readback(WorkflowsTable, prefix, "Workflows")
        super().__init__(name)

    @property
    def pva(self) -> PvaChannels:
        """The PVA-only PVs as the plans read them (ophyd Signals over p4p, as on the ophyd gateway)."""
        return PvaChannels(self.prefix, self.pva_context)
