"""The gateway beside a pythonSoftIOC serving the same records, measured in one run by one
client that asks both in alternating blocks: CA get and put-callback latency (pyepics), PVA
get (p4p), monitor updates with 50 subscribers; and DM requests per poll period with 1, 10
and 100 active jobs."""

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
REPEAT = int(os.environ.get("BENCH_REPEAT", 5))  # parts of a run whose ratios give the spread
BLOCK = 50  # requests to one IOC before the other takes its turn
SUBSCRIBERS = 50
PREFIX, REF_PREFIX = "BENCH:", "BREF:"


def _ports() -> tuple[int, int, int]:
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from conftest import free_port

    return free_port(), free_port(udp=False), free_port()


def _env(ca: int, pva: int, bcast: int) -> dict[str, str]:
    from conftest import epics_env

    return epics_env(ca, pva, bcast)


def _both(gw: dict[str, str], ref: dict[str, str]) -> dict[str, str]:
    """A client environment that finds both IOCs (each serves its own prefix)."""
    return {**gw, **{key: f"{gw[key]} {ref[key]}" for key in
                     ("EPICS_CA_ADDR_LIST", "EPICS_PVA_ADDR_LIST", "EPICS_PVA_NAME_SERVERS")}}


def measure(names: dict[str, dict[str, str]]) -> dict[str, dict[str, list[float]]]:
    """Run in a child that finds both IOCs. Each kind of request goes to them in alternating
    blocks of BLOCK, so a burst of load on the shared machine hits both alike: CA get and
    put-callback latency (pyepics), PVA get (p4p), and the time SUBSCRIBERS monitors of the
    put PV take to receive every update of a block of puts."""
    import epics
    from p4p.client.thread import Context

    iocs = list(names)
    gets = {ioc: epics.PV(names[ioc]["get"], auto_monitor=False) for ioc in iocs}
    puts = {ioc: epics.PV(names[ioc]["put"]) for ioc in iocs}
    counts = dict.fromkeys(iocs, 0)
    lock = threading.Lock()

    def counter(ioc: str):  # type: ignore[no-untyped-def]
        def cb(**_kw: object) -> None:
            with lock:
                counts[ioc] += 1
        return cb
    for pv in (*gets.values(), *puts.values()):
        assert pv.wait_for_connection(10), pv.pvname
    ctx = Context("pva")
    for ioc in iocs:
        ctx.get(names[ioc]["get"])
    time.sleep(0.5)

    def monitored_puts(ioc: str, block: int) -> None:
        """A block of puts, until every monitor got each (or 10 s)."""
        expected = counts[ioc] + BLOCK * SUBSCRIBERS
        for i in range(BLOCK):
            puts[ioc].put(f'{{"m": {block * BLOCK + i}}}', wait=True, timeout=10)
        deadline = time.perf_counter() + 10
        while counts[ioc] < expected and time.perf_counter() < deadline:
            time.sleep(0.0005)

    requests = {
        "ca_get": lambda ioc, i: gets[ioc].get(use_monitor=False),
        "ca_put": lambda ioc, i: puts[ioc].put(f'{{"i": {i}}}', wait=True, timeout=10),
        "pva_get": lambda ioc, i: ctx.get(names[ioc]["get"]),
    }
    out: dict[str, dict[str, list[float]]] = {ioc: {} for ioc in iocs}
    for kind, request in requests.items():
        for block in range(N // BLOCK):
            for ioc in _in_turn(iocs, block):
                times = out[ioc].setdefault(kind, [])
                for i in range(BLOCK):
                    t0 = time.perf_counter()
                    request(ioc, i)
                    times.append(time.perf_counter() - t0)
    subs = [epics.PV(names[ioc]["put"], callback=counter(ioc), auto_monitor=True)
            for ioc in iocs for _ in range(SUBSCRIBERS)]  # only now: the puts above had none
    for pv in subs:
        assert pv.wait_for_connection(10), pv.pvname
    time.sleep(0.5)
    for block in range(N // BLOCK):
        for ioc in _in_turn(iocs, block):
            t0, before = time.perf_counter(), counts[ioc]
            monitored_puts(ioc, block)
            out[ioc].setdefault("monitor", []).append(
                (counts[ioc] - before) / (time.perf_counter() - t0))
    ctx.close()
    return out


def _in_turn(iocs: list[str], block: int) -> list[str]:
    """The IOCs in the order they take a block: who goes first alternates."""
    return iocs if block % 2 == 0 else iocs[::-1]


def _figures(samples: list[float], kind: str) -> dict[str, float]:
    """A request kind's median and p99 in ms; monitor blocks' updates per second."""
    if kind == "monitor":
        return {"monitor_updates_per_s_50_subs": statistics.median(samples)}
    ordered = sorted(samples)
    return {f"{kind}_median_ms": statistics.median(samples) * 1e3,
            f"{kind}_p99_ms": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1e3}


def _start(cmd: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, **env, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout is not None
    while "READY" not in (line := proc.stdout.readline()):
        if not line and proc.poll() is not None:
            raise RuntimeError(f"{cmd} exited")
    return proc


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
    ref = _start([sys.executable, "-m", "bench.softioc_peer", REF_PREFIX],
                 {**ref_env, "EPICS_PVAS_SERVER_PORT": str(ref_ports[1]),
                  "EPICS_PVAS_BROADCAST_PORT": str(ref_ports[2]),
                  "EPICS_PVAS_INTF_ADDR_LIST": "127.0.0.1"})
    names = {ioc: {"get": prefix + "DAQ1:NFiles_RBV", "put": prefix + "Metadata:Json"}
             for ioc, prefix in (("gateway", PREFIX), ("softioc", REF_PREFIX))}
    try:
        out = subprocess.run([sys.executable, "-m", "bench.ioc_latency", "measure", json.dumps(names)],
                             env={**os.environ, **_both(gw_env, ref_env)}, capture_output=True,
                             text=True, check=True)
        runs = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{'metric (N=' + str(N) + ' each, blocks of ' + str(BLOCK) + ')':34} {'gateway':>10} "
              f"{'softioc':>10} {'ratio':>7}  spread of {REPEAT} parts")
        for kind, ours in runs["gateway"].items():
            theirs, parts = runs["softioc"][kind], len(ours) // REPEAT or 1
            whole = (_figures(ours, kind), _figures(theirs, kind))
            split = [(_figures(ours[k:k + parts], kind), _figures(theirs[k:k + parts], kind))
                     for k in range(0, len(ours) - parts + 1, parts)]
            for key in whole[0]:
                ratios = [o[key] / t[key] for o, t in split]
                print(f"{key:34} {whole[0][key]:10.3f} {whole[1][key]:10.3f} "
                      f"{whole[0][key] / whole[1][key]:7.2f}  {min(ratios):.2f}-{max(ratios):.2f}")
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
