"""The embedded DM service's batched copies and its close-event fast path, in process, so a
test can set the service's batch size and settle time."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from test_faults import Appearances

from apsdm.dm import DmClient, DmConfig
from apsdm.dmserver import daqrunner, start_service, transfer, uploadrunner
from apsdm.dmserver.watch import WatchHub


@asynccontextmanager
async def service_client(root: Path) -> AsyncIterator[DmClient]:
    service = await start_service(root)
    try:
        async with DmClient(DmConfig.from_env({}, setup_file=str(service.setup_file))) as dm:
            yield dm
    finally:
        await service.stop()


async def until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"{what}: not reached in {timeout} s"
        await asyncio.sleep(0.05)


def test_closed_file_is_copied_without_waiting_to_settle(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """With a settle time far longer than the test, a file its writer closed is still copied
    at once, while one still open waits; closing it, unchanged, releases it."""
    monkeypatch.setattr(daqrunner, "STABLE_SECONDS", 600.0)
    src = tmp_path / "detector"
    src.mkdir()

    async def go() -> None:
        async with service_client(tmp_path / "dm") as dm:
            await dm.add_experiment("closing")
            with (src / "open.dat").open("wb") as still_open:
                still_open.write(b"x" * 1000)
                still_open.flush()
                daq = await dm.start_daq("closing", str(src))

                async def counts(processed: int, waiting: int) -> bool:
                    d = await dm.get_daq(daq.id)
                    return (d.n_processed, d.n_waiting) == (processed, waiting)
                # the open file, fresh, waits to settle: the DAQ has scanned, so it watches
                await until(lambda: counts(0, 1), 30, "open file waiting")
                (src / "closed.dat").write_bytes(b"y" * 2000)
                await until(lambda: counts(1, 1), 30, "closed file copied")
            await until(lambda: counts(2, 0), 30, "file copied once closed")
            await dm.stop_daq("closing", str(src))

    asyncio.run(go())


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


@pytest.mark.parametrize("how", ["daq", "files", "directory"])
def test_batches_copy_each_file_once_with_its_checksum(tmp_path: Path, how: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Many small batches copied side by side: every file renamed into place exactly once,
    catalogued with its own size and md5, and counted once."""
    monkeypatch.setattr(transfer, "BATCH_FILES", 7)
    src = tmp_path / "data"
    rels = {f"scan{i % 3}/f{i:03d}.dat" for i in range(60)}
    for i, rel in enumerate(sorted(rels)):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(bytes([i]) * (100 * i + 1))

    async def go() -> None:
        async with service_client(tmp_path / "dm") as dm:
            exp = await dm.add_experiment("batches")
            dest = Path(exp.data_directory)
            for i in range(3):  # the watch makes up "created" events in directories it
                (dest / "out" / f"scan{i}").mkdir(parents=True)  # sees appear: none here
            with Appearances(dest) as appeared:
                if how == "daq":
                    daq = await dm.start_daq("batches", str(src), destDirectory="out")

                    async def counted() -> bool:
                        return (await dm.get_daq(daq.id)).n_processed >= len(rels)
                    await until(counted, 60, "DAQ copies")
                    await dm.stop_daq("batches", str(src))
                    final = await dm.get_daq(daq.id)
                else:
                    up = await dm.upload("batches", str(src), destDirectory="out",
                                         processingMode=how)

                    async def finished() -> bool:
                        return (await dm.get_upload(up.id)).finished
                    await until(finished, 60, "upload")
                    final = await dm.get_upload(up.id)
                await asyncio.sleep(0.5)  # let the watch see the last renames
            assert (final.n_files, final.n_processed, final.n_errors) == (len(rels), len(rels), 0)
            appeared.assert_each_once("out", rels)
            for rel in rels:
                record = await dm.get_experiment_file("batches", str(PurePosixPath("out", rel)))
                assert (record["fileSize"], record["md5Sum"]) == (
                    (src / rel).stat().st_size, md5(src / rel)), rel
                assert md5(dest / "out" / rel) == md5(src / rel)

    asyncio.run(go())


