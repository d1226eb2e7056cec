"""A streaming detector for bluesky: frames served as an ``NTNDArray`` PV over PV Access.

It publishes what areaDetector's PVA plugin (NDPluginPva) publishes: the pixels in the
``value`` union, ``codec`` (blank name: uncompressed), compressed/uncompressed sizes,
``dimension`` (fastest-varying first, so numpy's shape reversed), ``uniqueId`` (the array
counter), ``timeStamp`` and ``dataTimeStamp`` (POSIX seconds) and NDAttributes such as
``ColorMode`` in ``attribute``. Each trigger posts ``frames_per_trigger`` frames at
``frame_rate`` frames/s (0: as fast as the server takes them); a streaming workflow
subscribes to :attr:`StreamingDetector.frames_pv` on its own PVA server, as it would to a
real detector's.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from ophyd import Component as Cpt
from ophyd import Device, Kind, Signal
from ophyd.status import DeviceStatus
from p4p import Value
from p4p.nt import NTNDArray
from p4p.server import Server
from p4p.server.thread import SharedPV

#: NDAttrSource_t of areaDetector's NDAttribute.h: where an attribute's value comes from
ATTR_SOURCE_DRIVER = 0
#: distinct frame contents the detector cycles through (frame ``n`` is ``n % VARIANTS``)
VARIANTS = 4


def spot_frame(shape: Sequence[int], dtype: str, variant: int) -> np.ndarray:
    """A frame with one bright spot on a low background, the spot moving with ``variant``,
    so per-frame sums, maxima and centroids differ from frame to frame."""
    rows, cols = shape
    y, x = np.ogrid[:rows, :cols]
    cy, cx = rows * (1 + variant) / (VARIANTS + 2), cols * (VARIANTS + 1 - variant) / (VARIANTS + 2)
    sigma = max(2.0, min(rows, cols) / 16)
    spot = 1000.0 * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * sigma**2))
    return (spot + 10 + variant).astype(dtype)


class _NDArrayType(NTNDArray):
    """NTNDArray that also posts a Value already built (with uniqueId and the rest set)."""

    def wrap(self, value: Any, **kws: Any) -> Value:
        return value if isinstance(value, Value) else super().wrap(value, **kws)


class FrameServer:
    """One ``NTNDArray`` PV on its own p4p PVA server (as an areaDetector IOC serves it)."""

    def __init__(self, pvname: str, *, interface: str = "127.0.0.1", port: int = 0) -> None:
        self.pvname = pvname
        self.nt = _NDArrayType()
        self.pv = SharedPV(nt=self.nt, initial=np.zeros((1, 1), dtype="uint16"))
        self.server = Server(providers=[{pvname: self.pv}], useenv=False, conf={
            "EPICS_PVAS_INTF_ADDR_LIST": interface, "EPICS_PVAS_SERVER_PORT": str(port),
            "EPICS_PVAS_BROADCAST_PORT": "0", "EPICS_PVAS_AUTO_BEACON_ADDR_LIST": "NO"})
        conf = self.server.conf()
        host = "127.0.0.1" if interface in ("", "0.0.0.0") else interface
        #: where a client finds it: ``EPICS_PVA_NAME_SERVERS`` (TCP, no UDP search needed)
        self.address = f"{host}:{conf['EPICS_PVAS_SERVER_PORT']}"

    def value(self, frame: np.ndarray, unique_id: int, stamp: float,
              attributes: Mapping[str, Any]) -> Value:
        """The NTNDArray value of one frame, with the fields NDPluginPva fills in."""
        attrs = {"ColorMode": 0, **attributes}
        v = self.nt.wrap(frame, timestamp=stamp)
        v["uniqueId"] = unique_id
        v["codec.name"] = ""  # uncompressed: compressedSize == uncompressedSize
        seconds = int(stamp)
        v["dataTimeStamp.secondsPastEpoch"] = seconds
        v["dataTimeStamp.nanoseconds"] = int((stamp - seconds) * 1e9)
        v["attribute"] = [{"name": name, "value": value, "descriptor": name,
                           "sourceType": ATTR_SOURCE_DRIVER, "source": "Driver"}
                          for name, value in attrs.items()]
        return v

    def post(self, frame: np.ndarray, unique_id: int, attributes: Mapping[str, Any]) -> float:
        """Publish one frame; returns its time stamp."""
        stamp = time.time()
        self.pv.post(self.value(frame, unique_id, stamp, attributes))
        return stamp

    def close(self) -> None:
        self.server.stop()


class StreamingDetector(Device):
    """An ophyd detector whose frames go out as an ``NTNDArray`` PV (``frames_pv``) on its own
    PVA server; a reading holds the last frame's ``unique_id`` and the frames sent so far."""

    unique_id = Cpt(Signal, value=0, kind=Kind.hinted)
    frames_sent = Cpt(Signal, value=0, kind=Kind.normal)
    frames_pv = Cpt(Signal, value="", kind=Kind.config)
    frame_shape = Cpt(Signal, value=(0, 0), kind=Kind.config)
    frame_rate = Cpt(Signal, value=0.0, kind=Kind.config)
    frames_per_trigger = Cpt(Signal, value=1, kind=Kind.config)

    def __init__(self, pvname: str, *, shape: Sequence[int] = (512, 512), dtype: str = "uint16",
                 rate: float = 0.0, frames_per_trigger: int = 1, interface: str = "127.0.0.1",
                 port: int = 0, name: str = "stream_det", **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"frame shape must be two positive sizes, not {shape!r}")
        self.server = FrameServer(pvname, interface=interface, port=port)
        self.frames_pv.put(pvname)
        self.frame_shape.put(tuple(int(n) for n in shape))
        self.frame_rate.put(float(rate))
        self.frames_per_trigger.put(int(frames_per_trigger))
        self._variants = [spot_frame(shape, dtype, n) for n in range(VARIANTS)]
        self.attributes: dict[str, Any] = {}  # more NDAttributes to send with every frame

    @property
    def address(self) -> str:
        """``host:port`` of its PVA server (for ``EPICS_PVA_NAME_SERVERS``)."""
        return self.server.address

    def frame(self, unique_id: int) -> np.ndarray:
        """The pixels of frame ``unique_id`` (what a client must have received)."""
        return self._variants[unique_id % VARIANTS]

    def trigger(self) -> DeviceStatus:
        """Post the next ``frames_per_trigger`` frames at ``frame_rate``; done after the last."""
        status = DeviceStatus(self)
        threading.Thread(target=self._acquire, args=(status,), daemon=True,
                         name=f"{self.name}-frames").start()
        return status

    def _acquire(self, status: DeviceStatus) -> None:
        try:
            rate = float(self.frame_rate.get())
            period = 1.0 / rate if rate > 0 else 0.0
            start = time.monotonic()
            for n in range(int(self.frames_per_trigger.get())):
                if period:
                    time.sleep(max(0.0, start + n * period - time.monotonic()))
                uid = int(self.unique_id.get()) + 1
                self.server.post(self.frame(uid), uid, self.attributes)
                self.unique_id.put(uid)
                self.frames_sent.put(int(self.frames_sent.get()) + 1)
        except Exception as exc:  # the plan sees it through the status
            status.set_exception(exc)
        else:
            status.set_finished()

    def close(self) -> None:
        """Stop serving frames."""
        self.server.close()
