"""Typed DM errors and the numeric codes DM puts in the ``Dm-Status-Code`` header.

Codes 5, 6, 12, 14, 15, 16, 19, 22 are verified from the vendor client; the rest follow
the ComponentDB framework DM is built on (see dm-protocol.md section 2.5).
"""

from __future__ import annotations


class DmError(Exception):
    """Any error reported by DM (or by talking to it); ``code`` is DM's status code."""

    code = 1

    def __init__(self, message: str = "") -> None:
        super().__init__(message or type(self).__name__)
        self.message = message or type(self).__name__


class InternalError(DmError):
    code = 2


class CommunicationError(DmError):
    """DM could not be reached, or answered with something that is not DM's protocol."""

    code = 3


class NoAnswer(CommunicationError):
    """The request reached DM (or may have) but no answer came back: DM may have acted on it."""


class ConfigurationError(DmError):
    code = 4


class AuthorizationError(DmError):
    code = 5


class AuthenticationError(DmError):
    code = 6


class DbError(DmError):
    code = 7


class UrlError(DmError):
    code = 8


class TimeoutError_(DmError):
    code = 9


class InvalidArgument(DmError):
    code = 10


class InvalidRequest(DmError):
    code = 11


class InvalidSession(DmError):
    code = 12


class CommandFailed(DmError):
    code = 13


class ObjectNotFound(DmError):
    code = 14


class ObjectAlreadyExists(DmError):
    code = 15


class InvalidObjectState(DmError):
    code = 16


class ServiceLimitReached(DmError):
    code = 19


class TaskTimeout(DmError):
    code = 22


ERRORS_BY_CODE: dict[int, type[DmError]] = {
    cls.code: cls
    for cls in (
        DmError,
        InternalError,
        CommunicationError,
        ConfigurationError,
        AuthorizationError,
        AuthenticationError,
        DbError,
        UrlError,
        TimeoutError_,
        InvalidArgument,
        InvalidRequest,
        InvalidSession,
        CommandFailed,
        ObjectNotFound,
        ObjectAlreadyExists,
        InvalidObjectState,
        ServiceLimitReached,
        TaskTimeout,
    )
}

ERRORS_BY_NAME: dict[str, type[DmError]] = {
    ("DmException" if cls is DmError else cls.__name__.rstrip("_")): cls
    for cls in ERRORS_BY_CODE.values()
}


def error_from_status(code: int, message: str, exception_type: str = "") -> DmError:
    """Build the typed exception for a DM status code (falling back to the type name)."""
    cls = ERRORS_BY_CODE.get(code) or ERRORS_BY_NAME.get(exception_type) or DmError
    return cls(message)


def exception_type_name(err: DmError) -> str:
    """The vendor's exception class name for ``err`` (``Dm-Exception-Type`` header)."""
    return "DmException" if type(err) is DmError else type(err).__name__.rstrip("_")
