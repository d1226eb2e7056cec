"""Demo streaming workflow: the program a DM workflow stage runs to take part in a stream.

It is the reference for beamline staff writing their own. Over PV Access (configured by
the ``EPICS_PVA_*`` environment the DM service passes on) it posts ``Stream:Workflow``
state ``ready``, follows ``Stream:Bluesky`` and counts the frames bluesky announces
while ``acquiring``, and when bluesky says ``done`` posts ``done`` with a summary and
exits 0. A timeout, or bluesky reporting ``error``, posts ``error`` and exits 1.

    python -m apsdm_ophyd.streaming_workflow --prefix DM: --timeout 600
"""

from __future__ import annotations

import argparse
import queue
import sys
import time
from typing import Any

from p4p.client.thread import Context, Disconnected

from .pva import TERMINAL, StreamNames, StreamState, post


def follow(ctx: Context, names: StreamNames, timeout: float) -> tuple[bool, str, int]:
    """Run the handshake; returns (success, summary, frames counted)."""
    updates: queue.Queue[Any] = queue.Queue()
    subscription = ctx.monitor(names.bluesky, updates.put, notify_disconnect=True)
    try:
        post(ctx, names.workflow, "ready", "waiting for bluesky")
        print(f"ready: following {names.bluesky}", flush=True)
        deadline = time.monotonic() + timeout
        frames = n_updates = 0
        first = True
        while True:
            try:
                item = updates.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return False, f"timed out after {timeout:g} s with {frames} frames", frames
            if isinstance(item, Disconnected):
                continue  # delivered before the first value and on IOC restarts
            if isinstance(item, Exception):
                return False, f"lost {names.bluesky}: {item}", frames
            state = StreamState.from_value(item)
            stale = first and state.state in TERMINAL  # the end of an earlier run
            first = False
            if stale:
                continue
            if state.state == "acquiring":
                n_updates += 1
                if state.counter != frames:
                    frames = state.counter
                    post(ctx, names.workflow, "acquiring", f"{frames} frames so far", frames)
            elif state.state == "done":
                frames = state.counter
                return True, f"consumed {frames} frames in {n_updates} updates", frames
            elif state.state == "error":
                return False, f"bluesky reported an error: {state.message}", frames
    finally:
        subscription.close()


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: run the handshake against the gateway with this prefix."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefix", default="DM:", help="gateway PV prefix (default DM:)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds to wait for bluesky to finish (default 600)")
    args = parser.parse_args(argv)
    names = StreamNames.for_prefix(args.prefix)
    with Context("pva") as ctx:
        try:
            ok, summary, frames = follow(ctx, names, args.timeout)
        except Exception as exc:  # report any failure on the PV before exiting
            ok, summary, frames = False, f"{type(exc).__name__}: {exc}", 0
        post(ctx, names.workflow, "done" if ok else "error", summary, frames)
    print(("done: " if ok else "error: ") + summary, flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
