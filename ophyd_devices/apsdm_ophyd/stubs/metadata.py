"""Plan stub that adds a run's metadata to DM's dataset catalog (``Metadata:Json``)."""

import json
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from bluesky import plan_stubs as bps
from bluesky.utils import FailedStatus, MsgGenerator

from ..devices import DMMetadata
from ..errors import GatewayError, MetadataNotShared
from ..progress import DEFAULT_TIMING, Timing
from ..pva import TextSignal
from ..reports import plain
from .io import expect, refusal, run_command, write

__all__ = ["METADATA_LIMIT", "UNSHARED_KEYS", "run_metadata", "share_metadata"]

#: Bytes ``Metadata:Json`` holds over CA (a char waveform); PVA takes more (see share_metadata).
METADATA_LIMIT = 4095
#: Start-document keys left out of what is shared (bulky, not searchable).
UNSHARED_KEYS = frozenset({"plan_args", "hints"})


def run_metadata(start: Mapping[str, Any], descriptors: Sequence[Mapping[str, Any]] = (),
                 **extra: Any) -> dict[str, Any]:
    """What DM's catalog gets for a run: its start document, every stream's metadata (its
    descriptors in full, as apstools shares a run's streams) and ``extra``; the dataset is
    named like apstools', ``run_uid8_<uid[:8]>``."""
    uid = str(start.get("uid", ""))  # none when the plan is only simulated
    info = {key: value for key, value in start.items() if key not in UNSHARED_KEYS}
    info.update(datasetName=f"run_uid8_{uid[:8]}", bluesky_run_uid=uid,
                time_iso8601=datetime.fromtimestamp(float(start.get("time", 0))).isoformat(),
                streams=_streams(descriptors), **extra)
    return plain(info)


def _streams(descriptors: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each stream's descriptors by stream name (a stream may have several)."""
    streams: dict[str, dict[str, Any]] = {}
    for doc in descriptors:
        stream = streams.setdefault(str(doc.get("name", "primary")), {"descriptors": []})
        stream["descriptors"].append(dict(doc))
    return streams


def share_metadata(metadata: DMMetadata, info: Mapping[str, Any],
                   timing: Timing = DEFAULT_TIMING, *,
                   json_pva: TextSignal | None = None) -> MsgGenerator[str]:
    """Add ``info`` to DM's catalog; returns the dataset name.

    ``json_pva`` (``PvaChannels.metadata_json``) writes ``Metadata:Json`` over PVA, where
    it holds any size the IOC takes; without it the text goes over CA (METADATA_LIMIT).
    Raises MetadataNotShared (never drops it silently) when the text is too long, the
    IOC refuses it or DM does.
    """
    info = dict(info)
    uid = str(info.get("uid") or info.get("bluesky_run_uid") or uuid.uuid4())
    name = str(info.setdefault("datasetName", f"run_uid8_{uid[:8]}"))  # as the IOC names it
    text = json.dumps(plain(info), default=str)
    size = len(text.encode())
    if json_pva is None and size > METADATA_LIMIT:
        raise MetadataNotShared(
            f"run metadata is {size} bytes, over the {METADATA_LIMIT} bytes Metadata:Json "
            "holds on CA: not shared with DM (share it over PVA: json_pva=dm.pva.metadata_json)")
    try:
        if json_pva is None:
            yield from write(metadata, json=text)
        else:
            yield from _write_pva(metadata, json_pva, text)
        yield from run_command(metadata.upload, timeout=timing.upload_timeout,
                               poll_period=timing.poll_period)
        yield from expect(metadata, lambda: _ended(metadata, name), f"dataset {name} not added")
        why = yield from refusal(metadata)
        if why is not None:
            raise GatewayError(f"metadata not shared: {why}")
    except GatewayError as exc:
        raise MetadataNotShared(str(exc)) from None
    return name


def _write_pva(metadata: DMMetadata, signal: TextSignal, text: str) -> MsgGenerator[None]:
    """Put ``text`` over PVA; a refusal raises GatewayError with the IOC's reason."""
    try:
        yield from bps.abs_set(signal, text, wait=True)
    except FailedStatus as exc:
        status = exc.args[0] if exc.args else None
        cause = status.exception() if hasattr(status, "exception") else None
        why = (yield from refusal(metadata)) or str(cause or exc)
        raise GatewayError(f"{signal.pvname} ({len(text.encode())} bytes) refused: {why}") from None


def _ended(metadata: DMMetadata, name: str) -> MsgGenerator[bool]:
    """True once the IOC shows dataset ``name`` added, or refused the upload (an alarm)."""
    if (yield from refusal(metadata)) is not None:
        return True
    return bool((yield from bps.rd(metadata.dataset_name, default_value=name)) == name)
