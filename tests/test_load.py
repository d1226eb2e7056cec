"""Load and soak: one IOC on the embedded DM service under concurrent jobs, four DAQs
receiving thousands of files and 100 monitoring clients (CA and PVA), for a soak of
``APSDM_SOAK_SECONDS`` (default 600). Memory, DM load per poll, copied data, monitor
updates, latency and job outcomes are all checked, and one summary line is printed.
A fast test checks that a poll's job listing stays small however long the history.

Run alone: ``python -m pytest tests/test_load.py -m slow -s``. Run as a script
(``python test_load.py ca|pva SPEC``) it is the child process that hosts the monitors.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import IO, Any

import pytest

SOAK_SECONDS = float(os.environ.get("APSDM_SOAK_SECONDS", 600))
N_FILES = int(os.environ.get("APSDM_LOAD_FILES", 10_000))
N_JOBS = int(os.environ.get("APSDM_LOAD_JOBS", 100))
JOB_SECONDS = float(os.environ.get("APSDM_LOAD_JOB_SECONDS", 5))
N_CA = int(os.environ.get("APSDM_LOAD_CA_CLIENTS", 50))
N_PVA = int(os.environ.get("APSDM_LOAD_PVA_CLIENTS", 50))

N_SLOTS = 4  # DAQ and workflow slots, and source trees
POLL_PERIOD = 1.0
SAMPLE_SECONDS = 10.0  # RSS samples, inode scans and monitor buckets
WARMUP_SECONDS = 60.0  # of the soak, before the RSS baseline is taken
RSS_BOUND_MB = 15.0
RAMP = (1, 10, min(100, N_JOBS))  # active jobs at which DM requests per poll are counted
RAMP_POLLS = 20  # two slow (every 10th) polls in each window, so the means compare
WRITE_SHARE = 0.85  # files are written over this share of the soak; the rest drains
WORKFLOW = "soak"
ACTIVE = ("pending", "running")


# --- monitor clients (child processes) ---------------------------------------------------


def client_pvs(prefix: str, client: int, pva: bool) -> list[str]:
    """What one monitoring client watches: health, one DAQ and one workflow slot (and tables)."""
    k = client % N_SLOTS + 1
    names = ["Status:Heartbeat_RBV", f"DAQ{k}:NProcessed_RBV", f"WF{k}:Status_RBV"]
    names += ["Jobs", "DAQs"] if pva else ["Status:DmRequests_RBV", f"DAQ{k}:Status_RBV"]
    return [prefix + n for n in names]


class Tally:
    """Monitor events of one client: counts per SAMPLE_SECONDS bucket and the last counts."""

    def __init__(self) -> None:
        self.buckets: dict[int, int] = defaultdict(int)
        self.last: dict[str, int] = {}
        self.events = 0

    def event(self, name: str, value: Any) -> None:
        self.events += 1
        self.buckets[int(time.time() // SAMPLE_SECONDS)] += 1
        if name.endswith("NProcessed_RBV"):  # a number, an NT wrapper or a raw p4p Value
            self.last[name] = int(getattr(value, "value", value))

    def report(self) -> dict[str, Any]:
        return {"events": self.events, "buckets": dict(self.buckets), "last": self.last}


def _ca_clients(spec: dict[str, Any], tallies: list[Tally]) -> list[Any]:
    import epics

    pvs = []
    for c, tally in enumerate(tallies):
        for name in client_pvs(spec["prefix"], c, pva=False):
            pvs.append(epics.PV(name, auto_monitor=True, form="native",
                                callback=lambda value, t=tally, n=name, **_: t.event(n, value)))
    for pv in pvs:
        if not pv.wait_for_connection(30):
            raise SystemExit(f"CA monitor of {pv.pvname} did not connect")
    return pvs


def _pva_clients(spec: dict[str, Any], tallies: list[Tally]) -> list[Any]:
    from p4p.client.thread import Context

    conf = {k: v for k, v in os.environ.items() if k.startswith("EPICS_PVA")}
    keep: list[Any] = []  # contexts and their subscriptions
    for c, tally in enumerate(tallies):
        ctx = Context("pva", conf=conf, useenv=False)
        names = client_pvs(spec["prefix"], c, pva=True)
        ctx.get(names)  # connected before the test goes on
        keep += [ctx, *(ctx.monitor(name, lambda value, t=tally, n=name: t.event(n, value))
                        for name in names)]
    return keep


def monitor_main(kind: str, spec: dict[str, Any]) -> None:
    """Child process: start the clients, say READY, count events until stdin says stop."""
    tallies = [Tally() for _ in range(spec["clients"])]
    clients = (_ca_clients if kind == "ca" else _pva_clients)(spec, tallies)
    print("READY", flush=True)
    sys.stdin.readline()
    print(json.dumps([t.report() for t in tallies]), flush=True)
    del clients
    os._exit(0)  # libca and pvxs threads need no orderly goodbye


class MonitorProcess:
    """A child process hosting ``n`` CA or PVA monitoring clients of one IOC."""

    def __init__(self, kind: str, n: int, prefix: str, env: dict[str, str]) -> None:
        self.kind = kind
        spec = json.dumps({"clients": n, "prefix": prefix})
        self.proc = subprocess.Popen([sys.executable, __file__, kind, spec], text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env={**os.environ, **env})
        line = self._stdout.readline()
        assert line.strip() == "READY", f"{kind} monitor child failed to start: {line!r}"

    @property
    def _stdout(self) -> IO[str]:
        assert self.proc.stdout is not None
        return self.proc.stdout

    def results(self) -> list[dict[str, Any]]:
        """Stop counting and return each client's tally."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("stop\n")
        self.proc.stdin.flush()
        out = json.loads(self._stdout.readline())
        self.proc.wait(30)
        return out

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


