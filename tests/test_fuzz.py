"""Fuzzing: values of every type, length and encoding written to every writable PV over
Channel Access (pyepics) and PV Access (p4p), and malformed requests to every route of the
embedded DM service (raw httpx).

Every write is judged by the README's input rules, written out here apart from the IOC's
code: a valid value is stored as written (and reads the same over both protocols), an
invalid one is refused and the PV keeps its value, and a refusal by the IOC leaves a
Message_RBV with a MINOR/STATE alarm. The IOC must never die, and the embedded DM service's
access log (one ``dm=<status code>`` line per request) must show no InvalidArgument answer
and nothing started. ``-rP`` shows the ``FUZZ`` summary lines (values fuzzed per protocol).
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import posixpath
import re
import shutil
import socket
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import epics
import httpx
import numpy
import pytest
from caproto import ChannelType
from caproto.sync.client import ErrorResponseReceived
from caproto.sync.client import write as ca_write
from conftest import DmServer, Ioc, make_ioc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from p4p.client.thread import RemoteError
from test_ioc import wait_until

from apsdm.dm import routes, wire
from apsdm.dm.records import RESERVED_JOB_KEYS
from apsdm.gateway.schema import PV, STREAM_STATES, Kind, Layout, build

#: hypothesis examples per test on top of the fixed edge cases (APSDM_FUZZ_EXAMPLES to change)
EXAMPLES = int(os.environ.get("APSDM_FUZZ_EXAMPLES", "150"))
MINOR, STATE = 1, 7
USERNAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._@-]*")


# --- the rules (README "Behaviour": inputs are checked before any DM call) ------------------


@dataclass(frozen=True)
class Verdict:
    """What must happen to a write: ``store`` (as ``value``), ``refuse``, or ``either`` when
    the client library converts the value on its own first (1.5 -> "1.5", a cut at NUL)."""

    outcome: str
    value: Any = None


REFUSE, EITHER = Verdict("refuse"), Verdict("either")


def store(value: Any) -> Verdict:
    return Verdict("store", value)


def text_rule(pv: PV, text: str) -> Verdict:
    """A text as it reaches the IOC: length in bytes, then the setting's own rule."""
    if len(text.encode()) >= pv.field.max_length:  # one byte stays for the terminator
        return REFUSE
    suffix = pv.suffix
    if pv.group == "Experiment":  # looked up in DM, which holds no experiment in these tests
        return REFUSE if text.strip() else store("")
    if not text:
        return store("")
    if suffix in ("DataDirectory", "Path"):
        ok = text.startswith("/") and ".." not in text.split("/")
        return store(posixpath.normpath(text)) if ok else REFUSE
    if suffix == "DestDirectory":
        ok = not text.startswith("/") and ".." not in text.split("/")
        return store(posixpath.normpath(text)) if ok else REFUSE
    if suffix in ("Args", "Json", "Options"):
        if not text.strip():
            return store(text)
        try:
            doc = json.loads(text)
        except (ValueError, RecursionError):
            return REFUSE
        if not isinstance(doc, dict):
            return REFUSE
        if suffix == "Options":  # DM's own options by name and type: only the shape is judged
            return store(text) if doc == {} else EITHER
        return store(text) if suffix == "Json" or all(map(job_arg, doc.items())) else REFUSE
    if suffix in ("Owner", "WorkflowOwner"):
        return store(text) if USERNAME.fullmatch(text) else REFUSE
    if suffix == "WorkflowArgs":
        return store(text) if all(map(per_file_arg, text.split())) else REFUSE
    return store(text)  # WFn:Name, IncludeExtensions, SkipPattern, Workflow: any text


#: job fields DM fills in for each file of a DAQ/upload's per-file workflow
PER_FILE_KEYS = frozenset({"filePath", "experimentFilePath", "experimentName", "dataDirectory"})


def per_file_arg(item: str) -> bool:
    """One ``key:value`` of a slot's WorkflowArgs: a variable name DM does not set itself."""
    key, sep, _ = item.partition(":")
    return bool(sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key)
                and key not in RESERVED_JOB_KEYS | PER_FILE_KEYS)


def job_arg(item: tuple[str, Any]) -> bool:
    """A WFn:Args entry DM takes: a variable name, a string or number (filePathList: or a
    list of strings), nothing DM reserves for the job's own fields."""
    key, value = item
    if key == "filePathList" and isinstance(value, list):
        values_ok = all(isinstance(v, str) and "\x00" not in v for v in value)
    else:
        values_ok = type(value) in (int, float, bool) or (isinstance(value, str)
                                                          and "\x00" not in value)
    name_ok = re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) and key not in RESERVED_JOB_KEYS
    return bool(name_ok) and values_ok


