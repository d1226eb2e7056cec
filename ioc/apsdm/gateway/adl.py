"""The MEDM (``.adl``) writer of the operator screens' layout model
(:mod:`apsdm.gateway.screens`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

from .screens import (
    ACCENT,
    BACKGROUND,
    BANNER_BG,
    COLOR_MAP,
    CONTROL_BG,
    FILE_PREFIX,
    MARGIN,
    TEXT,
    VALUE_BG,
    WHITE,
    Part,
    Screen,
    Widget,
)


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
