"""Screens (opi/) and db/ against the PV schema: PV names, writability, widget set, drift, render.

The render test converts the MEDM screens with adl2pydm and renders them with PyDM offscreen
against the running IOC; it runs PyDM in a subprocess (this file as a script) with the
IOC's EPICS environment.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from apsdm import __version__
from apsdm.gateway import generate
from apsdm.gateway.schema import PV, Layout, build

ROOT = Path(__file__).resolve().parents[1]
OPI = ROOT / "opi"
PREFIX = "T:"
SERVED = {pv.name: pv for pv in build(Layout(prefix=PREFIX))}
START = "apsdm_overview"
MACRO = re.compile(r"\$\((\w+)\)")
CONNECT_TIMEOUT = 20.0  # seconds for the IOC to answer a selection
# libca spaces the searches of a channel not yet found ever further apart (doubling, from
# tens of ms): a few unanswered while both test workers load the machine put the next
# one 10-20 s out (seen once in CI: 1 of 60 widgets unconnected after 20 s; that may have
# been pydm's lost connection news instead, see _replay_lost_connections)
RENDER_CONNECT_TIMEOUT = 60.0
PYDM_LOST_NEWS_AFTER = 5.0  # s: a widget still disconnected then, its PV connected, missed it

# Phoebus widget types: version and property names. Derived from phoebusgen 3.3.0 as installed
# (config/4.7.3_widgets.def for versions; for property names, the XML tags that each widget
# class's property mixins in phoebusgen/widget/{widget,widgets,properties}.py write).
_BASE = {"name", "x", "y", "width", "height", "visible", "tooltip", "rules", "scripts"}
PHOEBUS_WIDGETS: dict[str, tuple[str, set[str]]] = {
    "label": ("2.0.0", _BASE | {
        "text", "macros", "font", "foreground_color", "background_color", "transparent",
        "horizontal_alignment", "vertical_alignment", "rotation_step", "wrap_words",
        "auto_size", "border_color", "border_width"}),
    "rectangle": ("2.0.0", _BASE | {
        "macros", "line_width", "line_color", "background_color", "transparent",
        "corner_width", "corner_height"}),
    "textupdate": ("2.0.0", _BASE | {
        "pv_name", "font", "foreground_color", "background_color", "transparent", "format",
        "precision", "show_units", "horizontal_alignment", "vertical_alignment", "wrap_words",
        "rotation_step", "border_alarm_sensitive", "border_color", "border_width"}),
    "textentry": ("2.0.0", _BASE | {
        "pv_name", "font", "foreground_color", "background_color", "format", "precision",
        "show_units", "enabled", "multi_line", "wrap_words", "horizontal_alignment",
        "vertical_alignment", "border_alarm_sensitive", "border_color", "border_width"}),
    "action_button": ("3.0.0", _BASE | {
        "pv_name", "actions", "text", "font", "foreground_color", "background_color",
        "transparent", "horizontal_alignment", "vertical_alignment", "rotation_step",
        "enabled", "confirm_message", "password", "show_confirm_dialog",
        "border_alarm_sensitive"}),
    "combo": ("2.0.0", _BASE | {
        "pv_name", "font", "foreground_color", "background_color", "items", "items_from_pv",
        "editable", "enabled", "confirm_message", "password", "show_confirm_dialog",
        "border_alarm_sensitive"}),
    "choice": ("2.0.0", _BASE | {
        "pv_name", "font", "foreground_color", "background_color", "selected_color",
        "horizontal", "items", "items_from_pv", "horizontal_alignment", "vertical_alignment",
        "confirm_message", "password", "show_confirm_dialog", "border_alarm_sensitive"}),
    "bool_button": ("2.0.0", _BASE | {
        "pv_name", "bit", "off_image", "on_image", "show_led", "font", "foreground_color",
        "background_color", "off_color", "on_color", "off_label", "on_label", "labels_from_pv",
        "mode", "enabled", "horizontal_alignment", "vertical_alignment", "confirm_message",
        "password", "show_confirm_dialog", "border_alarm_sensitive"}),
    "led": ("2.0.0", _BASE | {
        "pv_name", "bit", "off_color", "on_color", "off_label", "on_label", "labels_from_pv",
        "font", "foreground_color", "line_color", "square", "border_alarm_sensitive"}),
    "multi_state_led": ("2.0.0", _BASE | {
        "pv_name", "states", "fallback_color", "fallback_label", "font", "foreground_color",
        "line_color", "square", "border_alarm_sensitive"}),
    "progressbar": ("2.0.0", _BASE | {
        "pv_name", "fill_color", "background_color", "horizontal", "limits_from_pv", "minimum",
        "maximum", "border_alarm_sensitive"}),
    "table": ("2.0.0", _BASE | {
        "pv_name", "font", "foreground_color", "background_color", "show_toolbar", "columns",
        "editable", "row_selection_mode", "selection_pv", "border_alarm_sensitive"}),
    "group": ("3.0.0", _BASE | {
        "macros", "style", "font", "foreground_color", "background_color", "line_color",
        "transparent"}),
    "embedded": ("2.0.0", _BASE | {
        "macros", "file", "resize", "group_name", "transparent", "border_color",
        "border_width"}),
}
PHOEBUS_DISPLAY = {"name", "width", "height", "background_color", "macros", "widget"}
PHOEBUS_ACTIONS = {"open_display": {"file", "target", "macros", "description"},
                   "write_pv": {"pv_name", "value", "description"}}
BOB_WRITES = {"textentry", "combo", "choice", "bool_button", "radio", "checkbox",
              "slide_button", "spinner", "scaledslider", "scrollbar", "thumbwheel"}
ADL_WRITES = {"text entry", "menu", "message button", "choice button", "valuator",
              "wheel switch"}
ADL_HEADER = {"file", "display", "color map"}


@dataclass(frozen=True)
class Ref:
    """A PV a screen widget uses, as written in the file (macros unexpanded)."""

    widget: str
    pv: str
    writes: bool


@dataclass(frozen=True)
class Link:
    """A screen a widget opens, with the macros it passes."""

    file: str
    macros: dict[str, str]


# ----------------------------------------------------------------------------- parsing
AdlTree = list[tuple[str, "str | AdlTree | None"]]
ADL_TOKEN = re.compile(r'"[^"]*"|[{}=]|[^\s{}=",]+')


def parse_adl(text: str) -> AdlTree:
    """MEDM's brace format as nested (name, value) lists; bare list items get value None."""
    tokens = ADL_TOKEN.findall(text)
    pos = 0

    def block() -> AdlTree:
        nonlocal pos
        items: AdlTree = []
        while pos < len(tokens) and tokens[pos] != "}":
            key = tokens[pos].strip('"')
            nxt = tokens[pos + 1] if pos + 1 < len(tokens) else ""
            if nxt == "=":
                items.append((key, tokens[pos + 2].strip('"')))
                pos += 3
            elif nxt == "{":
                pos += 2
                items.append((key, block()))
                assert tokens[pos] == "}", f"unbalanced braces near token {pos}"
                pos += 1
            else:
                items.append((key, None))
                pos += 1
        return items

    tree = block()
    assert pos == len(tokens), f"unexpected '}}' at token {pos}"
    return tree


