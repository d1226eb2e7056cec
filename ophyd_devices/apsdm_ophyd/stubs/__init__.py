"""Composable plan stubs: every DM step of the plans, each usable on its own.

All I/O is bluesky messages (``bps.rd``, ``bps.abs_set``, ``bps.wait``), every wait a loop
of short waits with checkpoints (:func:`apsdm_ophyd.progress.wait_until`).
"""

from .beamtime import select_beamtime
from .io import release, run_command, write
from .metadata import METADATA_LIMIT, run_metadata, share_metadata
from .transfers import (
    DaqBaseline,
    daq_baseline,
    select_experiment,
    start_daq,
    start_upload,
    upload,
    wait_daq_files,
    wait_upload,
)
from .workflow import JobHandle, release_workflow, start_workflow, wait_workflow

__all__ = ["METADATA_LIMIT", "DaqBaseline", "JobHandle", "daq_baseline", "release",
           "release_workflow", "run_command", "run_metadata", "select_beamtime", "select_experiment",
           "share_metadata", "start_daq", "start_upload", "start_workflow", "upload",
           "wait_daq_files", "wait_upload", "wait_workflow", "write"]
