"""Finished games in SQLite: what is kept, and that no finished game is lost or half-written, whether many
sessions write at once or the server is killed."""

import html
import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy.exc import IntegrityError

from conftest import INNOCENT_CASE, MINIMAL_CASE, ROOT, connect, start_server, text_of, write_scenarios
from game.config import GameConfig
from game.results import ResultStore
from game.session import Exchange, Result


def finished(tag: str, questions: int = 3, accused: bool = True, guilty: bool = True, size: int = 40) -> Result:
    transcript = tuple(Exchange(f"{tag} question {i}?", f"{tag} answer {i}. " + "x" * size) for i in range(questions))
    return Result(accused=accused, guilty=guilty, truth="what happened", transcript=transcript)


def rows(path: Path) -> list[dict]:
    with sqlite3.connect(path) as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT * FROM games ORDER BY id")]


def assert_whole(path: Path) -> None:
    """The file opens, SQLite finds nothing wrong in it, and every game in it is complete."""
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    for row in rows(path):
        transcript = json.loads(row["transcript"])
        assert row["questions"] == len(transcript) > 0
        assert all(e["question"] and e["answer"] for e in transcript)


def test_the_store_is_created_on_first_run_in_wal_mode(tmp_path):
    path = tmp_path / "not" / "yet" / "results.db"
    ResultStore(path)
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("SELECT COUNT(*) FROM games").fetchone()[0] == 0


def test_a_damaged_store_is_kept_aside_and_the_game_starts_with_a_new_one(tmp_path, caplog):
    path = tmp_path / "results.db"
    damage = b"this was a results database until a disk went bad" * 100
    path.write_bytes(damage)
    store = ResultStore(path)
    store.record("g1", "museum", finished("after"))
    assert [r["game_id"] for r in rows(path)] == ["g1"]
    kept = list(tmp_path.glob("results.db.corrupt-*"))
    assert len(kept) == 1 and kept[0].read_bytes() == damage  # nothing lost: the old file is there to inspect
    assert str(kept[0]) in caplog.text


def test_the_store_path_is_configurable(monkeypatch, tmp_path):
    monkeypatch.setenv("IR_RESULTS_DB", str(tmp_path / "elsewhere.db"))
    assert GameConfig.from_env().results == tmp_path / "elsewhere.db"


def test_a_finished_game_is_stored_whole(tmp_path):
    store = ResultStore(tmp_path / "results.db")
    store.record("g1", "greenhouse-test", finished("a", questions=2, accused=False, guilty=True), finished_at=1234.5)
    [game] = store.games()
    assert game == {
        "game_id": "g1", "case_id": "greenhouse-test", "accused": False, "correct": False, "questions": 2,
        "finished_at": 1234.5,
        "transcript": [{"question": "a question 0?", "answer": "a answer 0. " + "x" * 40},
                       {"question": "a question 1?", "answer": "a answer 1. " + "x" * 40}],
    }


def test_the_case_record_counts_the_players_who_got_it_right(tmp_path):
    store = ResultStore(tmp_path / "results.db")
    for i, (accused, guilty) in enumerate([(True, True), (False, True), (False, False)]):
        store.record(f"g{i}", "greenhouse-test", finished(str(i), accused=accused, guilty=guilty))
    store.record("other", "another-case", finished("o"))
    assert (store.case_record("greenhouse-test").played, store.case_record("greenhouse-test").solved) == (3, 2)
    assert store.case_record("never-played").played == 0


def test_a_game_cannot_be_recorded_twice(tmp_path):
    store = ResultStore(tmp_path / "results.db")
    store.record("g1", "greenhouse-test", finished("a"))
    with pytest.raises(IntegrityError):
        store.record("g1", "greenhouse-test", finished("b"))
    assert [g["transcript"][0]["question"] for g in store.games()] == ["a question 0?"]


# A separate process recording games as fast as it can, printing each game's id once its transaction committed.
WRITER = """
import sys
from game.results import ResultStore
from game.session import Exchange, Result
path, tag, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
store = ResultStore(path)
for g in range(count):
    game_id = f"{tag}-{g}"
    transcript = tuple(Exchange(f"{game_id} question {i}?", f"{game_id} answer {i}. " + "x" * 2000)
                       for i in range(1 + g % 5))
    store.record(game_id, "greenhouse-test", Result(True, True, "what happened", transcript))
    print(game_id, flush=True)
"""


