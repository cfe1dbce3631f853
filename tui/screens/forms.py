"""Modal screens: help, settings, engine log, new training run, feedback on a reply.

Each returns its result through `dismiss`, so the app stays the one place that calls the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Markdown, RichLog, Select, Static, TextArea

from engine import names
from engine import settings as st
from engine.text import plain

HELP = """\
# Tandem keys

| key | what |
| --- | --- |
| **Enter** | send the prompt (typed before the model is ready: it waits) |
| **Up / Down** (in the prompt) | prompt history |
| **Esc** | stop the reply being generated |
| **F2 F3 F4 F5** | chat · specialists · training · GPUs (on a small terminal they are tabs) |
| **Ctrl+N** | new conversation |
| **Ctrl+R** | reasoning level: low → medium → high |
| **Ctrl+G** | sampling preset: balanced → creative → precise (greedy) |
| **Ctrl+T** | show or hide the reasoning (analysis channel) |
| **Ctrl+F** | feedback on the last reply: rate 1–5, correct it, mark it good |
| **Ctrl+O** | settings (settings.toml) |
| **Ctrl+L** | engine log |
| **F7** | A/B: the last prompt answered by two adapters side by side; **1**/**2**/**=** stores your pick |
| **F8** | learning report: ratings, corrections, speed, usage, router confidence |
| **F9** | why the last route: top score, runner-up, nearest example; **1**-**9**/**n** correct it |
| **F6** | expert view of the last reply: layer × expert heat map, per-token experts, **c** compare |
| **F10** | serve the OpenAI-compatible API ([api] in settings.toml) from this app, or stop it |
| **Ctrl+P** | command palette: every action |
| **F1** | this help |
| **Ctrl+Q** | quit (training runs keep going) |

**Specialists panel**: Enter pins the highlighted adapter, **b** base, **a** auto (router), **1–9** pin,
**u** rolls the highlighted specialist back to its previous version.
**Training panel**: **n** new specialist, **e** experiment (variants of a specialist; the best is promoted),
**x** experiments (comparison table, loss curves overlaid), **s** stop, **r** resume, Up/Down select a run.
The panel's first line says what the training GPU does and why (with `learning.idle_after_minutes` or
`learning.nightly_window` it takes pending retrains and experiments by itself; your runs go first).
"""


class Dismissable(ModalScreen):
    BINDINGS = [Binding("escape", "dismiss(None)", "close")]


class HelpScreen(Dismissable):
    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog tall"):
            with VerticalScroll(classes="dialog-body"):
                yield Markdown(HELP)
            yield Static("Esc closes · Up/Down/PgUp/PgDn scroll", classes="hint")  # below the scroll: always seen


class LogScreen(Dismissable):
    def __init__(self, lines: list[str]) -> None:
        super().__init__()
        self.lines = lines

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("Engine log (Esc closes)")
            log = RichLog(id="log", wrap=True, markup=False)
            yield log

    def on_mount(self) -> None:
        log = self.query_one(RichLog)
        for line in self.lines or ["(nothing logged yet)"]:
            log.write(line)


# The settings a person changes from the app; the rest stays in the file.
EDITABLE = [
    ("model.name", "base model (hub id or folder; empty = demo)"),
    ("gpus.inference", "inference GPU"),
    ("gpus.training", "training GPU"),
    ("chat.reasoning", "reasoning (low/medium/high)"),
    ("chat.temperature", "temperature"),
    ("chat.top_p", "top_p"),
    ("chat.max_new_tokens", "max new tokens"),
    ("chat.instructions", "developer instructions"),
    ("adapters.mode", "specialist (auto, base or a name)"),
    ("adapters.router_threshold", "router threshold"),
    ("adapters.vram_budget_mb", "adapter VRAM budget (MB)"),
    ("training.default_profile", "default training profile"),
    ("learning.retrain_every", "retrain after N examples"),
    ("learning.idle_after_minutes", "idle minutes before background work"),
    ("learning.nightly_window", "nightly window (HH:MM-HH:MM)"),
]


def _get(s: st.Settings, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(s, section), name)


class SettingsScreen(Dismissable):
    """Edits settings.toml. Every field is validated together on save; nothing is written on error. The
    fields scroll; the error line and the buttons stay in view below them at any terminal size. A file
    changed on disk since it was read is not overwritten: Reload reads it again (the edits are lost)."""

    BINDINGS = [Binding("ctrl+s", "save", "save")]

    def __init__(self, settings: st.Settings) -> None:
        super().__init__()
        self.settings = settings

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog tall"):
            yield Label(f"Settings · {plain(self.settings.source)}", markup=False)
            with VerticalScroll(classes="dialog-body"):
                for key, label in EDITABLE:
                    with Horizontal(classes="field"):
                        yield Label(label, classes="field-label")
                        yield Input(str(_get(self.settings, key)), id=key.replace(".", "--"))
            yield Static("", id="settings-error")
            with Horizontal(classes="buttons"):
                yield Button("Save (Ctrl+S)", id="save", variant="primary")
                reload = Button("Reload from disk", id="reload")
                reload.display = False  # offered when the file changed under us
                yield reload
                yield Button("Cancel (Esc)", id="cancel")

    @on(Button.Pressed, "#save")
    def action_save(self) -> None:
        s = self.settings
        try:
            for key, _ in EDITABLE:
                text = self.query_one(f"#{key.replace('.', '--')}", Input).value
                if str(_get(s, key)) != text:
                    s = st.updated(s, key, text)
        except st.SettingsError as e:
            self.show_error(str(e))
            return
        self.query_one("#save", Button).disabled = True
        self.write(s)

    @work(thread=True, exclusive=True, exit_on_error=False)
    def write(self, s: st.Settings) -> None:
        """The file is read back, compared, written and fsynced: disk work, off the event loop."""
        try:
            st.save(s)
        except st.SettingsChanged as e:
            self.app.call_from_thread(self._refused, f"{e}. Reload discards the edits here.", True)
        except (st.SettingsError, OSError) as e:
            self.app.call_from_thread(self._refused, str(e), False)
        else:
            self.app.call_from_thread(self.dismiss, s)

    def _refused(self, text: str, changed_on_disk: bool) -> None:
        self.query_one("#save", Button).disabled = False
        self.show_error(text)
        self.query_one("#reload").display = changed_on_disk

    def show_error(self, text: str) -> None:
        error = self.query_one("#settings-error", Static)
        error.update(Text(plain(text), style="red"))
        error.scroll_visible()

    @on(Button.Pressed, "#reload")
    def _reload(self) -> None:
        try:
            self.settings = st.load(self.settings.source)
        except st.SettingsError as e:
            self.show_error(str(e))
            return
        for key, _ in EDITABLE:
            self.query_one(f"#{key.replace('.', '--')}", Input).value = str(_get(self.settings, key))
        self.query_one("#reload").display = False
        self.query_one("#settings-error", Static).update(Text("reloaded from disk", style="green"))

    @on(Button.Pressed, "#cancel")
    def _cancel(self) -> None:
        self.dismiss(None)


def start_or_cancel() -> ComposeResult:
    """How every form that starts training ends: its error line, then Start and Cancel."""
    yield Static("", id="run-error")
    with Horizontal(classes="buttons"):
        yield Button("Start (Ctrl+S)", id="start", variant="primary")
        yield Button("Cancel (Esc)", id="cancel")


@dataclass
class NewRun:
    task: str
    data: str
    profile: str


def profile_line(name: str, p: st.Profile, seconds_per_step: float | None) -> str:
    """What a training profile does, in one line: steps, data, rank, and the time it should take."""
    when = (f"about {_duration(p.max_steps * seconds_per_step)} at the last run's pace"
            if seconds_per_step else "time: no run measured on this machine yet")
    return f"{name}: {p.max_steps} steps on up to {p.max_samples} samples, LoRA rank {p.rank} · {when}"


def _duration(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m // 60} h {m % 60:02d} min" if m >= 60 else f"{m} min {s:02d} s" if m else f"{s} s"


class NewRunScreen(Dismissable):
    BINDINGS = [Binding("ctrl+s", "start", "start")]

    def __init__(self, profiles: dict[str, st.Profile], default_profile: str, default_data: str = "",
                 seconds_per_step: float | None = None) -> None:
        super().__init__()
        self.profiles, self.default_profile, self.default_data = profiles, default_profile, default_data
        self.seconds_per_step = seconds_per_step

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("New specialist")
            yield Input(placeholder="task name, e.g. math", id="task")
            yield Input(self.default_data, placeholder="data: a .jsonl/.json/.parquet/.csv path or owner/dataset",
                        id="data")
            yield Select([(Text(f"{name} · {p.max_steps} steps"), name) for name, p in sorted(self.profiles.items())],
                         value=self.default_profile, allow_blank=False, id="profile")
            yield Static(self._about(self.default_profile), id="profile-about", markup=False)
            yield from start_or_cancel()

    @on(Input.Submitted)
    @on(Button.Pressed, "#start")
    def action_start(self) -> None:
        task = self.query_one("#task", Input).value.strip()
        data = self.query_one("#data", Input).value.strip()
        if not task or not data:
            self.show_error("task and data are both needed")
            return
        try:
            names.check(task, "task name")  # the run queue's rule, checked here so the form stays open
        except names.InvalidName as e:
            self.show_error(str(e))
            return
        self.dismiss(NewRun(task, data, str(self.query_one("#profile", Select).value)))

    def _about(self, name: object) -> str:
        p = self.profiles.get(str(name))
        return profile_line(str(name), p, self.seconds_per_step) if p else ""

    @on(Select.Changed, "#profile")
    def _profile_chosen(self, event: Select.Changed) -> None:
        self.query_one("#profile-about", Static).update(self._about(event.value))

    def show_error(self, text: str) -> None:
        self.query_one("#run-error", Static).update(Text(text, style="red"))

    @on(Button.Pressed, "#cancel")
    def _cancel(self) -> None:
        self.dismiss(None)


@dataclass
class Feedback:
    rating: int | None = None
    correction: str | None = None
    good: bool = False


class FeedbackScreen(Dismissable):
    """Rate the last reply (1-5), write the reply you wanted, or mark it as a good example."""

    BINDINGS = [
        *[Binding(str(i), f"rate({i})", f"rate {i}", show=False) for i in range(1, 6)],
        Binding("g", "good", "good example"),
        Binding("c", "correct", "write a correction"),
        Binding("ctrl+s", "save_correction", "save correction"),
    ]

    def __init__(self, prompt: str, final: str) -> None:
        super().__init__()
        self.prompt, self.final = prompt, final

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("Feedback on the last reply")
            yield Static(Text.assemble(("You: ", "bold"), self.prompt, "\n", ("Reply: ", "bold"), self.final[:400]),
                         id="feedback-reply")
            yield Static("1–5 rate · g good example · c write the reply you wanted · Esc close", classes="hint")
            area = TextArea(self.final, id="correction")
            area.display = False
            area.can_focus = False  # keys rate the reply until the user asks to write a correction
            yield area
            yield Static("", classes="hint", id="correction-hint")

    def action_rate(self, n: int) -> None:
        if not self.query_one(TextArea).display:
            self.dismiss(Feedback(rating=n))

    def action_good(self) -> None:
        if not self.query_one(TextArea).display:
            self.dismiss(Feedback(good=True))

    def action_correct(self) -> None:
        area = self.query_one(TextArea)
        area.display = area.can_focus = True
        area.focus()
        self.query_one("#correction-hint", Static).update("Ctrl+S saves the correction · Esc cancels")

    def action_save_correction(self) -> None:
        area = self.query_one(TextArea)
        if area.display and area.text.strip():
            self.dismiss(Feedback(correction=area.text.strip()))
