"""The gateway's PV state: one value and alarm per PV, published to both servers.

Data flows one way: the publisher and commands ``post`` values here and the CA and PVA
servers (the sinks) show them; a client write arrives at :meth:`Hub.put`, is checked
(access, type, length) and handed to the command handler registered for that PV.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from .checks import PutRejected
from .schema import PV, Kind

log = logging.getLogger(__name__)

# CA alarm codes (caproto AlarmStatus / AlarmSeverity values)
NO_ALARM, MINOR, MAJOR, INVALID = 0, 1, 2, 3
STATUS_STATE, STATUS_COMM = 7, 9


class Alarm(NamedTuple):
    """Severity and status in CA's codes, and a message for PVA (CA has no message)."""

    severity: int = NO_ALARM
    status: int = 0
    message: str = ""


OK = Alarm()


def comm_alarm(message: str = "DM unreachable") -> Alarm:
    return Alarm(INVALID, STATUS_COMM, message)


def state_alarm(message: str) -> Alarm:
    return Alarm(MINOR, STATUS_STATE, message)


class Writer(NamedTuple):
    """Who wrote: protocol, host and user as the client reports them, and its address."""

    protocol: str
    host: str
    user: str
    address: str = ""

    def __str__(self) -> str:
        return f"{self.user}@{self.host} ({self.protocol})"


current_writer: ContextVar[Writer | None] = ContextVar("current_writer", default=None)


class Sink(Protocol):
    """A server that shows hub values to its clients (the CA and PVA servers)."""

    async def publish(self, pv: PV, value: Any, alarm: Alarm, timestamp: float) -> None: ...


Handler = Callable[[PV, Any, Writer], Awaitable[Any]]


@dataclass
class AccessList:
    """Hosts, addresses and users allowed to write; empty means everyone may write."""

    allowed: frozenset[str] = frozenset()

    def permits(self, *identities: str) -> bool:
        return not self.allowed or any(i in self.allowed for i in identities if i)


class Hub:
    """Holds every PV's value and alarm and routes client writes to command handlers."""

    def __init__(self, pvs: Iterable[PV], access: AccessList | None = None) -> None:
        self.pvs: dict[str, PV] = {pv.name: pv for pv in pvs}
        self.values: dict[str, Any] = {name: pv.field.initial for name, pv in self.pvs.items()}
        self.alarms: dict[str, Alarm] = dict.fromkeys(self.pvs, OK)
        self.stamps: dict[str, float] = dict.fromkeys(self.pvs, time.time())
        self.access = access or AccessList()
        self.sinks: list[Sink] = []
        self.handlers: dict[str, Handler] = {}
        # a write takes effect: a setting is stored, a command starts
        self.on_write: list[Callable[[PV, Writer], Awaitable[None]]] = []
        self._running: dict[str, asyncio.Future[Any]] = {}  # busy commands under way
        self._released: set[str] = set()  # busy commands whose waiting a 0 ended

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def handle(self, name: str, handler: Handler) -> None:
        """Route client writes of ``name`` to ``handler`` (its return value is stored)."""
        self.handlers[name] = handler

    async def post(self, name: str, value: Any, alarm: Alarm = OK, *, force: bool = False) -> None:
        """Set a PV's value and alarm and show it on both protocols (unchanged: no event)."""
        pv = self.pvs[name]
        if pv.field.kind in (Kind.STRING, Kind.LONGSTRING) and isinstance(value, str):
            value = fit(value, pv.field.length("pva") - 1)  # CA shows what it can hold
        if not force and self.values[name] == value and self.alarms[name] == alarm:
            return
        self.values[name], self.alarms[name] = value, alarm
        self.stamps[name] = now = time.time()
        for sink in self.sinks:
            try:
                await sink.publish(pv, value, alarm, now)
            except Exception:  # a broken client connection must not stop the others
                log.exception("publishing %s failed", name)

    async def set_alarm(self, name: str, alarm: Alarm) -> None:
        await self.post(name, self.values[name], alarm)

    def may_write(self, pv: PV, *identities: str) -> bool:
        return pv.field.writable and self.access.permits(*identities)

    async def put(self, name: str, raw: Any, writer: Writer) -> Any:
        """A client write: check it, run its handler, store and show the result.

        Raises :class:`PutRejected` with a message for the client; a busy command is 1
        while its handler runs and returns to 0 when the handler ends.
        """
        pv = self.pvs[name]
        try:
            return await self._put(pv, raw, writer)
        except PutRejected as exc:
            await self.refused(pv, exc, writer)
            raise

    async def refused(self, pv: PV, exc: PutRejected, writer: Writer) -> None:
        """Log a refused write and say why in the Message_RBV of ``pv``, with an alarm."""
        log.warning("write refused: %s (by %s)", exc, writer)
        await self.post(self.message_pv(pv), str(exc), state_alarm(str(exc)))

    def message_pv(self, pv: PV) -> str:
        """The Message_RBV that explains what happened to a write of ``pv``."""
        name = pv.name.rsplit(":", 1)[0] + ":Message_RBV"
        return name if name in self.pvs else self.status_message

    @functools.cached_property
    def status_message(self) -> str:
        """Status:Message_RBV's full name (looked up once: every setting write asks)."""
        return next(n for n, pv in self.pvs.items()
                    if pv.group == "Status" and pv.suffix == "Message_RBV")

    async def _put(self, pv: PV, raw: Any, writer: Writer) -> Any:
        name = pv.name
        if not pv.field.writable:
            raise PutRejected(f"{name} is read-only")
        self.check_writer(pv, writer)
        value = coerce(pv, raw, writer.protocol)
        if pv.field.kind is Kind.BUSY:
            return await self._command(pv, value, writer, self.handlers[name])
        handler = self.handlers.get(name)
        if handler is not None:
            value = await handler(pv, value, writer)
        await self.post(name, value)
        for hook in self.on_write:
            await hook(pv, writer)
        return value

    def check_writer(self, pv: PV, writer: Writer) -> None:
        """Refuse a writer that the allow-list does not name (by host, user or address)."""
        if not self.access.permits(writer.host, writer.user, writer.address):
            raise PutRejected(f"{writer.user}@{writer.host} may not write {pv.name}")

    async def _command(self, pv: PV, value: int, writer: Writer, handler: Handler) -> int:
        """Run a busy command: 1 while its handler runs, 0 after. Writing 0 while it runs
        releases the slot: the waiting put fails, and the DM action itself goes on."""
        name = pv.name
        running = self._running.get(name)
        if not value:
            if running is not None:
                self._released.add(name)
                running.cancel()
            return 0
        if running is not None:
            raise PutRejected(f"{name} is busy: wait until the running action ends, "
                              "or write 0 to stop waiting")
        for hook in self.on_write:
            await hook(pv, writer)
        await self.post(name, 1)
        task = asyncio.ensure_future(handler(pv, value, writer))
        self._running[name] = task
        try:
            await task
            log.info("%s: done", name)
        except asyncio.CancelledError:
            if name not in self._released:  # the put itself was cancelled (shutdown)
                raise
            raise PutRejected(f"{name}: stopped waiting (0 written); the DM action goes on") from None
        finally:
            self._released.discard(name)
            self._running.pop(name, None)
            await self.post(name, 0)
        return 0


