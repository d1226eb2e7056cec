"""The gateway beside a real EPICS IOC (pythonSoftIOC: EPICS base records and QSRV) that
loads db/apsdm.db under the same prefix: both are asked the same things by the same
clients (tests/differential_probe.py, a child process per IOC), and every answer must
agree but values and the deliberate differences listed in DELIBERATE. Every PV of the
schema is asked, so a PV added there is covered once `make generate` wrote it to db/."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import BIN, Ioc, _start, _stop, epics_env, free_port
from differential_probe import FIELDS

from apsdm.gateway.schema import PV, Kind, Layout, build

# two IOCs asked some 10,000 things each: minutes on a loaded 2-core machine
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]
ROOT = Path(__file__).resolve().parents[1]
PROBE = Path(__file__).with_name("differential_probe.py")

# What differs on purpose, in one place (the comparison below applies each where named).
DELIBERATE = {
    "long string": "a long string's bare name (and .VAL) answers as .VAL$ of its lsi/lso "
                   "does: a char waveform at its used length with the NUL, where an lsi's VAL "
                   "is a 40-character DBR_STRING; clients get the whole text without .VAL$",
    "waveform fields": "a long string also has NORD and NELM (LEN and SIZV of lsi), the "
                       "fields clients that see a char waveform ask for",
    "read-only readbacks": "readbacks are read-only on the gateway (DM state is their only "
                           "writer); an EPICS IOC lets any CA client write an input record",
}

# parts of an answer that are values (differ by when asked), never compared
VALUE_META = {"timestamp", "posixseconds", "nanoseconds", "status", "severity"}
VALUE_FIELDS = {"VAL", "SEVR", "STAT", "NORD", "LEN", "VAL$", "$"}
FORMS = ("native", "time", "ctrl")
TEXT_PV = "WF1:Name"  # a DBF_STRING setting given text (not a number) before asking
ECA_GETFAIL = 152


def _ca_pvs(prefix: str) -> list[PV]:
    return [pv for pv in build(Layout(prefix)) if not pv.field.pva_only]


def _probe(env: dict[str, str], args: dict[str, Any], log: Path) -> dict[str, Any]:
    """Run the probe against one IOC; it must exit normally (libca aborts on ECA_INTERNAL)."""
    proc = subprocess.run([sys.executable, str(PROBE), json.dumps(args)], capture_output=True,
                          text=True, timeout=600, env={**os.environ, **env})
    log.with_suffix(".err").write_text(proc.stderr)
    assert proc.returncode == 0, f"the client died (rc {proc.returncode}): {proc.stderr[-3000:]}"
    log.write_text(proc.stdout)  # the answers, to look at when they disagree
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def answers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, Any], ...]]:
    """The gateway's and the reference IOC's answers, the values of text PVs made equal."""
    tmp = Path(tmp_path_factory.mktemp("differential"))
    prefix = f"D{uuid.uuid4().hex[:6]}:"
    gateway = Ioc(tmp / "gateway", prefix)
    gateway.data_root.mkdir()
    ca, pva, bcast = free_port(), free_port(udp=False), free_port()
    ref_env = {**epics_env(ca, pva, bcast), "EPICS_PVAS_SERVER_PORT": str(pva),
               "EPICS_PVAS_BROADCAST_PORT": str(bcast), "EPICS_PVAS_INTF_ADDR_LIST": "127.0.0.1"}
    reference, _ = _start([str(BIN / "python"), "-m", "bench.softioc_peer", prefix,
                           str(ROOT / "db" / "apsdm.db")], tmp / "softioc.log",
                          {**os.environ, **ref_env, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)})
    try:
        gateway.start()
        pvs = _ca_pvs(prefix)
        names = [pv.name for pv in pvs]
        longs = [pv.name for pv in pvs if pv.field.kind is Kind.LONGSTRING]
        # text with no number in front, which a numeric read must fail on as on the IOC
        text = {prefix + TEXT_PV: "beamline staff"}
        masks = [prefix + TEXT_PV, ["one", "two", "three"]]
        ours = _probe(gateway.env, {"ca": names, "pva": names, "set": text, "masks": masks},
                      tmp / "gateway.json")
        texts = {pv.name + (".VAL$" if pv.field.kind is Kind.LONGSTRING else ""):
                 ours["ca"][pv.name]["as_string"]["value"]
                 for pv in pvs if pv.field.kind in (Kind.STRING, Kind.LONGSTRING)}
        theirs = _probe(ref_env, {"ca": names + [n + ".VAL$" for n in longs], "pva": names,
                                  "set": texts, "masks": masks}, tmp / "softioc.json")
        yield ours, theirs, pvs
    finally:
        gateway.stop()
        _stop(reference)


def _shown(answer: Any, field: str = "") -> Any:
    """An answer without its values: what must agree between the two IOCs."""
    if not isinstance(answer, dict):
        return answer
    out = {}
    for key, part in answer.items():
        if key == "access":
            continue  # DELIBERATE["read-only readbacks"]
        if key == "value" and (not field or field in VALUE_FIELDS):
            continue
        if key == "meta":
            part = {k: v for k, v in part.items() if k not in VALUE_META}
        out[key] = _shown(part, field)
    return out


def _diff(ours: Any, theirs: Any, path: str = "") -> list[str]:
    if isinstance(ours, dict) and isinstance(theirs, dict):
        return [line for key in sorted(set(ours) | set(theirs), key=str)
                for line in _diff(ours.get(key, "<absent>"), theirs.get(key, "<absent>"),
                                  f"{path} {key}")]
    return [] if ours == theirs else [f"{path}: gateway {ours!r}, IOC {theirs!r}"]


def _disagreements(ours: dict[str, Any], theirs: dict[str, Any], pairs: dict[str, str],
                   shown: Any) -> list[str]:
    lines = []
    for key, ref_key in pairs.items():
        lines += _diff(shown(ours.get(key, "<absent>"), key),
                       shown(theirs.get(ref_key, "<absent>"), ref_key), key)
    return lines


def test_ca_answers_agree_with_a_real_ioc(answers: tuple[dict[str, Any], ...]) -> None:
    """Every DBR type and form, counts, as_string, the record fields and monitors, per PV;
    a numeric read of text fails (or reads its leading number) as on the IOC, and the
    client that asked survives (the probe exits normally)."""
    ours, theirs, pvs = answers
    pairs = {}
    for pv in pvs:
        fields = {f"field {pv.name}.{f}": f"field {pv.name}.{f}" for f in FIELDS}
        if pv.field.kind is Kind.LONGSTRING:  # DELIBERATE["long string"]
            pairs[pv.name] = pv.name + ".VAL$"
            pairs.update({f"monitor {form} {pv.name}": f"monitor {form} {pv.name}.VAL$"
                          for form in FORMS})
            fields[f"field {pv.name}.VAL"] = f"field {pv.name}.VAL$"
            for extra in ("NORD", "NELM"):  # DELIBERATE["waveform fields"]
                del fields[f"field {pv.name}.{extra}"]
        else:
            pairs[pv.name] = pv.name
            pairs.update({f"monitor {form} {pv.name}": f"monitor {form} {pv.name}" for form in FORMS})
        pairs.update(fields)
    lines = _disagreements(ours["ca"], theirs["ca"], pairs,
                           lambda answer, key: _shown(answer, key.rsplit(".", 1)[1]
                                                      if key.startswith("field ") else ""))
    assert not lines, f"{len(lines)} disagreements:\n" + "\n".join(lines[:80])


def test_pva_structures_agree_with_a_real_ioc(answers: tuple[dict[str, Any], ...]) -> None:
    """The full structure (pvRequest field()) of a get and of a monitor's first update."""
    ours, theirs, pvs = answers
    pairs = {k: k for pv in pvs for k in (pv.name, f"monitor {pv.name}")}

    def shown(answer: Any, _key: str) -> Any:
        if "fields" not in answer:
            return answer
        fields = {k: v for k, v in answer["fields"].items()
                  if k not in ("value", "value.index") and not k.startswith(("alarm.", "timeStamp."))}
        return {"type": answer["type"], "fields": fields}

    lines = _disagreements(ours["pva"], theirs["pva"], pairs, shown)
    assert not lines, f"{len(lines)} disagreements:\n" + "\n".join(lines[:80])


