"""Operator screens generated from the PV schema: Phoebus ``.bob`` and MEDM ``.adl``.

One layout model (pages of label/value rows on a fixed grid) is built from
:func:`apsdm.gateway.schema.build`; two small writers (:mod:`~apsdm.gateway.bob`,
:mod:`~apsdm.gateway.adl`) turn it into both formats, so the two screen sets show the same
PVs in the same places. Written by ``python -m apsdm.gateway.generate``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
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


def build(layout: Layout) -> list[Screen]:
    """All screens: overview, experiment, one per slot kind (macro $(N)), gateway status."""
    pvs = _slottemplate()
    group = {g: [pv for pv in pvs if pv.group == g] for g in {pv.group for pv in pvs}}
    tables = {screen: [pv for pv in group[""] if TABLE_SCREEN[pv.suffix] == screen]
              for screen in set(TABLE_SCREEN.values())}
    screens = [
        _overview(layout),
        _detail("experiment", "Experiment   $(P)",
                [("Experiment", group["Experiment"]), ("Run metadata", group["Metadata"]),
                 ("ESAF", group["Esaf"]), ("Proposal", group["Proposal"]),
                 ("Experiment for ESAF / proposal", group["Beamtime"])],
                tables["experiment"]),
        _detail("status", "Gateway status   $(P)",
                [("Gateway", group["Status"]), ("Streaming handshake", group["Stream"])], []),
    ]
    for g, (screen, one, _many) in SLOTS.items():
        slot_tables = [pv for pv in group[g] if pv.field.kind is Kind.TABLE]
        sections = [(title, [pv for pv in group[g] if _role(pv) == role])
                    for role, title in enumerate(ROLES)]
        screens.append(_detail(screen, f"{one} $(N)   $(P)", sections,
                               slot_tables + tables.get(screen, [])))
    return screens
