"""DM's argument encoding: free-text path segments and JSON query values.

The vendor client sends ``repr(b64encode(encodebytes(text)))``, i.e. base64 twice (the
inner pass adds newlines) and the Python bytes repr ``b'...'`` with its quotes, unquoted
in the URL. Decoding accepts that form and the bare base64 some other clients send.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any
from urllib.parse import unquote

from .errors import InvalidArgument


def encode(text: str) -> str:
    """Encode one free-text argument exactly as the vendor client does."""
    return repr(base64.b64encode(base64.encodebytes(text.encode("utf-8"))))


def encode_json(value: Any) -> str:
    """Encode a JSON-valued query parameter (``json.dumps`` with default separators)."""
    return encode(json.dumps(value))


def decode(token: str) -> str:
    """Decode a path segment or query value produced by :func:`encode` (or bare base64)."""
    text = unquote(token).strip()
    if text.startswith("b'") and text.endswith("'") and len(text) >= 3:
        text = text[2:-1]
    # some HTTP stacks turn '+' into ' ' in query strings: undo that before decoding
    text = text.replace(" ", "+")
    try:
        inner = base64.b64decode(text, validate=True)
        return base64.b64decode(inner).decode("utf-8")
    except (binascii.Error, ValueError) as exc:
        raise InvalidArgument(f"argument is not DM-encoded: {token[:60]!r}") from exc


def decode_json(token: str) -> Any:
    """Decode a JSON-valued argument; broken JSON is an ``InvalidArgument``."""
    text = decode(token)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"argument is not valid JSON: {exc.msg}") from exc
    except RecursionError:
        raise InvalidArgument("argument is JSON nested too deeply") from None
