"""Embedded DM service copy speed, as ratios to ``cp -r`` + ``sync`` and to ``rsync -a`` of the
same data in the same run: DAQs and uploads of many small files and of one large file,
file-mode uploads against ``rsync`` per file, and the latency from a file's close to its count.

The service runs as its own process (``apsdm-server``), as in production. References are
medians of BENCH_REPEATS runs, DM figures of BENCH_DM_REPEATS; each is printed with its
spread (min-max). Sizes: BENCH_SMALL_FILES (comma-separated counts of 4 KiB files,
default 2000,20000; empty: none), BENCH_BIG_BYTES (default 1 GiB; 0: none),
BENCH_LATENCY_FILES (default 200; 0: none), and BENCH_LONG_FILES for the long DAQ (default
200,000 small files written while it runs; 0: none), which reports the service's memory
(RSS) at 10% and 100% and its files/s in the first and last 10%.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from apsdm.dm import DmClient, DmConfig
from apsdm.dm.errors import NoAnswer

SMALL_COUNTS = [int(n) for n in os.environ.get("BENCH_SMALL_FILES", "2000,20000").split(",") if n]
BIG_BYTES = int(os.environ.get("BENCH_BIG_BYTES", 1 << 30))
REPEATS = int(os.environ.get("BENCH_REPEATS", 5))
DM_REPEATS = int(os.environ.get("BENCH_DM_REPEATS", 3))
RSYNC_PER_FILE = int(os.environ.get("BENCH_RSYNC_PER_FILE", 200))  # files timed, rate scaled
LATENCY_FILES = int(os.environ.get("BENCH_LATENCY_FILES", 200))
LONG_FILES = int(os.environ.get("BENCH_LONG_FILES", 200_000))
LONG_BACKLOG = 2000  # files the long DAQ's writer keeps ahead of the count at most
SMALL_SIZE = 4096
RSYNC = shutil.which("rsync")

Commands = Callable[[Path], list[list[str]]]  # the commands of a reference, given its destination


@dataclass(frozen=True)
class Timing:
    """Seconds of repeated runs: their median and spread."""

    runs: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    def __str__(self) -> str:
        return f"{self.median:.3f} s ({min(self.runs):.3f}-{max(self.runs):.3f}, n={len(self.runs)})"


@dataclass(frozen=True)
class Case:
    """A data set: its tree, file count and bytes."""

    name: str
    tree: Path
    files: int
    nbytes: int

    def rate(self, seconds: float) -> str:
        files = self.files / seconds
        return (f"{files:,.0f}" if files >= 10 else f"{files:.2f}") + (
            f" files/s, {self.nbytes / seconds / 1e6:,.1f} MB/s")


def make_small(root: Path, count: int, start: int = 0) -> Case:
    """Files start..count-1 of a tree of 4 KiB files, 1,000 to a directory."""
    for i in range(start, count):
        sub = root / f"scan{i // 1000:03d}"
        if i % 1000 == 0:
            sub.mkdir(parents=True)
        (sub / f"f{i:06d}.dat").write_bytes(os.urandom(SMALL_SIZE))
    return Case(f"{count:,} x 4 KiB", root, count, count * SMALL_SIZE)


def rss_mb(pid: int) -> float:
    """A process's resident memory, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def make_big(root: Path) -> Case:
    root.mkdir(parents=True)
    chunk = os.urandom(1 << 20)
    with (root / "big.bin").open("wb") as fh:
        for _ in range(BIG_BYTES >> 20):
            fh.write(chunk)
    return Case(f"1 x {BIG_BYTES >> 20} MiB", root, 1, BIG_BYTES >> 20 << 20)


def run_commands(commands: Commands, scratch: Path) -> float:
    """Run commands (given a fresh destination) after a sync; return the seconds taken."""
    dest = scratch / "reference"
    subprocess.run(["sync"], check=True)
    t0 = time.perf_counter()
    for command in commands(dest):
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    elapsed = time.perf_counter() - t0
    shutil.rmtree(dest, ignore_errors=True)
    return elapsed


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 3600,
                pause: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError
        await asyncio.sleep(pause)


