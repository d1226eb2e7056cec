"""Operator screens generated from the PV schema: Phoebus ``.bob`` and MEDM ``.adl``.

One layout model (pages of label/value rows on a fixed grid) is built from
:func:`apsdm.gateway.schema.build`; two small writers turn it into both formats, so the two
screen sets show the same PVs in the same places. Written by ``python -m apsdm.gateway.generate``.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum

from apsdm.gateway.schema import PV, Field, Kind, Layout, template

DEFAULT_LAYOUT = Layout()  # 4 slots of each kind
FILE_PREFIX = "apsdm_"

# MEDM's standard 65-colour map: .adl widgets name colours by index, .bob widgets by its RGB.
COLOR_MAP = (
    "ffffff", "ececec", "dadada", "c8c8c8", "bbbbbb", "aeaeae", "9e9e9e", "919191", "858585",
    "787878", "696969", "5a5a5a", "464646", "2d2d2d", "000000", "00d800", "1ebb00", "339900",
    "2d7f00", "216c00", "fd0000", "de1309", "be190b", "a01207", "820400", "5893ff", "597ee1",
    "4b6ec7", "3a5eab", "27548d", "fbf34a", "f9da3c", "eeb62b", "e19015", "cd6100", "ffb0ff",
    "d67fe2", "ae4ebc", "8b1a96", "610a75", "a4aaff", "8793e2", "6a73c1", "4d52a4", "343386",
    "c7bb6d", "b79d5c", "a47e3c", "7d5627", "58340f", "99ffff", "73dfff", "4ea5f9", "2a63e4",
    "0a00b8", "ebf1b5", "d4db9d", "bbc187", "a6a462", "8b8239", "73ff6b", "52da3b", "3cb420",
    "289315", "1a7309",
)
WHITE, BACKGROUND, VALUE_BG, TEXT, CONTROL_BG, BANNER_BG, ACCENT = 0, 3, 1, 14, 51, 28, 54

MARGIN, GAP = 10, 6
ROW_H, PITCH, BANNER_H, TABLE_H = 20, 26, 32, 150
LABEL_W, VALUE_W, BUTTON_W, NUMBER_W, ENUM_W = 230, 440, 90, 110, 160
PAGE_W = MARGIN + LABEL_W + GAP + VALUE_W + MARGIN
ROLES = ("Settings", "Commands", "State")  # section titles of slot screens, in row order
# Overview: one line per slot with the same columns for every kind of slot.
SLOT_LABEL_W, LINK_W = 80, 80
SUMMARY_W = (110, 90, 270, 64, 64)  # column widths: three readbacks, then the commands
SUMMARY = {
    "DAQ": ("Status_RBV", "Percent_RBV", "Message_RBV", "Start", "Stop"),
    "UP": ("Status_RBV", "Percent_RBV", "Message_RBV", "Start"),
    "WF": ("Status_RBV", "Stage_RBV", "Message_RBV", "Start"),
}
OVERVIEW = {"Experiment": ("Name", "Name_RBV", "Valid_RBV", "Message_RBV"),
            "Status": ("Connected_RBV", "Message_RBV", "Heartbeat_RBV")}
# Slot groups: (screen name, title of one slot, title of all slots).
SLOTS = {"DAQ": ("daq", "DAQ", "DAQs"), "UP": ("upload", "Upload", "Uploads"),
         "WF": ("workflow", "Workflow", "Workflows")}
# Screen that shows each whole-list table (PVA only, so .bob only).
TABLE_SCREEN = {"Experiments": "experiment", "DAQs": "daq", "Uploads": "upload",
                "Jobs": "workflow", "Workflows": "workflow"}


class Part(StrEnum):
    """What a widget of the layout model is; each writer has one function per part."""

    BANNER = "banner"  # title bar across the top
    HEADING = "heading"  # section title
    LABEL = "label"  # right-aligned row label
    CAPTION = "caption"  # left-aligned column title
    READBACK = "readback"
    ENTRY = "entry"
    MENU = "menu"
    COMMAND = "command"  # button that writes 1 to a busy PV
    BAR = "bar"  # 0..100 % progress
    TABLE = "table"  # PVA NTTable, Phoebus only
    LINK = "link"  # opens another screen


@dataclass(frozen=True)
class Widget:
    """One widget of the layout model: placement plus what it shows or does."""

    part: Part
    w: int
    x: int = 0
    y: int = 0
    h: int = ROW_H
    text: str = ""
    pv: str = ""
    string: bool = False  # shown and entered as text (long strings are char arrays on CA)
    target: str = ""  # LINK: screen name
    macros: tuple[tuple[str, str], ...] = ()
    pva: bool = False  # part of a PVA view: on Phoebus screens only


@dataclass(frozen=True)
class Screen:
    """A laid-out screen, ready for either writer."""

    name: str
    title: str
    width: int
    widgets: tuple[Widget, ...]

    def height(self, with_pva: bool) -> int:
        """Bottom of the lowest widget plus a margin; MEDM screens have no PVA views."""
        return MARGIN + max(w.y + w.h for w in self.widgets if with_pva or not w.pva)


def _flow(cells: Iterable[Widget], x: int, y: int) -> list[Widget]:
    """The cells placed left to right from (x, y), GAP apart."""
    placed = []
    for cell in cells:
        placed.append(replace(cell, x=x, y=y))
        x += cell.w + GAP
    return placed


class _Page:
    """Collects widgets top to bottom: a banner, then headings and rows on the grid."""

    def __init__(self, name: str, title: str, width: int = PAGE_W) -> None:
        self.name, self.title, self.width = name, title, width
        self.widgets = [Widget(Part.BANNER, width, h=BANNER_H, text=title)]
        self.y = BANNER_H + MARGIN

    def place(self, cells: Iterable[Widget], right: Sequence[Widget] = ()) -> None:
        """Put cells left to right, and `right` flush with the right margin, on the current
        line; then start the next line."""
        right_x = self.width - MARGIN + GAP - sum(w.w + GAP for w in right)
        placed = [*_flow(cells, MARGIN, self.y), *_flow(right, right_x, self.y)]
        self.widgets += placed
        self.y += max(w.h for w in placed) + PITCH - ROW_H

    def banner_link(self, link: Widget) -> None:
        """A link at the right end of the banner."""
        self.widgets.append(replace(link, x=self.width - MARGIN - link.w,
                                    y=(BANNER_H - link.h) // 2))

    def heading(self, text: str, *links: Widget, pva: bool = False) -> None:
        """A section title, with optional links at the right end of its line."""
        self.y += GAP
        links_w = sum(link.w + GAP for link in links)
        self.place([Widget(Part.HEADING, self.width - 2 * MARGIN - links_w, text=text, pva=pva)],
                   links)

    def row(self, label: str, cells: Iterable[Widget]) -> None:
        """A labelled row: label in the left column, then the value cells."""
        self.place([Widget(Part.LABEL, LABEL_W, text=label), *cells])

    def pv_rows(self, pvs: Iterable[PV]) -> None:
        """One row per PV, labelled with its DESC: settings first, then commands, then state."""
        for pv in sorted(pvs, key=_role):
            self.row(pv.field.desc, _cells(pv.name, pv.field))

    def table(self, pv: PV) -> None:
        """A PVA table under its own heading, across the page."""
        self.heading(pv.field.desc, pva=True)
        self.place([Widget(Part.TABLE, self.width - 2 * MARGIN, h=TABLE_H,
                           pv=f"pva://{pv.name}", pva=True)])

    def screen(self) -> Screen:
        return Screen(self.name, self.title, self.width, tuple(self.widgets))


def _role(pv: PV) -> int:
    """Row order within a section: settings, commands, readbacks."""
    if not pv.field.writable:
        return 2
    return 1 if pv.field.kind is Kind.BUSY else 0


def _is_text(field: Field) -> bool:
    return field.kind in (Kind.STRING, Kind.LONGSTRING)


def _cells(name: str, field: Field) -> list[Widget]:
    """The widgets that show, and if writable set, one PV in the value column."""
    if field.kind is Kind.BUSY:
        return [Widget(Part.COMMAND, BUTTON_W, text=field.enums[1], pv=name),
                Widget(Part.READBACK, ENUM_W, pv=name)]
    if field.writable:
        if field.kind is Kind.ENUM:
            return [Widget(Part.MENU, ENUM_W, pv=name)]
        return [Widget(Part.ENTRY, VALUE_W, pv=name, string=_is_text(field))]
    if field.egu == "%":
        return [Widget(Part.READBACK, NUMBER_W, pv=name),
                Widget(Part.BAR, VALUE_W - NUMBER_W - GAP, pv=name)]
    width = VALUE_W if _is_text(field) else ENUM_W if field.kind is Kind.ENUM else NUMBER_W
    return [Widget(Part.READBACK, width, pv=name, string=_is_text(field))]


def _summary_cell(pv: PV, width: int) -> Widget:
    """A compact overview cell: a button for a command, else a readback."""
    if pv.field.kind is Kind.BUSY:
        return Widget(Part.COMMAND, width, text=pv.field.enums[1], pv=pv.name)
    return Widget(Part.READBACK, width, pv=pv.name, string=_is_text(pv.field))


def _link(text: str, screen: str, **macros: str) -> Widget:
    """A button that opens a screen, passing $(P) on and the given macros."""
    return Widget(Part.LINK, LINK_W, text=text, target=screen,
                  macros=(("P", "$(P)"), *macros.items()))


def _slottemplate() -> list[PV]:
    """The schema's PVs as screens of one slot name them: prefix $(P), slot number $(N)."""
    return [replace(pv, name=pv.name.replace(f"{pv.group}1:", f"{pv.group}$(N):"))
            if pv.slot else pv for pv in template(Layout(n_daq=1, n_upload=1, n_workflow=1))]


