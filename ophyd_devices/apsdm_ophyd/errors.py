"""The exceptions the plans raise: each carries the gateway's reason in words."""

__all__ = ["GatewayError", "MetadataNotShared", "PreflightFailed", "WaitExpired",
           "WorkflowFailed"]


class GatewayError(RuntimeError):
    """The gateway refused a command or it did not do what was asked; the text says why."""


class WorkflowFailed(GatewayError):
    """A processing job did not start or ended in a state other than ``done``."""


class PreflightFailed(GatewayError):
    """A check made before any data were taken failed; nothing was started."""


class MetadataNotShared(GatewayError):
    """The run's metadata did not reach DM's catalog (too large for ``Metadata:Json``, or refused)."""


class WaitExpired(TimeoutError):
    """A plan's own wait ran out of time (:func:`apsdm_ophyd.progress.wait_until`): told apart
    from a read that timed out inside it (ophyd's ReadTimeoutError is a TimeoutError too)."""
