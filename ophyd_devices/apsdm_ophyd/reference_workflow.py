"""Reference streaming workflow: the program a DM workflow stage runs to analyse a frame stream.

Beamline staff copy it and replace :func:`analyse`. It subscribes to an ``NTNDArray`` PV
(a :class:`~apsdm_ophyd.stream_detector.StreamingDetector`, or areaDetector's PVA plugin),
processes every frame (sum, maximum, centroid), appends frames and results to an HDF5
file (h5py) in the experiment's analysis directory, counts lost frames from ``uniqueId``
gaps, and reports through the gateway: ``Stream:Workflow`` (state; counter = frames
received), ``Stream:Workflow:Lost`` and ``Stream:Workflow:Results`` (a JSON summary).

Handshake (``Stream:Bluesky``): the workflow says ``ready`` once subscribed; bluesky's
``acquiring`` counter is the ``uniqueId`` before the first frame, its ``done`` counter
the last ``uniqueId`` taken. The stream ends when that frame has come (or no frame came
for ``--drain`` s: the rest are lost), when ``--max-frames`` are in (the workflow has
enough and says ``done`` first), or with ``error`` on either side.

Backpressure is explicit: the frame subscription asks the server for a ``queueSize``
queue with flow control (``pipeline``); while analysis is behind, the server keeps
the newest frames and drops older ones, and every frame dropped shows as a ``uniqueId``
gap, counted and reported, never silent.

    python -m apsdm_ophyd.reference_workflow --prefix DM: --frames-pv 13SIM1:Pva1:Image \\
        --data-dir /path/of/experiment/data
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from p4p.client.thread import Context, Disconnected

from .pva import StreamNames, StreamState, post

#: progress updates to the gateway at most this often (s)
PROGRESS_PERIOD = 0.25


@dataclass
class Tally:
    """Frames received and lost (``uniqueId`` gaps), between bluesky's first and last id."""

    start: int | None = None  # the uniqueId before the first frame (bluesky's acquiring)
    end: int | None = None  # the last uniqueId taken (bluesky's done)
    received: int = 0
    gaps: int = 0  # frames missing between two received ones
    stale: int = 0  # frames from before the start, repeated or out of order
    first: int | None = None
    last: int | None = None
    latencies: list[float] = field(default_factory=list)

    def take(self, uid: int) -> bool:
        """Count frame ``uid``; False for a frame that is not new (skip it)."""
        if (self.start is not None and uid <= self.start) or (
                self.last is not None and uid <= self.last):
            self.stale += 1
            return False
        if self.last is not None:
            self.gaps += uid - self.last - 1
        self.first = uid if self.first is None else self.first
        self.last = uid
        self.received += 1
        return True

    @property
    def lost(self) -> int:
        """Frames lost so far: gaps, the head before the first received frame and, once
        the end is known, the tail after the last one."""
        head = 0 if self.start is None or self.first is None else self.first - self.start - 1
        if self.end is None:
            return self.gaps + head
        if self.first is None:
            return max(0, self.end - (self.start or 0))
        return self.gaps + head + max(0, self.end - (self.last or 0))

    @property
    def complete(self) -> bool:
        """The last frame bluesky took has come."""
        return self.end is not None and (self.last or 0) >= self.end


def analyse(frame: np.ndarray) -> dict[str, float]:
    """Per-frame results: sum, maximum and intensity centroid (row, column)."""
    rows = frame.sum(axis=1, dtype=np.float64)  # no float copy of the whole frame
    cols = frame.sum(axis=0, dtype=np.float64)
    total = float(rows.sum())
    cy = float(rows @ np.arange(rows.size)) / total if total else float("nan")
    cx = float(cols @ np.arange(cols.size)) / total if total else float("nan")
    return {"sum": total, "max": float(frame.max()), "centroid_row": cy, "centroid_col": cx}


