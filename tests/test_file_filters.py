"""DM's file-selection options of DAQs and uploads (dm-protocol.md 1.3), each with real files
copied by the embedded service: only what the option selects lands in the experiment."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import DmServer

from apsdm.dm import InvalidArgument

FILES = ("a.h5", "b.tmp", "sub/c.hdf5", "sub/d.txt", ".hid.h5")
VISIBLE = {"a.h5", "b.tmp", "sub/c.hdf5", "sub/d.txt"}


def _tree(root: Path) -> Path:
    for rel in FILES:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(rel)
    return root


def _copied(data_directory: str) -> set[str]:
    root = Path(data_directory)
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize(("option", "value", "expected"), [
    (None, None, VISIBLE),
    ("skipFilePathPattern", "*.tmp, sub/*.txt", {"a.h5", "sub/c.hdf5"}),
    ("includeFileExtensions", "h5,hdf5", {"a.h5", "sub/c.hdf5"}),
    ("excludeFileExtensions", ["h5", ".tmp"], {"sub/c.hdf5", "sub/d.txt"}),
    ("filePathPattern", "sub/*", {"sub/c.hdf5", "sub/d.txt"}),
    ("processHiddenFiles", True, VISIBLE | {".hid.h5"}),
])
def test_upload_takes_only_selected_files(dm_server: DmServer, tmp_path: Path,
                                          option: str | None, value: Any,
                                          expected: set[str]) -> None:
    source = _tree(tmp_path / "src")
    options = {option: value} if option else {}

    async def go() -> set[str]:
        async with dm_server.client() as dm:
            experiment = await dm.add_experiment("filters")
            upload = await dm.upload("filters", str(source), **options)
            deadline = time.monotonic() + 30
            while not upload.finished:
                assert time.monotonic() < deadline, "upload did not end"
                await asyncio.sleep(0.1)
                upload = await dm.get_upload(upload.id)
            assert (upload.status, upload.n_files) == ("done", len(expected))
            return _copied(experiment.data_directory)

    assert asyncio.run(go()) == expected


def test_daq_skips_files_matching_skip_pattern(dm_server: DmServer, tmp_path: Path) -> None:
    """dmax's case: skipFilePathPattern="*.tmp" is honoured, for files present at the start
    and for files written while the DAQ runs."""
    source = _tree(tmp_path / "src")

    async def go() -> set[str]:
        async with dm_server.client() as dm:
            experiment = await dm.add_experiment("daq-skip")
            await dm.start_daq("daq-skip", str(source), skipFilePathPattern="*.tmp")
            (source / "late.tmp").write_text("late")
            (source / "late.h5").write_text("late")
            deadline = time.monotonic() + 30
            while len(_copied(experiment.data_directory)) < 4:
                assert time.monotonic() < deadline, _copied(experiment.data_directory)
                await asyncio.sleep(0.1)
            daq = await dm.stop_daq("daq-skip", str(source))
            assert daq.n_files == 4
            return _copied(experiment.data_directory)

    assert asyncio.run(go()) == {"a.h5", "sub/c.hdf5", "sub/d.txt", "late.h5"}


def test_bad_selection_option_is_refused(dm_server: DmServer, tmp_path: Path) -> None:
    async def go() -> None:
        async with dm_server.client() as dm:
            await dm.add_experiment("bad-filter")
            with pytest.raises(InvalidArgument, match="includeFileExtensions"):
                await dm.upload("bad-filter", str(tmp_path), includeFileExtensions=5)

    asyncio.run(go())
