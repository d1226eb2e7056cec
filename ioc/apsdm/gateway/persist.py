"""What the gateway remembers across restarts: the selected experiment, slot settings
and the ids of the DAQs, uploads and jobs it started (so it reattaches, never restarts).
Only :class:`~apsdm.gateway.state.DmState` writes it.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class Persistence:
    """A JSON file written atomically (temp file + rename) on every change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {"settings": {}, "ids": {}, "owners": {}}
        if path.exists():
            try:
                loaded = json.loads(path.read_text())
                if not isinstance(loaded, dict) or not all(
                        isinstance(loaded.get(k, {}), dict) for k in self.data):
                    raise ValueError("not an object of 'settings', 'ids' and 'owners'")
                for key in self.data:
                    self.data[key].update(loaded.get(key, {}))
            except (OSError, ValueError) as exc:
                # keep the unreadable file for inspection; start from defaults
                backup = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
                path.replace(backup)
                log.error("state file %s unreadable (%s); moved to %s", path, exc, backup)

    @property
    def settings(self) -> dict[str, Any]:
        """Saved setting values by PV suffix path (e.g. ``DAQ1:DataDirectory``)."""
        return self.data["settings"]

    @property
    def ids(self) -> dict[str, str]:
        """DM ids of what each slot started, by slot (e.g. ``WF2``)."""
        return self.data["ids"]

    @property
    def owners(self) -> dict[str, str]:
        """Owners of the jobs the workflow slots started, by slot: the jobs to list."""
        return self.data["owners"]

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".state-")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(self.data, fh, indent=1, sort_keys=True)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