def test_daq_keeps_its_per_file_state_in_the_store(tmp_path: Path) -> None:
    """A running DAQ's per-file state is one store row per file, at the version copied (not
    objects in its memory); a file changed after its copy is copied again and still counted
    once; once the DAQ ends only its counts remain."""
    src = tmp_path / "data"
    src.mkdir()
    for i in range(30):
        (src / f"f{i:02d}.dat").write_bytes(bytes([i]) * (10 * i + 1))

    def rows(daq_id: str) -> dict[str, tuple[str, int, int]]:
        with sqlite3.connect(tmp_path / "dm" / "dm.sqlite") as db:
            return {path: (state, size, mtime) for path, state, size, mtime in db.execute(
                "SELECT path, state, size, mtime_ns FROM transfer_files WHERE transfer = ?",
                (daq_id,))}

    async def go() -> None:
        async with service_client(tmp_path / "dm") as dm:
            exp = await dm.add_experiment("rows")
            daq = await dm.start_daq("rows", str(src))

            async def copied(content: bytes = b"") -> bool:
                d = await dm.get_daq(daq.id)
                copy = Path(exp.data_directory) / "f07.dat"
                return d.n_processed == 30 and (not content or copy.read_bytes() == content)
            await until(copied, 60, "first copies")
            stats = {p.name: p.stat() for p in src.iterdir()}
            assert rows(daq.id) == {name: ("done", st.st_size, st.st_mtime_ns)
                                    for name, st in stats.items()}
            (src / "f07.dat").write_bytes(b"changed")
            await until(lambda: copied(b"changed"), 60, "the changed file copied again")
            assert rows(daq.id)["f07.dat"][1:] == (7, (src / "f07.dat").stat().st_mtime_ns)
            await dm.stop_daq("rows", str(src))
            final = await dm.get_daq(daq.id)
            assert (final.n_files, final.n_processed, final.n_errors) == (30, 30, 0)
            assert rows(daq.id) == {}

    asyncio.run(go())


def record_walks(monkeypatch: pytest.MonkeyPatch, slower: float = 0.0) -> list[tuple[float, str]]:
    """Every walk the DAQs make: when, and of which directory ("": the whole tree); each
    made ``slower`` seconds longer (as on a tree of 100,000s of files)."""
    walks: list[tuple[float, str]] = []
    walk = daqrunner.DaqRunner._list_unhandled

    def recorded(self: daqrunner.DaqRunner, under: str = "") -> dict[str, Any]:
        walks.append((time.monotonic(), under))
        time.sleep(slower)
        return walk(self, under)

    monkeypatch.setattr(daqrunner.DaqRunner, "_list_unhandled", recorded)
    return walks


async def copied_in_time(dm: DmClient, daq_id: str, count: int, seconds: float) -> None:
    """The DAQ's processed count reaches ``count`` within ``seconds``."""
    async def copied() -> bool:
        return (await dm.get_daq(daq_id)).n_processed == count
    began = time.monotonic()
    await until(copied, 30, f"{count} files copied")
    assert time.monotonic() - began < seconds, f"{count} files: copied too late"


@asynccontextmanager
async def daq_past_first_walk(tmp_path: Path, name: str, walks: list[tuple[float, str]]
                              ) -> AsyncIterator[tuple[DmClient, str, Path]]:
    """A DAQ on a new detector directory, once it has made its first walk; stopped after."""
    src = tmp_path / "detector"
    src.mkdir()
    async with service_client(tmp_path / "dm") as dm:
        await dm.add_experiment(name)
        daq = await dm.start_daq(name, str(src))
        await until(lambda: asyncio.sleep(0, bool(walks)), 30, "first walk")
        yield dm, daq.id, src
        await dm.stop_daq(name, str(src))