def test_concurrent_sessions_lose_no_game(tmp_path):
    """Many threads (as Gradio's workers) through one store, and other processes with their own, all at once."""
    path = tmp_path / "results.db"
    store = ResultStore(path)
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), f"process{p}", "300"], cwd=ROOT,
                                stdout=subprocess.PIPE, text=True) for p in range(3)]
    for writer in writers:
        writer.stdout.readline()  # each is writing: the threads below start alongside them

    def session(t: int) -> None:
        for g in range(25):
            store.record(f"thread{t}-{g}", "greenhouse-test", finished(f"thread{t}-{g}", questions=1 + g % 5))

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(session, range(16)))
    for writer in writers:
        writer.communicate(timeout=120)
        assert writer.returncode == 0
    games = {g["game_id"]: g for g in store.games()}
    expected = ({f"thread{t}-{g}" for t in range(16) for g in range(25)}
                | {f"process{p}-{g}" for p in range(3) for g in range(300)})
    assert set(games) == expected
    assert all(g["transcript"][0]["question"] == f"{gid} question 0?" for gid, g in games.items())
    assert_whole(path)


def test_a_killed_writer_leaves_only_whole_games(tmp_path):
    path = tmp_path / "results.db"
    acknowledged = []
    for round_ in range(5):  # the file must also take writes again after each kill
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path), f"round{round_}", "100000"], cwd=ROOT,
                                  stdout=subprocess.PIPE, text=True)
        for _ in range(100 + 37 * round_):
            acknowledged.append(writer.stdout.readline().strip())
        writer.send_signal(signal.SIGKILL)  # mid-transaction, as likely as not: it writes without pause
        writer.wait()
        writer.stdout.close()
    assert_whole(path)
    stored = {row["game_id"]: row for row in rows(path)}
    assert set(acknowledged) <= set(stored)
    for game_id in acknowledged:
        assert json.loads(stored[game_id]["transcript"])[0]["question"] == f"{game_id} question 0?"


def test_a_killed_server_keeps_every_game_whose_verdict_returned(tmp_path):
    scenarios = write_scenarios(tmp_path / "scenarios", [MINIMAL_CASE, INNOCENT_CASE])
    db = tmp_path / "data" / "results.db"  # its folder does not exist yet: the server creates both
    server, url = start_server(tmp_path, IR_SCENARIOS=str(scenarios), IR_ADAPTERS=str(tmp_path / "adapters"),
                               IR_RESULTS_DB=str(db), IR_MAX_NEW_TOKENS="6")
    returned = []  # (player's questions, answers seen, case id), for each game whose verdict came back
    stop = threading.Event()

    def player(p: int) -> None:
        client = connect(url)
        g = 0
        while not stop.is_set():
            case = (MINIMAL_CASE, INNOCENT_CASE)[g % 2]
            try:
                client.predict(case["id"], api_name="/new_game")
                questions, answers = [f"Player {p}, game {g}: where were you at {q + 1} o'clock?" for q in range(2)], []
                for question in questions:
                    history, *_ = client.predict(question, [], api_name="/ask")
                    answers.append(html.unescape(text_of(history[-1])))
                client.predict(api_name="/guilty" if g % 2 else "/innocent")
            except Exception:
                return  # the server is gone
            returned.append((questions, answers, case["id"]))
            g += 1

    threads = [threading.Thread(target=player, args=(p,), daemon=True) for p in range(4)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 300
        while len(returned) < 4 and time.monotonic() < deadline and server.poll() is None:
            time.sleep(0.2)
        assert len(returned) >= 4, (tmp_path / "server.log").read_text()[-3000:]
        server.send_signal(signal.SIGKILL)  # four players are mid-game: asking, waiting for answers, deciding
        server.wait()
        stop.set()
        for t in threads:
            t.join(timeout=60)
    finally:
        server.kill()

    assert_whole(db)
    stored = {tuple(e["question"] for e in json.loads(r["transcript"])): r for r in rows(db)}
    for questions, answers, case_id in returned:
        row = stored[tuple(questions)]
        assert row["case_id"] == case_id and row["questions"] == 2
        assert [e["answer"] for e in json.loads(row["transcript"])] == answers
