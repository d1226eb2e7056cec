"""PV Access helpers (p4p) for the gateway's PVA-only PVs: the streaming handshake and tables.

Both the bluesky plans and the demo streaming workflow use these, so the two sides of
``Stream:Bluesky`` / ``Stream:Workflow`` agree on the structure by construction.
:class:`PvaChannels` is the plans' one adapter: ophyd Signals over those PVs, so plans
read and write them with ``bps.rd`` / ``bps.abs_set`` messages, never p4p calls of their own.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from functools import cache
from typing import Any

from ophyd import Kind, Signal
from ophyd.status import Status
from p4p.client.thread import Context

STATES = ("idle", "ready", "acquiring", "done", "error")
TERMINAL = frozenset({"done", "error"})


@dataclass(frozen=True)
class StreamNames:
    """The two handshake PVs of one gateway; each side writes its own and reads the other's."""

    bluesky: str
    workflow: str

    @classmethod
    def for_prefix(cls, prefix: str) -> StreamNames:
        """The handshake PVs of the gateway with this PV prefix."""
        return cls(f"{prefix}Stream:Bluesky", f"{prefix}Stream:Workflow")


@dataclass(frozen=True)
class StreamState:
    """One side's handshake value: ``state`` (see STATES), free text, a counter, a time."""

    state: str
    message: str = ""
    counter: int = 0
    timestamp: float = 0.0

    @classmethod
    def from_value(cls, value: Any) -> StreamState:
        """Decode a p4p Value of the handshake structure."""
        return cls(state=_text(value["state"]), message=str(value["message"]),
                   counter=int(value["counter"]), timestamp=float(value["timestamp"]))


def _text(field: Any) -> str:
    """A string field, or an enum_t field as the text of its selected choice."""
    if isinstance(field, str):
        return field
    return str(field["choices"][field["index"]])


def post(ctx: Context, pvname: str, state: str, message: str = "", counter: int = 0) -> None:
    """Write this side's handshake value, stamped with the current time."""
    if state not in STATES:
        raise ValueError(f"stream state must be one of {STATES}, not {state!r}")
    ctx.put(pvname, {"state": state, "message": message, "counter": int(counter),
                     "timestamp": time.time()})


def read(ctx: Context, pvname: str, timeout: float = 5.0) -> StreamState:
    """Read one side's handshake value."""
    return StreamState.from_value(ctx.get(pvname, timeout=timeout))


def read_table(ctx: Context, pvname: str, timeout: float = 5.0) -> list[dict[str, Any]]:
    """Rows of an NTTable PV (e.g. ``WFn:Stages``) as dictionaries."""
    value = ctx.get(pvname, timeout=timeout)
    if isinstance(value, list):  # p4p unwraps NTTable into rows
        return [dict(row) for row in value]
    names = [name for name, _ in value["value"].items()]
    columns = [() if column is None else column for _, column in value["value"].items()]
    return [dict(zip(names, row, strict=True)) for row in zip(*columns, strict=True)]



@cache
def default_context() -> Context:
    """One p4p client context per process, configured by the ``EPICS_PVA_*`` environment."""
    return Context("pva")


class _PvaSignal(Signal):
    """An ophyd Signal over one PVA PV, read (and written) when the RunEngine asks."""

    def __init__(self, pvname: str, *, name: str, context: Context | None = None,
                 timeout: float = 5.0) -> None:
        super().__init__(name=name, kind=Kind.omitted)
        self.pvname, self._context, self._timeout = pvname, context, timeout

    @property
    def context(self) -> Context:
        """The context given, or the process-wide one."""
        return self._context or default_context()

    def describe(self) -> dict[str, dict[str, Any]]:
        return {self.name: {"source": f"PVA:{self.pvname}", "dtype": "string", "shape": []}}


class TableSignal(_PvaSignal):
    """A read-only NTTable PV (``Workflows``, ``WFn:Stages``); its value is a list of row dicts."""

    def get(self, **kwargs: Any) -> list[dict[str, Any]]:
        self._readback = read_table(self.context, self.pvname, self._timeout)
        return self._readback