def enum_rule(pv: PV, value: Any) -> Verdict:
    """An enum or busy command: a choice index or name; every action is refused here."""
    choices = pv.field.enums
    if isinstance(value, str):
        if value not in choices:
            return EITHER  # clients parse "1" or "0x1" themselves
        index = choices.index(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            return REFUSE
        if value != int(value):
            return EITHER  # clients truncate
        index = int(value)
    elif isinstance(value, int):
        index = value
    else:
        return EITHER
    if not -(2**15) <= index < 2**15:
        return EITHER  # clients wrap wider integers to their wire type
    if not 0 <= index < len(choices):
        return REFUSE
    if pv.field.kind is Kind.BUSY:  # 0 does nothing; 1 starts an action, which is refused
        return store(0) if index == 0 else REFUSE
    return store(index)


STREAM_FIELDS = ("state", "message", "counter", "timestamp")


def stream_rule(value: Any) -> Verdict:
    """A streaming handshake structure: known state, message <= 4000, finite timestamp."""
    if not isinstance(value, dict) or set(value) != set(STREAM_FIELDS):
        return EITHER
    state, message, counter, stamp = (value[k] for k in STREAM_FIELDS)
    if not (isinstance(state, str) and isinstance(message, str) and type(counter) is int
            and type(stamp) is float) or "\x00" in state + message:
        return EITHER
    if not -(2**63) <= counter < 2**63:
        return EITHER
    if state not in STREAM_STATES or len(message) > 4000 or not math.isfinite(stamp):
        return REFUSE
    return store(value)


def verdict(pv: PV, value: Any, proto: str) -> Verdict:
    """The rule for writing ``value`` (as the client has it) to ``pv`` through ``proto``."""
    kind = pv.field.kind
    if kind is Kind.STREAM:
        return stream_rule(value)
    if kind in (Kind.ENUM, Kind.BUSY):
        return enum_rule(pv, value)
    if isinstance(value, bytes) and b"\x00" not in value:  # clients cut text at a NUL
        try:
            value = value.decode()
        except UnicodeDecodeError:
            return REFUSE
    if not isinstance(value, str) or "\x00" in value:
        return EITHER
    if proto == "ca" and pv.field.kind is Kind.LONGSTRING and not value.isascii():
        return EITHER  # pyepics sends each non-ASCII character of a char waveform as 0xFD
    return text_rule(pv, value)


def valid_stored(pv: PV, stored: Any) -> bool:
    """Whether a value the IOC holds is one the rules allow."""
    kind = pv.field.kind
    if kind is Kind.STREAM:
        return stream_rule({**stored, "timestamp": float(stored["timestamp"])}).outcome == "store"
    if kind in (Kind.ENUM, Kind.BUSY):
        return enum_rule(pv, stored) == store(stored)
    return isinstance(stored, str) and "\x00" not in stored and text_rule(pv, stored) == store(stored)


def same(pv: PV, stored: Any, expected: Any) -> bool:
    """Stored equals expected; a stream timestamp of 0 means "now" (set by the IOC)."""
    if pv.field.kind is Kind.STREAM:
        keys = STREAM_FIELDS if expected["timestamp"] else STREAM_FIELDS[:3]
        return all(stored[k] == expected[k] for k in keys)
    return bool(stored == expected)


# --- the values -----------------------------------------------------------------------------

LONG_TEXTS = [4094, 4095, 4096, 10_000]
EDGE_VALUES: list[Any] = [
    "", " ", "a" * 39, "a" * 40, "a" * 41, "é" * 19, "é" * 20, *("x" * n for n in LONG_TEXTS),
    '{"k": "' + "x" * 4086 + '"}',  # a JSON object of 4095 bytes
    b"\xff\xfe\xfd", b"ok\x80", "nul\x00inside", "trailing\x00",
    float("nan"), float("inf"), float("-inf"), -1, 0, 1, 2, 7, 1.5, -(2**31) - 1, 2**31, 2**63,
    [1, 2, 3], [], "{", "{not json", "[1, 2]", "null", '{"a": ', "[" * 1200,
    "/abs/path", "rel/path", "../up", "/a/../b", "a/./b/", "~root", "x; rm -rf /", "$(id)",
    "Start", "Directory", "bogus", "0x1", "\n\t\r",
]
OTHER_SLOT_EDGES: list[Any] = [
    "", "a" * 40, "x" * 4096, b"\xff\xfe\xfd", float("nan"), -1, 1, 2, "../up", "[" * 1200]
STREAM_EDGES: list[Any] = [
    {"state": s, "message": m, "counter": c, "timestamp": t}
    for s, m, c, t in [
        ("ready", "", 1, 0.0), ("bogus", "x", 2, 1.0), ("", "", 0, 0.0), ("done", "m" * 4000, 3, 5.0),
        ("done", "m" * 4001, 4, 5.0), ("error", "x", -(2**63), float("nan")),
        ("idle", "x", 2**63 - 1, float("inf")), ("acquiring", "é" * 100, 5, -1.0),
    ]
] + [{"state": "ready"}, {"message": b"\xff\xfe"}, {"counter": 2**64}, {"nope": 1}, "ready", 3]

texts = st.one_of(
    st.text(max_size=60),
    st.integers(0, 60).map(lambda n: "a" * n),
    st.sampled_from(LONG_TEXTS).map(lambda n: "y" * n),
    st.lists(st.sampled_from(["", ".", "..", "a", "b c", "~", "$HOME", "é", "*", "x;y"]),
             max_size=5).flatmap(
        lambda parts: st.sampled_from(["/", ""]).map(lambda lead: lead + "/".join(parts))),
    st.recursive(st.none() | st.booleans() | st.floats() | st.text(max_size=8),
                 lambda inner: st.lists(inner, max_size=3)
                 | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                 max_leaves=8).map(json.dumps).flatmap(
        lambda doc: st.integers(0, 3).map(lambda cut: doc[:len(doc) - cut])),
)
values = st.one_of(
    texts, st.binary(max_size=40), st.integers(-(2**70), 2**70), st.floats(),
    st.sampled_from(["Done", "Start", "Stop", "Upload", "File", "Directory", "No", "Yes"]),
    st.lists(st.integers(-3, 3) | st.text(max_size=3), max_size=4),
)
stream_values = st.fixed_dictionaries({
    "state": st.sampled_from(STREAM_STATES) | st.text(max_size=12),
    "message": st.text(max_size=30) | st.sampled_from([3999, 4000, 4001]).map(lambda n: "m" * n),
    "counter": st.integers(-(2**63), 2**63 - 1),
    "timestamp": st.floats(),
})


# --- writing and judging through one protocol ---------------------------------------------

#: two valid values per setting; one is written before each fuzzed value (clears Message_RBV)
BASELINES: dict[str, tuple[Any, Any]] = {
    "DataDirectory": ("/fuzz/base-a", "/fuzz/base-b"), "Path": ("/fuzz/base-a", "/fuzz/base-b"),
    "DestDirectory": ("base/a", "base/b"), "Name": ("base-a", "base-b"),
    "Owner": ("base-a", "base-b"), "Args": ('{"base": "a"}', '{"base": "b"}'),
    "Json": ('{"base": "a"}', '{"base": "b"}'), "Mode": (0, 1), "WaitForOthers": (0, 1),
    "Stream": ({"state": "idle", "message": "base-a", "counter": 1, "timestamp": 1.0},
               {"state": "idle", "message": "base-b", "counter": 2, "timestamp": 2.0}),
    "IncludeExtensions": ("h5", "tif,tiff"), "SkipPattern": ("*.tmp", "scratch/*"),
    "Workflow": ("base-a", "base-b"), "WorkflowOwner": ("base-a", "base-b"),
    "WorkflowArgs": ("base:a", "base:b"), "RemoveSource": (0, 1),
    "Options": ("{}", '{"skipChecksum": false}'),
}
#: the setting whose baseline write clears a command's Message_RBV
CLEARED_BY = {"DAQ": "DataDirectory", "UP": "Path", "WF": "Name", "Metadata": "Json"}
#: the only DM routes the fuzzed IOC may call: its polls, experiment look-ups, job starts
ALLOWED_ROUTES = frozenset({"listDaqs", "listUploads", "listProcessingJobs",
                            "getExperimentsByStation", "listWorkflows", "getExperimentByName",
                            "startProcessingJob"})


class Fuzzer:
    """Writes values to every writable PV of one IOC through one protocol and judges them."""

    def __init__(self, ioc: Ioc, proto: str) -> None:
        self.ioc, self.proto = ioc, proto
        # not yet the handshake's scalar mirrors and results (Stream:*:State ...): their rules
        # (e.g. a State of -1 over CA was taken) are still to be written; nor the ESAF/proposal
        # ids and Beamtime:Experiment, which ask the APS DB or create an experiment in DM
        # (tests/test_beamtime.py checks their refusals)
        self.pvs = [pv for pv in build(Layout(prefix=ioc.prefix))
                    if pv.field.writable and (proto == "pva" or not pv.field.pva_only)
                    and not (pv.group == "Stream" and pv.field.kind is not Kind.STREAM)
                    and pv.group not in ("Esaf", "Proposal", "Beamtime")]
        self.by_name = {pv.name: pv for pv in self.pvs}
        self.status = ioc.pv("Status:Message_RBV")
        self.ctx = ioc.pva_context()  # writes, with p4p's conversions
        self.raw = ioc.pva_context(nt=False)  # reads: plain structures
        self.status_seen: list[str] = []  # the poller resets Status:Message_RBV: watch it
        self.sub = self.raw.monitor(self.status, lambda v: self.status_seen.append(v["value"]))
        self.flip: Counter[str] = Counter()
        self.counts: Counter[str] = Counter()
        self.log_start = len(ioc.log())
        self.heartbeat = self.raw.get(ioc.pv("Status:Heartbeat_RBV"))["value"]

    def close(self) -> None:
        self.sub.close()
        self.raw.close()
        self.ctx.close()

    # protocol access
    def put(self, pv: PV, value: Any) -> tuple[str, str]:
        """Write through the protocol under test: ("ok" | "server" | "client", why)."""
        if self.proto == "ca":
            try:
                result = epics.caput(pv.name, value, wait=True, timeout=30)
            except Exception as exc:  # pyepics refused to convert or send it
                return "client", repr(exc)
            assert result == 1, f"caput {pv.name} <- {value!r:.60} did not complete"
            return "ok", ""
        if pv.field.kind in (Kind.STRING, Kind.LONGSTRING) and isinstance(value, str | bytes):
            value = {"value": value}  # p4p would take text starting with '{' for a structure
        try:
            self.ctx.put(pv.name, value, timeout=30)
        except RemoteError as exc:
            return "server", str(exc)
        except TimeoutError:
            raise
        except Exception as exc:  # p4p refused to convert it to the PV's type
            return "client", repr(exc)
        return "ok", ""

    def read(self, pv: PV) -> Any:
        """The PV's value over PVA (exact text, enum index, stream fields)."""
        v = self.raw.get(pv.name, timeout=5)
        if pv.field.kind is Kind.STREAM:
            return {k: v[k] for k in STREAM_FIELDS}
        if pv.field.kind in (Kind.ENUM, Kind.BUSY):
            return int(v["value.index"])
        return v["value"]

    def read_ca(self, pv: PV) -> Any:
        """The PV's value over CA: enum index, or text (pyepics strips trailing blanks)."""
        if pv.field.kind in (Kind.ENUM, Kind.BUSY):
            return epics.caget(pv.name, use_monitor=False, timeout=5)
        if pv.field.kind is Kind.STRING:
            return epics.caget(pv.name, as_string=True, use_monitor=False, timeout=5)
        # a char waveform as bytes (pyepics' as_string reads them as latin-1), all of it
        # (without count pyepics asks for as many characters as its last monitor had)
        chars = epics.caget(pv.name, count=pv.field.max_length, use_monitor=False, timeout=5)
        return bytes(numpy.asarray(chars, dtype=numpy.uint8)).split(b"\0")[0].decode().rstrip()

    def message_pv(self, pv: PV) -> str:
        """The Message_RBV that explains a write of ``pv`` (Status:Message_RBV if none)."""
        name = pv.name.rsplit(":", 1)[0] + ":Message_RBV"
        return self.status if pv.group in ("Stream", "Status") else name

    def message(self, name: str) -> tuple[str, int]:
        v = self.raw.get(name, timeout=5)
        return v["value"], int(v["alarm.severity"])

    # one write
    def baseline(self, pv: PV) -> Any:
        """Write the next of the setting's two valid values (through PVA); return it."""
        if pv.group == "Experiment":
            value: Any = ""
        else:
            self.flip[pv.name] += 1
            key = "Stream" if pv.field.kind is Kind.STREAM else pv.suffix
            value = BASELINES[key][self.flip[pv.name] % 2]
        how, why = self.put_pva(pv, value)
        assert how == "ok", f"baseline {pv.name} <- {value!r} refused: {why}"
        return value

    def put_pva(self, pv: PV, value: Any) -> tuple[str, str]:
        proto, self.proto = self.proto, "pva"
        try:
            return self.put(pv, value)
        finally:
            self.proto = proto

    def prepare(self, pv: PV) -> Any:
        """Make the PV's value and its Message_RBV known before a fuzzed write."""
        if pv.field.kind is Kind.BUSY:
            sibling = pv.name.rsplit(":", 1)[0] + ":" + CLEARED_BY[pv.group]
            self.baseline(self.by_name[sibling])
            return 0
        base = self.baseline(pv)
        if pv.field.kind is Kind.STREAM:
            wait_until(lambda: self.message(self.status)[0] == "OK", 5, "Status:Message_RBV OK")
        return base

    def check(self, pv: PV, value: Any) -> None:
        """Write one value and assert the rules; counts the outcome."""
        base = self.prepare(pv)
        seen = len(self.status_seen)
        how, why = self.put(pv, value)
        where = f"{self.proto} {pv.name} <- {value!r:.80} ({how} {why:.160})"
        assert self.ioc.proc is not None and self.ioc.proc.poll() is None, f"IOC died: {where}"
        stored = self.read(pv)
        msg_pv = self.message_pv(pv)
        text, severity = self.message(msg_pv)
        if msg_pv == self.status:  # refusals show there until the next poll: watch events
            refused = how == "server" and bool(wait_until(
                lambda: why in self.status_seen[seen:], 2, f"{why} on Status:Message_RBV"))
        else:
            refused = bool(text) and severity == MINOR
        if how == "server":
            assert refused, f"refused without a Message_RBV: {where}"
        if refused and msg_pv != self.status:
            meta = epics.get_pv(msg_pv).get_with_metadata(
                use_monitor=False, as_string=True, timeout=5)
            assert meta and (meta["severity"], meta["status"]) == (MINOR, STATE), where
        if refused or how == "client":
            assert same(pv, stored, base), f"refused, yet {stored!r:.80} stored: {where}"
        else:
            assert valid_stored(pv, stored), f"invalid value {stored!r:.80} stored: {where}"
        expect = verdict(pv, value, self.proto)
        if expect.outcome == "store":
            assert how == "ok" and not refused and same(pv, stored, expect.value), (
                f"valid value not stored as {expect.value!r:.80} (got {stored!r:.80}): {where}")
        elif expect.outcome == "refuse":
            assert how == "client" or refused, f"invalid value not refused: {where}"
        if not pv.field.pva_only:  # both protocols show the same value (pyepics strips text)
            shown = stored.rstrip() if isinstance(stored, str) else stored
            assert self.read_ca(pv) == shown, f"CA reads {self.read_ca(pv)!r:.80}: {where}"
        self.counts["refused by the IOC" if refused else
                    "refused by the client library" if how == "client" else "stored"] += 1

    # the whole run
    def sweep(self) -> None:
        """Every edge value to every writable PV of slot 1 and outside slots, a few to the
        other slots (the same code serves them)."""
        for pv in self.pvs:
            if pv.field.kind is Kind.STREAM:
                edges = STREAM_EDGES
            else:
                edges = EDGE_VALUES if pv.slot <= 1 else OTHER_SLOT_EDGES
            for value in edges:
                self.check(pv, value)

    def assert_healthy(self, allowed: frozenset[str] = ALLOWED_ROUTES) -> None:
        """The IOC still counts its heartbeat, its saved state matches its PVs, and DM's
        own record shows no InvalidArgument answer and no call but the ``allowed`` ones."""
        wait_until(lambda: self.raw.get(self.ioc.pv("Status:Heartbeat_RBV"))["value"]
                   > self.heartbeat, 5, "heartbeat")

        def unsaved() -> list[str]:
            saved = json.loads((self.ioc.data_root / "ioc-state.json").read_text())["settings"]
            return [key for pv in self.pvs if pv.field.autosave
                    and (key := pv.name[len(self.ioc.prefix):]) in saved
                    and saved[key] != self.read(pv)]
        try:  # settings are saved soon after they change (persist.SAVE_DELAY)
            wait_until(lambda: not unsaved(), 5)
        except AssertionError:
            raise AssertionError(f"saved settings differ from their PVs: {unsaved()}") from None
        codes: Counter[str] = Counter()
        for method, target, code in re.findall(
                r'apsdm\.dmserver\.access: \S+ "(\S+) (\S+) HTTP/[\d.]+" \d+ \S+ dm=(\S+)',
                self.ioc.log()[self.log_start:]):
            path, _, query = target.partition("?")
            if path == routes.LOGIN_PATH:
                continue
            found = routes.match(method, path, query)
            name = found[0].name if found else f"{method} {path}"
            assert name in allowed, f"the fuzzed IOC called DM: {name} ({code})"
            assert code in ("0", "14"), f"DM answered {name} with status code {code}"
            codes[f"{name}={code}"] += 1
        assert "Traceback" not in self.ioc.log()[self.log_start:]
        self.dm_calls = codes

    def summary(self) -> str:
        total = sum(self.counts.values())
        parts = ", ".join(f"{n} {what}" for what, n in sorted(self.counts.items()))
        starts = {k: n for k, n in self.dm_calls.items() if not k.startswith("list")
                  and not k.startswith("getExperimentsBy")}
        return (f"FUZZ {self.proto.upper()}: {total} values to {len(self.pvs)} writable PVs "
                f"({parts}); DM calls besides polls: {starts or 'none'}; "
                "InvalidArgument answers: 0")


def run_fuzz(ioc: Ioc, proto: str) -> None:
    """The edge-value sweep, then hypothesis examples, against one IOC."""
    fuzzer = Fuzzer(ioc, proto)
    try:
        fuzzer.sweep()
        cases = st.sampled_from(fuzzer.pvs).flatmap(lambda pv: st.tuples(
            st.just(pv), stream_values if pv.field.kind is Kind.STREAM else values))

        @settings(max_examples=EXAMPLES, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture,
                                         HealthCheck.too_slow])
        @given(case=cases)
        def random_writes(case: tuple[PV, Any]) -> None:
            fuzzer.check(*case)

        random_writes()
        fuzzer.assert_healthy()
        print(fuzzer.summary())
    finally:
        fuzzer.close()


