"""One side of tests/test_differential.py: asks one IOC, through the EPICS_* environment
it runs in, everything a CA client (libca via pyepics) and a PVA client (p4p) ask of the
given records, and prints the answers as one JSON object.

A process of its own per IOC: pyepics keeps one libca context per process, and a wrong
answer (ECA_INTERNAL) makes libca's default exception handler abort the process that asked.
Usage: ``python differential_probe.py '{"names": [...], "set": {name: text}}'``.
"""

from __future__ import annotations

import ctypes
import json
import math
import sys
import threading
import time
from typing import Any

# the record fields every client uses (screens, alarm tools, archiver), + NORD NELM of arrays,
# and the long-string forms of VAL
FIELDS = ("VAL", "DESC", "SEVR", "STAT", "RTYP", "EGU", "PREC", "HOPR", "LOPR", "NAME",
          "NORD", "NELM", "VAL$", "$")
# every DBR type pyepics unpacks: plain 0..6, DBR_TIME_* 14..20, DBR_CTRL_* 28..34
FTYPES = (*range(7), *range(14, 21), *range(28, 35))
CONNECT_TIMEOUT = 120.0
ABSENT_TIMEOUT = 10.0  # a field name no record has: how long after the last connected


def plain(value: Any) -> Any:
    """A JSON-able copy of a value pyepics or p4p returned."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, ctypes.Array):
        value = list(value)
    if isinstance(value, bytes):
        return value.decode("latin-1")
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def shape(value: Any) -> list[Any]:
    """Type name and length of a returned value (the part of it that is not a value)."""
    length = len(value) if hasattr(value, "__len__") and not isinstance(value, str) else None
    dtype = str(getattr(value, "dtype", type(value).__name__))
    return [dtype, length]


def connect(ca: Any, names: list[str]) -> dict[str, Any]:
    """Channel ids of every name that connects; a name no record has stays out (once no
    other has connected for ABSENT_TIMEOUT)."""
    chids = {name: ca.create_channel(name, connect=False, auto_cb=False) for name in names}
    deadline, last, connected = time.monotonic() + CONNECT_TIMEOUT, time.monotonic(), 0
    while time.monotonic() < deadline and time.monotonic() - last < ABSENT_TIMEOUT:
        ca.poll(0.01)
        now = sum(1 for c in chids.values() if ca.isConnected(c))
        if now == len(names):
            break
        if now > connected:
            connected, last = now, time.monotonic()
    return {n: c for n, c in chids.items() if ca.isConnected(c)}


def ca_get(ca: Any, chid: Any, **kw: Any) -> dict[str, Any]:
    """One get: the answer (value and metadata), or how it failed."""
    try:
        got = ca.get_with_metadata(chid, timeout=5, **kw)
    except ca.ChannelAccessGetFailure as exc:
        return {"error": f"status {exc.status}"}
    if got is None:
        return {"error": "timeout"}
    value = got.pop("value")
    return {"shape": shape(value), "value": plain(value),
            "meta": {k: plain(v) for k, v in got.items()}}


def probe_ca(names: list[str], texts: dict[str, str]) -> dict[str, Any]:
    """Every DBR type and form, counts, as_string, record fields, camonitor-style updates."""
    from epics import ca

    ca.initialize_libca()
    ca.libca.ca_add_exception_event(None, None)  # libca's handler, as caget has (aborts)
    chans = connect(ca, names)
    for name, text in texts.items():  # the same values as the other IOC, where it matters
        ca.put(chans[name], text, wait=True, timeout=5)
    out: dict[str, Any] = {}
    for name, chid in chans.items():
        count = ca.element_count(chid)
        answers: dict[str, Any] = {
            "ftype": ca.field_type(chid), "count": count,
            "access": [ca.read_access(chid), ca.write_access(chid)],
            "as_string": ca_get(ca, chid, as_string=True),
        }
        for ftype in FTYPES:
            answers[f"ftype {ftype}"] = ca_get(ca, chid, ftype=ftype)
        for n in sorted({0, 1, count}):
            answers[f"count {n}"] = ca_get(ca, chid, count=n)
        out[name] = answers
    fields = connect(ca, [f"{n}.{f}" for n in names for f in FIELDS])
    for name, chid in fields.items():
        out[f"field {name}"] = {"ftype": ca.field_type(chid), "count": ca.element_count(chid),
                     "access": [ca.read_access(chid), ca.write_access(chid)],
                     "ctrl": ca_get(ca, chid, ftype=ca.promote_type(chid, use_ctrl=True)),
                     "as_string": ca_get(ca, chid, as_string=True)}
    out.update(monitors(ca, chans))
    return out


def monitors(ca: Any, chans: dict[str, Any]) -> dict[str, Any]:
    """The first update of a native, a time and a ctrl subscription of each channel."""
    first: dict[str, Any] = {}
    lock = threading.Lock()
    keep = []

    def callback(key: str) -> Any:
        def on_update(value: Any = None, **kw: Any) -> None:
            with lock:
                meta = {k: plain(v) for k, v in kw.items() if k not in ("chid", "pvname")}
                first.setdefault(key, {"shape": shape(value), "value": plain(value), "meta": meta})
        return on_update

    for name, chid in chans.items():
        for form, kw in (("native", {}), ("time", {"use_time": True}), ("ctrl", {"use_ctrl": True})):
            keep.append(ca.create_subscription(chid, callback=callback(f"monitor {form} {name}"), **kw))
    deadline = time.monotonic() + 10
    while len(first) < 3 * len(chans) and time.monotonic() < deadline:
        ca.poll(0.05)
    for _callback, _arg, evid in keep:  # before the callbacks are freed (else libca crashes)
        ca.clear_subscription(evid)
    ca.poll(0.1)
    return first


def probe_pva(names: list[str]) -> dict[str, Any]:
    """The full structure (``field()``) of a get and of a monitor's first update."""
    from p4p.client.thread import Context

    ctx = Context("pva", nt=False)
    out: dict[str, Any] = {}
    for name, value in zip(names, ctx.get(names, request=["field()"] * len(names), throw=False), strict=True):
        out[name] = pva_answer(value)
    updates: dict[str, Any] = {}
    done = threading.Event()

    def callback(name: str) -> Any:
        def on_update(value: Any) -> None:
            updates.setdefault(name, pva_answer(value))
            if len(updates) == len(names):
                done.set()
        return on_update

    subs = [ctx.monitor(name, callback(name), request="field()") for name in names]
    done.wait(60)
    # a monitor that got nothing is made once more (once in CI, under load, one of some 200
    # monitors of the real IOC got no first update in 60 s): an absent answer is then two
    # subscriptions' worth of silence, on either server alike
    subs += [ctx.monitor(name, callback(name), request="field()")
             for name in names if name not in updates]
    done.wait(30)
    for sub in subs:
        sub.close()
    ctx.close()
    out.update({f"monitor {name}": answer for name, answer in updates.items()})
    return out


