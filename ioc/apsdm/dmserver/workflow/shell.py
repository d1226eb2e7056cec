"""Shell rendering of stage commands: ``$variables`` become environment references, so no
value can inject a command, while the displayed command shows DM's textual substitution."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from apsdm.dm.errors import InvalidArgument

ENV_PREFIX = "DMV_"
_INT_RE = re.compile(r"\s*[-+]?\d+\s*")


def var_pattern(names: Iterable[str]) -> re.Pattern[str]:
    """``$name`` / ``${name}`` for known names, longest first (DM's textual replace order)."""
    ordered = sorted(set(names), key=len, reverse=True)
    if not ordered:
        return re.compile(r"(?!)")
    alt = "|".join(map(re.escape, ordered))
    return re.compile(rf"\$(?:\{{({alt})\}}|({alt}))")


def render(command: str, pattern: re.Pattern[str], values: Mapping[str, str]) -> tuple[str, str]:
    """Return (shell text, display text) for a command.

    The shell text references each known variable as ``${DMV_name}`` (its value goes in the
    environment), keeping the author's quoting: inside '...' the quote is closed around a
    double-quoted reference. The display text is DM's plain textual substitution.
    Raises InvalidArgument for a non-integer value inside ``$((...))``, which bash would
    evaluate as an expression (its array subscripts can run commands).
    """
    shell: list[str] = []
    shown: list[str] = []
    # Contexts: "top", "cmd" $(...), "arith" $((...)), "bt" `...`, "dq" "..."; [kind, parens].
    stack: list[list[Any]] = [["top", 0]]
    i, n = 0, len(command)
    while i < n:
        ch = command[i]
        kind = stack[-1][0]
        match = pattern.match(command, i) if ch == "$" else None
        if match:
            name = match[1] or match[2]
            if kind == "arith" and not _INT_RE.fullmatch(values[name]):
                raise InvalidArgument(
                    f"${name} is used in $((...)) but its value {values[name]!r} is not an integer"
                )
            shell.append(f"${{{ENV_PREFIX}{name}}}")
            shown.append(values[name])
            i = match.end()
            continue
        if ch == "'" and kind != "dq":
            end = command.find("'", i + 1)
            end = n if end < 0 else end
            body, close = command[i + 1 : end], command[end : end + 1]
            quoted = pattern.sub(lambda m: f"'\"${{{ENV_PREFIX}{m[1] or m[2]}}}\"'", body)
            shell.append("'" + quoted + close)
            shown.append("'" + pattern.sub(lambda m: values[m[1] or m[2]], body) + close)
            i = end + 1
            continue
        text = ch
        if ch == "\\":
            text = command[i : i + 2]
        elif command.startswith("$((", i):
            text = "$(("
            stack.append(["arith", 0])
        elif command.startswith("$(", i):
            text = "$("
            stack.append(["cmd", 0])
        elif command.startswith("$$", i):
            text = "$$"
        elif ch == '"' or ch == "`":
            own = "dq" if ch == '"' else "bt"
            if kind == own:
                stack.pop()
            else:
                stack.append([own, 0])
        elif ch == "(" and kind in ("cmd", "arith"):
            stack[-1][1] += 1
        elif ch == ")" and kind in ("cmd", "arith"):
            if stack[-1][1]:
                stack[-1][1] -= 1
            else:
                stack.pop()
                text = "))" if kind == "arith" else ")"
        i += len(text)
        shell.append(text)
        shown.append(text)
    return "".join(shell), "".join(shown)


def substitute(text: str, pattern: re.Pattern[str], values: Mapping[str, str]) -> str:
    """Plain textual substitution, for values that never meet a shell (workingDir)."""
    return pattern.sub(lambda m: values[m[1] or m[2]], text)


def as_text(value: Any) -> str:
    """A variable's string form; a filePathList list becomes space-separated paths."""
    if isinstance(value, list):
        return " ".join(map(str, value))
    return str(value)
