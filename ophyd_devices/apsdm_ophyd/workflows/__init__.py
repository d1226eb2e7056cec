"""Example DM workflow definitions (JSON) for the demo plans: a file-based one, a
streaming handshake demo and the reference streaming workflow.

Add them all to DM with ``apsdm add-workflow --demo``, one with ``apsdm add-workflow --file
PATH`` (or ``dm-upsert-workflow``); the owner defaults to the DM user.
"""

from __future__ import annotations

from pathlib import Path

DIRECTORY = Path(__file__).parent


def path(name: str) -> Path:
    """The JSON file of the demo workflow ``name`` (``files-demo``, ``streaming-demo`` or
    ``streaming-reference``)."""
    found = DIRECTORY / f"{name}.json"
    if not found.is_file():
        choices = ", ".join(sorted(p.stem for p in DIRECTORY.glob("*.json")))
        raise ValueError(f"no demo workflow {name!r}; there are: {choices}")
    return found
