"""The `tandem` command: the workstation when run bare, the engine's headless commands otherwise.

It lives in tui/ so that engine/ never imports the app: the engine's CLI takes the app as a callback.
"""

from __future__ import annotations

import argparse
import sys

from engine import cli
from engine.settings import Settings


def run_app(settings: Settings, _args: argparse.Namespace) -> int:
    print(f"tandem: starting the workstation ({settings.source})…", file=sys.stderr, flush=True)  # no silent wait
    from tui.app import TandemApp

    TandemApp(settings).run()
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.main(argv, ui=run_app)


if __name__ == "__main__":
    sys.exit(main())
