"""Tandem's Textual app: chat, specialist switcher, training and GPU panels over one engine.

The app owns no model state: it maps its messages to `engine.service.Workstation` (the engine, run
queue, adapter store, history and learner) from thread workers and shows what comes back. Slow things
never run on the event loop: the model load, every reply, NVML polls and reading training runs all
happen in workers that hand results back with messages or `call_from_thread`. A worker that fails is
reported and the app goes on; a screen closed while its worker ran is not an error. Text that came
from disk, runs, adapters or the model is passed through `engine.text` before it is shown.
"""

from __future__ import annotations

import contextlib
import gc
import re
import threading
import time
from collections import deque
from collections.abc import Iterable
from functools import partial
from pathlib import Path
from typing import Any

from textual import on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.css.query import NoMatches
from textual.message import Message
from textual.reactive import reactive
from textual.screen import Screen
from textual.widgets import Footer, Header, Static
from textual.worker import Worker, WorkerState

from engine import settings as st
from engine.service import Workstation
from engine.telemetry import Telemetry
from engine.text import line, plain, plain_all
from tui.screens.experiments import ExperimentsScreen, NewExperiment, NewExperimentScreen
from tui.screens.experts import ExpertsScreen
from tui.screens.forms import (
    Feedback,
    FeedbackScreen,
    HelpScreen,
    LogScreen,
    NewRun,
    NewRunScreen,
    SettingsScreen,
)
from tui.screens.review import CompareScreen, ReportScreen
from tui.screens.route import RouteCorrection, RouteScreen
from tui.widgets.chat import ChatPanel, ReplyMeta
from tui.widgets.gpus import GpuPanel
from tui.widgets.switcher import AdapterRow, SpecialistSwitcher
from tui.widgets.training import RunView, TrainingPanel

PANELS = ("chat", "specialists", "training", "gpus")
NARROW_BELOW = 120  # columns; below this the panels become tabs
PRESETS = {"precise": (0.0, 1.0), "balanced": (0.7, 0.95), "creative": (1.0, 1.0)}  # temperature 0: greedy
REASONING = ("low", "medium", "high")
FLUSH_S = 0.05  # streamed text reaches the screen in batches at most this old
IDLE_TICK_S = 30.0  # how often the idle scheduler may look for work for the training GPU


def background(**kw: Any) -> Any:
    """A thread worker whose failure is reported (`on_worker_state_changed`) instead of ending the app."""
    return work(thread=True, exit_on_error=False, **kw)


# What the palette says of each app action beyond its footer label.
PALETTE_HELP = {
    "help": "every key, in one list",
    **{f"view('{panel}')": f"show the {panel} panel" for panel in PANELS},
    "stop_reply": "stop the reply being generated",
    "new_conversation": "start a new chat",
    "cycle_reasoning": "reasoning level: low, medium, high",
    "cycle_preset": "sampling: balanced, creative, precise (greedy)",
    "toggle_analysis": "show or hide the reasoning channel",
    "feedback": "rate, correct or keep the last reply",
    "settings": "edit settings.toml",
    "show_log": "the engine log",
    "experts": "which experts the last reply used",
    "compare": "the last prompt answered by two adapters",
    "report": "learning report: ratings, corrections, speed, usage",
    "why_route": "why the router chose the last adapter; correct it",
}
# The panels' own keys, for the palette: (title, key, what it does, panel id, panel action).
PANEL_COMMANDS = [
    ("train a new specialist", "n", "task, data and profile; runs on the training GPU", "training", "new"),
    ("stop the selected training run", "s", "the run keeps its checkpoints", "training", "stop"),
    ("resume the selected training run", "r", "from its last checkpoint", "training", "resume"),
    ("roll back the highlighted specialist", "u", "its previous version becomes current", "specialists",
     "rollback"),
    ("answer with the base model", "b", "no specialist until you pick auto", "specialists", "mode('base')"),
    ("let the router pick (auto)", "a", "a specialist per prompt", "specialists", "mode('auto')"),
]


class EngineProgress(Message):
    def __init__(self, text: str, fraction: float) -> None:
        super().__init__()
        self.text, self.fraction = text, fraction


