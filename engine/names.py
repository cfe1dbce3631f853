"""The one rule for names a person gives Tandem: tasks, adapters, imports and run ids.

A name becomes a folder (`adapters/<name>`, `.versions/<name>`), a router class, a table cell and a
line on the terminal, so it is a short slug checked once, at the boundary where it comes in (the CLI,
the app's forms, the run queue, the learning loop, the store), before any work starts. Paths built
from names are resolved and must stay inside their root, symlinks included.
"""

from __future__ import annotations

import re
from pathlib import Path

MAX_LEN = 64
_SLUG = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_LEN - 1}}}")
# the router's choices and its correction label: an adapter of such a name could never be pinned or corrected to
RESERVED = frozenset({"auto", "base", "none"})
RULE = f"1-{MAX_LEN} letters, digits, '.', '_' or '-', starting with a letter or digit, no '..'"


class InvalidName(ValueError):
    """A name breaks the rule, or a path built from one leaves its folder. One line, for the user."""


def shown(text: str, limit: int = 40) -> str:
    """A user's string quoted for an error message: control characters escaped, long ones cut."""
    return repr(text[:limit]) + ("…" if len(text) > limit else "")


def check(name: object, what: str = "name") -> str:
    """`name` if it is a safe slug (not auto/base), else InvalidName saying what was expected."""
    if not isinstance(name, str):
        raise InvalidName(f"{what} must be text, got {type(name).__name__}")
    if not _SLUG.fullmatch(name) or ".." in name or name.lower() in RESERVED:
        raise InvalidName(f"{what} {shown(name)}: use {RULE}; not 'auto', 'base' or 'none'")
    return name


def is_valid(name: object) -> bool:
    try:
        check(name)
    except InvalidName:
        return False
    return True


def inside(root: Path, *parts: str) -> Path:
    """`root/parts` with symlinks resolved; InvalidName when that lands outside `root`."""
    base = Path(root).resolve()
    path = base.joinpath(*parts).resolve()
    if path != base and base not in path.parents:
        raise InvalidName(f"{base.joinpath(*parts)} leads outside {base} (to {path})")
    return path
