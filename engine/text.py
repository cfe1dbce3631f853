"""Text that is safe to print on a terminal.

Stored text (prompts, replies, task names, errors from runs) came from people and models. Printed raw,
an escape sequence in it can recolour, move the cursor, retitle the window or hide what follows, and a
carriage return or a bidi override can make a line read differently from what it holds. `plain`
removes escape sequences and shows every other control character as a visible `\\xNN` escape.
"""

from __future__ import annotations

import json
import re
import unicodedata
from typing import Any

# ESC-led sequences (CSI, OSC, DCS/SOS/PM/APC strings, two-byte escapes) and the 8-bit CSI/OSC forms.
_SEQUENCE = re.compile(
    r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]?"  # CSI: colours, cursor moves, erase
    r"|(?:\x1b[\]PX^_]|[\x9d\x90\x98\x9e\x9f])[^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"  # OSC/DCS/...: titles, links
    r"|\x1b[ -/]*[0-~]?"  # any other escape
)
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _visible(c: str, newlines: bool) -> str:
    if (c == "\n" and newlines) or c == "\t":
        return c
    if unicodedata.category(c) in ("Cc", "Zl", "Zp") or c in _BIDI:
        return f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"
    return c


def plain(text: object, newlines: bool = True) -> str:
    """`text` as printable characters only. With newlines=False a line break shows as `\\x0a`, so one
    stored value stays on one output line."""
    s = _SEQUENCE.sub("", str(text))
    return "".join(_visible(c, newlines) for c in s)


def line(text: object) -> str:
    """`plain` on one line: for tables and lists."""
    return plain(text, newlines=False)


_JSON_UNSAFE = re.compile("[\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\u2028\u2029]")


def json_text(obj: object, **kw: object) -> str:
    """`json.dumps` that keeps non-ASCII text readable but escapes what a terminal would act on (JSON
    already escapes C0 controls; C1 controls and bidi marks become `\\uXXXX`, still valid JSON)."""
    dumped = json.dumps(obj, ensure_ascii=False, **kw)
    return _JSON_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", dumped)


def plain_all(obj: Any) -> Any:
    """`plain` on every string inside dicts (keys too), lists and tuples: a record read from disk or a
    run, made safe to show in one step."""
    if isinstance(obj, str):
        return plain(obj)
    if isinstance(obj, dict):
        return {plain_all(k): plain_all(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(plain_all(x) for x in obj)
    return obj


def plural(n: int, one: str, many: str | None = None) -> str:
    """'1 token', '2 tokens': a count with its noun in the right number."""
    return f"{n} {one if n == 1 else many or one + 's'}"
