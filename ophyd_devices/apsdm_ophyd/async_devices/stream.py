"""``Stream:Bluesky`` and ``Stream:Workflow``: the streaming handshake, one signal per member.

The handshake is a custom ``apsdm:stream:1.0`` structure, not a normative type: ophyd-async's
PVA backend picks its converter from the NT type and reads a ``value`` field, so it refuses the
PV ("no such member field 'value'"). A backend that reads and writes one named member makes
it usable; it relies on ophyd-async 0.21's PVA internals (its context and initial get).
"""

import time
from typing import Any

from event_model import DataKey
from ophyd_async.core import (
    SignalDatatypeT,
    SignalMetadata,
    SignalRW,
    StandardReadable,
    StrictEnum,
    make_datakey,
)
from ophyd_async.epics.core import PvaSignalBackend
from ophyd_async.epics.core._p4p import context

from .enums import HandshakeState
from .signals import setting


class _MemberConverter:
    """Converts one member of the structure, as ophyd-async's PVA converters convert ``value``."""

    reading_fields = ("alarm", "timeStamp")

    def __init__(self, datatype: type, member: str) -> None:
        self.datatype = datatype
        self.value_fields = (member,)

    def value(self, value: Any) -> Any:
        return self.datatype(value[self.value_fields[0]])


class StreamMemberBackend(PvaSignalBackend[SignalDatatypeT]):
    """Reads (and monitors) member ``member`` of a handshake PV, with its alarm and time stamp;
    writes it alone, stamped with the current time (the IOC merges a partial put)."""

    def __init__(self, datatype: type[SignalDatatypeT], pv: str, member: str) -> None:
        super().__init__(datatype, pv, pv)
        self.member = member

    async def connect(self, timeout: float) -> None:
        await self._store_initial_value(self.read_pv, timeout=timeout)
        self.converter = _MemberConverter(self.datatype, self.member)  # type: ignore[assignment]

    async def put(self, value: SignalDatatypeT | None) -> None:
        stamp = {} if self.member == "timestamp" else {"timestamp": time.time()}
        await context().put(self.write_pv, {self.member: value, **stamp}, wait=True)

    async def get_datakey(self, source: str) -> DataKey:
        metadata = SignalMetadata()
        if isinstance(self.datatype, type) and issubclass(self.datatype, StrictEnum):
            metadata["choices"] = [state.value for state in self.datatype]
        return make_datakey(self.datatype, await self.get_value(), source, metadata)


class DMStreamSide(StandardReadable):
    """One side of the handshake; each side writes its own and reads the other's. The
    ``mirror_*`` signals are its scalar PVs (``Stream:Bluesky:State`` ...), one value with it."""

    def __init__(self, pv: str, name: str = "") -> None:
        with self.add_children_as_readables():
            self.state = SignalRW(StreamMemberBackend(HandshakeState, pv, "state"))
            self.counter = SignalRW(StreamMemberBackend(int, pv, "counter"))
        self.message = SignalRW(StreamMemberBackend(str, pv, "message"))
        self.timestamp = SignalRW(StreamMemberBackend(float, pv, "timestamp"))
        self.mirror_state = setting(HandshakeState, pv, ":State")
        self.mirror_message = setting(str, pv, ":Message")
        self.mirror_counter = setting(int, pv, ":Counter")
        super().__init__(name)


class DMStream(StandardReadable):
    """``Stream:``: both sides of the handshake."""

    def __init__(self, prefix: str, name: str = "") -> None:
        with self.add_children_as_readables():
            self.bluesky = DMStreamSide(f"{prefix}Bluesky")
            self.workflow = DMStreamSide(f"{prefix}Workflow")
            self.workflow_lost = setting(int, prefix, "Workflow:Lost")
        self.workflow_results = setting(str, prefix, "Workflow:Results")
        super().__init__(name)
