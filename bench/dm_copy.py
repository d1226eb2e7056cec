"""Embedded DM service copy speed, as ratios to ``cp -r`` of the same data in the same run:
a DAQ receiving 2,000 small files and one 1 GiB file, and directory- vs file-mode uploads."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from apsdm.dm import DmClient, DmConfig
from apsdm.dmserver import start_service

SMALL_FILES = int(os.environ.get("BENCH_SMALL_FILES", 2000))
BIG_BYTES = int(os.environ.get("BENCH_BIG_BYTES", 1 << 30))


def make_small(root: Path) -> None:
    root.mkdir(parents=True)
    for i in range(SMALL_FILES):
        (root / f"f{i:05d}.dat").write_bytes(os.urandom(4096))


def make_big(root: Path) -> None:
    root.mkdir(parents=True)
    with (root / "big.bin").open("wb") as fh:
        chunk = os.urandom(1 << 20)
        for _ in range(BIG_BYTES >> 20):
            fh.write(chunk)


def cp_seconds(src: Path, dest: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(["cp", "-r", str(src), str(dest)], check=True)
    return time.perf_counter() - t0


async def until(check, timeout: float = 3600) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError
        await asyncio.sleep(0.05)


async def daq_seconds(dm: DmClient, exp: str, src: Path, n: int) -> float:
    """Time from DAQ start (existing files processed) until n files are copied."""
    t0 = time.perf_counter()
    daq = await dm.start_daq(exp, str(src), destDirectory=src.name, processExistingFiles=True)

    async def done() -> bool:
        return (await dm.get_daq(daq.id)).n_processed >= n
    await until(done)
    elapsed = time.perf_counter() - t0
    await dm.stop_daq(exp, str(src))
    return elapsed


async def upload_seconds(dm: DmClient, exp: str, src: Path, mode: str) -> float:
    t0 = time.perf_counter()
    up = await dm.upload(exp, str(src), destDirectory=f"{src.name}-{mode}", processingMode=mode)

    async def done() -> bool:
        return (await dm.get_upload(up.id)).finished
    await until(done)
    return time.perf_counter() - t0


async def run(work: Path) -> None:
    small, big = work / "small", work / "big"
    make_small(small)
    make_big(big)
    service = await start_service(work / "dm")
    try:
        async with DmClient(DmConfig.from_env({}, setup_file=str(service.setup_file))) as dm:
            await dm.add_experiment("bench")
            cp_small = cp_seconds(small, work / "cp-small")
            daq_small = await daq_seconds(dm, "bench", small, SMALL_FILES)
            cp_big = cp_seconds(big, work / "cp-big")
            daq_big = await daq_seconds(dm, "bench", big, 1)
            up_dir = await upload_seconds(dm, "bench", small, "directory")
            up_files = await upload_seconds(dm, "bench", small, "files")
    finally:
        await service.stop()
    print(f"DAQ copy, {SMALL_FILES} x 4 KiB files: {daq_small:.2f} s, cp -r {cp_small:.2f} s, "
          f"ratio {daq_small / cp_small:.1f}x")
    print(f"DAQ copy, one {BIG_BYTES >> 20} MiB file: {daq_big:.2f} s, cp -r {cp_big:.2f} s, "
          f"ratio {daq_big / cp_big:.1f}x")
    print(f"upload of {SMALL_FILES} small files: directory mode {up_dir:.2f} s, "
          f"file mode {up_files:.2f} s, file/directory ratio {up_files / up_dir:.1f}x")


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="apsdm-bench-"))
    try:
        asyncio.run(run(work))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
