"""A loss curve drawn with text: training loss (•), eval loss (◆), and the target bands.

The bands are horizontal rules at the overfit, target and underfit levels from settings, so a person
sees at a glance whether the curve is heading into the good zone; a legend under it says which is which.
`overlay` draws several runs' curves on one scale instead (an experiment's variants), each with its own
mark and colour.
"""

from __future__ import annotations

from rich.text import Text
from textual.widget import Widget

SERIES_STYLES = (("•", "bold cyan"), ("◆", "bold magenta"), ("▲", "bold green"), ("■", "bold yellow"),
                 ("★", "bold red"), ("●", "bold blue"))


class LossChart(Widget):
    DEFAULT_CSS = "LossChart { height: 10; }"

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.series: list[tuple[list[tuple[int, float]], str, str]] = []  # points, mark, style
        self.names: list[str] = []  # what each series is, for the legend (an overlay's caller names its runs)
        self.total = 1
        self.bands = (0.3, 0.5, 1.0)  # overfit below, target, underfit above

    @property
    def loss(self) -> list[tuple[int, float]]:
        """The first curve: the training loss (or an overlay's first run)."""
        return self.series[0][0] if self.series else []

    def plot(self, loss: list[tuple[int, float]], eval_loss: list[tuple[int, float]], total: int,
             bands: tuple[float, float, float]) -> None:
        self.series = [(loss, "•", "bold cyan"), (eval_loss, "◆", "bold magenta")]
        self.names = ["train", "eval loss"]
        self.total, self.bands = max(total, 1), bands
        self.refresh()

    def overlay(self, curves: list[list[tuple[int, float]]], total: int, bands: tuple[float, float, float]) -> None:
        """Several loss curves on one scale, the i-th drawn with SERIES_STYLES[i] (cycled)."""
        self.series = [(c, *SERIES_STYLES[i % len(SERIES_STYLES)]) for i, c in enumerate(curves)]
        self.names = []
        self.total, self.bands = max(total, 1), bands
        self.refresh()

    def render(self) -> Text:
        width = max(self.size.width - 7, 10)
        height = max(self.size.height - 1, 3)  # the last row is the legend
        values = [v for points, _, _ in self.series for _, v in points] + list(self.bands)
        if not any(points for points, _, _ in self.series):
            return Text("no loss yet", style="dim")
        top, bottom = max(values) * 1.05, min(0.0, min(values))
        span = (top - bottom) or 1.0
        grid = [[" "] * width for _ in range(height)]
        styles = [[""] * width for _ in range(height)]

        def row(v: float) -> int:
            return min(height - 1, max(0, round((top - v) / span * (height - 1))))

        for level, style in zip(self.bands, ("yellow", "green", "red"), strict=True):
            r = row(level)
            for c in range(width):
                grid[r][c], styles[r][c] = "┄", f"dim {style}"
        for points, mark, style in self.series:
            for step, v in points:
                c = min(width - 1, int((step - 1) / self.total * width))
                grid[row(v)][c], styles[row(v)][c] = mark, style
        out = Text()
        for r in range(height):
            label = top - r / (height - 1) * span
            out.append(f"{label:5.2f} │", style="dim")
            for c in range(width):
                out.append(grid[r][c], style=styles[r][c] or None)
            out.append("\n")
        return out.append_text(self.legend())

    def legend(self) -> Text:
        """What the marks and the dashed lines mean, under the chart."""
        over, target, under = self.bands
        out = Text()
        for (_, mark, style), name in zip(self.series, self.names, strict=False):
            out.append(f"{mark} {name}", style=style).append(" ")
        return out.append_text(Text.assemble(" ┄ ", (f"overfit <{over:g}", "yellow"), " ",
                                             (f"target {target:g}", "green"), " ", (f"underfit >{under:g}", "red")))
