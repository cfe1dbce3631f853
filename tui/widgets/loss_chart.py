"""A loss curve drawn with text: training loss (•), eval loss (◆), and the target bands.

The bands are horizontal rules at the overfit, target and underfit levels from settings, so a person
sees at a glance whether the curve is heading into the good zone; a legend under it says which is which.
"""

from __future__ import annotations

from rich.text import Text
from textual.widget import Widget


class LossChart(Widget):
    DEFAULT_CSS = "LossChart { height: 10; }"

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.loss: list[tuple[int, float]] = []
        self.eval: list[tuple[int, float]] = []
        self.total = 1
        self.bands = (0.3, 0.5, 1.0)  # overfit below, target, underfit above

    def plot(self, loss: list[tuple[int, float]], eval_loss: list[tuple[int, float]], total: int,
             bands: tuple[float, float, float]) -> None:
        self.loss, self.eval, self.total, self.bands = loss, eval_loss, max(total, 1), bands
        self.refresh()

    def render(self) -> Text:
        width = max(self.size.width - 7, 10)
        height = max(self.size.height - 1, 3)  # the last row is the legend
        values = [v for _, v in self.loss + self.eval] + list(self.bands)
        if not self.loss and not self.eval:
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
        for points, mark, style in ((self.loss, "•", "bold cyan"), (self.eval, "◆", "bold magenta")):
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
        return Text.assemble(("• train", "bold cyan"), " ", ("◆ eval", "bold magenta"), " loss  ┄ ",
                             (f"overfit <{over:g}", "yellow"), " ", (f"target {target:g}", "green"), " ",
                             (f"underfit >{under:g}", "red"))