class Bench:
    """One DM service and one experiment, and the runs made against them."""

    def __init__(self, dm: DmClient, storage: Path, scratch: Path) -> None:
        self.dm = dm
        self.storage = storage
        self.scratch = scratch
        self._runs = 0

    def _dest(self) -> str:
        self._runs += 1
        return f"run{self._runs}"

    async def daq(self, case: Case) -> float:
        """From DAQ start (existing files processed) until every file is counted."""
        dest = self._dest()
        t0 = time.perf_counter()
        daq = await self.dm.start_daq("bench", str(case.tree), destDirectory=dest,
                                      processExistingFiles=True)

        async def done() -> bool:
            return (await self.dm.get_daq(daq.id)).n_processed >= case.files
        await until(done)
        elapsed = time.perf_counter() - t0
        await self.dm.stop_daq("bench", str(case.tree))
        await until(lambda: self._daq_ended(daq.id))
        shutil.rmtree(self.storage / dest)
        return elapsed

    async def _daq_ended(self, id: str) -> bool:
        return (await self.dm.get_daq(id)).status not in ("pending", "running")

    async def upload(self, case: Case, mode: str) -> float:
        dest = self._dest()
        t0 = time.perf_counter()
        up = await self.dm.upload("bench", str(case.tree), destDirectory=dest,
                                  processingMode=mode)

        async def done() -> bool:
            return (await self.dm.get_upload(up.id)).finished
        await until(done)
        elapsed = time.perf_counter() - t0
        final = await self.dm.get_upload(up.id)
        assert final.n_processed == case.files, f"upload {final.status}: {final.message}"
        shutil.rmtree(self.storage / dest)
        return elapsed

    async def latency(self) -> list[float]:
        """Seconds from each file's close to DM counting it, files written one at a time."""
        src = self.scratch / "latency"
        src.mkdir()
        daq = await self.dm.start_daq("bench", str(src), destDirectory=self._dest())
        await asyncio.sleep(1.0)  # let the DAQ set up its watch
        latencies = []
        for i in range(LATENCY_FILES):
            (src / f"f{i:05d}.dat").write_bytes(os.urandom(SMALL_SIZE))
            closed = time.perf_counter()

            async def counted(n: int = i + 1) -> bool:
                return (await self.dm.get_daq(daq.id)).n_processed >= n
            await until(counted, 60, pause=0.002)
            latencies.append(time.perf_counter() - closed)
        await self.dm.stop_daq("bench", str(src))
        return latencies

    async def long_daq(self, count: int, server: int) -> None:
        """A DAQ fed ``count`` small files while it runs (its writer keeps at most
        LONG_BACKLOG ahead): the service's RSS at 10% and 100% counted, files/s in the first
        and last 10%."""
        src = self.scratch / "long"
        src.mkdir()
        dest = self._dest()
        daq = await self.dm.start_daq("bench", str(src), destDirectory=dest)
        await asyncio.sleep(1.0)  # let the DAQ set up its watch
        tenth = count // 10
        marks: dict[str, tuple[float, int, float]] = {}  # time, count, RSS at 10/50/90/100%
        written, processed, t0 = 0, 0, time.perf_counter()
        while processed < count:
            if written < count and written - processed < LONG_BACKLOG:
                more = min(count, written + LONG_BACKLOG // 4)
                await asyncio.to_thread(make_small, src, more, written)
                written = more
            else:
                await asyncio.sleep(0.05)
            processed = (await self.dm.get_daq(daq.id)).n_processed
            for name, at in (("10%", tenth), ("50%", count // 2), ("90%", count - tenth),
                             ("100%", count)):
                if processed >= at and name not in marks:
                    marks[name] = (time.perf_counter(), processed, rss_mb(server))
        (t10, n10, rss10), (_, _, rss50), (t90, n90, _), (t100, n100, rss100) = (
            marks[name] for name in ("10%", "50%", "90%", "100%"))
        first, last = n10 / (t10 - t0), (n100 - n90) / (t100 - t90)
        print(f"long DAQ, {count:,} x 4 KiB written while it runs: service RSS {rss10:.1f} MB "
              f"at 10%, {rss50:.1f} MB at 50%, {rss100:.1f} MB at 100% "
              f"(growth {rss100 - rss10:+.1f} MB, target < 20); "
              f"{first:,.0f} files/s in the first 10%, {last:,.0f} in the last "
              f"({last / first:.2f}x, target >= 0.9x); {count / (t100 - t0):,.0f} files/s overall")
        with contextlib.suppress(NoAnswer):  # its last rescan may outlast the client's timeout
            await self.dm.stop_daq("bench", str(src))
        await until(lambda: self._daq_ended(daq.id))
        shutil.rmtree(src)
        shutil.rmtree(self.storage / dest)


def ratios(dm: Timing, refs: dict[str, Timing | None]) -> str:
    return ", ".join(f"{dm.median / ref.median:.2f}x {name}"
                     for name, ref in refs.items() if ref is not None)


def references(case: Case) -> dict[str, Commands | None]:
    src = str(case.tree)
    refs: dict[str, Commands | None] = {
        "cp -r + sync": lambda d: [["cp", "-r", src, str(d)], ["sync"]],
        "rsync -a": None if RSYNC is None else lambda d: [[RSYNC, "-a", f"{src}/", str(d)]],
    }
    if case.files == 1:
        refs["md5sum"] = lambda d: [["md5sum", *map(str, case.tree.iterdir())]]
    return refs


def rsync_per_file(case: Case) -> float:
    """Seconds per file of one ``rsync -a`` per file (as DM's file mode moves files)."""
    assert RSYNC is not None
    files = sorted(p for p in case.tree.rglob("*") if p.is_file())[:RSYNC_PER_FILE]
    dest = case.tree.parent / "rsync-per-file"
    dest.mkdir()
    t0 = time.perf_counter()
    for path in files:
        subprocess.run([RSYNC, "-a", str(path), str(dest / path.name)], check=True)
    elapsed = time.perf_counter() - t0
    shutil.rmtree(dest)
    return elapsed / len(files)


async def measure(bench: Bench, case: Case) -> None:
    """Each reference and each DM case, their runs interleaved so load on the machine
    falls on all of them alike."""
    commands = references(case)
    available = {name: c for name, c in commands.items() if c is not None}
    ref_runs: dict[str, list[float]] = {name: [] for name in available}
    dm_cases: dict[str, Callable[[], Awaitable[float]]] = {
        "DAQ": lambda: bench.daq(case),
        "upload, directory mode": lambda: bench.upload(case, "directory"),
        "upload, file mode": lambda: bench.upload(case, "files")}
    dm_runs: dict[str, list[float]] = {name: [] for name in dm_cases}
    for i in range(max(REPEATS, DM_REPEATS)):
        for name, reference in available.items():
            if i < REPEATS:
                ref_runs[name].append(run_commands(reference, case.tree.parent))
        for name, run in dm_cases.items():
            if i < DM_REPEATS:
                subprocess.run(["sync"], check=True)
                dm_runs[name].append(await run())
    refs: dict[str, Timing | None] = {
        name: Timing(tuple(ref_runs[name])) if name in ref_runs else None for name in commands}
    daq, up_dir, up_files = (Timing(tuple(dm_runs[name])) for name in dm_cases)
    print(f"{case.name} ({case.nbytes / 1e6:,.1f} MB); references: " + ", ".join(
        f"{name} {ref}" if ref else f"{name} absent" for name, ref in refs.items()))
    for what, timing in zip(dm_cases, (daq, up_dir, up_files), strict=True):
        print(f"  {what:<22} {timing}; {case.rate(timing.median)}; {ratios(timing, refs)}")
    if case.files == 1:
        slower = max(refs["cp -r + sync"].median, refs["md5sum"].median)  # type: ignore[union-attr]
        print(f"  DAQ / slower of cp + sync and md5sum: {daq.median / slower:.2f}x "
              "(target 1.3x)")
    else:
        print(f"  file mode / directory mode: {up_files.median / up_dir.median:.2f}x")
        if RSYNC is not None:
            per_file = rsync_per_file(case)
            print(f"  rsync per file: {per_file * 1e3:.1f} ms/file ({RSYNC_PER_FILE} files); "
                  f"file-mode upload is {per_file * case.files / up_files.median:.0f}x faster")
    sys.stdout.flush()


@contextmanager
def dm_server(root: Path) -> Iterator[tuple[Path, int]]:
    """An apsdm-server process; yields its dm.setup.sh and its process id."""
    exe = Path(sys.executable).with_name("apsdm-server")
    proc = subprocess.Popen([str(exe), "--data-root", str(root), "--log-level", "WARNING"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("READY"):
            raise RuntimeError(f"apsdm-server did not start: {line!r}")
        yield root / "dm.setup.sh", proc.pid
    finally:
        proc.terminate()
        proc.wait(30)


async def run(work: Path) -> None:
    print(f"dm_copy, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, "
          f"{os.cpu_count()} CPUs; references: median of {REPEATS}, DM: median of {DM_REPEATS}"
          + ("" if RSYNC else "; rsync absent (apt-get install rsync): its ratios are missing"))
    with dm_server(work / "dm") as (setup, server):
        async with DmClient(DmConfig.from_env({}, setup_file=str(setup))) as dm:
            exp = await dm.add_experiment("bench")
            bench = Bench(dm, Path(exp.data_directory), work)
            warm_up = make_small(work / "warm-up", 20)  # the service's first calls import code
            await bench.daq(warm_up)
            await bench.upload(warm_up, "files")
            for count in SMALL_COUNTS:
                case = make_small(work / f"small-{count}", count)
                await measure(bench, case)
                shutil.rmtree(case.tree)
            if BIG_BYTES:
                case = make_big(work / "big")
                await measure(bench, case)
                shutil.rmtree(case.tree)
            if LATENCY_FILES:
                latencies = sorted(await bench.latency())
                p50, p99 = (latencies[int(q * (len(latencies) - 1))] for q in (0.5, 0.99))
                print(f"close-to-counted latency (DM's nProcessedFiles; the IOC adds up to one "
                      f"poll period), {len(latencies)} files: p50 {p50 * 1e3:.0f} ms, "
                      f"p99 {p99 * 1e3:.0f} ms")
            if LONG_FILES:
                await bench.long_daq(LONG_FILES, server)


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="apsdm-bench-"))
    try:
        asyncio.run(run(work))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
