"""Ophyd devices and bluesky plans for the apsdm-gateway IOC (APS Data Management over EPICS).

Only PV names are known here: nothing imports the IOC package, and every device is made of
``EpicsSignal``/``EpicsSignalRO``, so any EPICS client host can use it.
"""

from .devices import DMDaq, DMExperiment, DMGateway, DMMetadata, DMStatus, DMUpload, DMWorkflow
from .plans import (
    GatewayError,
    WorkflowFailed,
    file_collection_plan,
    setup_user,
    share_run_metadata,
    streaming_collection_plan,
)

__all__ = ["DMDaq", "DMExperiment", "DMGateway", "DMMetadata", "DMStatus", "DMUpload",
           "DMWorkflow", "GatewayError", "WorkflowFailed", "file_collection_plan", "setup_user",
           "share_run_metadata", "streaming_collection_plan"]
