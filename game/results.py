"""Finished games, kept in any database SQLAlchemy speaks: one row per game, written in one transaction.

A path is a SQLite file (the default), in WAL mode so that the many sessions of a running server write while others
read. A URL (`postgresql://user@host/db`) names a database that several web servers share: each records its own
games, and every server's solve rates count them all. A game is one INSERT in one transaction, so a killed server
leaves either the whole game or none of it.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import (Boolean, Column, Float, Index, Integer, MetaData, String, Table, Text, create_engine, event,
                        func, select, text)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DatabaseError

from game.session import Result

log = logging.getLogger(__name__)

metadata = MetaData()
games = Table(
    "games", metadata,
    Column("id", Integer, primary_key=True),
    Column("game_id", String(64), nullable=False, unique=True),
    Column("case_id", String(200), nullable=False),
    Column("accused", Boolean, nullable=False),
    Column("correct", Boolean, nullable=False),
    Column("questions", Integer, nullable=False),
    Column("finished_at", Float, nullable=False),
    Column("transcript", Text, nullable=False),
    Index("games_case", "case_id"),
)


@dataclass(frozen=True)
class CaseRecord:
    played: int
    solved: int


def _sqlite(path: Path) -> Engine:
    engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": 30})

    @event.listens_for(engine, "connect")
    def _wal(connection, _record):
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")

    return engine


class ResultStore:
    def __init__(self, where: Path | str):
        """where: a SQLite file's path, or a SQLAlchemy database URL."""
        self.url = str(where) if "://" in str(where) else None
        if self.url is not None:
            self.engine = create_engine(self.url, pool_pre_ping=True)  # a restarted database: reconnect, not fail
            self._create()
            return
        self.path = Path(where)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.engine = _sqlite(self.path)
        try:
            self._create()
            with self.engine.connect() as db:
                if (check := db.execute(text("PRAGMA quick_check")).scalar()) != "ok":
                    raise sqlite3.DatabaseError(check)
        except (sqlite3.DatabaseError, DatabaseError) as exc:  # a damaged file must not stop the game: keep it aside
            self.engine.dispose()
            kept = self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
            for suffix in ("", "-wal", "-shm"):
                if Path(f"{self.path}{suffix}").exists():
                    Path(f"{self.path}{suffix}").rename(f"{kept}{suffix}")
            log.warning("results database %s is damaged (%s): kept as %s, starting a new one", self.path, exc, kept)
            self.engine = _sqlite(self.path)
            self._create()

    def _create(self) -> None:
        try:
            metadata.create_all(self.engine)
        except DatabaseError:
            # Two servers starting at once both find no table and both create it: the second one's CREATE fails
            # on the first one's table, which is there now. Checked again; a real failure raises this time.
            metadata.create_all(self.engine)

    def record(self, game_id: str, case_id: str, result: Result, finished_at: float | None = None) -> None:
        transcript = json.dumps([{"question": e.question, "answer": e.answer} for e in result.transcript])
        with self.engine.begin() as db:  # commits, or rolls back on error
            db.execute(games.insert().values(
                game_id=game_id, case_id=case_id, accused=result.accused, correct=result.correct,
                questions=len(result.transcript), finished_at=finished_at if finished_at is not None else time.time(),
                transcript=transcript))

    def case_record(self, case_id: str) -> CaseRecord:
        query = select(func.count(), func.count().filter(games.c.correct)).where(games.c.case_id == case_id)
        with self.engine.connect() as db:
            played, solved = db.execute(query).one()
        return CaseRecord(played, solved)

    def games(self, case_id: str | None = None) -> list[dict]:
        query = select(games.c.game_id, games.c.case_id, games.c.accused, games.c.correct, games.c.questions,
                       games.c.finished_at, games.c.transcript).order_by(games.c.id)
        if case_id:
            query = query.where(games.c.case_id == case_id)
        with self.engine.connect() as db:
            rows = db.execute(query).all()
        return [
            {"game_id": g, "case_id": c, "accused": bool(a), "correct": bool(k), "questions": q, "finished_at": t,
             "transcript": json.loads(tr)}
            for g, c, a, k, q, t, tr in rows
        ]