def _overview(layout: Layout) -> Screen:
    """Experiment, gateway health and one line per slot with its commands and a details link."""
    pvs = {(pv.group, pv.slot, pv.suffix): pv for pv in template(layout)}
    width = MARGIN + SLOT_LABEL_W + sum(w + GAP for w in SUMMARY_W) + GAP + LINK_W + MARGIN
    page = _Page("overview", "APS Data Management gateway   $(P)", max(width, PAGE_W))
    for group, title, screen in (("Experiment", "Experiment", "experiment"),
                                 ("Status", "Gateway", "status")):
        page.heading(title, _link("Details...", screen))
        page.pv_rows(pvs[group, 0, suffix] for suffix in OVERVIEW[group])
    for group, (screen, one, many) in SLOTS.items():
        page.heading(many)
        page.place([Widget(Part.CAPTION, SLOT_LABEL_W),
                    *(Widget(Part.CAPTION, w, text=suffix.removesuffix("_RBV"))
                      for suffix, w in zip(SUMMARY[group], SUMMARY_W, strict=False)
                      if suffix.endswith("_RBV"))])
        for n in sorted({slot for g, slot, _ in pvs if g == group}):
            page.place([Widget(Part.LABEL, SLOT_LABEL_W, text=f"{one} {n}"),
                        *(_summary_cell(pvs[group, n, suffix], w)
                          for suffix, w in zip(SUMMARY[group], SUMMARY_W, strict=False))],
                       [_link("Details...", screen, N=str(n))])
    return page.screen()


