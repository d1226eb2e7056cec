"""The whole gateway as one ophyd-async device: experiment, slots, metadata, health, tables,
stream, ESAF and proposal."""

from ophyd_async.core import DeviceVector, StandardReadable

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


class DMGateway(StandardReadable):
    """Every PV of a gateway with this prefix and these slot counts (the IOC's configuration);
    slots are ``daq[n]``, ``upload[n]``, ``workflow[n]``, numbered from 1 as in the PV names."""

    def __init__(self, prefix: str = "DM:", *, n_daq: int = 4, n_upload: int = 4,
                 n_workflow: int = 4, name: str = "") -> None:
        self.experiment = DMExperiment(f"{prefix}Experiment:")
        self.daq = DeviceVector({n: DMDaq(f"{prefix}DAQ{n}:") for n in range(1, n_daq + 1)})
        self.upload = DeviceVector({n: DMUpload(f"{prefix}UP{n}:") for n in range(1, n_upload + 1)})
        self.workflow = DeviceVector({n: DMWorkflow(f"{prefix}WF{n}:")
                                      for n in range(1, n_workflow + 1)})
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