class Store:
    """Frames and per-frame results appended to one HDF5 file.

    A frame is one chunk, written as is in one call (no filter, no chunk cache: a third of
    the time of an indexed write at 8 MiB); datasets grow ``GROW`` rows at a time and
    results are written ``GROW`` rows at a time, instead of seven resizes a frame. The
    file is complete, and trimmed to the frames received, when the workflow ends."""

    RESULTS = ("unique_id", "sum", "max", "centroid_row", "centroid_col", "latency")
    GROW = 64

    def __init__(self, path: Path, frames_pv: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.file = h5py.File(path, "w")
        self.file.attrs["frames_pv"] = frames_pv
        self.file.attrs["started"] = time.time()
        self.frames: Any = None
        self.count = 0
        self.pending: list[dict[str, float]] = []  # results not yet written
        self.results = {name: self.file.create_dataset(
            name, (0,), maxshape=(None,), dtype="i8" if name == "unique_id" else "f8",
            chunks=(1024,)) for name in self.RESULTS}

    def append(self, frame: np.ndarray, uid: int, result: dict[str, float],
               latency: float) -> None:
        if self.frames is None:  # the first frame gives the shape and type
            self.frames = self.file.create_dataset(
                "frames", (0, *frame.shape), maxshape=(None, *frame.shape), dtype=frame.dtype,
                chunks=(1, *frame.shape))
        n = self.count
        if n == self.frames.shape[0]:
            self.frames.resize(n + self.GROW, axis=0)
        if frame.flags.c_contiguous and frame.dtype == self.frames.dtype:
            self.frames.id.write_direct_chunk((n, *(0,) * frame.ndim), frame)
        else:
            self.frames[n] = frame
        self.count = n + 1
        self.pending.append({"unique_id": uid, "latency": latency, **result})
        if len(self.pending) >= self.GROW:
            self._write_results()

    def _write_results(self) -> None:
        start = self.count - len(self.pending)
        for name, dataset in self.results.items():
            dataset.resize(self.count, axis=0)
            dataset[start:self.count] = [row[name] for row in self.pending]
        self.pending = []

    def close(self, summary: dict[str, Any]) -> None:
        self._write_results()
        if self.frames is not None:
            self.frames.resize(self.count, axis=0)
        self.file.attrs["summary"] = json.dumps(summary)
        self.file.close()


class FrameQueue(queue.Queue):  # type: ignore[type-arg]
    """The bounded queue between the frame subscription and the analysis: a full queue
    holds the subscription's callback (backpressure to the server) until :meth:`stop`."""

    def __init__(self, maxsize: int) -> None:
        super().__init__(maxsize=maxsize)
        self.stopped = threading.Event()

    def offer(self, item: Any) -> None:
        """The subscription's callback: wait for room, or drop the item once stopped."""
        while not self.stopped.is_set():
            try:
                self.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def stop(self) -> None:
        self.stopped.set()


def _context(address: str) -> Context:
    """A PVA client context: from the environment, or straight to ``address`` (host:port)."""
    if not address:
        return Context("pva")
    return Context("pva", conf={"EPICS_PVA_NAME_SERVERS": address, "EPICS_PVA_ADDR_LIST": "",
                                "EPICS_PVA_AUTO_ADDR_LIST": "NO"}, useenv=False)


class Reporter:
    """Posts progress and results to the gateway's ``Stream:Workflow`` PVs."""

    def __init__(self, ctx: Context, names: StreamNames) -> None:
        self.ctx, self.names = ctx, names

    def state(self, state: str, message: str, counter: int) -> None:
        post(self.ctx, self.names.workflow, state, message, counter)

    def follow(self, tally: Tally, stop: threading.Event) -> threading.Thread:
        """Post the tally every PROGRESS_PERIOD s from a thread of its own (until ``stop``),
        so the round trips to the gateway never hold up the analysis."""
        def run() -> None:
            posted = (-1, -1)
            while not stop.wait(PROGRESS_PERIOD):
                now = (tally.received, tally.lost)
                if now != posted:
                    posted = now
                    self.ctx.put(f"{self.names.workflow}:Lost", now[1])
                    self.state("acquiring", f"{now[0]} frames, {now[1]} lost", now[0])

        thread = threading.Thread(target=run, name="progress", daemon=True)
        thread.start()
        return thread

    def results(self, summary: dict[str, Any]) -> None:
        self.ctx.put(f"{self.names.workflow}:Lost", int(summary["framesLost"]))
        # as {"value": text}: p4p parses a bare string that looks like JSON as the structure
        self.ctx.put(f"{self.names.workflow}:Results", {"value": json.dumps(summary)})


@dataclass
class Options:
    """What one run of the workflow is told (see :func:`main`)."""

    frames_pv: str
    output: Path
    frames_address: str = ""
    queue_size: int = 4
    timeout: float = 600.0
    drain: float = 5.0
    max_frames: int = 0
    delay: float = 0.0


def follow(gateway: Context, names: StreamNames, opts: Options) -> tuple[bool, dict[str, Any]]:
    """Run the stream; returns (success, summary)."""
    reporter = Reporter(gateway, names)
    bluesky: queue.Queue[Any] = queue.Queue()
    # bounded: while analysis is behind, the callback blocks, the client's queueSize fills
    # and the server (pipeline flow control) keeps only the newest frames: uniqueId gaps
    frames = FrameQueue(max(1, opts.queue_size))
    request = f"field()record[queueSize={max(2, opts.queue_size)},pipeline=true]"
    tally, store = Tally(), Store(opts.output, opts.frames_pv)
    sub_bluesky = gateway.monitor(names.bluesky, bluesky.put, notify_disconnect=True)
    source = _context(opts.frames_address)
    sub_frames = source.monitor(opts.frames_pv, frames.offer, request=request,
                                notify_disconnect=True)
    ok, why, nbytes = False, "", 0
    progress: threading.Thread | None = None
    first_bluesky = True
    try:
        _subscribed(frames, opts.frames_pv, min(opts.timeout, 30.0))
        reporter.state("ready", f"subscribed to {opts.frames_pv}", 0)
        began = time.monotonic()
        progress = reporter.follow(tally, frames.stopped)
        print(f"ready: {opts.frames_pv} -> {opts.output}", flush=True)
        deadline, quiet_since = time.monotonic() + opts.timeout, None
        while True:
            while not bluesky.empty():  # bluesky's word first, then the next frame
                item = bluesky.get_nowait()
                if isinstance(item, Disconnected):
                    continue
                if isinstance(item, Exception):
                    raise RuntimeError(f"lost {names.bluesky}: {item}")
                state = StreamState.from_value(item)
                if first_bluesky and state.state in ("done", "error"):
                    first_bluesky = False
                    continue  # the end of an earlier run
                first_bluesky = False
                if state.state == "acquiring" and tally.start is None:
                    tally.start = state.counter
                elif state.state == "done":
                    tally.end = state.counter
                    quiet_since = time.monotonic()
                elif state.state == "error":
                    why = f"bluesky reported an error: {state.message}"
                    break
            if why:
                break
            if tally.complete or (opts.max_frames and tally.received >= opts.max_frames):
                ok, why = True, "enough frames" if not tally.complete else "end of stream"
                break
            if quiet_since is not None and time.monotonic() - quiet_since > opts.drain:
                ok, why = True, f"no frame for {opts.drain:g} s after the end: the rest lost"
                break
            if time.monotonic() > deadline:
                why = f"timed out after {opts.timeout:g} s"
                break
            try:
                item = frames.get(timeout=0.05)
            except queue.Empty:
                continue
            if isinstance(item, Disconnected):
                continue
            if isinstance(item, Exception):
                raise RuntimeError(f"lost {opts.frames_pv}: {item}")
            uid = int(item.raw["uniqueId"])
            if not tally.take(uid):
                continue
            frame = np.asarray(item)
            if opts.delay:
                time.sleep(opts.delay)  # a slow analysis (tests and benchmarks of loss)
            result = analyse(frame)
            latency = time.time() - item.timestamp
            store.append(frame, uid, result, latency)
            tally.latencies.append(latency)
            nbytes += frame.nbytes
            if quiet_since is not None:
                quiet_since = time.monotonic()
    except BaseException as exc:  # what came is kept: the file is completed, then the error
        store.close({"framesReceived": tally.received, "framesLost": tally.lost,
                     "ended": f"{type(exc).__name__}: {exc}"})
        raise
    finally:
        frames.stop()  # a callback waiting for room returns, so the subscription can close
        if progress is not None:
            progress.join()
        sub_frames.close()
        sub_bluesky.close()
        source.close()
    summary = summarise(tally, store, why, began, nbytes)
    return ok, summary


def _subscribed(frames: queue.Queue[Any], pvname: str, timeout: float) -> None:
    """Wait for the subscription's first update: the PV's value when it was made, not a
    frame of this run (dropped); frames posted after it all reach the queue."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            item = frames.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise TimeoutError(f"{pvname}: no connection within {timeout:g} s") from None
        if isinstance(item, Exception) and not isinstance(item, Disconnected):
            raise RuntimeError(f"{pvname}: {item}")
        if not isinstance(item, Exception):
            return


def summarise(tally: Tally, store: Store, why: str, began: float, nbytes: int) -> dict[str, Any]:
    """The run's summary (also the HDF5 file's ``summary`` attribute); closes the file."""
    seconds = max(time.monotonic() - began, 1e-9)
    lat = np.asarray(tally.latencies) if tally.latencies else np.zeros(1)
    summary = {
        "framesReceived": tally.received, "framesLost": tally.lost, "framesStale": tally.stale,
        "firstUniqueId": tally.first, "lastUniqueId": tally.last, "file": str(store.path),
        "seconds": round(seconds, 3), "framesPerSecond": round(tally.received / seconds, 2),
        "megabytesPerSecond": round(nbytes / seconds / 1e6, 2),
        "latencyP50": float(np.percentile(lat, 50)), "latencyP99": float(np.percentile(lat, 99)),
        "ended": why,
    }
    store.close(summary)
    return summary


def default_output(data_dir: str) -> Path:
    """``<data dir>/analysis/stream-<time>-<pid>.h5``: the experiment's analysis directory."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(data_dir or ".") / "analysis" / f"stream-{stamp}-{os.getpid()}.h5"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: analyse one stream, report through the gateway with this prefix."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefix", default="DM:", help="gateway PV prefix (default DM:)")
    parser.add_argument("--frames-pv", required=True, help="the NTNDArray PV to analyse")
    parser.add_argument("--frames-address", default="",
                        help="host:port of the PVA server of --frames-pv (default: search "
                             "as the EPICS_PVA_* environment says)")
    parser.add_argument("--data-dir", default="",
                        help="the experiment's data directory; results go to its analysis/")
    parser.add_argument("--output", default="", help="HDF5 file (default: see --data-dir)")
    parser.add_argument("--queue-size", type=int, default=4,
                        help="frames queued for analysis before the server drops (default 4)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds the whole stream may take (default 600)")
    parser.add_argument("--drain", type=float, default=5.0,
                        help="seconds to wait for the last frames after bluesky is done")
    parser.add_argument("--max-frames", type=int, default=0,
                        help="end (done) after this many frames (default 0: at bluesky's end)")
    parser.add_argument("--delay", type=float, default=0.0,
                        help="extra seconds of analysis per frame (to test loss)")
    args = parser.parse_args(argv)
    names = StreamNames.for_prefix(args.prefix)
    opts = Options(args.frames_pv, Path(args.output) if args.output else default_output(
        args.data_dir), args.frames_address, args.queue_size, args.timeout, args.drain,
        args.max_frames, args.delay)
    with Context("pva") as ctx:
        try:
            ok, summary = follow(ctx, names, opts)
        except Exception as exc:  # report any failure on the PV before exiting
            ok, summary = False, {"framesReceived": 0, "framesLost": 0,
                                  "ended": f"{type(exc).__name__}: {exc}"}
        text = (f"{summary['framesReceived']} frames, {summary['framesLost']} lost: "
                f"{summary['ended']}")
        Reporter(ctx, names).results(summary)
        post(ctx, names.workflow, "done" if ok else "error", text, summary["framesReceived"])
    print(("done: " if ok else "error: ") + json.dumps(summary), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
