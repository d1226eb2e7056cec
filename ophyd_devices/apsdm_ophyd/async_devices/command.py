"""A busy-style command as a bluesky ``Movable``: ``set()`` completes when the IOC's action ends."""

from typing import TypeVar

from bluesky.protocols import Movable
from ophyd_async.core import AsyncStatus, Device, Reference, SignalR, StrictEnum
from p4p.client.asyncio import RemoteError

from .signals import setting

CommandT = TypeVar("CommandT", bound=StrictEnum)


class CommandFailed(RuntimeError):
    """The IOC refused a command, or its action ended badly; the text is the slot's message."""


class BusyCommand(Device, Movable[CommandT]):
    """A ``bo`` that is 1 while the IOC's action runs; ``set()`` puts with put-completion (no
    timeout: a job may run for hours), then fails if the slot's message or an outcome readback
    (e.g. ``Status_RBV``) carries an alarm, which is how the IOC reports a failure."""

    def __init__(self, datatype: type[CommandT], prefix: str, suffix: str, message: SignalR[str],
                 *outcomes: SignalR[str], name: str = "") -> None:
        self.busy = setting(datatype, prefix, suffix)
        self._checks = [Reference(signal) for signal in (message, *outcomes)]
        super().__init__(name)

    @AsyncStatus.wrap
    async def set(self, value: CommandT) -> None:
        message = self._checks[0]()
        try:
            await self.busy.set(value, timeout=None)
        except RemoteError as refused:
            raise CommandFailed(f"{self.name}: {refused}") from refused
        for check in self._checks:
            [reading] = (await check().read(cached=False)).values()
            if reading["alarm_severity"]:
                raise CommandFailed(f"{self.name}: {await message.get_value(cached=False)}")