@pytest.fixture
def fuzz_ioc(tmp_path: Path) -> Iterator[Ioc]:
    """The IOC with its data root on tmpfs where there is one: it saves (fsync) each of the
    thousands of settings written; its log is copied to ``tmp_path`` at the end."""
    shm = Path("/dev/shm")
    root = Path(tempfile.mkdtemp(prefix="apsdm-fuzz-", dir=shm if os.access(shm, os.W_OK)
                                 else tmp_path))
    ioc = make_ioc(root)
    try:
        yield ioc
    finally:
        ioc.stop()
        shutil.copy(ioc.data_root / "ioc.log", tmp_path / "ioc.log")
        shutil.rmtree(root, ignore_errors=True)


def test_fuzz_every_writable_pv_over_ca(fuzz_ioc: Ioc) -> None:
    run_fuzz(fuzz_ioc, "ca")


def test_fuzz_every_writable_pv_over_pva(fuzz_ioc: Ioc) -> None:
    run_fuzz(fuzz_ioc, "pva")


#: hypothesis examples of settings that are then used by a real DM call
DM_EXAMPLES = max(EXAMPLES // 3, 10)
job_arg_values = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=12),
    st.lists(st.text(max_size=5), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(),
                                                                max_size=1))
job_args = st.dictionaries(
    st.sampled_from(["x", "filePath", "filePathList", "_a1", "id", "status", "workflow", "1a",
                     "a-b", "a b", "é", ""]) | st.text(max_size=6),
    job_arg_values, max_size=4).map(json.dumps)
