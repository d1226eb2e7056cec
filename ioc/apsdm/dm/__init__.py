"""DM access: records, errors, wire format, routes, the async REST client and adapters."""

from .client import DmClient
from .config import DmConfig
from .errors import (
    AuthorizationError,
    CommunicationError,
    DmError,
    InvalidArgument,
    InvalidObjectState,
    InvalidSession,
    NoAnswer,
    ObjectAlreadyExists,
    ObjectNotFound,
)
from .records import Daq, Esaf, Experiment, Job, Proposal, Upload, Workflow

__all__ = [
    "AuthorizationError",
    "CommunicationError",
    "Daq",
    "DmClient",
    "DmConfig",
    "DmError",
    "Esaf",
    "Experiment",
    "InvalidArgument",
    "InvalidObjectState",
    "InvalidSession",
    "Job",
    "NoAnswer",
    "ObjectAlreadyExists",
    "ObjectNotFound",
    "Proposal",
    "Upload",
    "Workflow",
]