def _adl_values(tree: AdlTree, key: str) -> Iterator[str]:
    """Every value assigned to key at any depth."""
    for name, value in tree:
        if isinstance(value, list):
            yield from _adl_values(value, key)
        elif name == key and value is not None:
            yield value


def adl_screen(path: Path) -> tuple[list[Ref], list[Link]]:
    """The PVs and links of an .adl file (MEDM passes only the args, no inherited macros)."""
    refs, links = [], []
    for name, body in parse_adl(path.read_text()):
        if name in ADL_HEADER or not isinstance(body, list):
            continue
        refs += [Ref(name, chan, name in ADL_WRITES) for chan in _adl_values(body, "chan")]
        for key, target in body:
            if key.startswith("display[") and isinstance(target, list):
                fields = {k: v for k, v in target if isinstance(v, str)}
                args = dict(a.split("=", 1) for a in fields.get("args", "").split(",") if a)
                links.append(Link(fields["name"], args))
    return refs, links


def bob_screen(path: Path) -> tuple[list[Ref], list[Link]]:
    """The PVs and links of a .bob file; write_pv actions resolve $(pv_name)."""
    refs, links = [], []
    for widget in ET.parse(path).getroot().iter("widget"):
        kind, pv = widget.get("type", ""), widget.findtext("pv_name")
        if pv:
            refs.append(Ref(kind, pv, kind in BOB_WRITES))
        for action in widget.iter("action"):
            if action.get("type") == "write_pv":
                target = action.findtext("pv_name", "").replace("$(pv_name)", pv or "")
                refs.append(Ref(f"{kind} write_pv", target, True))
            elif action.get("type") == "open_display":
                passed = action.find("macros")
                macros = {m.tag: m.text or "" for m in (passed if passed is not None else [])}
                links.append(Link(action.findtext("file", ""), macros))
    return refs, links


