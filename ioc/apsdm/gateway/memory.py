"""The IOC's memory over months: glibc's malloc with few arenas, the started IOC's objects spared
the garbage collector's walks, and what clients that left held given back."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import os

M_ARENA_MAX = -8  # glibc's mallopt parameter (malloc.h)
TRIM_DELAY = 5.0  # seconds after a CA client leaves before the heap is trimmed (once per burst)

_name = ctypes.util.find_library("c")
_libc = ctypes.CDLL(_name) if _name else None
_trim: asyncio.TimerHandle | None = None


def bound_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's malloc arenas (unless MALLOC_ARENA_MAX says otherwise): each thread that
    allocates (DM I/O, p4p, caproto) may get an arena of its own, and RSS then grows in
    steps of arenas that are never given back; an IOC that runs for months keeps a few."""
    if "MALLOC_ARENA_MAX" not in os.environ and hasattr(_libc, "mallopt"):  # glibc only
        _libc.mallopt(M_ARENA_MAX, arenas)  # type: ignore[union-attr]


def keep_started_objects() -> None:
    """Exempt what the started IOC holds (modules, schema, channels: about 150,000 objects,
    kept as long as it runs) from the garbage collector's walks: a full collection then
    takes a few milliseconds instead of about 100, so one can follow clients leaving."""
    gc.collect()
    gc.freeze()


def give_back_soon() -> None:
    """Return the heap's free pages to the system TRIM_DELAY from now (malloc_trim): what a
    client that left freed is otherwise kept, and RSS stays at the peak of the busiest
    moment (many clients at once, a loaded machine) for as long as the IOC runs."""
    global _trim
    if _trim is None and hasattr(_libc, "malloc_trim"):
        _trim = asyncio.get_running_loop().call_later(TRIM_DELAY, _trim_now)


def _trim_now() -> None:
    """Free what clients that left held in reference cycles (caproto's channels and
    requests: about 200 objects a client, otherwise kept until the next full collection),
    then give the free pages back."""
    global _trim
    _trim = None
    gc.collect()
    _libc.malloc_trim(0)  # type: ignore[union-attr]
