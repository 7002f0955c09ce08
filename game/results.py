"""Finished games, kept in SQLite: one row per game, written in one transaction.

WAL mode lets the many sessions of a running server write while others read; a game is one INSERT in one
transaction, so a killed server leaves either the whole game or none of it.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from game.session import Result

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS games (
    id INTEGER PRIMARY KEY,
    game_id TEXT NOT NULL UNIQUE,
    case_id TEXT NOT NULL,
    accused INTEGER NOT NULL,
    correct INTEGER NOT NULL,
    questions INTEGER NOT NULL,
    finished_at REAL NOT NULL,
    transcript TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS games_case ON games(case_id);
"""


@dataclass(frozen=True)
class CaseRecord:
    played: int
    solved: int


class ResultStore:
    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._local.db = None
        try:
            self._open()
        except sqlite3.DatabaseError as exc:  # a damaged file must not stop the game: keep it aside, start afresh
            if self._local.db is not None:
                self._local.db.close()
                self._local.db = None
            kept = self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
            for suffix in ("", "-wal", "-shm"):
                if Path(f"{self.path}{suffix}").exists():
                    Path(f"{self.path}{suffix}").rename(f"{kept}{suffix}")
            log.warning("results database %s is damaged (%s): kept as %s, starting a new one", self.path, exc, kept)
            self._open()

    def _open(self) -> None:
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)
            if (check := db.execute("PRAGMA quick_check").fetchone()[0]) != "ok":
                raise sqlite3.DatabaseError(check)

    def _connect(self) -> sqlite3.Connection:
        # One connection per thread: sqlite3 connections must not cross threads, and Gradio runs handlers in a pool.
        db = getattr(self._local, "db", None)  # None in a thread that has not connected yet
        if db is None:
            db = self._local.db = sqlite3.connect(self.path, timeout=30)
            db.execute("PRAGMA synchronous=NORMAL")
        return db

    def record(self, game_id: str, case_id: str, result: Result, finished_at: float | None = None) -> None:
        transcript = json.dumps([{"question": e.question, "answer": e.answer} for e in result.transcript])
        with self._connect() as db:  # the context manager commits, or rolls back on error
            db.execute(
                "INSERT INTO games (game_id, case_id, accused, correct, questions, finished_at, transcript)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (game_id, case_id, result.accused, result.correct, len(result.transcript),
                 finished_at if finished_at is not None else time.time(), transcript),
            )

    def case_record(self, case_id: str) -> CaseRecord:
        played, solved = self._connect().execute(
            "SELECT COUNT(*), COALESCE(SUM(correct), 0) FROM games WHERE case_id = ?", (case_id,)
        ).fetchone()
        return CaseRecord(played, solved)

    def games(self, case_id: str | None = None) -> list[dict]:
        query = "SELECT game_id, case_id, accused, correct, questions, finished_at, transcript FROM games"
        rows = self._connect().execute(query + (" WHERE case_id = ?" if case_id else "") + " ORDER BY id",
                                       (case_id,) if case_id else ()).fetchall()
        return [
            {"game_id": g, "case_id": c, "accused": bool(a), "correct": bool(k), "questions": q, "finished_at": t,
             "transcript": json.loads(tr)}
            for g, c, a, k, q, t, tr in rows
        ]