destinations = texts.filter(lambda t: len(t) < 200) | st.sampled_from(
    ["d" * 255, ".", "./a", "a/./b/", "~", "$HOME", "*", " ", "é/ü", "a\tb"])


def test_settings_the_ioc_accepts_are_accepted_by_dm(fuzz_ioc: Ioc, tmp_path: Path) -> None:
    """Random job arguments and upload destinations: each one the IOC takes is then used
    in a real DM call (a job, an upload) that DM carries out; none gets InvalidArgument."""
    ioc = fuzz_ioc
    source = tmp_path / "src.dat"
    source.write_bytes(b"fuzz")

    async def setup() -> None:
        async with ioc.dm_client() as dm:
            await dm.add_experiment("fz")
            await dm.add_workflow({"name": "fzwf", "stages": {"01": {"command": "true"}}})
    asyncio.run(setup())
    # aiohttp logs a request after its answer is sent: wait for the line, so that the
    # fuzzer's look at DM's record starts after this setup and judges only what it caused
    wait_until(lambda: "/dm/workflows/addWorkflow" in ioc.log(), 10, "setup's access log")
    fuzzer = Fuzzer(ioc, "pva")
    counts: Counter[str] = Counter()
    try:
        for suffix, value in (("Experiment:Name", "fz"), ("WF1:Name", "fzwf"),
                              ("UP1:Path", str(source)), ("UP1:Mode", 0)):
            fuzzer.ctx.put(ioc.pv(suffix), value, timeout=10)

        def use(setting: str, value: str, start: str) -> None:
            """Write a setting through PVA; if taken, start the command that uses it."""
            try:
                fuzzer.ctx.put(ioc.pv(setting), {"value": value}, timeout=10)
            except RemoteError:
                counts[f"{setting} refused"] += 1
                return
            fuzzer.ctx.put(ioc.pv(start), 1, timeout=60)  # RemoteError if DM refused it
            counts[f"{setting} used"] += 1

        @settings(max_examples=DM_EXAMPLES, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture,
                                         HealthCheck.too_slow])
        @given(args=job_args, dest=destinations)
        def accepted_means_usable(args: str, dest: str) -> None:
            use("WF1:Args", args, "WF1:Start")
            counts["dest"] += 1  # a fresh subdirectory: no earlier copy stands in the way
            use("UP1:DestDirectory", f"{dest}/u{counts['dest']}" if dest else "", "UP1:Start")

        accepted_means_usable()
        fuzzer.assert_healthy(ALLOWED_ROUTES | {"upload"})
        assert counts["WF1:Args used"] and counts["UP1:DestDirectory used"], counts
    finally:
        fuzzer.close()
    print(f"FUZZ settings used in DM calls: {dict(counts)}; InvalidArgument answers: 0")


