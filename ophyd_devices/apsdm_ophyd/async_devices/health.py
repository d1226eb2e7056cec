"""``Status:``: gateway health (DM reachable, heartbeat, version, last writer)."""

from ophyd_async.core import StandardReadable
from ophyd_async.core import StandardReadableFormat as Format

from .enums import Connection
from .signals import readback


class DMHealth(StandardReadable):
    """The gateway's own state; ``connected`` is ``Disconnected`` while DM is unreachable."""

    def __init__(self, prefix: str, name: str = "") -> None:
        with self.add_children_as_readables():
            self.connected = readback(Connection, prefix, "Connected_RBV")
        with self.add_children_as_readables(Format.CONFIG_SIGNAL):
            self.version = readback(str, prefix, "Version_RBV")
            self.dm_url = readback(str, prefix, "DmUrl_RBV")
            self.poll_period = readback(float, prefix, "PollPeriod_RBV")
        self.message = readback(str, prefix, "Message_RBV")
        self.heartbeat = readback(int, prefix, "Heartbeat_RBV")
        self.last_writer = readback(str, prefix, "LastWriter_RBV")
        self.dm_requests = readback(int, prefix, "DmRequests_RBV")
        super().__init__(name)
