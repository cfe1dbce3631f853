"""Reading the JSON files Tandem writes (manifests, run records): a damaged one is a one-line error
that names the file and the line, in the error class of whoever reads it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json(path: Path, error: type[Exception], shown: str | None = None) -> Any:
    """The parsed file; `error` with the file (as `shown`, default its path) and what is wrong."""
    name = shown or str(path)
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        raise error(f"missing {name}") from None
    except json.JSONDecodeError as e:
        raise error(f"{name}: bad JSON at line {e.lineno}: {e.msg}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{name}: unreadable ({type(e).__name__}: {e})") from None