def pva_answer(value: Any) -> dict[str, Any]:
    """A PVA value as its type (the whole structure) and its fields by dotted name."""
    if isinstance(value, Exception):
        return {"error": type(value).__name__}
    flat: dict[str, Any] = {}

    def walk(prefix: str, item: Any) -> None:
        if isinstance(item, dict):
            for key, sub in item.items():
                walk(f"{prefix}{key}.", sub)
        else:
            flat[prefix.rstrip(".")] = plain(item)

    walk("", value.todict())
    return {"type": plain(value.type().aspy()), "fields": flat}


#: camonitor -m v, a, p and the default va
MASKS = {"value": 1, "alarm": 4, "property": 8, "value|alarm": 5}


def masked_updates(name: str, values: list[str]) -> dict[str, int]:
    """How many updates a monitor of each mask gets while ``values`` are written in turn
    (the alarm unchanged): the first update, and then only what its mask asks for."""
    from epics import ca

    chid = connect(ca, [name])[name]
    counts = dict.fromkeys(MASKS, 0)
    lock = threading.Lock()

    def callback(key: str) -> Any:
        def on_update(**_kw: Any) -> None:
            with lock:
                counts[key] += 1
        return on_update

    keep = [ca.create_subscription(chid, mask=mask, callback=callback(key))
            for key, mask in MASKS.items()]
    deadline = time.monotonic() + 10
    while not all(counts.values()) and time.monotonic() < deadline:
        ca.poll(0.05)
    for value in values:
        ca.put(chid, value, wait=True, timeout=5)
    deadline = time.monotonic() + 2  # then what follows the last write
    while time.monotonic() < deadline:
        ca.poll(0.05)
    for _callback, _arg, evid in keep:
        ca.clear_subscription(evid)
    ca.poll(0.1)
    return counts


def main() -> None:
    args = json.loads(sys.argv[1])
    out = {"ca": probe_ca(args["ca"], args.get("set", {})), "pva": probe_pva(args["pva"])}
    if "masks" in args:
        out["masks"] = masked_updates(*args["masks"])
    print(json.dumps(out))


if __name__ == "__main__":
    main()
