"""What both DM access implementations share, whatever carries their calls: configuration,
the DM account and its default ownership, the station, the call count, and upsert."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Self

from .config import Credentials, DmConfig
from .errors import ObjectAlreadyExists
from .records import Workflow


class DmClientBase(ABC):
    """The transport-free part of a :class:`~apsdm.dm.api.DmApi` implementation."""

    def __init__(self, config: DmConfig) -> None:
        self.config = config
        self.requests = 0  # DM calls made, for health PVs and the load benchmark
        self._credentials: Credentials | None = None

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(urls={dict(self.config.urls)!r}, "
                f"station={self.config.station!r})")

    @property
    def username(self) -> str:
        """The DM account in use; DM's tools use it as the default workflow owner."""
        return self._creds().username

    @property
    def station(self) -> str:
        return self.config.station

    def _creds(self) -> Credentials:
        """The login, read from the configured file on first use (never at construction)."""
        if self._credentials is None:
            self._credentials = self.config.credentials()
        return self._credentials

    def _owner(self, owner: str) -> str:
        """A workflow or job owner: the one given, else our DM account (as DM's tools do)."""
        return owner or self.username

    def _owned(self, workflow: dict[str, Any]) -> dict[str, Any]:
        """A workflow definition that names an owner (our DM account unless it has one)."""
        return {"owner": self.username, **workflow}

    @abstractmethod
    async def close(self) -> None:
        """Release connections or vendor API objects."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @abstractmethod
    async def add_workflow(self, workflow: dict[str, Any]) -> Workflow: ...

    @abstractmethod
    async def update_workflow(self, workflow: dict[str, Any]) -> Workflow: ...

    async def upsert_workflow(self, workflow: dict[str, Any]) -> Workflow:
        """Add the workflow, or update it if one of that name exists (dm-upsert-workflow)."""
        try:
            return await self.add_workflow(workflow)
        except ObjectAlreadyExists:
            return await self.update_workflow(workflow)