#: CA writes pyepics would not send: (suffix, data, wire type, value stored or None: refused)
WIRE_CASES: list[tuple[str, Any, ChannelType, Any]] = [
    ("WF1:Name", b"a" * 40, ChannelType.STRING, None),  # 40 bytes: no room for the terminator
    ("WF1:Name", b"\xff" * 10, ChannelType.STRING, None),
    ("WF1:Name", b"\xc3\xa9t\xc3\xa9", ChannelType.STRING, "été"),
    ("WF1:Name", [1e300], ChannelType.DOUBLE, "1e+300"),
    ("WF1:Owner", b"a/b", ChannelType.STRING, None),
    ("WF1:Args", [0x41] * 4096, ChannelType.CHAR, None),
    ("WF1:Args", [0xFF] * 10, ChannelType.CHAR, None),
    ("WF1:Args", [1.5], ChannelType.DOUBLE, None),
    ("UP1:Mode", [float("nan")], ChannelType.DOUBLE, None),
    ("UP1:Mode", [float("inf")], ChannelType.FLOAT, None),
    ("UP1:Mode", [1.5], ChannelType.DOUBLE, None),
    ("UP1:Mode", [1.0], ChannelType.DOUBLE, 1),
    ("UP1:Mode", [-1], ChannelType.LONG, None),
    ("UP1:Mode", [70000], ChannelType.LONG, None),
    ("UP1:Mode", b"bogus", ChannelType.STRING, None),
    ("UP1:Mode", b"Directory", ChannelType.STRING, 1),
    ("DAQ1:Start", [5], ChannelType.LONG, None),
    ("DAQ1:Start", [float("nan")], ChannelType.DOUBLE, None),
    ("DAQ1:Start", [2.0], ChannelType.DOUBLE, None),
]


