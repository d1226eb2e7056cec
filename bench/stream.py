"""Streaming throughput: frames from a StreamingDetector's NTNDArray PV through the reference
streaming workflow (analysis + HDF5 + progress to the gateway), against a bare p4p client
of the same frames, measured in one run.

For 1 MiB and 8 MiB frames each receiver is driven at falling frame rates (from the rate
a bare client takes unpaced, times 0.85 each step) until a run of ``BENCH_STREAM_SECONDS``
loses no frame: that rate is its sustained zero-loss rate. Prints frames/s, MB/s, the
ratio workflow/bare (target >= 0.8) and the workflow's frame latency p50/p99.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SECONDS = float(os.environ.get("BENCH_STREAM_SECONDS", 3.0))
STEPS = int(os.environ.get("BENCH_STREAM_STEPS", 6))
SIZES = {"1 MiB": (512, 1024), "8 MiB": (2048, 2048)}  # uint16 frames
ONLY = os.environ.get("BENCH_STREAM_SIZES", "")  # e.g. "8 MiB": only those
PREFIX = "BENCHS:"

BARE = r"""
import json, queue, sys
from p4p.client.thread import Context
pv, address, start, end, qsize = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
ctx = Context("pva", useenv=False, conf={"EPICS_PVA_NAME_SERVERS": address,
                                        "EPICS_PVA_AUTO_ADDR_LIST": "NO"})
q = queue.Queue(maxsize=qsize)
sub = ctx.monitor(pv, q.put, request=f"field()record[queueSize={max(2, qsize)},pipeline=true]")
q.get(timeout=30)
print("ready", flush=True)
got, last = 0, start
while last < end:
    try:
        v = q.get(timeout=3)
    except queue.Empty:
        break
    uid = int(v.raw["uniqueId"])
    if uid > start:
        got, last = got + 1, uid
print(json.dumps({"framesReceived": got, "framesLost": end - start - got}), flush=True)
sub.close(); ctx.close()
"""


def _start_ioc(root: Path) -> tuple[subprocess.Popen[str], dict[str, str]]:
    """The gateway on ports 0 (a new user's start); returns it and a client environment."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from conftest import epics_env

    env = {k: v for k, v in os.environ.items() if not k.startswith("EPICS_")}
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "apsdm-ioc"), "--prefix", PREFIX, "--data-root",
         str(root), "--interface", "127.0.0.1", "--ca-port", "0", "--pva-port", "0",
         "--log-level", "WARNING"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        text=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    ports = dict(re.findall(r"(\w+_port)=(\d+)", line))
    return proc, epics_env(int(ports["ca_port"]), int(ports["pva_port"]),
                           int(ports["pva_udp_port"]))


def _post(det: Any, frames: int, rate: float) -> None:
    """Post ``frames`` frames at ``rate`` frames/s (0: unpaced)."""
    det.frames_per_trigger.put(frames)
    det.frame_rate.put(rate)
    det.trigger().wait(timeout=600)


def _bare(det: Any, frames: int, rate: float) -> dict[str, Any]:
    start = int(det.unique_id.get())
    proc = subprocess.Popen([sys.executable, "-c", BARE, det.frames_pv.get(), det.address,
                             str(start), str(start + frames), "4"], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    began = time.monotonic()
    _post(det, frames, rate)
    out = json.loads(proc.stdout.readline())
    proc.wait(30)
    return {**out, "seconds": time.monotonic() - began}


def _workflow(det: Any, frames: int, rate: float, env: dict[str, str],
              ctx: Any, out: Path) -> dict[str, Any]:
    from apsdm_ophyd.pva import StreamNames, post, read

    names = StreamNames.for_prefix(PREFIX)
    post(ctx, names.bluesky, "idle", "bench")
    before = read(ctx, names.workflow).timestamp
    proc = subprocess.Popen(
        [sys.executable, "-m", "apsdm_ophyd.reference_workflow", "--prefix", PREFIX,
         "--frames-pv", det.frames_pv.get(), "--frames-address", det.address,
         "--output", str(out), "--drain", "3"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, **env})
    deadline = time.monotonic() + 60
    while not ((state := read(ctx, names.workflow)).state == "ready"
               and state.timestamp != before):
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError("the reference workflow did not become ready")
        time.sleep(0.05)
    start = int(det.unique_id.get())
    post(ctx, names.bluesky, "acquiring", "bench", start)
    began = time.monotonic()
    _post(det, frames, rate)
    post(ctx, names.bluesky, "done", "bench", start + frames)
    stdout, _ = proc.communicate(timeout=600)
    summary = json.loads(stdout.split("done: ", 1)[1]) if "done: " in stdout else {}
    out.unlink(missing_ok=True)
    return {**summary, "seconds": time.monotonic() - began}


def _zero_loss(run: Any, top: float, nbytes: int) -> dict[str, Any]:
    """The highest rate (from ``top`` down, x0.85 a step) at which ``run`` loses nothing."""
    rate = top
    for _ in range(STEPS):
        frames = max(20, int(rate * SECONDS))
        result = run(frames, rate)
        print(f"    {rate:7.1f} frames/s asked: {result.get('framesReceived')} of {frames} "
              f"received, {result.get('framesLost')} lost", file=sys.stderr, flush=True)
        if result.get("framesLost", 1) == 0 and result.get("framesReceived") == frames:
            return {**result, "rate": rate, "mbps": rate * nbytes / 1e6}
        rate *= 0.85
    return {"rate": 0.0, "mbps": 0.0, "latencyP50": float("nan"), "latencyP99": float("nan")}


def main() -> None:
    sys.path.insert(0, str(Path(__file__).parents[1] / "ophyd_devices"))
    from p4p.client.thread import Context

    from apsdm_ophyd.stream_detector import StreamingDetector

    with tempfile.TemporaryDirectory() as tmp:
        ioc, env = _start_ioc(Path(tmp) / "ioc")
        ctx = Context("pva", useenv=False,
                      conf={k: v for k, v in env.items() if k.startswith("EPICS_PVA")})
        try:
            print(f"stream bench: zero-loss frame rate, {SECONDS:g} s runs "
                  f"({time.strftime('%Y-%m-%d')})")
            for label, shape in SIZES.items():
                if ONLY and label not in ONLY.split(","):
                    continue
                det = StreamingDetector(f"{PREFIX}cam:Image", shape=shape, name="cam")
                nbytes = det.frame(0).nbytes
                try:
                    unpaced = _bare(det, max(20, int(200e6 * SECONDS / nbytes)), 0.0)
                    top = unpaced["framesReceived"] / unpaced["seconds"]
                    bare = _zero_loss(lambda n, r, d=det: _bare(d, n, r), top, nbytes)
                    wf = _zero_loss(lambda n, r, d=det: _workflow(
                        d, n, r, env, ctx, Path(tmp) / "out.h5"), bare["rate"] or top, nbytes)
                finally:
                    det.close()
                ratio = wf["rate"] / bare["rate"] if bare["rate"] else float("nan")
                print(f"  {label}: bare p4p {bare['rate']:7.1f} frames/s {bare['mbps']:7.1f} MB/s"
                      f" | reference workflow {wf['rate']:7.1f} frames/s {wf['mbps']:7.1f} MB/s"
                      f" | ratio {ratio:4.2f} (target >= 0.8) | latency p50 "
                      f"{wf['latencyP50'] * 1e3:6.1f} ms p99 {wf['latencyP99'] * 1e3:6.1f} ms")
        finally:
            ctx.close()
            ioc.terminate()
            ioc.wait(30)


if __name__ == "__main__":
    main()
