"""Conversation history in SQLite (WAL): every turn, how it was answered, and what the user thought.

A turn is written *before* generation starts (status 'pending') and completed after, with its partial
text saved as it streams; a turn left 'pending' by a crash is marked 'interrupted' at the next start.
So nothing typed is ever lost. The schema is versioned with `PRAGMA user_version` and migrations,
applied in one write transaction that re-reads the version inside it, so several processes opening a
new database at once set it up exactly once. The file is created readable by its owner only: it holds
everything the person typed.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine import names

MIGRATIONS = [
    """
    CREATE TABLE conversations (id INTEGER PRIMARY KEY, created REAL NOT NULL, title TEXT NOT NULL DEFAULT '');
    CREATE TABLE turns (
        id INTEGER PRIMARY KEY,
        conversation_id INTEGER NOT NULL REFERENCES conversations(id),
        created REAL NOT NULL,
        prompt TEXT NOT NULL,
        final TEXT NOT NULL DEFAULT '',
        analysis TEXT NOT NULL DEFAULT '',
        raw TEXT NOT NULL DEFAULT '',
        adapter TEXT NOT NULL DEFAULT 'base',
        route TEXT NOT NULL DEFAULT '{}',
        sampling TEXT NOT NULL DEFAULT '{}',
        stats TEXT NOT NULL DEFAULT '{}',
        status TEXT NOT NULL DEFAULT 'pending',
        rating INTEGER,
        correction TEXT,
        good_example INTEGER NOT NULL DEFAULT 0,
        task TEXT
    );
    CREATE INDEX turns_by_conversation ON turns(conversation_id, id);
    CREATE TABLE preferences (
        id INTEGER PRIMARY KEY, created REAL NOT NULL, prompt TEXT NOT NULL,
        adapter_a TEXT NOT NULL, adapter_b TEXT NOT NULL, reply_a TEXT NOT NULL, reply_b TEXT NOT NULL,
        choice TEXT NOT NULL
    );
    """,
    # Where a turn came from: the app or CLI ('app') or an OpenAI-compatible API client ('api').
    "ALTER TABLE turns ADD COLUMN source TEXT NOT NULL DEFAULT 'app';",
    # What shaped each reply, so a learned example is rendered as it was served (engine.train.learning),
    # and the task an A/B pick teaches (a preference pair for that specialist).
    """
    ALTER TABLE turns ADD COLUMN reasoning TEXT NOT NULL DEFAULT 'low';
    ALTER TABLE turns ADD COLUMN instructions TEXT NOT NULL DEFAULT '';
    ALTER TABLE preferences ADD COLUMN task TEXT;
    ALTER TABLE preferences ADD COLUMN reasoning TEXT NOT NULL DEFAULT 'low';
    ALTER TABLE preferences ADD COLUMN instructions TEXT NOT NULL DEFAULT '';
    ALTER TABLE turns ADD COLUMN context TEXT NOT NULL DEFAULT '[]';
    """,
]
SOURCES = ("app", "api")


@dataclass
class TurnRow:
    id: int
    conversation_id: int
    created: float
    prompt: str
    final: str
    analysis: str
    adapter: str
    route: dict[str, Any]
    stats: dict[str, Any]
    status: str
    rating: int | None
    correction: str | None
    good_example: bool
    task: str | None
    source: str = "app"  # app (the app or CLI) or api (an API client)
    raw: str = ""  # the reply as generated, control tokens included (what the chat keeps when final is empty)
    reasoning: str = "low"  # the reasoning level the reply was asked with
    instructions: str = ""  # the developer instructions in force for it
    context: list = field(default_factory=list)  # [role, text] turns sent with the prompt, not stored as turns

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class HistoryError(RuntimeError):
    """The history file cannot be used (not a database, from a newer Tandem); names the file."""


def _statements(script: str) -> list[str]:
    out, buf = [], ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            out.append(buf.strip())
            buf = ""
    return out


def _pairs(text: Any) -> list[tuple[str, str]]:
    """The stored `context` column: [role, text] pairs; anything damaged or foreign reads as none."""
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return []
    ok = isinstance(value, list) and all(isinstance(v, list) and len(v) == 2 and v[0] in ("user", "assistant")
                                         and isinstance(v[1], str) for v in value)
    return [(v[0], v[1]) for v in value] if ok else []


def _object(text: Any) -> dict[str, Any]:
    """A stored JSON column; damaged or foreign values read as empty rather than failing the whole list."""
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def private(path: Path) -> None:
    """Create `path` readable by its owner only, or make an existing one so (with its -wal/-shm):
    it holds everything the person typed. A file owned by someone else is left for SQLite to refuse."""
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    for f in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        try:
            if f.stat().st_mode & 0o077:
                os.chmod(f, 0o600)
        except (FileNotFoundError, PermissionError):
            continue


def _kept_answer(t: TurnRow) -> str:
    """What the chat kept of a stored reply as context for the next turn, by the rule of
    `engine.serve.chat.context_answer`: its final answer; a reply cancelled or cut at the token limit with
    no final answer kept nothing; one that ended on its own with no channel kept its text."""
    if t.final or t.stats.get("stop") in ("cancelled", "length"):
        return t.final
    return t.raw


class History:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        private(self.path)  # before SQLite opens it: it gives -wal/-shm the same mode
        # One connection shared by the app's workers; sqlite3 objects need a lock across threads.
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._lock = threading.Lock()
        self._closed = False
        try:
            with self._lock:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._migrate()
                self._db.execute("UPDATE turns SET status='interrupted' WHERE status='pending'")
        except sqlite3.DatabaseError as e:
            self._db.close()
            raise HistoryError(f"{self.path}: not a usable history database ({e})") from None
        except HistoryError:
            self._db.close()
            raise

    def _migrate(self) -> None:
        """Every pending migration in one write transaction, the version read inside it."""
        self._db.execute("BEGIN IMMEDIATE")  # waits for another process doing the same
        try:
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > len(MIGRATIONS):
                raise HistoryError(f"{self.path} was written by a newer Tandem (schema {version})")
            for i, script in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in _statements(script):
                    self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version={i}")
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def _exec(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        with self._lock:
            if self._closed:
                raise HistoryError(f"{self.path} is closed (Tandem is shutting down)")
            return self._db.execute(sql, args)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._db.close()

    # ----- writing
    def new_conversation(self, title: str = "") -> int:
        return self._exec("INSERT INTO conversations(created, title) VALUES (?, ?)", (time.time(), title)).lastrowid

    def start_turn(self, conversation_id: int, prompt: str, adapter: str, route: dict, sampling: dict,
                   reasoning: str = "low", instructions: str = "", source: str = "app",
                   context: list[tuple[str, str]] = ()) -> int:
        """A new turn, before generation. `context`: earlier turns the prompt came with that are not turns of
        this history (an API client sends its whole conversation), kept so it can be rendered as served."""
        if source not in SOURCES:
            raise ValueError(f"a turn's source is one of {SOURCES}, got {source!r}")
        return self._exec(
            "INSERT INTO turns(conversation_id, created, prompt, adapter, route, sampling, task, reasoning, "
            "instructions, source, context) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (conversation_id, time.time(), prompt, adapter, json.dumps(route), json.dumps(sampling),
             adapter if adapter != "base" else None, reasoning, instructions, source,
             json.dumps([[role, text] for role, text in context])),
        ).lastrowid

    def save_partial(self, turn_id: int, raw: str) -> None:
        self._exec("UPDATE turns SET raw=? WHERE id=?", (raw, turn_id))

    def finish_turn(self, turn_id: int, final: str, analysis: str, raw: str, stats: dict, status: str) -> None:
        self._exec("UPDATE turns SET final=?, analysis=?, raw=?, stats=?, status=? WHERE id=?",
                   (final, analysis, raw, json.dumps(stats), status, turn_id))

    def rate(self, turn_id: int, rating: int) -> None:
        if not 1 <= rating <= 5:
            raise ValueError("a rating is 1 to 5")
        self._exec("UPDATE turns SET rating=? WHERE id=?", (rating, turn_id))

    def correct(self, turn_id: int, correction: str) -> None:
        self._exec("UPDATE turns SET correction=? WHERE id=?", (correction.strip() or None, turn_id))

    def mark_good(self, turn_id: int, good: bool = True) -> None:
        self._exec("UPDATE turns SET good_example=? WHERE id=?", (int(good), turn_id))

    def set_task(self, turn_id: int, task: str) -> None:
        names.check(task, "task name")
        self._exec("UPDATE turns SET task=? WHERE id=?", (task, turn_id))

    def prefer(self, prompt: str, a: str, b: str, reply_a: str, reply_b: str, choice: str,
               task: str | None = None, reasoning: str = "low", instructions: str = "") -> int:
        """An A/B pick: `choice` is a, b (the winning adapter's name) or "tie"; `task` the specialist it teaches."""
        return self._exec(
            "INSERT INTO preferences(created, prompt, adapter_a, adapter_b, reply_a, reply_b, choice, task, "
            "reasoning, instructions) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (time.time(), prompt, a, b, reply_a, reply_b, choice, task, reasoning, instructions)).lastrowid

    # ----- reading
    _COLS = ("id, conversation_id, created, prompt, final, analysis, adapter, route, stats, status, rating, "
             "correction, good_example, task, source, raw, reasoning, instructions, context")

    def _rows(self, where: str = "1", args: tuple = (), limit: int | None = None, after: int = 0) -> list[TurnRow]:
        """Turns matching `where` with id > `after`, oldest first; `limit` None: all of them."""
        cur = self._exec(f"SELECT {self._COLS} FROM turns WHERE ({where}) AND id > ? ORDER BY id LIMIT ?",
                         (*args, after, -1 if limit is None else limit))
        return [TurnRow(r[0], r[1], r[2], r[3], r[4], r[5], r[6], _object(r[7]), _object(r[8]), r[9],
                        r[10], r[11], bool(r[12]), r[13], r[14], r[15], r[16], r[17],
                        _pairs(r[18])) for r in cur.fetchall()]

    def turn(self, turn_id: int) -> TurnRow:
        rows = self._rows("id=?", (turn_id,))
        if not rows:
            raise KeyError(f"no turn {turn_id}")
        return rows[0]

    def turns(self, conversation_id: int | None = None, limit: int | None = None) -> list[TurnRow]:
        """Turns oldest first, every one unless `limit` says how many."""
        if conversation_id is None:
            return self._rows(limit=limit)
        return self._rows("conversation_id=?", (conversation_id,), limit)

    def each_turn(self, page: int = 500) -> Iterator[TurnRow]:
        """Every turn, oldest first, read a page at a time (an export of any size in bounded memory)."""
        after = 0
        while rows := self._rows(limit=page, after=after):
            yield from rows
            after = rows[-1].id

    _MATCH = "prompt LIKE ? ESCAPE '\\' OR final LIKE ? ESCAPE '\\' OR correction LIKE ? ESCAPE '\\'"

    @staticmethod
    def _like(text: str) -> tuple[str, str, str]:
        """`text` as a literal substring pattern: % and _ typed by the user are characters, not wildcards."""
        like = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        return like, like, like

    def search(self, text: str, limit: int | None = None) -> list[TurnRow]:
        return self._rows(self._MATCH, self._like(text), limit)

    def count_matches(self, text: str) -> int:
        return self._exec(f"SELECT COUNT(*) FROM turns WHERE {self._MATCH}", self._like(text)).fetchone()[0]

    def count_conversations(self) -> int:
        return self._exec("SELECT COUNT(*) FROM conversations").fetchone()[0]

    def conversations(self, limit: int | None = 100) -> list[dict[str, Any]]:
        """The newest conversations first; `limit` None: all."""
        cur = self._exec(
            "SELECT c.id, c.created, c.title, COUNT(t.id), MAX(t.created) FROM conversations c "
            "LEFT JOIN turns t ON t.conversation_id=c.id GROUP BY c.id ORDER BY c.id DESC LIMIT ?",
            (-1 if limit is None else limit,))
        return [{"id": r[0], "created": r[1], "title": r[2], "turns": r[3], "last": r[4]} for r in cur.fetchall()]

    def usable_for(self, task: str) -> list[TurnRow]:
        """Turns that teach `task`: corrected ones, or complete ones rated 4+ (or marked good and unrated).
        A low rating without a correction excludes a turn: it says what not to do, not what to do."""
        return self._rows(
            "task=? AND status IN ('complete','cancelled','interrupted') AND "
            "(correction IS NOT NULL OR (status='complete' AND (rating >= 4 OR (good_example=1 AND rating IS NULL))))",
            (task,))

    def context(self, turn: TurnRow) -> list[tuple[str, str]]:
        """(role, text) of the turns the chat showed the model before `turn`'s prompt, oldest first: those it
        came with (`TurnRow.context`), then the earlier turns of its conversation that ended with a reply
        (complete or cancelled), each reply as the chat kept it. A failed turn never entered the chat's
        conversation (`engine.serve.chat.Engine.ask`), so it is not context either."""
        earlier = self._rows("conversation_id=? AND id<? AND status IN ('complete','cancelled')",
                             (turn.conversation_id, turn.id), limit=1_000_000)
        kept = [(t.prompt, answer) for t in earlier if (answer := _kept_answer(t))]
        return [*turn.context, *[p for prompt, answer in kept for p in (("user", prompt), ("assistant", answer))]]

    def tasks(self) -> list[str]:
        """Every task some turn is labelled with."""
        cur = self._exec("SELECT DISTINCT task FROM turns WHERE task IS NOT NULL ORDER BY task")
        return [r[0] for r in cur.fetchall()]

    def preferences(self) -> list[dict[str, Any]]:
        cur = self._exec("SELECT prompt, adapter_a, adapter_b, choice, created, reply_a, reply_b, task, reasoning, "
                         "instructions FROM preferences ORDER BY id")
        return [{"prompt": r[0], "a": r[1], "b": r[2], "choice": r[3], "created": r[4], "reply_a": r[5],
                 "reply_b": r[6], "task": r[7], "reasoning": r[8], "instructions": r[9]} for r in cur.fetchall()]

    def corrected(self, task: str) -> list[TurnRow]:
        """Turns of `task` with a correction that differs from the reply: each is a preference pair."""
        return self._rows("task=? AND correction IS NOT NULL AND correction != final", (task,), limit=1_000_000)
