"""Streaming: the handshake's scalar mirrors, jobs that find the gateway on any ports, and
frames flowing from the streaming detector to the reference workflow through a real plan."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import epics
import h5py
import numpy as np
import pytest
from bluesky import RunEngine
from conftest import Ioc, make_ioc
from plan_helpers import FAST, demo, new_user

from apsdm_ophyd import DMGateway, RunReport, streaming_collection_plan
from apsdm_ophyd.reference_workflow import Store, Tally, analyse
from apsdm_ophyd.stream_detector import StreamingDetector

pytestmark = pytest.mark.timeout(240)


def test_handshake_mirrors_agree_on_both_protocols(ioc: Ioc, ctx: Any) -> None:
    """A structure put over PVA shows on the CA mirrors; a mirror put over CA changes the
    structure (stamped now); a state that is not one of the five is refused."""
    ctx.put(ioc.pv("Stream:Workflow"), {"state": "acquiring", "message": "12 frames",
                                        "counter": 12})
    assert epics.caget(ioc.pv("Stream:Workflow:State"), as_string=True, timeout=10) == "acquiring"
    assert epics.caget(ioc.pv("Stream:Workflow:Counter"), timeout=10) == 12
    assert epics.caget(ioc.pv("Stream:Workflow:Message"), as_string=True) == "12 frames"
    before = ctx.get(ioc.pv("Stream:Bluesky"))["timestamp"]
    assert epics.caput(ioc.pv("Stream:Bluesky:Counter"), 7, wait=True, timeout=10) == 1
    assert epics.caput(ioc.pv("Stream:Bluesky:State"), "done", wait=True, timeout=10) == 1
    value = ctx.get(ioc.pv("Stream:Bluesky"))
    assert (value["state"], value["counter"]) == ("done", 7) and value["timestamp"] > before
    epics.caput(ioc.pv("Stream:Bluesky:State"), 9, wait=True, timeout=10)  # no such state
    assert ctx.get(ioc.pv("Stream:Bluesky"))["state"] == "done"
    epics.caput(ioc.pv("Stream:Workflow:Results"), "[1, 2]", wait=True, timeout=10)  # not an object
    assert epics.caget(ioc.pv("Stream:Workflow:Results"), as_string=True) == ""


@pytest.fixture
def new_users_ioc(tmp_path: Path) -> Iterator[Ioc]:
    """The IOC as a new user starts it: ``--ca-port 0 --pva-port 0``, no EPICS_* environment."""
    running = make_ioc(tmp_path, any_ports=True)
    yield running
    running.stop()


@pytest.fixture
def stream_gateway(new_users_ioc: Ioc) -> Iterator[DMGateway]:
    context = new_users_ioc.pva_context()
    gw = DMGateway(new_users_ioc.prefix, name="dm", pva_context=context)
    gw.wait_for_connection(timeout=30)
    yield gw
    context.close()


@pytest.fixture
def stream_dm(new_users_ioc: Ioc) -> Any:
    """A DM client of that IOC's embedded service (for test set-up)."""
    return new_users_ioc.dm_client()


@pytest.fixture
def detector(new_users_ioc: Ioc) -> Iterator[StreamingDetector]:
    det = StreamingDetector(f"{new_users_ioc.prefix}cam1:Pva1:Image", shape=(64, 96),
                            frames_per_trigger=4, rate=200.0, name="cam")
    yield det
    det.close()


def stream(RE: RunEngine, gateway: DMGateway, detector: StreamingDetector, shots: int,
           options: str = "") -> tuple[Any, RunReport, list[dict[str, Any]]]:
    """Run the streaming plan with the reference workflow; the RunEngine's result, the report
    and the documents of the run."""
    docs: list[dict[str, Any]] = []
    result = RE(streaming_collection_plan(
        gateway, [detector], shots, "apsdm-streaming-reference",
        workflow_args={"pythonExe": sys.executable, "options": options},
        ready_timeout=60, raise_on_failure=False, **FAST),
        lambda name, doc: docs.append({"name": name, **doc}))
    return result, result.plan_result, docs