def test_numeric_read_of_text_fails_as_on_the_ioc(answers: tuple[dict[str, Any], ...]) -> None:
    """The case the comparison covers, made sure: a DBR_DOUBLE (plain, time, ctrl) read of
    text is ECA_GETFAIL on both, and the client that asked lived on (its probe ended)."""
    ours, theirs, pvs = answers
    name = pvs[0].name.split(":")[0] + ":" + TEXT_PV
    for side in (ours, theirs):
        assert side["ca"][name]["as_string"]["value"] == "beamline staff"
        for ftype in (6, 20, 34):
            assert side["ca"][name][f"ftype {ftype}"] == {"error": f"status {ECA_GETFAIL}"}


def test_monitors_get_what_their_mask_asks_for_as_on_the_ioc(
        answers: tuple[dict[str, Any], ...]) -> None:
    """Three writes of a setting, its alarm unchanged: value monitors get each, alarm-only
    and property-only monitors (an alarm handler's, an archiver's) their first update alone."""
    ours, theirs, _pvs = answers
    assert ours["masks"] == theirs["masks"], (ours["masks"], theirs["masks"])
    assert ours["masks"]["value"] > ours["masks"]["alarm"], ours["masks"]


def test_every_schema_pv_was_asked(answers: tuple[dict[str, Any], ...]) -> None:
    """Nothing was compared by absence: every CA PV connected on both and answered a get."""
    ours, theirs, pvs = answers
    for side in (ours, theirs):
        for pv in pvs:
            assert "error" not in side["ca"][pv.name]["as_string"], pv.name
            assert "error" not in side["pva"][pv.name], pv.name