def expand(text: str, macros: dict[str, str]) -> str:
    return MACRO.sub(lambda m: macros.get(m.group(1), m.group(0)), text)


def instances(ext: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], list[Ref]]:
    """Every (screen, macros) reachable from the overview, with its PVs expanded."""
    parse = bob_screen if ext == "bob" else adl_screen
    todo = [(f"{START}.{ext}", {"P": PREFIX})]
    seen: dict[tuple[str, tuple[tuple[str, str], ...]], list[Ref]] = {}
    while todo:
        name, macros = todo.pop()
        key = (name, tuple(sorted(macros.items())))
        if key in seen:
            continue
        assert (OPI / name).is_file(), f"link to a missing screen: {name}"
        refs, links = parse(OPI / name)
        seen[key] = [Ref(r.widget, expand(r.pv, macros), r.writes) for r in refs]
        for link in links:
            passed = {k: expand(v, macros) for k, v in link.macros.items()}
            todo.append((link.file, {**macros, **passed} if ext == "bob" else passed))
    return seen


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("ext", ["bob", "adl"])
def test_screen_pvs_are_served_and_writes_go_to_writable_pvs(ext: str) -> None:
    found = instances(ext)
    problems = []
    for (name, macros), refs in found.items():
        where = f"{name} {dict(macros)}"
        for ref in refs:
            protocol, _, pv_name = ref.pv.rpartition("://")
            pv: PV | None = SERVED.get(pv_name)
            if pv is None:
                problems.append(f"{where}: {ref.widget} uses {ref.pv!r}, not served")
            elif pv.field.pva_only != (protocol == "pva"):
                problems.append(f"{where}: {ref.widget} reads {ref.pv!r} over the wrong protocol")
            elif ref.writes and not pv.field.writable:
                problems.append(f"{where}: {ref.widget} writes read-only {ref.pv!r}")
    assert not problems, "\n".join(problems)
    assert {name for name, _ in found} == {p.name for p in OPI.glob(f"*.{ext}")}, \
        "every screen is reachable from the overview"
    for screen in ("daq", "upload", "workflow"):
        slots = {dict(m)["N"] for name, m in found if name == f"apsdm_{screen}.{ext}"}
        assert slots == {"1", "2", "3", "4"}, f"{screen} screens opened for slots {slots}"


def test_screens_cover_the_operator_commands() -> None:
    """Every command and setting of every slot is reachable on both screen sets."""
    for ext in ("bob", "adl"):
        written = {r.pv for refs in instances(ext).values() for r in refs if r.writes}
        wanted = {pv.name for pv in SERVED.values() if pv.field.writable
                  and not pv.field.pva_only}
        assert wanted <= written, f"{ext}: no widget writes {sorted(wanted - written)}"