def test_raw_ca_wire_values_are_refused_with_messages(fuzz_ioc: Ioc) -> None:
    """Wire types and lengths that only a raw CA client sends (caproto's sync client)."""
    fuzzer = Fuzzer(fuzz_ioc, "ca")
    try:
        for suffix, data, data_type, expected in WIRE_CASES:
            pv = fuzzer.by_name[fuzz_ioc.pv(suffix)]
            base = fuzzer.prepare(pv)
            where = f"{suffix} <- {data!r:.40} as {data_type.name}"
            try:
                ca_write(pv.name, data, data_type=data_type, notify=True, timeout=10,
                         repeater=False)
                refused_on_wire = False
            except ErrorResponseReceived:
                refused_on_wire = True
            text, severity = fuzzer.message(fuzzer.message_pv(pv))
            stored = fuzzer.read(pv)
            if expected is None:
                assert refused_on_wire and text and severity == MINOR, f"not refused: {where}"
                assert stored == base, f"{stored!r} stored though refused: {where}"
            else:
                assert not refused_on_wire and not text, f"refused ({text}): {where}"
                assert stored == expected, f"{stored!r} stored: {where}"
        assert fuzz_ioc.proc is not None and fuzz_ioc.proc.poll() is None
    finally:
        fuzzer.close()


