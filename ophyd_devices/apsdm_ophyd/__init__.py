"""Ophyd devices and bluesky plans for the apsdm-gateway IOC (APS Data Management over EPICS).

Only PV names are known here: nothing imports the IOC package, and every device is made of
``EpicsSignal``/``EpicsSignalRO`` (plus one adapter for the PVA-only PVs, ``pva.PvaChannels``),
so any EPICS client host can use it.
"""

from .devices import DMDaq, DMExperiment, DMGateway, DMMetadata, DMStatus, DMUpload, DMWorkflow
from .errors import (
    GatewayError,
    MetadataNotShared,
    PreflightFailed,
    WaitExpired,
    WorkflowFailed,
)
from .plans import file_collection_plan, setup_user, streaming_collection_plan
from .preflight import check_job_args, preflight
from .progress import Progress, Timing
from .reports import JobReport, RunReport, UserSetup
from .stubs import (
    share_metadata,
    start_workflow,
    upload,
    wait_daq_files,
    wait_upload,
    wait_workflow,
)
from .wrappers import WorkflowRequest, dm_workflow_wrapper

__all__ = ["DMDaq", "DMExperiment", "DMGateway", "DMMetadata", "DMStatus", "DMUpload",
           "DMWorkflow", "GatewayError", "JobReport", "MetadataNotShared", "PreflightFailed",
           "Progress", "RunReport", "Timing", "UserSetup", "WaitExpired", "WorkflowFailed",
           "WorkflowRequest",
           "check_job_args", "dm_workflow_wrapper", "file_collection_plan", "preflight",
           "setup_user", "share_metadata", "start_workflow", "streaming_collection_plan",
           "upload", "wait_daq_files", "wait_upload", "wait_workflow"]
