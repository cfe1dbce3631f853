"""The chat panel: the conversation, streaming replies, and the prompt input with history.

A reply shows who answered (adapter, routed or pinned, confidence) and its speed; the analysis channel
sits dimmed in a collapsible (closed unless the user opened reasoning), the final channel as Markdown.
The view follows new text only while the user is already at the bottom, so scrolling up to read is
never fought.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.message import Message
from textual.reactive import reactive
from textual.widgets import Collapsible, Input, Markdown, Static

from engine.text import plain, plural


@dataclass
class ReplyMeta:
    """What the chat shows about a reply; filled from engine events by the app."""

    adapter: str = ""
    reason: str = ""
    confidence: float = 0.0
    ttft_s: float | None = None
    tokens_per_s: float | None = None
    tokens_out: int | None = None
    stop: str = ""
    dropped: int = 0  # oldest turns left out of the prompt: the conversation outgrew the context
    runner_up: str = ""  # the router's second choice, shown beside its pick
    runner_up_score: float = 0.0

    def line(self) -> str:
        who = self.adapter or "…"
        how = {"pinned": "pinned", "no specialists": "no specialists yet", "": ""}.get(
            self.reason, f"auto {self.confidence:.2f}")
        text = f"{who} · {how}" if how else who
        if self.runner_up and self.reason not in ("pinned", "no specialists"):
            text += f" (next {self.runner_up} {self.runner_up_score:.2f})"
        if self.ttft_s is not None:
            text += f" · first token {self.ttft_s * 1000:.0f} ms · {self.tokens_per_s:.1f} tok/s"
            text += f" · {plural(self.tokens_out or 0, 'token')}"
        if self.stop == "cancelled":
            text += " · stopped"
        elif self.stop == "length":
            text += " · cut at the max_new_tokens limit (chat.max_new_tokens, Ctrl+O)"
        if self.dropped:
            text += f" · {self.dropped} oldest turn{'s' if self.dropped > 1 else ''} left out to fit the context"
        return text


class UserMessage(Static):
    """What the user typed, shown as typed: brackets in a prompt are not markup."""

    def __init__(self, text: str, **kw) -> None:
        super().__init__(text, markup=False, **kw)


class Reply(Vertical):
    """One assistant reply, filled as it streams."""

    show_analysis: reactive[bool] = reactive(False)

    def __init__(self, show_analysis: bool = False) -> None:
        super().__init__(classes="reply")
        self.meta = ReplyMeta()
        self.analysis = ""
        self.final = ""
        self.raw = ""
        self.turn_id: int | None = None
        self.prompt = ""
        self.experts = None  # the engine's ExpertTrace of this reply, for the expert view
        self.decision: dict = {}  # the router's decision with its explanation (Decision.as_dict())
        self.tokens: list[str] = []  # the reply's text per token, aligned with the trace
        self.set_reactive(Reply.show_analysis, show_analysis)

    def compose(self) -> ComposeResult:
        yield Static(self.meta.line(), classes="reply-meta", markup=False)
        with Collapsible(title="reasoning", collapsed=not self.show_analysis, classes="analysis-box"):
            yield Static("", classes="analysis", markup=False)
        yield Markdown("", classes="final")

    def on_mount(self) -> None:
        self.query_one(".analysis-box").display = False  # shown once reasoning text arrives

    def watch_show_analysis(self, show: bool) -> None:
        if self.is_mounted:
            self.query_one(Collapsible).collapsed = not show

    def set_meta(self, meta: ReplyMeta) -> None:
        self.meta = meta
        self.query_one(".reply-meta", Static).update(meta.line())
        if meta.stop in ("length", "cancelled") and not self.final:  # say why there is no answer, not a blank
            why = "it reached the max_new_tokens limit while reasoning" if meta.stop == "length" else "it was stopped"
            self.query_one(Markdown).update(f"_(no answer: {why}; Ctrl+T shows the reasoning)_")

    def add(self, pieces: list[tuple[str, str]]) -> None:
        """Append (channel, text) pieces; final text goes to Markdown, the rest to the reasoning box."""
        final_added = ""
        for channel, text in pieces:
            if channel == "final":
                final_added += text
            else:
                self.analysis += text
                self.raw += text
        if self.analysis:
            box = self.query_one(".analysis-box")
            box.display = True
            self.query_one(".analysis", Static).update(self.analysis)
        if final_added:
            self.final += final_added
            # append re-parses only the last block; update() would rebuild the whole reply every flush
            self.query_one(Markdown).append(final_added)


class PromptInput(Input):
    """An Input with shell-like history on up/down."""

    BINDINGS = [
        Binding("up", "history(-1)", "previous prompt", show=False),
        Binding("down", "history(1)", "next prompt", show=False),
    ]

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.history: list[str] = []
        self._pos = 0

    def remember(self, text: str) -> None:
        if text and (not self.history or self.history[-1] != text):
            self.history.append(text)
        self._pos = len(self.history)

    def action_history(self, step: int) -> None:
        if not self.history:
            return
        self._pos = max(0, min(len(self.history), self._pos + step))
        self.value = self.history[self._pos] if self._pos < len(self.history) else ""
        self.cursor_position = len(self.value)


class ChatPanel(Vertical):
    """Conversation view + input. Posts Submitted; the app does the rest."""

    class Submitted(Message):
        def __init__(self, prompt: str) -> None:
            super().__init__()
            self.prompt = prompt

    show_analysis: reactive[bool] = reactive(False)

    def compose(self) -> ComposeResult:
        yield VerticalScroll(id="conversation")
        yield Static("", id="chat-status", markup=False)
        yield PromptInput(placeholder="Ask anything · Enter sends · Esc stops · F1 help", id="prompt")

    @property
    def conversation(self) -> VerticalScroll:
        return self.query_one("#conversation", VerticalScroll)

    @on(Input.Submitted, "#prompt")
    def _submitted(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if not text:
            return
        box = self.query_one(PromptInput)
        box.remember(text)
        box.value = ""
        self.post_message(self.Submitted(text))

    def add_user(self, text: str) -> None:
        self.conversation.mount(UserMessage(plain(text), classes="user"))
        self.conversation.scroll_end(animate=False)

    def start_reply(self, prompt: str) -> Reply:
        reply = Reply(self.show_analysis)
        reply.prompt = prompt
        self.conversation.mount(reply)
        self.conversation.scroll_end(animate=False)
        return reply

    def follow(self) -> None:
        """Keep the newest text in view only if the user has not scrolled up."""
        view = self.conversation
        if view.scroll_y >= view.max_scroll_y - 3:
            view.scroll_end(animate=False)

    def restore_prompt(self, text: str) -> None:
        """Put a prompt that could not be answered back in the input, unless something new is there."""
        box = self.query_one("#prompt", PromptInput)
        if not box.value:
            box.value = text

    def set_status(self, text: str | Text) -> None:
        """A status line. A str is shown as typed: errors quote names and paths, never markup."""
        self.query_one("#chat-status", Static).update(text)

    def show_error(self, headline: str, detail: str) -> None:
        """A red headline and a plain detail (an error message, which may hold any characters)."""
        self.set_status(Text.assemble((headline, "red"), " ", detail))

    def watch_show_analysis(self, show: bool) -> None:
        for reply in self.query(Reply):
            reply.show_analysis = show

    def clear(self) -> None:
        self.conversation.remove_children()

    @property
    def last_reply(self) -> Reply | None:
        replies = self.query(Reply)
        return replies.last() if replies else None
