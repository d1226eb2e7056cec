"""Plan stub that adds a run's metadata to DM's dataset catalog (``Metadata:Json``)."""

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from bluesky import plan_stubs as bps
from bluesky.utils import MsgGenerator

from ..devices import DMMetadata
from ..errors import GatewayError, MetadataNotShared
from ..progress import DEFAULT_TIMING, Timing
from ..reports import plain
from .io import expect, refusal, run_command, write

__all__ = ["METADATA_LIMIT", "UNSHARED_KEYS", "run_metadata", "share_metadata"]

#: Bytes ``Metadata:Json`` holds (a long-string PV); a larger JSON text is refused.
METADATA_LIMIT = 4095
#: Start-document keys left out of what is shared (bulky, not searchable).
UNSHARED_KEYS = frozenset({"plan_args", "hints"})


def run_metadata(start: Mapping[str, Any], descriptors: Sequence[Mapping[str, Any]] = (),
                 **extra: Any) -> dict[str, Any]:
    """What DM's catalog gets for a run: its start document, every stream's data keys
    and objects, and ``extra``; the dataset is named like apstools', ``run_uid8_<uid[:8]>``."""
    uid = str(start.get("uid", ""))  # none when the plan is only simulated
    info = {key: value for key, value in start.items() if key not in UNSHARED_KEYS}
    info.update(datasetName=f"run_uid8_{uid[:8]}", bluesky_run_uid=uid,
                time_iso8601=datetime.fromtimestamp(float(start.get("time", 0))).isoformat(),
                streams={str(doc["name"]): {"data_keys": sorted(doc["data_keys"]),
                                            "objects": sorted(doc.get("object_keys", {}))}
                         for doc in descriptors},
                **extra)
    return plain(info)


def share_metadata(metadata: DMMetadata, info: Mapping[str, Any],
                   timing: Timing = DEFAULT_TIMING) -> MsgGenerator[str]:
    """Add ``info`` to DM's catalog; returns the dataset name.

    Raises MetadataNotShared (never drops it silently) when the JSON text is over
    METADATA_LIMIT bytes or DM refuses it.
    """
    text = json.dumps(plain(dict(info)), default=str)
    size = len(text.encode())
    if size > METADATA_LIMIT:
        raise MetadataNotShared(
            f"run metadata is {size} bytes, over the {METADATA_LIMIT} bytes Metadata:Json "
            "holds: not shared with DM (pass less metadata, or share it by other means)")
    try:
        yield from write(metadata, json=text)
        yield from run_command(metadata.upload, timeout=timing.upload_timeout,
                               poll_period=timing.poll_period)
        yield from expect(metadata, lambda: _accepted(metadata), "metadata not shared")
    except GatewayError as exc:
        raise MetadataNotShared(str(exc)) from None
    return str((yield from bps.rd(metadata.dataset_name, default_value="")))


def _accepted(metadata: DMMetadata) -> MsgGenerator[bool]:
    """True when ``Metadata:Message_RBV`` carries no alarm."""
    return (yield from refusal(metadata)) is None