# --- load generators (threads of the test process) ---------------------------------------


class Worker(threading.Thread):
    """A daemon thread that runs ``body`` until told to halt, and keeps its error."""

    def __init__(self, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.halt = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.body()
        except BaseException as exc:
            self.error = exc

    def body(self) -> None:
        raise NotImplementedError

    def stop(self, timeout: float) -> None:
        self.halt.set()
        self.join(timeout)
        assert not self.is_alive(), f"{self.name} did not stop"
        if self.error is not None:
            raise self.error


class JobKeeper(Worker):
    """Keeps ``target`` jobs active: starts jobs through the DM client as others end.

    It asks DM about each job it started once the job's sleep is over (one small call per
    job, not a list of the whole growing history every second).
    """

    def __init__(self, ioc: Any, seconds: float, others: Callable[[], int]) -> None:
        super().__init__("job-keeper")
        self.ioc, self.seconds, self.others = ioc, seconds, others
        self.target = 0
        self.started: list[str] = []
        self._due: dict[str, float] = {}  # id -> when to ask DM about it

    @property
    def active(self) -> int:
        """Jobs started and not yet seen ended, with those started elsewhere (WFn:Start)."""
        return len(self._due) + self.others()

    def body(self) -> None:
        asyncio.run(self._keep())

    async def _keep(self) -> None:
        async with self.ioc.dm_client() as dm:
            while not self.halt.is_set():
                now = time.monotonic()
                for job_id, due in list(self._due.items()):
                    if due <= now and not self.halt.is_set():
                        job = await dm.get_processing_job(job_id)
                        if job.finished:
                            del self._due[job_id]
                        else:
                            self._due[job_id] = now + 0.5
                for _ in range(self.target - self.active):
                    job = await dm.start_processing_job(
                        WORKFLOW, {"seconds": str(self.seconds), "tag": f"dm{len(self.started)}"})
                    self.started.append(job.id)
                    self._due[job.id] = time.monotonic() + self.seconds
                await asyncio.sleep(0.5)


class SlotRunner(Worker):
    """Starts a job with WFn:Start over and over; each CA put-callback ends with the job."""

    def __init__(self, ioc: Any, n: int) -> None:
        super().__init__(f"WF{n}")
        self.ioc, self.n = ioc, n
        self.busy = False
        self.done: list[str] = []

    def body(self) -> None:
        import epics

        epics.ca.use_initial_context()
        s = self.ioc.pv(f"WF{self.n}:")
        while not self.halt.is_set():
            self.busy = True
            epics.caput(s + "Start", 1, wait=True, timeout=120)
            self.busy = False
            status = epics.caget(s + "Status_RBV", as_string=True, use_monitor=False, timeout=5)
            assert status == "done", f"WF{self.n} job ended {status}"
            self.done.append(epics.caget(s + "JobId_RBV", use_monitor=False, timeout=5))


def file_bytes(i: int) -> bytes:
    """The content of test file ``i``: 64 bytes to 4 kB, different for every file."""
    size = 64 + (i * 7919) % 4033
    return (f"{i:08d}".encode() * (size // 8 + 1))[:size]


def file_path(i: int) -> tuple[int, str]:
    """Source tree (0-based) and relative path of file ``i`` (a new folder every 250)."""
    return i % N_SLOTS, f"d{i // (N_SLOTS * 250):03d}/f{i:05d}.dat"


class FileWriter(Worker):
    """Writes N_FILES small files into the source trees at a steady rate."""

    def __init__(self, sources: list[Path], seconds: float) -> None:
        super().__init__("file-writer")
        self.sources, self.rate = sources, N_FILES / seconds
        self.written = 0

    def body(self) -> None:
        t0 = time.monotonic()
        for i in range(N_FILES):
            delay = t0 + i / self.rate - time.monotonic()
            if delay > 0 and self.halt.wait(delay):
                return
            tree, rel = file_path(i)
            path = self.sources[tree] / rel
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(file_bytes(i))
            self.written += 1


def scan_inodes(root: Path, seen: dict[str, int]) -> None:
    """Remember the inode each copied file first had (a copy made again gets a new one).

    Hidden files are a copy in flight (DM's temporary name), not yet a file in storage.
    """
    for path in root.rglob("[!.]*"):
        with contextlib.suppress(FileNotFoundError):
            if path.is_file():
                seen.setdefault(str(path.relative_to(root)), path.stat().st_ino)


# --- measurements ------------------------------------------------------------------------


def wait_until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``check`` until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return value


class PollCounter:
    """Status:DmRequests_RBV through a CA monitor: one event per poll, its delta the poll's calls."""

    def __init__(self, pvname: str) -> None:
        import epics

        self.values: list[int] = []
        self.pv = epics.PV(pvname, auto_monitor=True,
                           callback=lambda value, **_: self.values.append(int(value)))
        assert self.pv.wait_for_connection(10)

    def per_poll(self, polls: int) -> list[int]:
        """The DM requests of each of the next ``polls`` polls (after one to settle)."""
        first = len(self.values) + 1
        wait_until(lambda: len(self.values) > first + polls, polls * POLL_PERIOD * 3 + 30,
                   f"{polls} polls")
        window = self.values[first:first + polls + 1]
        return [b - a for a, b in pairwise(window)]


class Usage:
    """The IOC process's RSS (MB) and CPU use (% of one core since the last sample)."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.proc = psutil.Process(pid)
        self.proc.cpu_percent(None)

    def sample(self) -> tuple[float, float, float]:
        return time.time(), self.proc.memory_info().rss / 2**20, self.proc.cpu_percent(None)


def rss_verdict(samples: list[tuple[float, float, float]], soak_start: float
                ) -> tuple[float, float, str]:
    """Baseline and end RSS, and why memory is not flat ("" when it is).

    RSS after the warm-up (job history, tables, pymalloc arenas and SQLite's page cache
    reach their working size in the first minute) is split in thirds. A leak shows as
    steady growth, so: the last third's median may exceed the first third's by at most
    RSS_BOUND_MB over the whole soak, and the middle third's by at most half of that
    (growth that is still going on at the end). Medians ignore single GC/arena spikes.
    """
    after = [mb for t, mb, _ in samples if t >= soak_start + min(WARMUP_SECONDS, SOAK_SECONDS / 4)]
    third = max(1, len(after) // 3)
    first, middle, last = after[:third], after[third:-third] or after[:third], after[-third:]
    start, mid, end = (statistics.median(x) for x in (first, middle, last))
    why = []
    if end - start > RSS_BOUND_MB:
        why.append(f"RSS grew {end - start:.1f} MB over the soak (bound {RSS_BOUND_MB})")
    if end - mid > RSS_BOUND_MB / 2:
        why.append(f"RSS still growing at the end: {mid:.1f} -> {end:.1f} MB")
    return start, end, "; ".join(why)


def latency_ms(action: Callable[[], Any], n: int = 50) -> tuple[float, float]:
    """Median and worst time of ``n`` calls, in ms."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        action()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), max(times)


def monitors_quiet(kind: str, tallies: list[dict[str, Any]], soak: tuple[float, float],
                   final: dict[str, int]) -> list[str]:
    """Clients that missed updates: a bucket of the soak without events, or a stale count."""
    lo, hi = (int(t // SAMPLE_SECONDS) for t in soak)
    problems = []
    for c, tally in enumerate(tallies):
        buckets = {int(k): v for k, v in tally["buckets"].items()}
        empty = [b for b in range(lo + 1, hi) if not buckets.get(b)]
        if empty:
            problems.append(f"{kind} client {c}: no events in {len(empty)} of {hi - lo - 1} "
                            f"{SAMPLE_SECONDS:.0f}-s intervals")
        for name, value in tally["last"].items():
            if value != final[name]:
                problems.append(f"{kind} client {c}: last {name} {value}, IOC {final[name]}")
    return problems


@dataclass
class Figures:
    """What the soak measured, for the summary line and the assertions."""

    usage: list[tuple[float, float, float]] = field(default_factory=list)  # time, MB, CPU %
    per_poll: dict[int, list[int]] = field(default_factory=dict)
    latency: dict[str, tuple[float, float]] = field(default_factory=dict)
    events: dict[str, int] = field(default_factory=dict)
    soak: tuple[float, float] = (0.0, 0.0)
    copied: int = 0  # files in storage once, whole
    jobs: tuple[int, int, int] = (0, 0, 0)  # done, started, started through WFn:Start
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """The line the README quotes."""
        rss_start, rss_end, _ = rss_verdict(self.usage, self.soak[0])
        per_poll = ", ".join(f"{n} jobs {statistics.mean(d):.2f}" for n, d in self.per_poll.items())
        lat = {k: f"{median:.1f} ms (max {worst:.0f})" for k, (median, worst) in self.latency.items()}
        return (
            f"SOAK {(self.soak[1] - self.soak[0]) / 60:.0f} min: IOC RSS {rss_start:.1f} MB after "
            f"warm-up -> {rss_end:.1f} MB at end (max {max(u[1] for u in self.usage):.1f}); "
            f"{N_FILES} files written, {self.copied} copied exactly once by {N_SLOTS} DAQs; "
            f"{self.jobs[0]} jobs done of {self.jobs[1]} ({N_JOBS} kept active, {self.jobs[2]} "
            f"via WFn:Start); monitor events: {self.events.get('ca', 0)} to {N_CA} CA clients, "
            f"{self.events.get('pva', 0)} to {N_PVA} PVA clients; DM requests per poll at "
            f"{per_poll}; at the end CA get {lat['ca_get']}, CA put {lat['ca_put']}, "
            f"PVA get {lat['pva_get']}; lost: {'; '.join(self.problems) or 'nothing'}")


# --- the test ----------------------------------------------------------------------------


def _ask(ioc: Any, call: Callable[[Any], Any]) -> Any:
    """One DM call through a fresh client, from synchronous test code."""
    async def go() -> Any:
        async with ioc.dm_client() as dm:
            return await call(dm)
    return asyncio.run(go())


def all_jobs(ioc: Any) -> list[Any]:
    """Every job of the DM user (DEFAULT keys), however many there are."""
    return _ask(ioc, lambda dm: dm.list_processing_jobs(keys="DEFAULT", limit=10**7))


def _setup(ioc: Any, tmp_path: Path) -> tuple[list[Path], list[Path]]:
    """Experiment selected, soak workflow added, DAQs started: source and storage trees."""
    import epics

    async def prepare() -> Any:
        async with ioc.dm_client() as dm:
            exp = await dm.add_experiment("soak", description="load and soak test")
            await dm.add_workflow({"name": WORKFLOW, "stages": {
                "01-work": {"command": "sleep $seconds && echo soaked $tag",
                            "outputVariableRegexList": ["soaked (?P<echoed>\\S+)"]}}})
            return exp

    exp = asyncio.run(prepare())
    assert epics.caput(ioc.pv("Experiment:Name"), "soak", wait=True, timeout=30) == 1
    sources = [tmp_path / f"src{k}" for k in range(1, N_SLOTS + 1)]
    for k, src in enumerate(sources, 1):
        src.mkdir()
        s = ioc.pv(f"DAQ{k}:")
        epics.caput(s + "DataDirectory", str(src), wait=True, timeout=10)
        epics.caput(s + "DestDirectory", f"daq{k}", wait=True, timeout=10)
        epics.caput(s + "Start", 1, wait=True, timeout=30)
        assert epics.caget(s + "Active_RBV", as_string=True, use_monitor=False) == "Yes"
        w = ioc.pv(f"WF{k}:")
        epics.caput(w + "Name", WORKFLOW, wait=True, timeout=10)
        epics.caput(w + "Args", json.dumps({"seconds": str(JOB_SECONDS), "tag": f"wf{k}"}),
                    wait=True, timeout=10)
    return sources, [Path(exp.data_directory) / f"daq{k}" for k in range(1, N_SLOTS + 1)]


def _ramp(keeper: JobKeeper, polls: PollCounter, figures: Figures) -> None:
    """DM requests per poll with 1, 10 and 100 jobs active (they must not scale with jobs)."""
    for i, level in enumerate(RAMP):
        # each level's jobs last until the ramp is over, then the soak's short jobs follow
        keeper.seconds = (len(RAMP) - i) * (RAMP_POLLS + 10) * POLL_PERIOD + 10
        keeper.target = level
        wait_until(lambda n=level: keeper.active >= n, 60, f"{level} active jobs")
        figures.per_poll[level] = polls.per_poll(RAMP_POLLS)
        assert keeper.active >= level, "ramp jobs ended inside the counting window"
    keeper.seconds = JOB_SECONDS


def _latencies(ioc: Any) -> dict[str, tuple[float, float]]:
    """CA get, CA put-callback and PVA get times, measured while the load goes on."""
    import epics

    pv = epics.PV(ioc.pv("DAQ1:NProcessed_RBV"), auto_monitor=False)
    assert pv.wait_for_connection(5)
    out = {"ca_get": latency_ms(lambda: pv.get(use_monitor=False, timeout=5)),
           "ca_put": latency_ms(lambda: epics.caput(ioc.pv("Metadata:Json"), '{"soak": 1}',
                                                    wait=True, timeout=5))}
    ctx = ioc.pva_context()
    try:
        out["pva_get"] = latency_ms(lambda: ctx.get(ioc.pv("DAQ1:NProcessed_RBV"), timeout=5))
    finally:
        ctx.close()
    return out


def _wind_down(ioc: Any, keeper: JobKeeper, slots: list[SlotRunner]) -> dict[str, int]:
    """Let every file be copied and every job end, stop the DAQs; the final DAQ counts."""
    import epics

    final = {ioc.pv(f"DAQ{k + 1}:NProcessed_RBV"): len(range(k, N_FILES, N_SLOTS))
             for k in range(N_SLOTS)}
    for name, n in final.items():
        wait_until(lambda name=name, n=n: epics.caget(name, use_monitor=False, timeout=5) == n,
                   120, f"{name} = {n}")
    keeper.stop(60)
    for slot in slots:
        slot.stop(JOB_SECONDS + 120)
    wait_until(lambda: not any(j.status in ACTIVE for j in all_jobs(ioc)), 120, "jobs to end")
    for k in range(1, N_SLOTS + 1):
        epics.caput(ioc.pv(f"DAQ{k}:Stop"), 1, wait=True, timeout=60)
    time.sleep(2 * POLL_PERIOD)  # the last counts reach every monitor
    return final


def _check_storage(ioc: Any, dests: list[Path], inodes: list[dict[str, int]],
                   figures: Figures) -> None:
    """Every file in storage once, whole, never copied twice; no partials; DAQs clean."""
    for dest, seen in zip(dests, inodes, strict=True):
        scan_inodes(dest, seen)
    for i in range(N_FILES):
        tree, rel = file_path(i)
        copy = dests[tree] / rel
        if not copy.is_file() or copy.read_bytes() != file_bytes(i):
            figures.problems.append(f"file {i} missing or wrong in storage: {copy}")
        elif copy.stat().st_ino != inodes[tree][rel]:
            figures.problems.append(f"file {i} was copied more than once: {copy}")
        else:
            figures.copied += 1
    extra = sum(len(seen) for seen in inodes) - N_FILES
    extra += sum(1 for dest in dests for path in dest.rglob(".*") if path.is_file())
    if extra:
        figures.problems.append(f"{extra} unexpected files in storage (partials, copies)")
    for daq in _ask(ioc, lambda dm: dm.list_daqs()):
        if (daq.status, daq.n_errors) != ("done", 0):
            figures.problems.append(f"DAQ {daq.id[:8]} {daq.status}, {daq.n_errors} errors")


def _check_jobs(ioc: Any, keeper: JobKeeper, slots: list[SlotRunner], figures: Figures) -> None:
    """Every job started (both ways) is done, none more exist, and the last ones echoed."""
    by_slot = [i for slot in slots for i in slot.done]
    started = keeper.started + by_slot
    status = {j.id: j.status for j in all_jobs(ioc)}
    lost = [i for i in started if status.get(i) != "done"]
    figures.jobs = (sum(s == "done" for s in status.values()), len(started), len(by_slot))
    if lost or len(status) != len(started):
        figures.problems.append(f"jobs: {len(started)} started, {len(status)} in DM, "
                                f"{len(lost)} not done")

    async def echoes(dm: Any) -> list[tuple[str, str]]:
        jobs = [await dm.get_processing_job(i) for i in keeper.started[-10:] + by_slot[-4:]]
        return [(str(j.raw.get("echoed")), str(j.raw.get("tag"))) for j in jobs]

    figures.problems += [f"job echoed {got!r}, not {tag!r}" for got, tag in _ask(ioc, echoes)
                         if got != tag]


@pytest.mark.slow
@pytest.mark.timeout(int(SOAK_SECONDS) + 900)
def test_soak_under_load(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from conftest import make_ioc

    ioc = make_ioc(tmp_path, "--poll-period", str(POLL_PERIOD), "--daq-slots", str(N_SLOTS),
                   "--workflow-slots", str(N_SLOTS), "--log-level", "INFO")
    assert ioc.proc is not None
    usage = Usage(ioc.proc.pid)
    children: list[MonitorProcess] = []
    workers: list[Worker] = []
    figures = Figures()
    try:
        sources, dests = _setup(ioc, tmp_path)
        children = [MonitorProcess("ca", N_CA, ioc.prefix, ioc.env),
                    MonitorProcess("pva", N_PVA, ioc.prefix, ioc.env)]
        polls = PollCounter(ioc.pv("Status:DmRequests_RBV"))
        slots = [SlotRunner(ioc, n) for n in range(1, N_SLOTS + 1)]
        keeper = JobKeeper(ioc, JOB_SECONDS, others=lambda: sum(s.busy for s in slots))
        writer = FileWriter(sources, SOAK_SECONDS * WRITE_SHARE)
        workers = [keeper, writer, *slots]
        keeper.start()
        _ramp(keeper, polls, figures)

        soak_start = time.time()
        for w in (writer, *slots):
            w.start()
        inodes: list[dict[str, int]] = [{} for _ in dests]
        while time.time() < soak_start + SOAK_SECONDS:
            figures.usage.append(usage.sample())
            for dest, seen in zip(dests, inodes, strict=True):
                if dest.exists():
                    scan_inodes(dest, seen)
            for w in workers:
                assert w.is_alive() or w is writer, f"{w.name} died: {w.error!r}"
            time.sleep(max(0.0, min(SAMPLE_SECONDS, soak_start + SOAK_SECONDS - time.time())))
        figures.usage.append(usage.sample())
        figures.soak = (soak_start, time.time())
        figures.latency = _latencies(ioc)

        writer.stop(60)
        assert writer.written == N_FILES
        final = _wind_down(ioc, keeper, slots)
        for child in children:
            tallies = child.results()
            figures.events[child.kind] = sum(t["events"] for t in tallies)
            figures.problems += monitors_quiet(child.kind, tallies, figures.soak, final)
        _check_storage(ioc, dests, inodes, figures)
        _check_jobs(ioc, keeper, slots, figures)
        ioc_alive = ioc.proc.poll() is None
    finally:
        for w in workers:
            w.halt.set()
        for child in children:
            child.kill()
        ioc.stop()

    with capsys.disabled():  # the figures go into every run's output, CI's included
        print("\n" + figures.summary())
        for when, mb, cpu in figures.usage[::6] + figures.usage[-1:]:  # every minute, the end
            print(f"  t={when - soak_start:4.0f} s: IOC RSS {mb:6.1f} MB, CPU {cpu:3.0f} %")
    assert ioc_alive, "the IOC died"
    assert not figures.problems, figures.problems
    _, _, rss_problem = rss_verdict(figures.usage, soak_start)
    assert not rss_problem, rss_problem
    # a poll is one list call per kind, however many jobs are active
    medians = {n: statistics.median(d) for n, d in figures.per_poll.items()}
    assert len(set(medians.values())) == 1, f"DM requests per poll scale with jobs: {medians}"
    means = [statistics.mean(d) for d in figures.per_poll.values()]
    assert max(means) - min(means) < 0.5, figures.per_poll
    for what, (median, worst) in figures.latency.items():
        assert median < 100 and worst < 2000, f"{what} latency {median:.1f} ms (max {worst:.0f})"


class FakeDm:
    """Just enough of DmClient for the poller: a job list DM answers page by page."""

    username = "dm"

    def __init__(self) -> None:
        self.jobs: list[dict[str, Any]] = []
        self.requests = 0
        self.answers: list[int] = []  # jobs in each listProcessingJobs answer

    def add(self, n: int, status: str) -> list[dict[str, Any]]:
        new = [{"id": f"j{len(self.jobs) + i}", "owner": "dm", "status": status,
                "submissionTime": float(len(self.jobs) + i)} for i in range(n)]
        self.jobs += new
        return new

    async def list_processing_jobs(self, owner: str = "", keys: Any = "DEFAULT", skip: int = 0,
                                   limit: int = 5000) -> list[Any]:
        from apsdm.dm import Job

        self.requests += 1
        page = [Job.from_dict(dict(d)) for d in self.jobs[skip:skip + limit]]
        self.answers.append(len(page))
        return page

    async def _nothing(self, *_: Any) -> list[Any]:
        self.requests += 1
        return []

    list_daqs = list_uploads = list_experiments = list_workflows = _nothing


def test_poll_lists_only_unfinished_and_new_jobs(tmp_path: Path) -> None:
    """A long job history neither hides new jobs (DM cuts lists at 5000) nor grows a poll."""
    from apsdm.gateway.hub import Hub
    from apsdm.gateway.persist import Persistence
    from apsdm.gateway.poller import JOBS_SHOWN, Poller
    from apsdm.gateway.publisher import Publisher
    from apsdm.gateway.schema import Layout, build
    from apsdm.gateway.state import DmState

    async def scenario() -> None:
        layout = Layout("T:")
        dm = FakeDm()
        slot_job = dm.add(1, "done")[0]["id"]
        dm.add(5999, "done")
        running = dm.add(2, "running")
        hub = Hub(build(layout))
        persist = Persistence(tmp_path / "state.json")
        persist.ids["WF1"] = slot_job
        state = DmState(persist, Publisher(hub))
        poller = Poller(dm, state, 1.0)  # type: ignore[arg-type]
        for _ in range(2):  # the first poll reads the oldest 5000, the next one the rest
            await poller.poll_once()
        assert {j["id"] for j in running} <= state.snapshot.jobs.keys()
        for job in running:
            job["status"] = "done"
        new = dm.add(3, "running")
        dm.answers.clear()
        for _ in range(3):
            await poller.poll_once()
        assert max(dm.answers) <= 6, dm.answers  # the anchor, what ran and what is new
        jobs = state.snapshot.jobs
        assert {j["id"] for j in new} <= jobs.keys() and jobs[new[0]["id"]].status == "running"
        assert slot_job in jobs and len(jobs) <= JOBS_SHOWN + len(new) + 1
        table = hub[layout.prefix + "Jobs"]
        assert [row["id"] for row in table[:3]] == [j["id"] for j in reversed(new)]
        del dm.jobs[:10]  # DM's list changed under the poller: it reads it all again
        await poller.poll_once()
        assert dm.answers[-1] == 5000 and slot_job not in state.snapshot.jobs

    asyncio.run(scenario())


def test_monitored_pvs_hold_no_sent_updates(ioc: Any) -> None:
    """Updates sent to CA monitors are let go: 20 monitors of a 4 kB long string and 1,000
    writes leave the IOC's RSS as it was (caproto alone would keep them all, 80 MB)."""
    import epics
    import psutil

    assert ioc.proc is not None
    rss = psutil.Process(ioc.proc.pid).memory_info
    name = ioc.pv("Metadata:Json")
    seen: list[str] = []
    monitors = [epics.PV(name, form="native", callback=lambda char_value="", **_: seen.append(char_value))
                for _ in range(20)]
    assert all(m.wait_for_connection(5) for m in monitors)
    writer = epics.PV(name)
    assert writer.wait_for_connection(5)

    def write(i: int) -> str:
        text = json.dumps({"n": i, "pad": f"{i:04d}" * 990})  # 3,981 bytes
        writer.put(text, wait=True, timeout=10)
        return text

    for i in range(100):  # the circuits, buffers and allocator reach their working size
        write(i)
    before, earlier = rss().rss / 2**20, len(seen)
    for i in range(100, 1100):
        last = write(i)
    wait_until(lambda: seen[-20:] == [last] * 20, 30, "every monitor shows the last write")
    grown = rss().rss / 2**20 - before
    received = len(seen) - earlier
    # a client that falls behind asks the server to hold back (CA flow control), and then
    # gets only the newest values; half of them is still 40 MB that caproto would have kept
    assert received > 20 * 1000 // 2, f"monitors got only {received} of 20,000 updates"
    assert grown < 16, f"IOC RSS grew {grown:.1f} MB over 20,000 monitor updates"


if __name__ == "__main__":
    monitor_main(sys.argv[1], json.loads(sys.argv[2]))