def test_frames_flow_from_detector_to_reference_workflow_on_any_ports(
        stream_dm: Any, stream_gateway: DMGateway, detector: StreamingDetector,
        RE: RunEngine) -> None:
    """No wrapper, no EPICS_* set for the IOC: its job finds it, subscribes to the detector,
    stores every frame with its results in the experiment's analysis directory."""
    experiment = new_user(stream_dm, stream_gateway, RE, demo("streaming-reference"))
    result, report, docs = stream(RE, stream_gateway, detector, 5)
    assert result.exit_status == "success", result.reason
    assert report.job.status == "done", report.job.stages[0]["stdErr"]
    dm_md = report.data_management
    assert dm_md["stream_frames_received"] == 20 and dm_md["stream_frames_lost"] == 0
    stop = next(d for d in docs if d["name"] == "stop")
    assert "20 frames received, 0 lost" in stop["reason"]
    dm_event = next(d for d in docs if d["name"] == "event" and "dm_stream_frames_lost" in d["data"])
    assert dm_event["data"]["dm_stream_frames_lost"] == 0
    assert dm_event["data"]["dm_stream_frames_received"] == 20
    path = Path(dm_md["stream_file"])
    exp_dir = Path(stream_gateway.experiment.data_directory.get())
    assert path.parent == exp_dir / "analysis" and experiment in str(exp_dir)
    with h5py.File(path) as h5:
        ids = h5["unique_id"][:]
        assert list(ids) == list(range(1, 21))
        for n, uid in enumerate(ids):
            expected = detector.frame(int(uid))
            assert np.array_equal(h5["frames"][n], expected)
            assert h5["sum"][n] == pytest.approx(float(expected.sum(dtype=np.float64)))
            assert h5["max"][n] == expected.max()
            assert h5["centroid_row"][n] == pytest.approx(analyse(expected)["centroid_row"])
        assert json.loads(h5.attrs["summary"])["framesLost"] == 0
    assert stream_gateway.stream.workflow.state.get() == "done"


def test_loss_is_counted_exactly_when_the_workflow_is_slower(
        stream_dm: Any, stream_gateway: DMGateway, detector: StreamingDetector,
        RE: RunEngine) -> None:
    """A workflow slower than the detector loses frames: received + lost is every frame
    taken, and the lost ones are exactly the uniqueIds missing from the HDF5 file."""
    new_user(stream_dm, stream_gateway, RE, demo("streaming-reference"))
    detector.frames_per_trigger.put(30)
    detector.frame_rate.put(0.0)  # as fast as the server takes them
    _result, report, _docs = stream(RE, stream_gateway, detector, 2,
                                   "--delay 0.05 --queue-size 2 --drain 2")
    assert report.job.status == "done", report.job.stages[0]["stdErr"]
    dm_md = report.data_management
    received, lost = dm_md["stream_frames_received"], dm_md["stream_frames_lost"]
    assert lost > 0 and received + lost == 60
    with h5py.File(dm_md["stream_file"]) as h5:
        ids = set(int(uid) for uid in h5["unique_id"][:])
    assert len(ids) == received and len(set(range(1, 61)) - ids) == lost
    assert stream_gateway.stream.workflow.lost.get() == lost


def test_workflow_that_has_enough_ends_the_collection(
        stream_dm: Any, stream_gateway: DMGateway, detector: StreamingDetector,
        RE: RunEngine) -> None:
    """The workflow ends the stream first (it wants 8 frames): bluesky takes no more shots of
    the 400 asked for, closes the run with those it took, says why, and the job ends done."""
    new_user(stream_dm, stream_gateway, RE, demo("streaming-reference"))
    result, report, docs = stream(RE, stream_gateway, detector, 400, "--max-frames 8")
    assert result.exit_status == "success", result.reason
    assert report.job.status == "done", report.job.stages[0]["stdErr"]
    assert report.data_management["stream_frames_received"] == 8
    # a descriptor's own "name" (its stream) stands where the others have the document's
    primary = next(d["uid"] for d in docs if "data_keys" in d and d["name"] == "primary")
    shots = [d for d in docs if d["name"] == "event" and d["descriptor"] == primary]
    assert 2 <= len(shots) < 400, len(shots)
    ours = stream_gateway.stream.bluesky
    assert ours.state.get() == "done"
    assert "the workflow ended the stream" in ours.message.get()


def test_tally_counts_gaps_head_and_tail() -> None:
    """Lost frames: gaps between received ids, before the first and after the last."""
    tally = Tally(start=10)
    for uid in (9, 10, 12, 13, 13, 16):  # 9, 10: before the start; 13 twice
        tally.take(uid)
    assert (tally.received, tally.stale, tally.lost) == (3, 3, 3)  # 11, 14, 15
    tally.end = 18
    assert tally.lost == 5 and not tally.complete  # and 17, 18


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_store_keeps_every_frame_and_result_across_growth(tmp_path: Path, layout: str) -> None:
    """More frames than one growth step: the file holds each frame (written as its chunk, or
    indexed when not contiguous) and its result row, trimmed to the frames received."""
    count = Store.GROW + 6
    store = Store(tmp_path / "s.h5", "DET:Pva1:Image")
    frames = [np.arange(48, dtype=np.uint16).reshape(6, 8) * (i + 1) for i in range(count)]
    for i, frame in enumerate(frames):
        shown = frame if layout == "contiguous" else np.asfortranarray(frame)
        store.append(shown, 100 + i, analyse(frame), 0.001 * i)
    store.close({"framesReceived": count})
    with h5py.File(tmp_path / "s.h5") as h5:
        assert h5["frames"].shape == (count, 6, 8)
        assert all(np.array_equal(h5["frames"][i], f) for i, f in enumerate(frames))
        assert list(h5["unique_id"][:]) == [100 + i for i in range(count)]
        assert h5["sum"][count - 1] == frames[-1].sum()
        assert h5["latency"].shape == (count,)