class EngineReady(Message):
    pass


class EngineFailed(Message):
    def __init__(self, error: str) -> None:
        super().__init__()
        self.error = error


class EngineLog(Message):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text


def key_label(key: str) -> str:
    """A binding's key as the help writes it: Ctrl+N, F1, Esc."""
    return "+".join({"escape": "Esc", "ctrl": "Ctrl"}.get(part, part.upper() if len(part) <= 3 else part.title())
                    for part in key.split("+"))


def where_line(s: st.Settings) -> str:
    """Which settings file and data this app uses: another TANDEM_SETTINGS means other specialists."""
    def short(p: Path | None) -> str:
        text = str(p)
        home = str(Path.home())
        return "~" + text[len(home):] if home != "/" and text.startswith(home + "/") else text

    return plain(f"settings {short(s.source)} · specialists {short(s.adapters_dir)} · history {short(s.history_db)}")


def seconds_per_step(runs: list[RunView]) -> float | None:
    """The newest measured training pace, from a run's own ETA (seconds left / steps left)."""
    for rv in runs:
        for m in reversed(rv.metrics):
            left = (m.get("total") or 0) - (m.get("step") or 0)
            if m.get("eta_s") and left > 0:
                return m["eta_s"] / left
    return None


class TandemApp(App):
    TITLE = "Tandem"
    CSS_PATH = "app.tcss"
    BINDINGS = [
        Binding("f1", "help", "help"),
        Binding("f2", "view('chat')", "chat"),
        Binding("f3", "view('specialists')", "specialists"),
        Binding("f4", "view('training')", "training"),
        Binding("f5", "view('gpus')", "GPUs"),
        Binding("escape", "stop_reply", "stop reply", show=False),
        Binding("ctrl+n", "new_conversation", "new chat"),
        Binding("ctrl+r", "cycle_reasoning", "reasoning"),
        Binding("ctrl+g", "cycle_preset", "preset", show=False),
        Binding("ctrl+t", "toggle_analysis", "show reasoning", show=False),
        Binding("ctrl+f", "feedback", "feedback"),
        Binding("ctrl+o", "settings", "settings", show=False),
        Binding("ctrl+l", "show_log", "log", show=False),
        Binding("f6", "experts", "experts"),
        Binding("f7", "compare", "A/B"),
        Binding("f8", "report", "report", show=False),
        Binding("f9", "why_route", "why this route", show=False),
        Binding("f10", "toggle_api", "API server", show=False),
    ]

    view: reactive[str] = reactive("chat")
    reasoning: reactive[str] = reactive("low")
    preset: reactive[str] = reactive("balanced")

    def __init__(self, settings: st.Settings, telemetry: Telemetry | None = None, poll_s: float = 1.0,
                 engine_factory: Any = None) -> None:
        super().__init__()
        self.settings = settings
        self.telemetry = telemetry
        self.poll_s = poll_s
        self.service = Workstation(settings, **({"engine_factory": engine_factory} if engine_factory else {}))
        self.conversation = self.service.new_conversation()
        self.pending: deque[str] = deque()
        self.cancel: threading.Event | None = None
        self.generating = False
        self.log_lines: list[str] = []
        self.reasoning = settings.chat.reasoning
        self.load_error = ""
        self._progress_at, self._progress_line = -1.0, -1  # the last load step logged, and where its line is
        self.polls = {"gpus": 0, "runs": 0}  # results shown so far, per poller (tests wait on these)
        self._closing = False  # set at unmount: workers stop handing results to the loop
        self._idle_at = -IDLE_TICK_S  # when the idle scheduler last ticked (monotonic)

    def notify(self, message: str, *, title: str = "", severity: Any = "information", timeout: float | None = None,
               markup: bool = False) -> None:
        """Notifications carry names, errors and model text: shown as plain text, never as markup."""
        super().notify(plain(message), title=line(title), severity=severity, timeout=timeout, markup=markup)

    def _ui(self, fn: Any, *args: Any, **kwargs: Any) -> None:
        """call_from_thread for workers, quiet when the app is shutting down (a poll finishing while the
        user quits must not turn into an error) or the screen it updates was closed meanwhile."""
        if not self.is_running or self._closing:
            return
        with contextlib.suppress(RuntimeError):
            self.call_from_thread(self._on_screen, fn, *args, **kwargs)

    @staticmethod
    def _on_screen(fn: Any, *args: Any, **kwargs: Any) -> None:
        with contextlib.suppress(NoMatches):  # its screen or widget is gone: nothing left to show it on
            fn(*args, **kwargs)

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        """Every worker that fails lands here: reported in the log and a notification, the app goes on."""
        if event.state != WorkerState.ERROR or isinstance(event.worker.error, NoMatches):
            return
        e = event.worker.error
        self._remember_log(f"{event.worker.name} failed: {type(e).__name__}: {e}")
        self.notify(str(e).splitlines()[0] if str(e).strip() else type(e).__name__,
                    title=f"{event.worker.name.replace('_', ' ')} failed", severity="error")

    # ----- command palette
    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        """Every action with its key: the app's bindings, then the panels' (Ctrl+P reaches them all)."""
        yield from super().get_system_commands(screen)
        for b in self.BINDINGS:
            assert isinstance(b, Binding)
            yield SystemCommand(f"{b.description} ({key_label(b.key)})", PALETTE_HELP.get(b.action, ""),
                                partial(self.run_action, b.action))
        for title, key, help_text, panel, action in PANEL_COMMANDS:
            yield SystemCommand(f"{title} ({key} in {panel.title()})", help_text,
                                partial(self._panel_action, panel, action))

    async def _panel_action(self, panel: str, action: str) -> None:
        self.action_view(panel)
        await self.query_one(f"#{panel}").run_action(action)

    # ----- layout
    def compose(self) -> ComposeResult:
        yield Header(show_clock=False)
        yield Static("", id="tabs")
        with Horizontal(id="main"):
            yield ChatPanel(id="chat")
            with Vertical(id="side"):
                yield SpecialistSwitcher(id="specialists")
                yield TrainingPanel(id="training")
                yield GpuPanel(self.settings.gpus.inference, self.settings.gpus.training, id="gpus")
        yield Static(where_line(self.settings), id="where", markup=False)
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = "loading model…"
        for panel, title in zip(PANELS, ("Chat", "Specialists", "Training", "GPUs"), strict=True):
            self.query_one(f"#{panel}").border_title = title
        self._layout(self.size.width)
        self.query_one(ChatPanel).set_status("Loading the model in the background; you can type already.")
        self.query_one(SpecialistSwitcher).show([], self.settings.adapters.mode, note="waiting for the model…")
        self.load_engine()
        self.poll_gpus()
        self.poll_runs()
        self.set_interval(self.poll_s, self.poll_gpus)
        self.set_interval(self.poll_s, self.poll_runs)
        self.query_one("#prompt").focus()

    def on_resize(self, event) -> None:
        self._layout(event.size.width)

    def _layout(self, width: int) -> None:
        self.set_class(width < NARROW_BELOW, "-narrow")
        self._show_view()

    def _show_view(self) -> None:
        narrow = self.has_class("-narrow")
        for panel in PANELS:
            self.query_one(f"#{panel}").set_class(narrow and panel != self.view, "-hidden")
        self.query_one("#side").set_class(narrow and self.view == "chat", "-hidden")
        self.query_one("#chat").set_class(narrow and self.view != "chat", "-hidden")
        tabs = "  ".join(f"[reverse] F{i + 2} {p} [/reverse]" if p == self.view else f"F{i + 2} {p}"
                         for i, p in enumerate(PANELS))
        self.query_one("#tabs", Static).update(tabs)

    def watch_view(self, _old: str, _new: str) -> None:
        if self.is_mounted:
            self._show_view()

    def action_view(self, panel: str) -> None:
        self.view = panel
        target = {"chat": "#prompt", "specialists": "#adapters", "training": "#runs", "gpus": "#gpus"}[panel]
        self.query_one(target).focus()

    # ----- engine lifecycle
    @background(exclusive=True, group="engine")
    def load_engine(self) -> None:
        try:
            self.service.load(lambda text, frac: self.post_message(EngineProgress(text, frac)),
                              lambda text: self.post_message(EngineLog(text)),
                              lambda _changes: self._ui(self.refresh_switcher))
        except Exception as e:  # a model that fails to load must not take the app down
            self.post_message(EngineFailed(f"{type(e).__name__}: {e}"))
            return
        self.post_message(EngineReady())

    @on(EngineProgress)
    def _engine_progress(self, m: EngineProgress) -> None:
        # a step that counts its own seconds says how far it is; a percentage that holds still looks stuck
        self.sub_title = m.text if re.search(r"\d s\b", m.text) else f"{m.text} ({m.fraction:.0%})"
        if (self._progress_at, len(self.log_lines)) == (m.fraction, self._progress_line):
            self.log_lines.pop()  # the same step repeating its countdown: keep its latest line only
        self._remember_log(m.text)
        self._progress_at, self._progress_line = m.fraction, len(self.log_lines)

    @on(EngineLog)
    def _engine_log(self, m: EngineLog) -> None:
        self._remember_log(m.text)

    @on(EngineFailed)
    def _engine_failed(self, m: EngineFailed) -> None:
        m.error = plain(m.error)
        self.load_error = m.error
        self.sub_title = "model failed to load"
        self._remember_log(f"model failed to load: {m.error}")
        self.query_one(ChatPanel).show_error("Model failed to load:", f"{m.error}\nFix settings (Ctrl+O).")
        self.notify(m.error, title="model failed to load", severity="error", timeout=15)

    @on(EngineReady)
    def _engine_ready(self) -> None:
        if not self.is_running or not self.screen.query(ChatPanel):
            return  # the app quit while the model loaded
        # The model, tokenizer and libraries are hundreds of thousands of long-lived objects; a full
        # garbage collection walking them stalls the event loop for tenths of a second. Freeze them.
        gc.collect()
        gc.freeze()
        info = self.service.model_info()
        self.sub_title = info.line()
        decoder = "fast" if info.decoder == "fast" else "reference"
        self.query_one(GpuPanel).set_serving(f"{info.precision}, {decoder} decoder")
        self._remember_log(f"model ready in {info.load_seconds:.1f} s: {info.name} on {info.device}, "
                           f"{info.precision}, decoder: {info.decoder}")
        self.refresh_switcher()
        self._status()
        if self.pending:
            self.ask(self.pending.popleft())

    def _remember_log(self, text: str) -> None:
        self.log_lines.append(f"{time.strftime('%H:%M:%S')} {plain(text)}")

    def _status(self, extra: str = "") -> None:
        parts = [f"mode {self.service.mode}", f"reasoning {self.reasoning}", f"preset {self.preset}"]
        if self.pending:
            parts.append(f"{len(self.pending)} prompt(s) waiting for the model")
        if extra:
            parts.append(extra)
        self.query_one(ChatPanel).set_status(" · ".join(parts))

    # ----- chat
    @on(ChatPanel.Submitted)
    def _submitted(self, m: ChatPanel.Submitted) -> None:
        chat = self.query_one(ChatPanel)
        chat.add_user(m.prompt)
        if not self.service.ready or self.generating:
            self.pending.append(m.prompt)
            self._status("waiting for the model" if not self.service.ready else "queued after the current reply")
            return
        self.ask(m.prompt)

    def ask(self, prompt: str) -> None:
        self.generating = True
        self.cancel = threading.Event()
        reply = self.query_one(ChatPanel).start_reply(prompt)
        self._status("generating… (Esc stops)")
        self.run_reply(prompt, reply, self.cancel)

    @background(group="chat")
    def run_reply(self, prompt: str, reply: Any, cancel: threading.Event) -> None:
        from engine.serve.chat import Delta, Finished, Routed

        temperature, top_p = PRESETS[self.preset]
        sampling = self.service.sampling(temperature=temperature, top_p=top_p)
        pieces: list[tuple[str, str]] = []
        last = time.monotonic()
        meta = ReplyMeta()
        try:
            for ev in self.service.ask(self.conversation, prompt, reasoning=self.reasoning, sampling=sampling,
                                      cancel=cancel):
                if isinstance(ev, Routed):
                    d = ev.decision
                    meta = ReplyMeta(ev.adapter, d.reason, d.confidence, dropped=ev.dropped, runner_up=d.runner_up,
                                     runner_up_score=d.runner_up_score)
                    reply.turn_id, reply.decision = ev.turn_id, d.as_dict()
                    self._ui(reply.set_meta, meta)
                elif isinstance(ev, Delta):
                    pieces.append((ev.channel, plain(ev.text)))
                    if time.monotonic() - last > FLUSH_S:
                        self._ui(self._flush_reply, reply, pieces)
                        pieces, last = [], time.monotonic()
                elif isinstance(ev, Finished):
                    s = ev.reply.stats
                    meta.ttft_s, meta.tokens_per_s, meta.tokens_out, meta.stop = (
                        s.ttft_s, s.tokens_per_s, s.tokens_out, s.stop)
                    self._ui(self._flush_reply, reply, pieces)
                    self._ui(reply.set_meta, meta)
                    reply.experts = ev.reply.experts
                    reply.tokens = ev.reply.token_texts
        except Exception as e:  # e.g. a prompt that cannot fit the context: say so, give the text back
            self._ui(self.notify, str(e).splitlines()[0] if str(e) else type(e).__name__, title="reply failed",
                     severity="error")
            self.post_message(EngineLog(f"reply failed: {type(e).__name__}: {e}"))
            self._ui(self.query_one(ChatPanel).restore_prompt, prompt)
        finally:
            self._ui(self._reply_done)

    def _flush_reply(self, reply: Any, pieces: list[tuple[str, str]]) -> None:
        if pieces:
            reply.add(pieces)
            self.query_one(ChatPanel).follow()

    def _reply_done(self) -> None:
        self.generating = False
        self.cancel = None
        self._status()
        if self.pending and self.service.ready:
            self.ask(self.pending.popleft())

    def action_stop_reply(self) -> None:
        if self.cancel is not None:
            self.cancel.set()

    def action_new_conversation(self) -> None:
        self.action_stop_reply()
        self.conversation = self.service.new_conversation()
        self.query_one(ChatPanel).clear()
        self._status("new conversation")

    def action_cycle_reasoning(self) -> None:
        self.reasoning = REASONING[(REASONING.index(self.reasoning) + 1) % len(REASONING)]
        self._status()

    def action_cycle_preset(self) -> None:
        names = list(PRESETS)
        self.preset = names[(names.index(self.preset) + 1) % len(names)]
        self._status()

    def action_toggle_analysis(self) -> None:
        chat = self.query_one(ChatPanel)
        chat.show_analysis = not chat.show_analysis

    # ----- specialists
    def refresh_switcher(self) -> None:
        if not self.service.ready or not self.is_running:
            return
        rows = [AdapterRow(line(r.name), line(r.task), r.size_mb, r.final_loss, r.resident, r.active)
                for r in self.service.adapters()]
        self.query_one(SpecialistSwitcher).show(rows, self.service.mode, plain_all(self.service.broken_adapters()),
                                                 gpu=self.service.model_info().device.startswith("cuda"))

    @on(SpecialistSwitcher.ModeChosen)
    def _mode(self, m: SpecialistSwitcher.ModeChosen) -> None:
        try:
            self.service.set_mode(m.mode)
        except Exception as e:
            self.notify(str(e), severity="error")
            return
        self.refresh_switcher()
        self._status()
        self.notify(f"next prompt: {m.mode}", title="specialist", timeout=3)

    @on(SpecialistSwitcher.RollbackRequested)
    def _rollback(self, m: SpecialistSwitcher.RollbackRequested) -> None:
        self.rollback(m.name)

    @background(group="store")
    def rollback(self, name: str) -> None:
        """Moves a whole adapter on disk: never on the event loop."""
        try:
            self.service.rollback(name)
        except Exception as e:
            self._ui(self.notify, str(e), title="roll back", severity="warning")
            return
        self._ui(self.notify, f"{name} rolled back to its previous version", title="specialist")

    def action_why_route(self) -> None:
        reply = self.query_one(ChatPanel).last_reply
        if reply is None or not reply.decision:
            self.notify("no routed reply yet", severity="warning")
            return
        names = [r.name for r in self.service.adapters()]
        self.push_screen(RouteScreen(plain(reply.prompt), plain_all(reply.decision), names), self._route_corrected)

    def _route_corrected(self, correction: RouteCorrection | None) -> None:
        if correction is not None:
            self.correct_route(correction)

    @background(group="route")
    def correct_route(self, c: RouteCorrection) -> None:
        """The correction becomes a router example at once; the next prompt is routed with it."""
        try:
            self.service.correct_route(c.prompt, c.label)
        except Exception as e:
            self._ui(self.notify, str(e), title="route not corrected", severity="error")
            return
        where = "the base model" if c.label in ("none", "base") else c.label
        self._ui(self.notify, f"noted: prompts like this go to {where}", title="router")

    # ----- training
    @background(exclusive=True, group="runs")
    def poll_runs(self) -> None:
        """Read the runs; let the idle scheduler give the training GPU work (every IDLE_TICK_S); tell the
        person what experiments found."""
        try:
            work = None
            if time.monotonic() - self._idle_at >= IDLE_TICK_S:
                self._idle_at = time.monotonic()
                work = self.service.idle_tick()
            views = [RunView(plain_all(r.summary()), plain_all(r.metrics())) for r in reversed(self.service.runs())]
            decided = self.service.newly_decided()
        except Exception as e:
            self.post_message(EngineLog(f"reading training runs failed: {e}"))
            return
        if work is not None:
            self._ui(self.query_one(TrainingPanel).show_work, work.status)
            for run_id in work.started:
                self.post_message(EngineLog(f"{work.status}: started {run_id}"))
        for exp in decided:
            self._ui(self.notify, exp.outcome, title=f"experiment on {exp.task}", timeout=15)
        self._ui(self._show_runs, views)

    def _show_runs(self, views: list[RunView]) -> None:
        panel = self.query_one(TrainingPanel)
        t = self.settings.training
        panel.bands = (t.overfit_below, t.target_loss, t.underfit_above)
        panel.show(views)
        self.polls["runs"] += 1

    @on(TrainingPanel.Action)
    def _run_action(self, m: TrainingPanel.Action) -> None:
        if m.action == "new":
            sample = Path(__file__).resolve().parent.parent / "data" / "samples" / "math.jsonl"
            with contextlib.suppress(ValueError):  # shown relative to where the app was started, if inside
                sample = sample.relative_to(Path.cwd())
            self.push_screen(NewRunScreen(self.settings.training.profiles, self.settings.training.default_profile,
                                          str(sample), seconds_per_step(self.query_one(TrainingPanel).runs)),
                             self._start_run)
        elif m.action == "experiment":
            sft = sorted(n for n, p in self.settings.training.profiles.items() if p.method == "sft")
            default = self.settings.training.default_profile
            self.push_screen(NewExperimentScreen(sft, default if default in sft else sft[0]), self._start_experiment)
        elif m.action == "experiments":
            self.show_experiments()
        else:
            self.change_run(m.action, m.run_id)

    def _start_run(self, new: NewRun | None) -> None:
        if new is not None:
            self.submit_run(new)

    @background(group="runs-actions")
    def submit_run(self, new: NewRun) -> None:
        try:
            run, report = self.service.submit_run(new.task, new.data, new.profile)
        except Exception as e:
            self._ui(self.notify, str(e), title="cannot start training", severity="error", timeout=10)
            return
        self._ui(self.notify, f"{run.id}: {run.state.status} · {report.summary()}", title="training")
        self.poll_runs()

    def _start_experiment(self, new: NewExperiment | None) -> None:
        if new is not None:
            self.start_experiment(new)

    @background(group="runs-actions")
    def start_experiment(self, new: NewExperiment) -> None:
        try:
            exp = self.service.experiment(new.task, new.vary, new.data, new.profile, new.when_idle)
        except Exception as e:
            self._ui(self.notify, str(e), title="cannot start the experiment", severity="error", timeout=10)
            return
        how = "waiting for the training GPU to idle" if new.when_idle else "queued behind your runs"
        self._ui(self.notify, f"{exp.id}: {len(exp.variants)} variants {how}", title="experiment")
        self.poll_runs()

    @background(exclusive=True, group="experiments")
    def show_experiments(self) -> None:
        try:
            experiments = self.service.experiments()
        except Exception as e:
            self._ui(self.notify, str(e), title="experiments", severity="error")
            return
        t = self.settings.training
        self._ui(self.push_screen, ExperimentsScreen(experiments, (t.overfit_below, t.target_loss, t.underfit_above)))

    @background(group="runs-actions")
    def change_run(self, action: str, run_id: str) -> None:
        try:
            run = self.service.change_run(action, run_id)
            self._ui(self.notify, f"{run.id}: {run.state.status}", title=action)
        except Exception as e:
            self._ui(self.notify, str(e), title=f"cannot {action}", severity="error")
        self.poll_runs()

    # ----- GPUs
    @background(exclusive=True, group="gpus")
    def poll_gpus(self) -> None:
        if self.telemetry is None:
            self.telemetry = Telemetry()
        snap = self.telemetry.snapshot()
        self._ui(self._show_gpus, snap)

    def _show_gpus(self, snap: Any) -> None:
        self.query_one(GpuPanel).show(snap)
        self.polls["gpus"] += 1

    # ----- screens
    def action_toggle_api(self) -> None:
        """Serve (or stop serving) the OpenAI-compatible API from this process: clients share the model and
        queue behind what is typed here."""
        if not self.service.ready:
            self.notify("the model is still loading", title="API", severity="warning")
            return
        self.switch_api()

    @background(exclusive=True, group="api")
    def switch_api(self) -> None:
        try:
            if self.service.api_url:
                self.service.stop_api()
                self._ui(self.notify, "stopped", title="API server")
                return
            url = self.service.start_api()
        except Exception as e:  # the exposure rule, a port in use: one line
            self._ui(self.notify, str(e).splitlines()[0] if str(e) else type(e).__name__, title="API not started",
                     severity="error", timeout=10)
            return
        self._ui(self.notify, f"OpenAI-compatible API at {url} · models: auto, base and every specialist · "
                              "F10 stops it", title="API server", timeout=10)

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_show_log(self) -> None:
        self.push_screen(LogScreen(self.log_lines))

    def action_settings(self) -> None:
        self.push_screen(SettingsScreen(self.settings), self._settings_saved)

    def _settings_saved(self, saved: st.Settings | None) -> None:
        if saved is not None:
            self.apply_settings(saved)

    @background(exclusive=True, group="settings")
    def apply_settings(self, saved: st.Settings) -> None:
        """Off the loop: applying may wait for the engine (a budget change reaches the worker's queue)."""
        try:
            applied = self.service.apply_settings(saved)
        except Exception as e:  # e.g. adapters.mode naming an adapter that is not there
            self._ui(self.notify, f"saved, but not applied: {e}", title="settings", severity="warning")
            return
        self._ui(self._settings_applied, saved, applied)

    def _settings_applied(self, saved: st.Settings, applied: Any) -> None:
        self.settings = saved
        if "chat.reasoning" in applied.live:
            self.reasoning = saved.chat.reasoning
        self._status()
        self.refresh_switcher()
        later = f" · at the next start: {', '.join(applied.restart)}" if applied.restart else ""
        self.notify(f"saved · in effect now: {', '.join(applied.live) or 'nothing changed'}{later}", title="settings")

    def action_feedback(self) -> None:
        reply = self.query_one(ChatPanel).last_reply
        if reply is None or reply.turn_id is None:
            self.notify("no reply to give feedback on yet", severity="warning")
            return
        self.push_screen(FeedbackScreen(plain(reply.prompt), reply.final), lambda fb: self._feedback(reply.turn_id, fb))

    def _feedback(self, turn_id: int, fb: Feedback | None) -> None:
        if fb is not None:
            self.give_feedback(turn_id, fb)

    @background(exclusive=True, group="learning")
    def give_feedback(self, turn_id: int, fb: Feedback) -> None:
        """Store the feedback; it may make a specialist due for retraining, which the learner starts."""
        try:
            started = self.service.feedback(turn_id, fb.rating, fb.correction, fb.good)
        except Exception as e:
            self.post_message(EngineLog(f"feedback failed: {e}"))
            self._ui(self.notify, str(e), title="feedback", severity="error")
            return
        said = [f"rated {fb.rating}/5"] if fb.rating is not None else []
        said += ["correction saved; it will teach the specialist"] if fb.correction else []
        said += ["marked as a good example"] if fb.good else []
        self._ui(self.notify, " · ".join(said) or "nothing to save", title="feedback")
        for run_id in started:
            self._ui(self.notify, f"retraining started: {run_id}", title="learning")
        if started:
            self.poll_runs()

    def _other_adapter(self, than: str) -> str | None:
        """What to compare `than` with: the base, or for the base the first specialist."""
        names = [r.name for r in self.service.adapters()]
        return "base" if than != "base" else (names[0] if names else None)

    def action_compare(self) -> None:
        reply = self.query_one(ChatPanel).last_reply
        if reply is None or not self.service.ready:
            self.notify("ask something first", severity="warning")
            return
        a = reply.meta.adapter or "base"
        b = self._other_adapter(a)
        if b is None:
            self.notify("no specialist to compare with yet", severity="warning")
            return
        screen = CompareScreen(plain(reply.prompt), a, b)
        self.push_screen(screen, lambda choice: self._picked(screen, choice))
        self.answer_both(screen)

    @background(exclusive=True, group="experts")
    def answer_both(self, screen: CompareScreen) -> None:
        for side, name in (("a", screen.a), ("b", screen.b)):
            if not screen.is_attached:  # closed before both answers: the second is not worth computing
                return
            self._ui(screen.show, side, plain(self.service.answer_with(screen.prompt, name)))

    def _picked(self, screen: CompareScreen, choice: str | None) -> None:
        if choice is None:
            return
        winner = {"a": screen.a, "b": screen.b}.get(choice, "tie")
        self.store_preference(screen.prompt, screen.a, screen.b, dict(screen.replies), winner)

    @background(group="learning-write")
    def store_preference(self, prompt: str, a: str, b: str, replies: dict[str, str], winner: str) -> None:
        self.service.prefer(prompt, a, b, replies["a"], replies["b"], winner)
        self._ui(self.notify, f"preference stored: {winner}", title="A/B")

    @background(exclusive=True, group="report")
    def action_report(self) -> None:
        """Reads the whole history: off the loop; the screen opens when it is ready."""
        data = plain_all(self.service.report())
        self._ui(self.push_screen, ReportScreen(data))

    def action_experts(self) -> None:
        reply = self.query_one(ChatPanel).last_reply
        if reply is None or reply.experts is None:
            self.notify("no reply with recorded expert routing yet (model.record_experts in settings)",
                        severity="warning")
            return
        self.push_screen(ExpertsScreen(plain(reply.prompt), reply.meta.adapter, reply.experts, plain_all(reply.tokens)))

    @on(ExpertsScreen.CompareRequested)
    def _compare(self, m: ExpertsScreen.CompareRequested) -> None:
        other = self._other_adapter(m.adapter)
        if other is None:
            self.notify("no other adapter to compare with: train or import a specialist", severity="warning")
            return
        self.compare_experts(m.prompt, m.adapter, other)

    @background(exclusive=True, group="experts")
    def compare_experts(self, prompt: str, a: str, b: str) -> None:
        shift = self.service.expert_shift(prompt, a, b)
        screen = self.screen
        if isinstance(screen, ExpertsScreen) and shift is not None:
            self._ui(screen.show_shift, b, a, shift)

    def on_unmount(self) -> None:
        self._closing = True  # before close: a worker must not wait on this loop while close waits on it
        if self.cancel is not None:
            self.cancel.set()
        self.service.close()