def test_slow_rescans_are_spaced_and_do_not_hold_up_new_files(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rescan that takes long (a huge tree) is followed by a pause ten times its length, so
    rescans cannot take the whole DAQ's time; files closed meanwhile are still copied at once."""
    monkeypatch.setattr(daqrunner, "RESCAN_SECONDS", 0.2)
    walks = record_walks(monkeypatch, slower=0.3)

    async def go() -> None:
        async with daq_past_first_walk(tmp_path, "spaced", walks) as (dm, daq_id, src):
            for i in range(5):  # one closed file a second
                (src / f"f{i}.dat").write_bytes(b"z" * 100)
                await copied_in_time(dm, daq_id, i + 1, 2.0)
                await asyncio.sleep(1.0)

    asyncio.run(go())
    scans = [when for when, _ in walks[:-1]]  # the last: stopDaq's
    gaps = [b - a for a, b in itertools.pairwise(scans)]
    # 0.3 s scans every 0.2 s would leave gaps of ~0.4 s; spaced, each is 11 x 0.3 s or more
    assert gaps and min(gaps) >= 3.0, gaps


def test_files_closed_during_a_rescan_are_copied_before_it_ends(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rescan lists the tree in a worker thread while the DAQ goes on: files closed while
    a long one runs (here 4 s, as on a tree of 100,000s of files) are copied at once."""
    monkeypatch.setattr(daqrunner, "RESCAN_SECONDS", 600.0)
    walks = record_walks(monkeypatch, slower=4.0)

    async def go() -> None:
        async with daq_past_first_walk(tmp_path, "beside", walks) as (dm, daq_id, src):
            for i in range(3):
                (src / f"f{i}.dat").write_bytes(b"z" * 100)
                await copied_in_time(dm, daq_id, i + 1, 1.0)
            assert time.monotonic() - walks[0][0] < 4.0  # the first walk still runs

    asyncio.run(go())


def test_directory_upload_with_one_unreadable_file_places_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Directory mode is all or nothing: one file that cannot be read (while the other
    staging threads copy theirs) fails the upload saying which; no file is put in place or
    catalogued, and no staged copy is left behind."""
    stage = uploadrunner.stage_file

    def unreadable(src: Path, *args: object, **kwargs: object) -> object:
        if src.name == "f013.dat":
            raise PermissionError(13, "Permission denied", str(src))
        return stage(src, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(uploadrunner, "stage_file", unreadable)
    monkeypatch.setattr(uploadrunner, "PARALLEL_BATCHES", 4)  # threads race on any machine
    src = tmp_path / "data"
    for i in range(40):
        (src / f"scan{i % 4}").mkdir(parents=True, exist_ok=True)
        (src / f"scan{i % 4}" / f"f{i:03d}.dat").write_bytes(b"d" * (10 * i + 1))

    async def go() -> None:
        async with service_client(tmp_path / "dm") as dm:
            exp = await dm.add_experiment("allornothing")
            up = await dm.upload("allornothing", str(src), destDirectory="out",
                                 processingMode="directory")

            async def finished() -> bool:
                return (await dm.get_upload(up.id)).finished
            await until(finished, 60, "upload")
            final = await dm.get_upload(up.id)
            assert final.status == "failed" and "f013.dat" in final.error_message, final
            assert final.n_processed == 0
            dest = Path(exp.data_directory)
            assert [p for p in dest.rglob("*") if p.is_file()] == []
            with pytest.raises(Exception, match="not catalogued"):
                await dm.get_experiment_file("allornothing", "out/scan0/f000.dat")

    asyncio.run(go())


def test_new_directories_are_listed_without_rescanning_the_tree(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A detector making a directory per scan: each new directory's files are copied (those
    written before its watch existed too) by listing that directory alone; the whole tree is
    walked only at the start (and at the stop), not once per new directory."""
    monkeypatch.setattr(daqrunner, "RESCAN_SECONDS", 600.0)
    walks = record_walks(monkeypatch)

    async def go() -> None:
        async with daq_past_first_walk(tmp_path, "perscan", walks) as (dm, daq_id, src):
            for scan in range(5):
                os.makedirs(src / f"scan{scan}" / "sub")  # files at once, before any watch
                for name in ("a.dat", "sub/b.dat", "c.dat"):
                    (src / f"scan{scan}" / name).write_bytes(b"s" * 50)
                await copied_in_time(dm, daq_id, 3 * (scan + 1), 5.0)
            assert [under for _, under in walks].count("") == 1, walks

    asyncio.run(go())


def test_reads_of_watched_files_raise_no_events(tmp_path: Path) -> None:
    """A DAQ reads every file it copies: those opens and closes-without-writing reach no DAQ
    (inotify is asked only for the events a DAQ uses); a write and its close do."""
    events: list[tuple[str | None, bool, bool]] = []

    async def go() -> None:
        hub = WatchHub()
        try:
            assert await hub.watch(tmp_path, lambda *event: events.append(event))
            (tmp_path / "f.dat").write_bytes(b"x" * 100)
            await until(lambda: asyncio.sleep(0, any(closed for _, closed, _ in events)), 10,
                        "the write's close")
            await asyncio.sleep(0.3)  # the write's last events
            written = list(events)
            for _ in range(20):
                (tmp_path / "f.dat").read_bytes()
            await asyncio.sleep(0.5)
            assert events == written
        finally:
            await hub.close()

    asyncio.run(go())