@pytest.mark.parametrize("path", sorted(OPI.glob("*.bob")), ids=lambda p: p.name)
def test_bob_uses_phoebus_widgets_and_properties(path: Path) -> None:
    root = ET.parse(path).getroot()
    assert root.tag == "display" and root.get("version") == "2.0.0"
    assert {child.tag for child in root} <= PHOEBUS_DISPLAY
    for widget in root.iter("widget"):
        kind, version = widget.get("type", ""), widget.get("version")
        assert kind in PHOEBUS_WIDGETS, f"unknown Phoebus widget type {kind!r}"
        expected_version, properties = PHOEBUS_WIDGETS[kind]
        assert version == expected_version, f"{kind} version {version}"
        unknown = {child.tag for child in widget} - properties
        assert not unknown, f"{kind} has no properties {sorted(unknown)}"
        for tag in ("x", "y", "width", "height"):
            assert int(widget.findtext(tag, "")) >= 0
        if "pv_name" in properties and kind != "action_button":
            assert widget.findtext("pv_name"), f"{kind} without pv_name"
        if kind in ("textupdate", "textentry", "combo"):
            assert widget.findtext("border_alarm_sensitive") == "true", f"{kind} not alarm"
        for action in widget.iter("action"):
            allowed = PHOEBUS_ACTIONS[action.get("type", "")]
            assert {child.tag for child in action} <= allowed


def _box(body: AdlTree) -> tuple[int, int, int, int]:
    """x, y, right, bottom of a widget's object block."""
    box = {k: int(v) for k, v in dict(body)["object"]}  # type: ignore[arg-type]
    return box["x"], box["y"], box["x"] + box["width"], box["y"] + box["height"]


@pytest.mark.parametrize("path", sorted(OPI.glob("*.adl")), ids=lambda p: p.name)
def test_adl_layout(path: Path) -> None:
    """Header blocks, a 65-colour map, alarm colours on monitors, and below the banner
    every widget inside the display and clear of the others."""
    tree = parse_adl(path.read_text())
    assert [name for name, _ in tree[:3]] == ["file", "display", "color map"]
    colors = dict(tree[2][1])  # type: ignore[arg-type]
    assert len(colors["colors"]) == int(colors["ncolors"]) == 65  # type: ignore[arg-type]
    _, _, width, height = _box(tree[1][1])  # type: ignore[arg-type]
    widgets = [(name, body) for name, body in tree[3:] if isinstance(body, list)]
    banner_bottom = _box(widgets[0][1])[3]
    boxes = []
    for name, body in widgets:
        x, y, right, bottom = _box(body)
        assert right <= width and bottom <= height, f"{name} at {x},{y} sticks out"
        if name in ("text update", "bar"):
            assert ("clrmod", "alarm") in body, f"{name} at {x},{y} without alarm colours"
        if y >= banner_bottom:
            clash = [b for b in boxes if x < b[2] and b[0] < right and y < b[3] and b[1] < bottom]
            assert not clash, f"{name} at {x},{y} overlaps {clash}"
            boxes.append((x, y, right, bottom))


def test_generated_files_match_the_schema() -> None:
    """db/ and opi/ are exactly what `python -m apsdm.gateway.generate` writes now."""
    assert generate.differences(ROOT) == [], "run: PYTHONPATH=ioc python -m apsdm.gateway.generate"
    generated = set(generate.artifacts())
    on_disk = {str(p.relative_to(ROOT)) for d in ("db", "opi") for p in (ROOT / d).iterdir()
               if p.is_file()}
    assert on_disk == generated, f"files not made by the generator: {on_disk - generated}"


