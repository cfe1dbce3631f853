"""Drives the real app headless (Pilot) against the real engine and the real NVML, and prints what the
GPU panel and a streamed reply showed. Used on the GPU box to check what tests can only mock here.

    python bench/tui_check.py [SVG_OUT]
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent)]


async def main(svg: str | None) -> None:
    from engine.settings import load
    from tui.app import TandemApp

    app = TandemApp(load(), poll_s=1.0)
    started = time.monotonic()
    async with app.run_test(size=(160, 48)) as pilot:
        interactive = time.monotonic() - started
        while not app.service.ready and not app.load_error:
            await pilot.pause(0.2)
        print(f"app interactive after {interactive:.2f} s; model ready after {time.monotonic() - started:.1f} s")
        await pilot.pause(2.5)  # a few NVML polls for the sparklines
        for card in app.query(".gpu-text"):
            print("GPU panel:\n" + str(card.render()))
        await pilot.press(*"What is 2+2?", "enter")
        while app.generating or app.query_one("ChatPanel").last_reply is None or app.pending:
            await pilot.pause(0.2)
        reply = app.query_one("ChatPanel").last_reply
        print("reply:", reply.meta.line(), "| final:", repr(reply.final[:80]))
        if svg:
            app.save_screenshot(svg)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else None))