def _detail(name: str, title: str, sections: Sequence[tuple[str, Sequence[PV]]],
            tables: Sequence[PV]) -> Screen:
    """A screen of labelled sections, then the PVA tables that belong to it."""
    page = _Page(name, title)
    page.banner_link(_link("Overview", "overview"))
    for heading, pvs in sections:
        page.heading(heading)
        page.pv_rows(pv for pv in pvs if not pv.field.pva_only)
    for pv in tables:
        page.table(pv)
    return page.screen()


def _screens(layout: Layout) -> list[Screen]:
    """All screens: overview, experiment, one per slot kind (macro $(N)), gateway status."""
    pvs = _slottemplate()
    group = {g: [pv for pv in pvs if pv.group == g] for g in {pv.group for pv in pvs}}
    tables = {screen: [pv for pv in group[""] if TABLE_SCREEN[pv.suffix] == screen]
              for screen in set(TABLE_SCREEN.values())}
    screens = [
        _overview(layout),
        _detail("experiment", "Experiment   $(P)",
                [("Experiment", group["Experiment"]), ("Run metadata", group["Metadata"])],
                tables["experiment"]),
        _detail("status", "Gateway status   $(P)", [("Gateway", group["Status"])], []),
    ]
    for g, (screen, one, _many) in SLOTS.items():
        slot_tables = [pv for pv in group[g] if pv.field.kind is Kind.TABLE]
        sections = [(title, [pv for pv in group[g] if _role(pv) == role])
                    for role, title in enumerate(ROLES)]
        screens.append(_detail(screen, f"{one} $(N)   $(P)", sections,
                               slot_tables + tables.get(screen, [])))
    return screens


# ----------------------------------------------------------------------------- Phoebus .bob
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


# ------------------------------------------------------------------------------- MEDM .adl
class Bare(str):
    """An .adl value written without quotes (numbers, versions)."""


AdlItem = tuple[str, "str | int | list[AdlItem]"]


def _adl_block(name: str, items: Sequence[AdlItem], depth: int = 0) -> str:
    """One brace block: `name {` then `key=value` lines and nested blocks, then `}`."""
    def key(k: str) -> str:
        return f'"{k}"' if " " in k else k

    tab = "\t" * depth
    lines = [f"{tab}{key(name)} {{"]
    for k, v in items:
        if isinstance(v, list):
            lines.append(_adl_block(k, v, depth + 1))
        else:
            value = v if isinstance(v, int | Bare) else f'"{v}"'
            lines.append(f"{tab}\t{key(k)}={value}")
    lines.append(f"{tab}}}")
    return "\n".join(lines)


def _adl_box(x: int, y: int, width: int, height: int) -> AdlItem:
    return ("object", [("x", x), ("y", y), ("width", width), ("height", height)])


def _adl_object(w: Widget) -> AdlItem:
    return _adl_box(w.x, w.y, w.w, w.h)