# --- the embedded DM service's routes -------------------------------------------------------

LINE_LIMIT = 8190  # aiohttp's request-line limit: longer lines get HTTP 400 before any route
ROUTE_FIELD = re.compile(r"\{(\w+)(?::e)?\}")


def local_path(token: str) -> bool:
    """Whether a token decodes to an existing local path (a DAQ must never watch one)."""
    try:
        text = wire.decode(token)
    except Exception:
        return False
    return text.startswith("/") and os.path.lexists(posixpath.normpath(text))


bad_tokens = st.one_of(
    st.text(max_size=40).map(lambda t: quote(t, safe="")),  # not base64 at all
    st.binary(max_size=30).map(lambda b: repr(base64.b64encode(b))),  # base64 once only
    st.binary(max_size=30).map(lambda b: repr(base64.b64encode(base64.b64encode(b)))),  # not UTF-8
    st.binary(max_size=30).map(lambda b: quote(b, safe="")),  # random bytes
    st.sampled_from(["b''", "b'", "'", "%", "%ZZ", "b'%ZZ'", "b'=='", "b'@@@'", ".", "%2F", "%00"]),
)
json_docs = st.recursive(
    st.none() | st.booleans() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=6).filter(lambda k: k != "stages"), inner, max_size=3),
    max_leaves=6)
json_tokens = st.one_of(
    json_docs.map(wire.encode_json),
    st.text(max_size=30).map(wire.encode),  # DM-encoded, but (mostly) not JSON
    st.sampled_from(["{not json", "[1, 2]", "null", '"x"', "[" * 1200, '{"a": ' * 1200 + "1"])
    .map(wire.encode),
    bad_tokens,
)
plain_segments = st.text(max_size=20).map(lambda t: quote(t, safe="")) | st.binary(
    max_size=20).map(lambda b: quote(b, safe=""))


def text_tokens(field: str) -> st.SearchStrategy[str]:
    texts = st.text(max_size=30)
    if field == "dataDirectory":  # never a real directory: nothing may start copying it
        texts = texts.map(lambda t: "/nonexistent-apsdm-fuzz/" + t)
    return st.one_of(texts.map(wire.encode), bad_tokens).filter(lambda t: not local_path(t))


@st.composite
def route_requests(draw: st.DrawFn) -> tuple[str, str, str]:
    """(method, path?query, session): a mangled call of a DM route, or a random path."""
    if draw(st.integers(0, 4)):
        route = draw(st.sampled_from(sorted(routes.ROUTES.values(), key=lambda r: r.name)))
        path = ROUTE_FIELD.sub(lambda m: draw(
            text_tokens(m[1]) if m[0].endswith(":e}") else plain_segments), route.template)
        tokens = {"j": json_tokens, "p": plain_segments}
        query = [f"{key}={draw(tokens[kind] if kind in tokens else text_tokens(key))}"
                 for key, kind in route.query if draw(st.integers(0, 4))]
        empty = [f"{key}=" for key, _ in route.query[:1]]  # a parameter without a value
        query.append(draw(st.sampled_from(["", "", "x=1", "&&", "=", "skip=-1", *empty])))
        method = draw(st.sampled_from([route.method] * 6 + ["GET", "POST", "PUT", "DELETE"]))
    else:
        path = "/" + "/".join(draw(st.lists(plain_segments | bad_tokens, min_size=1, max_size=5)
                                   .filter(lambda parts: parts[0])))  # httpx refuses "//..."
        query, method = [], draw(st.sampled_from(["GET", "POST", "PUT", "PATCH"]))
    pad = draw(st.sampled_from([0] * 12 + [2000, LINE_LIMIT, 60_000]))  # httpx stops at 64 kB
    if pad:  # huge query strings
        query.append("pad=" + "x" * pad)
    session = draw(st.sampled_from(["valid", "valid", "none", "garbage", "valid+garbage"]))
    return method, path + ("?" + "&".join(q for q in query if q) if any(query) else ""), session


