"""The gateway's own work per CA get, CA put-callback, PVA get and monitor update: CPU time
(and, with ``--cprofile``, Python calls and the costliest functions) of the IOC per request
while a client process makes N of them. Unlike wall-clock latency this barely moves with
the load of a shared machine, so it guides work on the request paths.

Usage: ``python -m bench.ioc_profile [--cprofile] [phase ...]`` (phases: ca_get, ca_put,
monitor, pva_get); ``BENCH_N`` requests per phase (default 2,000).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import os
import pstats
import socket
import sys
import tempfile
import time
from pathlib import Path

from .ioc_latency import PREFIX, _env, _ports

N = int(os.environ.get("BENCH_N", 2000))
NAMES = {"get": PREFIX + "DAQ1:NFiles_RBV", "put": PREFIX + "Metadata:Json"}
PHASES = ("ca_get", "ca_put", "monitor", "pva_get")


def client(phase: str, n: int) -> None:
    """The client side of one phase (a child process whose EPICS_* names the gateway)."""
    import epics

    if phase == "ca_get":
        pv = epics.PV(NAMES["get"], auto_monitor=False)
        pv.wait_for_connection(10)
        for _ in range(n):
            pv.get(use_monitor=False)
    elif phase in ("ca_put", "monitor"):
        subs = [epics.PV(NAMES["put"], auto_monitor=True) for _ in range(50 if phase == "monitor" else 0)]
        put = epics.PV(NAMES["put"])
        for pv in (put, *subs):
            pv.wait_for_connection(10)
        for i in range(n):
            put.put(f'{{"i": {i}}}', wait=True, timeout=10)
        time.sleep(0.5)
    else:
        from p4p.client.thread import Context

        ctx = Context("pva")
        for _ in range(n):
            ctx.get(NAMES["get"])
        ctx.close()


async def _serve_and_measure(phases: list[str], profile: bool,
                             save: Path | None) -> dict[str, dict[str, object]]:
    from apsdm.gateway.main import parse_args, run

    ca, pva, bcast = _ports()
    env = _env(ca, pva, bcast)
    root = tempfile.mkdtemp(prefix="apsdm-bench-profile-")
    args = parse_args(["--prefix", PREFIX, "--data-root", root, "--interface", "127.0.0.1",
                       "--ca-port", str(ca), "--pva-port", str(pva), "--pva-broadcast-port",
                       str(bcast), "--poll-period", "3600", "--log-level", "WARNING"])
    ioc = asyncio.create_task(run(args))
    while True:  # READY: the CA port accepts
        await asyncio.sleep(0.2)
        if ioc.done():
            ioc.result()
        try:
            socket.create_connection(("127.0.0.1", ca), 1).close()
            break
        except OSError:
            continue
    results: dict[str, dict[str, object]] = {}
    try:
        for phase in phases:
            prof = cProfile.Profile() if profile else None
            cpu = time.process_time()
            if prof is not None:
                prof.enable()
            child = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench.ioc_profile", "--client", phase,
                env={**os.environ, **env})
            await child.wait()
            if prof is not None:
                prof.disable()
            cpu = time.process_time() - cpu
            row: dict[str, object] = {"cpu_us_per_request": round(cpu / N * 1e6, 1)}
            if prof is not None:
                if save is not None:
                    prof.dump_stats(save / f"{phase}.prof")
                stats = pstats.Stats(prof)
                row["python_calls_per_request"] = round(stats.total_calls / N, 1)  # type: ignore[attr-defined]
                out = io.StringIO()
                stats.stream = out  # type: ignore[attr-defined]
                stats.sort_stats("tottime").print_stats(25)
                row["top"] = out.getvalue()
            results[phase] = row
    finally:
        os.kill(os.getpid(), __import__("signal").SIGTERM)  # run() ends on SIGTERM
        await asyncio.gather(ioc, return_exceptions=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cprofile", action="store_true", help="also profile the IOC's Python calls")
    ap.add_argument("--save", type=Path, help="with --cprofile: write PHASE.prof files here")
    ap.add_argument("--asyncio-loop", action="store_true",
                    help="run the IOC on asyncio's own event loop instead of the IOC's")
    ap.add_argument("--client", help=argparse.SUPPRESS)
    ap.add_argument("phases", nargs="*", default=list(PHASES))
    args = ap.parse_args()
    if args.client:
        client(args.client, N)
        return
    if args.asyncio_loop:
        loop_factory = asyncio.new_event_loop
    else:
        from apsdm.gateway.main import event_loop as loop_factory
    with asyncio.Runner(loop_factory=loop_factory) as runner:  # the IOC's loop
        results = runner.run(_serve_and_measure(args.phases, args.cprofile, args.save))
    for phase, row in results.items():
        top = row.pop("top", "")
        print(phase, json.dumps(row))
        if top:
            print("\n".join(str(top).splitlines()[:40]))


if __name__ == "__main__":
    main()