def test_db_has_one_record_per_ca_pv() -> None:
    """Record names are the CA PVs; settings and commands are output records, the rest input."""
    text = (ROOT / "db/apsdm.db").read_text()
    records = re.findall(r'record\((\w+), "\$\(P\)([^"]+)"\) \{([^}]*)\}', text)
    ca = {pv.name.removeprefix(PREFIX): pv for pv in SERVED.values() if not pv.field.pva_only}
    assert sorted(name for _, name, _ in records) == sorted(ca)
    outputs = {"stringout", "lso", "longout", "ao", "mbbo", "bo"}
    for rtype, name, body in records:
        pv = ca[name]
        assert (rtype in outputs) == pv.field.writable, f"{name}: {rtype}"
        assert f'field(DESC, "{pv.field.desc}")' in body
        states = re.findall(r"field\((?:\w\wST|ZNAM|ONAM), \"([^\"]*)\"\)", body)
        assert tuple(states) == pv.field.enums, name
    comments = re.findall(r"# PVA only \(\w+\): \$\(P\)(\S+)", text)
    assert sorted(comments) == sorted(pv.name.removeprefix(PREFIX) for pv in SERVED.values()
                                      if pv.field.pva_only)


# ----------------------------------------------------------------------------- render
def _adl_to_ui(adl: Path, out: Path) -> Path:
    """Convert with adl2pydm, then work around two of its bugs: it emits PyDMAbsoluteGeometry
    (absent from pydm; use QFrame) and writes "(" in text as "{"."""
    from adl2pydm import cli

    cli.processFile(str(adl), str(out))
    ui = out / f"{adl.stem}.ui"
    tree = ET.parse(ui)
    for widget in tree.getroot().iter("widget"):
        if widget.get("class") == "PyDMAbsoluteGeometry":
            widget.set("class", "QFrame")
    custom = tree.getroot().find("customwidgets")
    for entry in list(custom if custom is not None else []):
        if entry.findtext("class") == "PyDMAbsoluteGeometry":
            custom.remove(entry)  # type: ignore[union-attr]
    for text in tree.getroot().iterfind(".//property[@name='text']/string"):
        text.text = re.sub(r"(?<!\$)\{([^{}]*)\}", r"(\1)", text.text or "")
    tree.write(ui)
    return ui


def _render(ui_dir: Path, png_dir: Path, prefix: str) -> None:
    """Subprocess side: render every .ui with live values, save PNGs, print label texts."""
    from pydm import display as pydm_display
    from pydm.widgets import PyDMLabel
    from pydm.widgets.base import PyDMWidget
    from qtpy.QtWidgets import QApplication

    app = QApplication([])
    texts = {}
    for ui in sorted(ui_dir.glob("*.ui")):
        screen = pydm_display.load_file(str(ui), macros={"P": prefix, "N": "1"}, target=None)
        screen.show()
        widgets = [w for w in screen.findChildren(PyDMWidget) if getattr(w, "channel", None)]
        loaded = time.monotonic()
        while (now := time.monotonic()) < loaded + RENDER_CONNECT_TIMEOUT and not all(
                w._connected for w in widgets):
            app.processEvents()
            if now > loaded + PYDM_LOST_NEWS_AFTER:
                _replay_lost_connections(widgets)
            time.sleep(0.05)
        for _ in range(20):  # let the first values arrive and paint
            app.processEvents()
            _replay_lost_connections(widgets)
            time.sleep(0.05)
        screen.grab().save(str(png_dir / f"{ui.stem}.png"))
        texts[ui.stem] = {w.channel: w.text() for w in screen.findChildren(PyDMLabel)
                          if w.channel}
        texts[ui.stem]["disconnected"] = [w.channel for w in widgets if not w._connected]
        screen.close()
    print(json.dumps(texts))


def _replay_lost_connections(widgets: list[Any]) -> None:
    """Tell a disconnected widget again that its PV connected, where pydm lost that news.

    pydm 1.29's pyepics plugin hooks a new channel's widgets up from a thread pool
    (``Connection.setup_callbacks`` -> ``add_listener``). When libca connects the PV between
    ``add_listener``'s ``isConnected`` check and its ``send_connection_state(conn=False)``,
    that False reaches the widget after libca's True, and the widget stays disconnected
    though its PV is connected (about 1 run in 10; the IOC had answered the search and the
    channel). Only PVs libca reports connected are replayed, so a PV the IOC does not serve
    still shows disconnected. ``test_pydm_still_hooks_widgets_up_from_its_thread_pool``
    fails when pydm's code for this changes."""
    import epics
    from pydm.data_plugins import plugin_for_address

    for widget in widgets:
        if widget._connected:
            continue
        for channel in widget.channels() or ():
            plugin = plugin_for_address(channel.address)
            connection = plugin.connections.get(plugin.get_connection_id(channel)) if plugin else None
            pv = getattr(connection, "pv", None)
            if isinstance(pv, epics.PV) and pv.connected:
                connection.send_connection_state(conn=True)  # type: ignore[union-attr]