def check_answer(resp: httpx.Response, line: int, where: str) -> str:
    """DM's protocol for any request: a DM status code header, never an internal error."""
    if resp.status_code in (400, 414):
        assert line > LINE_LIMIT - 200, f"HTTP {resp.status_code} for a short request: {where}"
        return f"http{resp.status_code}"
    assert resp.status_code in (200, 401, 404), f"HTTP {resp.status_code}: {where}"
    code = resp.headers.get("Dm-Status-Code")
    assert code is not None, f"no Dm-Status-Code: {where}"
    assert code != "2", f"internal error {resp.headers.get('Dm-Status-Message')}: {where}"
    assert "Traceback" not in resp.text, where
    if code != "0":
        body = resp.json()
        assert body["errorCode"] == int(code) and resp.headers["Dm-Exception-Type"], where
        message = resp.headers["Dm-Status-Message"]
        assert message.isascii() and message.isprintable(), where
    expected = {200: None, 401: ("12",), 404: ("8",)}[resp.status_code]
    assert expected is None or code in expected, f"HTTP {resp.status_code} with {code}: {where}"
    return code


RAW_REQUESTS = [  # bytes no HTTP client library sends
    b"GET /dm/experimentDaqs/\xff\xfe HTTP/1.1\r\n",
    b"GET /dm/experimentsByName/b'\x00'/APSDM HTTP/1.1\r\n",
    b"GET /dm/\xc3\x28 HTTP/1.1\r\n",
    b"POST /dm/experimentsByName/b'ZTMwPQo='/startDaq/b'\x7f' HTTP/1.1\r\n",
    b"GET /dm/experimentDaqs HTTP/1.1\r\nX-Junk: \xff\xfe\r\n",
]


def raw_request(url: str, head: bytes, cookie: str) -> bytes:
    """Send one request as raw bytes; return the status line."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head + f"Host: {host}\r\nCookie: {cookie}\r\nConnection: close\r\n\r\n"
                     .encode())
        return sock.makefile("rb").readline()


def test_fuzz_dm_service_routes(dm_server: DmServer) -> None:
    """Mangled tokens, broken JSON, unknown ids, bad sessions, huge queries and random paths:
    always a DM error answer (or 401/404), never an internal error, and the service lives."""
    login = dm_server.data_root / "dm.login"
    user, _, password = login.read_text().strip().partition("|")
    answers: Counter[str] = Counter()
    with httpx.Client(base_url=dm_server.url, timeout=30) as http:
        assert http.post(routes.LOGIN_PATH, data={"username": user, "password": password}
                         ).status_code == 200
        session = http.cookies["session_id"]
        cookies = {"valid": f"session_id={session}", "none": "",
                   "garbage": "session_id=" + "A" * 43,
                   "valid+garbage": f"x=1; session_id=; session_id={session}; y=\"q\"; z"}
        http.cookies.clear()

        @settings(max_examples=2 * EXAMPLES, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture,
                                         HealthCheck.too_slow, HealthCheck.filter_too_much])
        @given(request=route_requests())
        def requests(request: tuple[str, str, str]) -> None:
            method, target, which = request
            resp = http.request(method, target, headers={"Cookie": cookies[which]})
            line = len(method) + len(target) + 10
            answers[check_answer(resp, line, f"{method} {target[:200]} ({which})")] += 1
            assert dm_server.proc is not None and dm_server.proc.poll() is None

        requests()
        for head in RAW_REQUESTS:
            status = raw_request(dm_server.url, head, cookies["valid"])
            assert int(status.split()[1]) in (200, 400, 404), status
            answers["raw"] += 1
        resp = http.get(routes.ROUTES["listDaqs"].url(), headers={"Cookie": cookies["valid"]})
        assert resp.status_code == 200 and resp.json() == []  # alive, and nothing started
    log = (dm_server.data_root.parent / "dm-server.log").read_text()
    # aiohttp logs requests its HTTP parser refuses (HTTP 400) with a traceback: only those
    assert log.count("Traceback") == len(re.findall(r"^aiohttp\.http_exceptions\.", log, re.M))
    assert password not in log
    print(f"FUZZ DM routes: {sum(answers.values())} requests over {len(routes.ROUTES)} routes "
          f"and random paths; answers by DM status code: {dict(sorted(answers.items()))}")
