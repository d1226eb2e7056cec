"""PV Access helpers (p4p) for the gateway's PVA-only PVs: the streaming handshake and tables.

Both the bluesky plans and the demo streaming workflow use these, so the two sides of
``Stream:Bluesky`` / ``Stream:Workflow`` agree on the structure by construction.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

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

