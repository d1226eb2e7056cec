"""repeatUntil conditions: parsed with ast, only comparisons, and/or/not, constants and
``$variables`` allowed, and evaluated without eval."""

from __future__ import annotations

import ast
import contextlib
import operator
import re
from collections.abc import Callable, Mapping
from typing import Any

from apsdm.dm.errors import InvalidArgument

_ANY_VAR_RE = re.compile(r"\$(?:\{([A-Za-z_]\w*)\}|([A-Za-z_]\w*))")
_PLACEHOLDER_RE = re.compile(r"__dmv_(\d+)__")

_COMPARE: dict[type[ast.cmpop], Callable[[Any, Any], Any]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
}
_ALLOWED_NODES = (
    ast.Expression,
    ast.Compare,
    ast.BoolOp,
    ast.UnaryOp,
    ast.Constant,
    ast.Name,
    ast.Load,
    ast.And,
    ast.Or,
    ast.Not,
    ast.USub,
    ast.UAdd,
    *_COMPARE,
)


def parse_condition(expression: str) -> tuple[ast.Expression, list[str]]:
    """Parse a repeatUntil expression, each ``$var`` replaced by the placeholder
    ``__dmv_<n>__`` (n indexes the returned names); only safe node types pass."""
    names: list[str] = []

    def placeholder(match: re.Match[str]) -> str:
        names.append(match[1] or match[2])
        return f"__dmv_{len(names) - 1}__"

    text = _ANY_VAR_RE.sub(placeholder, expression.strip())
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        raise InvalidArgument(f"repeatUntil {expression!r} is not valid: {exc.msg}") from None
    for node in ast.walk(tree):
        if not isinstance(node, _ALLOWED_NODES):
            raise InvalidArgument(
                f"repeatUntil {expression!r} uses {type(node).__name__}; only comparisons, "
                "and/or/not, constants and $variables are allowed."
            )
        if isinstance(node, ast.Name) and _placeholder_name(node.id, names) is None:
            raise InvalidArgument(
                f"repeatUntil {expression!r}: bare name {node.id!r}; write ${node.id} or quote it."
            )
    return tree, names


def evaluate_condition(expression: str, values: Mapping[str, str]) -> bool:
    """Evaluate a repeatUntil expression without eval: $vars in strings are substituted,
    a bare $var is its value (a number if it reads as one)."""
    tree, names = parse_condition(expression)
    try:
        return bool(_eval(tree.body, names, values))
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"cannot evaluate repeatUntil {expression!r}: {exc}") from None


def _eval(node: ast.AST, names: list[str], values: Mapping[str, str]) -> Any:
    """Evaluate one node of a tree already checked by parse_condition."""
    match node:
        case ast.Constant(value=str() as text):
            return _PLACEHOLDER_RE.sub(lambda m: _in_string(m, names, values), text)
        case ast.Constant(value=value):
            return value
        case ast.Name(id=placeholder):
            name = _placeholder_name(placeholder, names) or ""
            if name not in values:
                raise ValueError(f"unknown variable ${name}")
            return _typed(values[name])
        case ast.UnaryOp(op=ast.Not(), operand=operand):
            return not _eval(operand, names, values)
        case ast.UnaryOp(op=ast.USub(), operand=operand):
            return -_eval(operand, names, values)
        case ast.UnaryOp(operand=operand):
            return +_eval(operand, names, values)
        case ast.BoolOp(op=op, values=operands):
            result: Any = None
            for operand in operands:
                result = _eval(operand, names, values)
                if bool(result) == isinstance(op, ast.Or):
                    break
            return result
        case ast.Compare(left=left, ops=ops, comparators=comparators):
            a = _eval(left, names, values)
            for op, right in zip(ops, comparators, strict=True):
                b = _eval(right, names, values)
                if not _COMPARE[type(op)](a, b):
                    return False
                a = b
            return True
    raise ValueError(f"unsupported expression {type(node).__name__}")


def _placeholder_name(text: str, names: list[str]) -> str | None:
    """The variable a ``__dmv_<n>__`` placeholder stands for (None if it is not one)."""
    match = _PLACEHOLDER_RE.fullmatch(text)
    return names[int(match[1])] if match and int(match[1]) < len(names) else None


def _in_string(match: re.Match[str], names: list[str], values: Mapping[str, str]) -> str:
    """A placeholder inside a string constant: the value; an unknown variable stays ``$name``."""
    name = _placeholder_name(match[0], names)
    return match[0] if name is None else values.get(name, "$" + name)


def _typed(text: str) -> Any:
    """A variable's value as a number or bool when it reads as one, else the string."""
    for convert in (int, float):
        with contextlib.suppress(ValueError):
            return convert(text)
    return {"True": True, "False": False}.get(text, text)
