"""The gateway beside a pythonSoftIOC serving the same records, measured in one run:
CA get and put-callback latency (pyepics), PVA get (p4p), monitor updates with 50
subscribers; and DM requests per poll period with 1, 10 and 100 active jobs."""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

N = int(os.environ.get("BENCH_N", 1000))
REPEAT = int(os.environ.get("BENCH_REPEAT", 5))  # gateway/softioc measured in turn, this often
PREFIX = "BENCH:"


def _ports() -> tuple[int, int, int]:
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from conftest import free_port

    return free_port(), free_port(udp=False), free_port()


def _env(ca: int, pva: int, bcast: int) -> dict[str, str]:
    from conftest import epics_env

    return epics_env(ca, pva, bcast)


def measure(names: dict[str, str]) -> dict[str, float]:
    """Run in a child whose EPICS_* environment points at one IOC."""
    import epics
    from p4p.client.thread import Context

    def pct(xs: list[float], q: float) -> float:
        return sorted(xs)[min(len(xs) - 1, int(q * len(xs)))] * 1e3

    out: dict[str, float] = {}
    pv = epics.PV(names["get"], auto_monitor=False)
    pv.wait_for_connection(10)
    times = []
    for _ in range(N):
        t0 = time.perf_counter()
        pv.get(use_monitor=False)
        times.append(time.perf_counter() - t0)
    out["ca_get_median_ms"], out["ca_get_p99_ms"] = statistics.median(times) * 1e3, pct(times, .99)
    put = epics.PV(names["put"])
    put.wait_for_connection(10)
    times = []
    for i in range(N):
        t0 = time.perf_counter()
        put.put(f'{{"i": {i}}}', wait=True, timeout=10)
        times.append(time.perf_counter() - t0)
    out["ca_put_median_ms"], out["ca_put_p99_ms"] = statistics.median(times) * 1e3, pct(times, .99)
    ctx = Context("pva")
    ctx.get(names["get"])
    times = []
    for _ in range(N):
        t0 = time.perf_counter()
        ctx.get(names["get"])
        times.append(time.perf_counter() - t0)
    out["pva_get_median_ms"], out["pva_get_p99_ms"] = statistics.median(times) * 1e3, pct(times, .99)
    counts = [0] * 50
    lock = threading.Lock()

    def counter(k: int):  # type: ignore[no-untyped-def]
        def cb(**_kw: object) -> None:
            with lock:
                counts[k] += 1
        return cb
    subs = [epics.PV(names["put"], callback=counter(k), auto_monitor=True) for k in range(50)]
    for s in subs:
        s.wait_for_connection(10)
    time.sleep(0.5)
    start = sum(counts)
    t0 = time.perf_counter()
    for i in range(N):
        put.put(f'{{"m": {i}}}', wait=True, timeout=10)
    time.sleep(0.5)
    out["monitor_updates_per_s_50_subs"] = (sum(counts) - start) / (time.perf_counter() - t0)
    ctx.close()
    return out


def _start(cmd: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, **env, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout is not None
    while "READY" not in (line := proc.stdout.readline()):
        if not line and proc.poll() is not None:
            raise RuntimeError(f"{cmd} exited")
    return proc


def _run_measure(env: dict[str, str], names: dict[str, str]) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-m", "bench.ioc_latency", "measure", json.dumps(names)],
                         env={**os.environ, **env}, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def dm_requests_per_poll(ioc_env: dict[str, str], setup: Path, period: float) -> dict[int, float]:
    """Requests per poll (from Status:DmRequests_RBV) with 1, 10 and 100 active jobs."""
    import epics

    from apsdm.dm import DmClient, DmConfig

    os.environ.update(ioc_env)
    epics.ca.initialize_libca()
    result = {}

    async def start(n: int) -> None:
        async with DmClient(DmConfig.from_env({}, setup_file=str(setup))) as dm:
            await dm.upsert_workflow({"name": "idle", "stages": {"01": {"command": "sleep 600"}}})
            for _ in range(n):
                await dm.start_processing_job("idle", {})

    active = 0
    for n in (1, 10, 100):
        asyncio.run(start(n - active))
        active = n
        time.sleep(3 * period)
        before = epics.caget(PREFIX + "Status:DmRequests_RBV", use_monitor=False)
        time.sleep(20 * period)
        after = epics.caget(PREFIX + "Status:DmRequests_RBV", use_monitor=False)
        result[n] = (after - before) / 20
    return result


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="apsdm-bench-ioc-"))
    gw_ports, ref_ports = _ports(), _ports()
    gw_env, ref_env = _env(*gw_ports), _env(*ref_ports)
    bin_dir = Path(sys.executable).parent
    period = 0.5
    gw = _start([str(bin_dir / "apsdm-ioc"), "--prefix", PREFIX, "--data-root", str(root),
                 "--interface", "127.0.0.1", "--ca-port", str(gw_ports[0]),
                 "--pva-port", str(gw_ports[1]), "--pva-broadcast-port", str(gw_ports[2]),
                 "--poll-period", str(period), "--log-level", "WARNING"], gw_env)
    ref = _start([sys.executable, "-m", "bench.softioc_peer", PREFIX],
                 {**ref_env, "EPICS_PVAS_SERVER_PORT": str(ref_ports[1]),
                  "EPICS_PVAS_BROADCAST_PORT": str(ref_ports[2]),
                  "EPICS_PVAS_INTF_ADDR_LIST": "127.0.0.1"})
    names = {"get": PREFIX + "DAQ1:NFiles_RBV", "put": PREFIX + "Metadata:Json"}
    try:
        # in turn, so that a burst of load on a shared machine hits both alike; each
        # figure is the median of the runs, the ratio's spread (min-max) beside it
        runs = [(_run_measure(gw_env, names), _run_measure(ref_env, names)) for _ in range(REPEAT)]
        print(f"{'metric (N=' + str(N) + ', ' + str(REPEAT) + ' runs)':34} {'gateway':>10} "
              f"{'softioc':>10} {'ratio':>7}  spread")
        for key in runs[0][0]:
            ratios = [ours[key] / theirs[key] for ours, theirs in runs]
            print(f"{key:34} {statistics.median(o[key] for o, _ in runs):10.3f} "
                  f"{statistics.median(t[key] for _, t in runs):10.3f} "
                  f"{statistics.median(ratios):7.2f}  {min(ratios):.2f}-{max(ratios):.2f}")
        per_poll = dm_requests_per_poll(gw_env, root / "dm" / "dm.setup.sh", period)
        print("DM requests per poll period: " + ", ".join(
            f"{n} active jobs: {v:.1f}" for n, v in per_poll.items()))
    finally:
        for proc in (gw, ref):
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    if sys.argv[1:2] == ["measure"]:
        print(json.dumps(measure(json.loads(sys.argv[2]))))
    else:
        main()
