"""ophyd-async devices for the apsdm-gateway IOC: every PV of DESIGN.md as a typed signal over PVA.

Like the ophyd (v1) devices they know only PV names, never the IOC package. Busy commands are
:class:`BusyCommand` movables whose ``set()`` completes when the IOC's action ends.
"""

from .beamtime import DMBeamtime, DMEsaf, DMProposal
from .command import BusyCommand, CommandFailed
from .daq import DMDaq
from .enums import Connection, HandshakeState, NoYes, StartCommand, StopCommand, UploadCommand, UploadMode
from .experiment import DMExperiment
from .gateway import DMGateway
from .health import DMHealth
from .metadata import DMMetadata
from .stream import DMStream, DMStreamSide, StreamMemberBackend
from .tables import (
    ExperimentsTable,
    GatewayTable,
    JobsTable,
    StagesTable,
    TransfersTable,
    WorkflowsTable,
)
from .transfer import DMTransfer
from .upload import DMUpload
from .workflow import DMWorkflow

__all__ = [
    "BusyCommand",
    "CommandFailed",
    "Connection",
    "DMBeamtime",
    "DMDaq",
    "DMEsaf",
    "DMExperiment",
    "DMGateway",
    "DMHealth",
    "DMMetadata",
    "DMProposal",
    "DMStream",
    "DMStreamSide",
    "DMTransfer",
    "DMUpload",
    "DMWorkflow",
    "ExperimentsTable",
    "GatewayTable",
    "HandshakeState",
    "JobsTable",
    "NoYes",
    "StagesTable",
    "StartCommand",
    "StopCommand",
    "StreamMemberBackend",
    "TransfersTable",
    "UploadCommand",
    "UploadMode",
    "WorkflowsTable",
]
