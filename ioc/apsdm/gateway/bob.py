"""The Phoebus Display Builder (``.bob``) writer of the operator screens' layout model
(:mod:`apsdm.gateway.screens`)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import replace

from .screens import (
    ACCENT,
    BACKGROUND,
    BANNER_BG,
    COLOR_MAP,
    CONTROL_BG,
    FILE_PREFIX,
    MARGIN,
    VALUE_BG,
    WHITE,
    Part,
    Screen,
    Widget,
)

BOB_VERSIONS = {"label": "2.0.0", "rectangle": "2.0.0", "textupdate": "2.0.0",
                "textentry": "2.0.0", "combo": "2.0.0", "action_button": "3.0.0",
                "progressbar": "2.0.0", "table": "2.0.0"}
PHOEBUS_STRING_FORMAT = "6"
PHOEBUS_LEFT, PHOEBUS_RIGHT, PHOEBUS_MIDDLE = "0", "2", "1"  # alignment codes


def _text(parent: ET.Element, tag: str, value: object) -> None:
    """A simple property: <tag>value</tag>, booleans as true/false."""
    ET.SubElement(parent, tag).text = str(value).lower() if isinstance(value, bool) else str(value)


def _bob_color(parent: ET.Element, tag: str, index: int) -> None:
    """A colour property with the RGB of a MEDM colour-map index."""
    rgb = COLOR_MAP[index]
    ET.SubElement(ET.SubElement(parent, tag), "color", red=str(int(rgb[0:2], 16)),
                  green=str(int(rgb[2:4], 16)), blue=str(int(rgb[4:6], 16)))


def _bob_font(parent: ET.Element, size: int) -> None:
    """A bold font of this size, for titles."""
    ET.SubElement(ET.SubElement(parent, "font"), "font", family="Liberation Sans",
                  style="BOLD", size=f"{size}.0")


def _bob(parent: ET.Element, kind: str, w: Widget, **props: object) -> ET.Element:
    """A widget element with name and geometry, then the given simple properties."""
    element = ET.SubElement(parent, "widget", type=kind, version=BOB_VERSIONS[kind])
    name = w.pv.rsplit(":", 1)[-1] if w.pv else w.text or w.part.value
    for tag, value in (("name", name), ("x", w.x), ("y", w.y), ("width", w.w),
                       ("height", w.h), *props.items()):
        _text(element, tag, value)
    return element


def _bob_action(button: ET.Element, kind: str, description: str, **props: str) -> ET.Element:
    """The button's (single) action of this type with these properties."""
    action = ET.SubElement(ET.SubElement(button, "actions"), "action", type=kind)
    for tag, value in props.items():
        _text(action, tag, value)
    _text(action, "description", description)
    return action


def _bob_banner(parent: ET.Element, w: Widget) -> None:
    _bob_color(_bob(parent, "rectangle", w, line_width=0), "background_color", BANNER_BG)
    label = _bob(parent, "label", replace(w, x=w.x + MARGIN, w=w.w - 2 * MARGIN), text=w.text,
                 vertical_alignment=PHOEBUS_MIDDLE)
    _bob_font(label, 18)
    _bob_color(label, "foreground_color", WHITE)


def _bob_heading(parent: ET.Element, w: Widget) -> None:
    label = _bob(parent, "label", w, text=w.text, vertical_alignment=PHOEBUS_MIDDLE)
    _bob_font(label, 14)
    _bob_color(label, "foreground_color", ACCENT)


def _bob_label(parent: ET.Element, w: Widget) -> None:
    align = PHOEBUS_RIGHT if w.part is Part.LABEL else PHOEBUS_LEFT
    _bob(parent, "label", w, text=w.text, horizontal_alignment=align,
         vertical_alignment=PHOEBUS_MIDDLE)


def _bob_pv(parent: ET.Element, kind: str, w: Widget, background: int,
            **props: object) -> ET.Element:
    """A PV widget with alarm-sensitive border, string format where the value is text."""
    if w.string:
        props["format"] = PHOEBUS_STRING_FORMAT
    element = _bob(parent, kind, w, pv_name=w.pv, border_alarm_sensitive=True, **props)
    _bob_color(element, "background_color", background)
    return element


def _bob_readback(parent: ET.Element, w: Widget) -> None:
    _bob_color(_bob_pv(parent, "textupdate", w, VALUE_BG, vertical_alignment=PHOEBUS_MIDDLE),
               "foreground_color", ACCENT)


def _bob_entry(parent: ET.Element, w: Widget) -> None:
    _bob_pv(parent, "textentry", w, CONTROL_BG)


def _bob_menu(parent: ET.Element, w: Widget) -> None:
    _bob_pv(parent, "combo", w, CONTROL_BG, items_from_pv=True)


def _bob_command(parent: ET.Element, w: Widget) -> None:
    button = _bob_pv(parent, "action_button", w, CONTROL_BG, text=w.text)
    _bob_action(button, "write_pv", w.text, pv_name="$(pv_name)", value="1")


def _bob_bar(parent: ET.Element, w: Widget) -> None:
    _bob(parent, "progressbar", w, pv_name=w.pv, limits_from_pv=False, minimum=0, maximum=100)


def _bob_table(parent: ET.Element, w: Widget) -> None:
    _bob(parent, "table", w, pv_name=w.pv, show_toolbar=False, editable=False)


def _bob_link(parent: ET.Element, w: Widget) -> None:
    button = _bob(parent, "action_button", w, text=w.text)
    _bob_color(button, "background_color", CONTROL_BG)
    action = _bob_action(button, "open_display", w.text, file=f"{FILE_PREFIX}{w.target}.bob",
                         target="tab")
    macros = ET.SubElement(action, "macros")
    for key, value in w.macros:
        _text(macros, key, value)


BOB_WRITERS: dict[Part, Callable[[ET.Element, Widget], None]] = {
    Part.BANNER: _bob_banner, Part.HEADING: _bob_heading, Part.LABEL: _bob_label,
    Part.CAPTION: _bob_label, Part.READBACK: _bob_readback, Part.ENTRY: _bob_entry,
    Part.MENU: _bob_menu, Part.COMMAND: _bob_command, Part.BAR: _bob_bar,
    Part.TABLE: _bob_table, Part.LINK: _bob_link,
}


def to_bob(screen: Screen) -> str:
    """The screen as a Phoebus Display Builder file."""
    root = ET.Element("display", version="2.0.0")
    for tag, value in (("name", screen.title), ("width", screen.width),
                       ("height", screen.height(with_pva=True))):
        _text(root, tag, value)
    _bob_color(root, "background_color", BACKGROUND)
    for w in screen.widgets:
        BOB_WRITERS[w.part](root, w)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, "unicode") + "\n"
