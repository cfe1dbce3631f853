"""The expert view of the last reply: a layer x expert heat map, the experts each token went to, and a
comparison of two adapters on the same prompt (which experts gained or lost traffic).

The comparison re-answers the prompt greedily with both adapters (in the app's worker), so the
difference is the adapter's and not sampling noise.
"""

from __future__ import annotations

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import Label, OptionList, Static

from engine.serve.experts import ExpertTrace
from engine.text import plural


def heatmap(grid: list[list[float]], signed: bool = False) -> Text:
    """One cell per expert, one row per layer; brightness is traffic share (or gain/loss when signed)."""
    out = Text("layer " + "".join(str(e % 10) for e in range(len(grid[0]))) + "\n", style="dim")
    top = max((abs(v) for row in grid for v in row), default=0.0) or 1.0
    for i, row in enumerate(grid):
        out.append(f"{i:>5} ", style="dim")
        for v in row:
            level = abs(v) / top
            if signed:
                color = "green" if v > 0 else "red"
                out.append("█" if level > 0.5 else "▓" if level > 0.2 else "·", style=color if level > 0.2 else "dim")
            else:
                shade = int(40 + 215 * level)
                out.append("█", style=f"rgb({shade // 3},{shade // 2},{shade})" if v > 0 else "rgb(30,30,30)")
        out.append("\n")
    return out


class ExpertsScreen(ModalScreen):
    BINDINGS = [Binding("escape", "dismiss(None)", "close"), Binding("c", "compare", "compare with another adapter")]

    class CompareRequested(Message):
        def __init__(self, prompt: str, adapter: str) -> None:
            super().__init__()
            self.prompt, self.adapter = prompt, adapter

    def __init__(self, prompt: str, adapter: str, trace: ExpertTrace, tokens: list[str]) -> None:
        super().__init__()
        self.prompt, self.adapter, self.trace, self.tokens = prompt, adapter, trace, tokens

    def compose(self) -> ComposeResult:
        t = self.trace
        with VerticalScroll(classes="dialog"):
            yield Label(f"Experts · {self.adapter} · top-{t.top_k} of {t.num_experts} · {t.num_layers} layers · "
                        f"{plural(len(t.indices), 'token')}", markup=False)
            yield Static(heatmap(t.usage()), id="heatmap")
            yield Label("Tokens (Up/Down): experts per layer for the selected token")
            yield OptionList(*[Text(repr(x)[1:-1] or "·") for x in self.tokens[: len(t.indices)]], id="tokens")
            yield Static("", id="token-experts")
            yield Static("c compares with another adapter · Esc closes", classes="hint", id="compare-hint")
            yield Static("", id="shift")

    def on_mount(self) -> None:
        if self.trace.indices:
            self.query_one(OptionList).highlighted = 0

    @on(OptionList.OptionHighlighted, "#tokens")
    def _token(self, event: OptionList.OptionHighlighted) -> None:
        i = event.option_index
        lines = [f"layer {layer:>2}: " + "  ".join(f"e{e} {w:.2f}" for e, w in zip(chosen, weights, strict=True))
                 for layer, (chosen, weights) in enumerate(zip(self.trace.indices[i], self.trace.weights[i],
                                                               strict=True))]
        self.query_one("#token-experts", Static).update("\n".join(lines))

    def action_compare(self) -> None:
        self.query_one("#compare-hint", Static).update("comparing… (the prompt is answered again by both)")
        self.post_message(self.CompareRequested(self.prompt, self.adapter))

    def show_shift(self, a: str, b: str, shift: list[list[float]]) -> None:
        text = Text(f"{b} vs {a}: green gained traffic, red lost\n")
        text.append_text(heatmap(shift, signed=True))
        self.query_one("#shift", Static).update(text)
        self.query_one("#compare-hint", Static).update("c compares again · Esc closes")