def _adl_text(w: Widget, color: int, align: str) -> str:
    return _adl_block("text", [_adl_object(w), ("basic attribute", [("clr", color)]),
                               ("textix", w.text), ("align", align)])


def _adl_banner(w: Widget) -> str:
    box = _adl_block("rectangle", [_adl_object(w), ("basic attribute", [("clr", BANNER_BG)])])
    title = replace(w, x=w.x + MARGIN, y=w.y + 6, w=w.w - 2 * MARGIN, h=w.h - 12)
    return box + "\n" + _adl_text(title, WHITE, "horiz. left")


def _adl_heading(w: Widget) -> str:
    return _adl_text(w, ACCENT, "horiz. left")


def _adl_label(w: Widget) -> str:
    inset = replace(w, y=w.y + 3, h=w.h - 5)  # MEDM sizes the font to the box
    return _adl_text(inset, TEXT, "horiz. right" if w.part is Part.LABEL else "horiz. left")


def _adl_channel(w: Widget, block: str, background: int) -> AdlItem:
    return (block, [("chan", w.pv), ("clr", TEXT), ("bclr", background)])


def _adl_format(w: Widget) -> list[AdlItem]:
    return [("format", "string")] if w.string else []


def _adl_readback(w: Widget) -> str:
    return _adl_block("text update", [_adl_object(w), _adl_channel(w, "monitor", VALUE_BG),
                                      ("clrmod", "alarm"), *_adl_format(w), ("limits", [])])


def _adl_entry(w: Widget) -> str:
    return _adl_block("text entry", [_adl_object(w), _adl_channel(w, "control", CONTROL_BG),
                                     ("clrmod", "alarm"), *_adl_format(w), ("limits", [])])


def _adl_menu(w: Widget) -> str:
    return _adl_block("menu", [_adl_object(w), _adl_channel(w, "control", CONTROL_BG),
                               ("clrmod", "alarm")])


def _adl_command(w: Widget) -> str:
    return _adl_block("message button", [_adl_object(w), _adl_channel(w, "control", CONTROL_BG),
                                         ("label", w.text), ("press_msg", "1")])


def _adl_bar(w: Widget) -> str:
    return _adl_block("bar", [_adl_object(w), _adl_channel(w, "monitor", VALUE_BG),
                              ("label", "no decorations"), ("clrmod", "alarm"),
                              ("limits", [("loprSrc", "default"), ("hoprSrc", "default"),
                                          ("hoprDefault", 100)])])


def _adl_link(w: Widget) -> str:
    args = ",".join(f"{k}={v}" for k, v in w.macros)
    target = [("label", w.text), ("name", f"{FILE_PREFIX}{w.target}.adl"), ("args", args)]
    return _adl_block("related display", [_adl_object(w), ("display[0]", target),
                                          ("clr", TEXT), ("bclr", CONTROL_BG),
                                          ("label", f"-{w.text}")])


ADL_WRITERS: dict[Part, Callable[[Widget], str]] = {
    Part.BANNER: _adl_banner, Part.HEADING: _adl_heading, Part.LABEL: _adl_label,
    Part.CAPTION: _adl_label, Part.READBACK: _adl_readback, Part.ENTRY: _adl_entry,
    Part.MENU: _adl_menu, Part.COMMAND: _adl_command, Part.BAR: _adl_bar, Part.LINK: _adl_link,
}


def to_adl(screen: Screen) -> str:
    """The screen as an MEDM file: CA only, so without the PVA tables."""
    name = f"{FILE_PREFIX}{screen.name}.adl"
    display = [_adl_box(0, 0, screen.width, screen.height(with_pva=False)), ("clr", TEXT),
               ("bclr", BACKGROUND), ("cmap", ""), ("gridSpacing", 5), ("gridOn", 0),
               ("snapToGrid", 0)]
    colors = "".join(f"\t\t{c},\n" for c in COLOR_MAP)
    blocks = [_adl_block("file", [("name", name), ("version", Bare("030111"))]),
              _adl_block("display", display),
              f'"color map" {{\n\tncolors={len(COLOR_MAP)}\n\tcolors {{\n{colors}\t}}\n}}',
              *(ADL_WRITERS[w.part](w) for w in screen.widgets if not w.pva)]
    return "\n".join(blocks) + "\n"


def files(layout: Layout = DEFAULT_LAYOUT) -> dict[str, str]:
    """The opi/ files by path relative to the repository root: a .bob and an .adl per screen."""
    out = {}
    for screen in _screens(layout):
        out[f"opi/{FILE_PREFIX}{screen.name}.bob"] = to_bob(screen)
        out[f"opi/{FILE_PREFIX}{screen.name}.adl"] = to_adl(screen)
    return out
