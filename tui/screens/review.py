"""A/B comparison of two adapters on one prompt, and the learning report.

The comparison answers the prompt with both (greedy, in the app's worker) side by side; the user's pick
(1, 2, or = for a tie) is stored as a preference in the history.
"""

from __future__ import annotations

from typing import Any

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Label, Markdown, Static

from engine.text import plural
from tui.screens.forms import Dismissable


class CompareScreen(Dismissable):
    BINDINGS = [
        Binding("1", "pick('a')", "left is better"),
        Binding("2", "pick('b')", "right is better"),
        Binding("equals_sign", "pick('tie')", "tie"),
    ]

    def __init__(self, prompt: str, a: str, b: str) -> None:
        super().__init__()
        self.prompt, self.a, self.b = prompt, a, b
        self.replies: dict[str, str] = {}

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(f"A/B · {self.prompt[:70]}", markup=False)
            with Horizontal(id="ab"):
                for side, name in (("a", self.a), ("b", self.b)):
                    with VerticalScroll(classes="ab-side"):
                        yield Label(f"{'1' if side == 'a' else '2'} · {name}", markup=False)
                        yield Markdown("answering…", id=f"ab-{side}")
            yield Static("1 left better · 2 right better · = tie · Esc close", classes="hint", id="ab-hint")

    def show(self, side: str, text: str) -> None:
        self.replies[side] = text
        self.query_one(f"#ab-{side}", Markdown).update(text or "_(empty)_")

    def action_pick(self, choice: str) -> None:
        if len(self.replies) == 2:
            self.dismiss(choice)


def report_markdown(r: dict[str, Any]) -> str:
    """The learning report as Markdown: counts with their nouns, a rate next to its count."""
    share = f" ({r['corrections'] / r['turns']:.1%} of turns)" if r["turns"] else ""
    lines = [f"# Learning report\n\n{plural(r['turns'], 'turn')} · mean rating {r['mean_rating'] or '-'} "
             f"({r['rated']} rated) · {plural(r['corrections'], 'corrected reply', 'corrected replies')}{share} · "
             f"{plural(r['preferences'], 'A/B pick')}\n",
             "**Usage:** " + (", ".join(f"{k} {v}" for k, v in r["usage"].items()) or "none yet") + "\n",
             "**Preference pairs** (A/B picks + corrections, what a preference run learns from): "
             + (", ".join(f"{k} {v['picks']} + {v['corrections']}" for k, v in r.get("pairs", {}).items())
                or "none yet") + "\n",
             "| day | turns | rating | correction rate | tok/s | router confidence |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for d in r["days"][-14:]:
        lines.append(f"| {d['day']} | {d['turns']} | {d['mean_rating'] or '-'} | {d['correction_rate']} | "
                     f"{d['tokens_per_s'] or '-'} | {d['router_confidence'] or '-'} |")
    return "\n".join(lines)


class ReportScreen(Dismissable):
    def __init__(self, data: dict[str, Any]) -> None:
        super().__init__()
        self.data = data

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog tall"):
            with VerticalScroll(classes="dialog-body"):
                yield Markdown(report_markdown(self.data))
            yield Static("Esc closes", classes="hint")