def fit(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` UTF-8 bytes, never inside a character."""
    data = text.encode("utf-8")
    return text if len(data) <= limit else data[:limit].decode("utf-8", "ignore")


def coerce(pv: PV, raw: Any, protocol: str = "ca") -> Any:
    """Turn a client's value into the PV's Python type, or refuse it with a reason (texts
    by the length the PV holds on the writer's ``protocol``)."""
    f = pv.field
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise PutRejected(f"{pv.name}: value is not UTF-8 text") from None
    if f.kind in (Kind.STRING, Kind.LONGSTRING):
        text = str(raw).rstrip("\x00")
        if "\x00" in text:
            raise PutRejected(f"{pv.name}: text contains NUL characters")
        # one byte is kept for the terminator, as EPICS does: a client that cut a longer
        # text to the element count is then refused instead of silently truncated
        limit = f.length(protocol) - 1
        if len(text.encode("utf-8")) > limit:
            raise PutRejected(f"{pv.name}: text too long ({len(text)} characters, at most {limit})")
        return text
    if f.kind in (Kind.ENUM, Kind.BUSY):
        if isinstance(raw, str):
            if raw in f.enums:
                return f.enums.index(raw)
            try:
                raw = int(raw)
            except ValueError:
                raise PutRejected(
                    f"{pv.name}: {raw!r} is not one of {', '.join(f.enums)}") from None
        if isinstance(raw, float) and (not math.isfinite(raw) or raw != int(raw)):
            raise PutRejected(f"{pv.name}: {raw!r} is not a choice index")
        index = int(raw)
        if not 0 <= index < len(f.enums):
            raise PutRejected(f"{pv.name}: index {index} is not one of 0..{len(f.enums) - 1}")
        return index
    if f.kind is Kind.LONG:
        try:
            value = int(raw)
        except (TypeError, ValueError, OverflowError):
            raise PutRejected(f"{pv.name}: {raw!r} is not an integer") from None
        if not -(2**31) <= value < 2**31:
            raise PutRejected(f"{pv.name}: {value} is out of range")
        return value
    if f.kind is Kind.DOUBLE:
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise PutRejected(f"{pv.name}: {raw!r} is not a number") from None
        if not math.isfinite(value):
            raise PutRejected(f"{pv.name}: {value} is not a finite number")
        return value
    return raw
