"""Enum strings of the gateway's enum and busy-command PVs, as ophyd-async ``StrictEnum``s.

A ``StrictEnum`` fails the connection if the IOC's choices differ, so a schema change
shows at connect time, not at the first put.
"""

from ophyd_async.core import StrictEnum


class NoYes(StrictEnum):
    """``Experiment:Valid_RBV``, ``DAQn:Active_RBV``, ``WFn:WaitForOthers``,
    ``DAQn:``/``UPn:RemoveSource``."""

    NO = "No"
    YES = "Yes"


class UploadMode(StrictEnum):
    """``UPn:Mode``: upload one file or a directory tree."""

    FILE = "File"
    DIRECTORY = "Directory"


class Connection(StrictEnum):
    """``Status:Connected_RBV``: whether the gateway reaches DM."""

    DISCONNECTED = "Disconnected"
    CONNECTED = "Connected"


class StartCommand(StrictEnum):
    """Busy ``Start`` commands (DAQ, upload, workflow): ``Start`` runs, ``Done`` when it ends."""

    DONE = "Done"
    START = "Start"


class StopCommand(StrictEnum):
    """Busy ``DAQn:Stop``."""

    DONE = "Done"
    STOP = "Stop"


class UploadCommand(StrictEnum):
    """Busy ``Metadata:Upload``."""

    DONE = "Done"
    UPLOAD = "Upload"


class HandshakeState(StrictEnum):
    """``state`` of either side of the streaming handshake (``Stream:Bluesky``/``:Workflow``)."""

    IDLE = "idle"
    READY = "ready"
    ACQUIRING = "acquiring"
    DONE = "done"
    ERROR = "error"