def _select_experiment(ioc: Any, dm: Any, name: str) -> None:
    """Create an experiment in the embedded DM and select it through CA, as an operator would."""
    import epics

    async def add() -> None:
        async with dm:
            await dm.add_experiment(name, description="Rendered by test_screens")

    asyncio.run(add())
    assert epics.caput(ioc.pv("Experiment:Name"), name, wait=True, timeout=CONNECT_TIMEOUT)
    deadline = time.monotonic() + CONNECT_TIMEOUT
    while epics.caget(ioc.pv("Experiment:Name_RBV"), use_monitor=False) != name:
        assert time.monotonic() < deadline, "the IOC did not select the experiment"
        time.sleep(0.2)


@pytest.mark.render
def test_render_medm_screens_with_live_values(ioc: Any, dm: Any, tmp_path: Path) -> None:
    pytest.importorskip("adl2pydm")
    pytest.importorskip("pydm")
    _select_experiment(ioc, dm, "screens-demo")
    ui_dir, png_dir = tmp_path / "ui", tmp_path / "png"
    ui_dir.mkdir()
    png_dir.mkdir()
    for adl in sorted(OPI.glob("*.adl")):
        _adl_to_ui(adl, ui_dir)
    env = {**os.environ, **ioc.env, "QT_QPA_PLATFORM": "offscreen",
           "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run([sys.executable, __file__, str(ui_dir), str(png_dir), ioc.prefix],
                         env=env, capture_output=True, text=True, timeout=240, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    texts = json.loads(run.stdout.strip().splitlines()[-1])
    if os.environ.get("APSDM_SAVE_RENDER") == "1":
        (OPI / "rendered").mkdir(exist_ok=True)
        for png in png_dir.glob("*.png"):
            shutil.copy(png, OPI / "rendered" / png.name)
    assert {p.stem for p in png_dir.glob("*.png")} == {p.stem for p in OPI.glob("*.adl")}
    for screen, labels in texts.items():
        assert labels.pop("disconnected") == [], f"{screen}: widgets not connected"

    def label(screen: str, suffix: str) -> str:
        return texts[screen][f"ca://{ioc.pv(suffix)}"]

    assert label("apsdm_status", "Status:Connected_RBV") == "Connected"
    assert label("apsdm_overview", "Experiment:Name_RBV") == "screens-demo"
    assert label("apsdm_experiment", "Experiment:Description_RBV") == "Rendered by test_screens"
    assert label("apsdm_overview", "Experiment:Valid_RBV") == "Yes"
    assert label("apsdm_daq", "DAQ1:Start") == "Done"
    assert label("apsdm_status", "Status:Version_RBV") == __version__


@pytest.mark.render
def test_pydm_still_hooks_widgets_up_from_its_thread_pool() -> None:
    """The race _replay_lost_connections mends is still in pydm's pyepics plugin: a new
    channel's listener is added from the thread pool, and added as disconnected when libca
    has not connected it yet. When this fails, see whether the replay is still needed."""
    pytest.importorskip("pydm")
    import inspect

    from pydm.data_plugins.epics_plugins import pyepics_plugin_component as plugin

    assert "thread_pool.submit(self.setup_callbacks" in inspect.getsource(plugin.Connection.__init__)
    listener = inspect.getsource(plugin.Connection.add_listener)
    assert "isConnected(self.pv.chid)" in listener
    assert "self.send_connection_state(conn=False)" in listener


if __name__ == "__main__":
    _render(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