class StreamSignal(_PvaSignal):
    """One side of the streaming handshake; reads a StreamState, ``set`` posts one."""

    def get(self, **kwargs: Any) -> StreamState:
        self._readback = read(self.context, self.pvname, self._timeout)
        return self._readback

    def set(self, value: StreamState, **kwargs: Any) -> Status:
        """Post ``value`` (stamped now); the returned Status is already finished."""
        post(self.context, self.pvname, value.state, value.message, value.counter)
        status = Status()
        status.set_finished()
        return status


@cache
def _raw_context(address: str) -> Context:
    """A context returning plain Values (no NT unwrapping), from the environment or straight
    to ``address`` (``host:port``)."""
    if not address:
        return Context("pva", nt=False)
    return Context("pva", nt=False, useenv=False, conf={
        "EPICS_PVA_NAME_SERVERS": address, "EPICS_PVA_AUTO_ADDR_LIST": "NO"})


class UniqueIdSignal(_PvaSignal):
    """The ``uniqueId`` of an NTNDArray PV (a detector's last frame), read alone."""

    def __init__(self, pvname: str, address: str = "", *, name: str = "frames_unique_id",
                 timeout: float = 5.0) -> None:
        super().__init__(pvname, name=name, context=_raw_context(address), timeout=timeout)

    def get(self, **kwargs: Any) -> int:
        value = self.context.get(self.pvname, request="field(uniqueId)", timeout=self._timeout)
        self._readback = int(value["uniqueId"])
        return self._readback

    def describe(self) -> dict[str, dict[str, Any]]:
        return {self.name: {"source": f"PVA:{self.pvname}.uniqueId", "dtype": "integer",
                            "shape": []}}


class TextSignal(_PvaSignal):
    """A text PV written over PVA, where it may hold more than CA's 4 kB (``Metadata:Json``)."""

    def get(self, **kwargs: Any) -> str:
        self._readback = str(self.context.get(self.pvname, timeout=self._timeout))
        return self._readback

    def set(self, value: str, **kwargs: Any) -> Status:
        """Put ``value`` off the caller's thread; the Status fails with the IOC's refusal."""
        status = Status()

        def put() -> None:
            try:
                # as a field: p4p parses a bare str that looks like JSON as a structure
                self.context.put(self.pvname, {"value": value}, timeout=self._timeout)
            except Exception as exc:  # p4p's RemoteError carries the IOC's reason
                status.set_exception(exc)
            else:
                status.set_finished()

        threading.Thread(target=put, name=f"put {self.pvname}", daemon=True).start()
        return status


@dataclass(frozen=True)
class PvaChannels:
    """The gateway's PVA-only PVs the plans use, as ophyd Signals sharing one context."""

    prefix: str
    context: Context | None = None

    @property
    def workflows(self) -> TableSignal:
        """``Workflows``: name, owner, stage count and description of every DM workflow."""
        return TableSignal(f"{self.prefix}Workflows", name="dm_workflows", context=self.context)

    @property
    def metadata_json(self) -> TextSignal:
        """``Metadata:Json`` over PVA: run metadata of any size (CA holds 4 kB)."""
        return TextSignal(f"{self.prefix}Metadata:Json", name="dm_metadata_json",
                          context=self.context)

    @property
    def bluesky(self) -> StreamSignal:
        """``Stream:Bluesky``, the side bluesky writes."""
        return StreamSignal(f"{self.prefix}Stream:Bluesky", name="dm_stream_bluesky",
                            context=self.context)

    @property
    def workflow(self) -> StreamSignal:
        """``Stream:Workflow``, the side the workflow writes."""
        return StreamSignal(f"{self.prefix}Stream:Workflow", name="dm_stream_workflow",
                            context=self.context)

    def stages(self, slot: int) -> TableSignal:
        """``WFn:Stages``: one row per stage and child process of the slot's job."""
        return TableSignal(f"{self.prefix}WF{slot}:Stages", name=f"dm_wf{slot}_stages",
                           context=self.context)
