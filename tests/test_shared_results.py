"""Several web servers, one database: finished games in a real PostgreSQL server (Debian's, which `make test`
installs), started here on a free port. Two `python app.py` processes record games into it at once, and each shows
the solve rates of all of them.

Skipped where PostgreSQL's server or the psycopg driver is not installed."""

import os
import re
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import IntegrityError, OperationalError

from conftest import INNOCENT_CASE, MINIMAL_CASE, connect, free_port, start_server, write_scenarios
from game.config import GameConfig
from game.results import ResultStore
from game.session import Exchange, Result

pytest.importorskip("psycopg")
POSTGRES_BINS = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))
if not POSTGRES_BINS:
    pytest.skip("PostgreSQL is not installed: run `make postgresql` (as root)", allow_module_level=True)
BIN = POSTGRES_BINS[-1].parent
RECORD = re.compile(r"(\d+) of (\d+) players got this case right")


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server of this module's own; yields the URL of an empty database in it."""
    # PostgreSQL will not run as root: as root, its files and process belong to the package's `postgres` user.
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    folder = Path(tempfile.mkdtemp(prefix="ir-postgres-"))  # not pytest's tmp_path: its parents are root's alone
    if as_postgres:
        shutil.chown(folder, "postgres", "postgres")
    subprocess.run([*as_postgres, BIN / "initdb", "-D", folder / "data", "-U", "postgres", "-A", "trust",
                    "--no-sync"], check=True, capture_output=True)
    port = free_port()
    server = subprocess.Popen([*as_postgres, BIN / "postgres", "-D", folder / "data", "-p", str(port),
                               "-k", folder, "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"],
                              stdout=subprocess.DEVNULL, stderr=open(folder / "log", "w"))
    admin = create_engine(f"postgresql://postgres@127.0.0.1:{port}/postgres", isolation_level="AUTOCOMMIT")
    deadline = time.monotonic() + 60
    while True:
        try:
            with admin.connect() as db:
                db.execute(text("CREATE DATABASE games"))
            break
        except OperationalError:
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("PostgreSQL did not start: " + (folder / "log").read_text()[-2000:]) from None
            time.sleep(0.3)
    admin.dispose()
    yield f"postgresql://postgres@127.0.0.1:{port}/games"
    server.terminate()
    server.wait(timeout=60)
    shutil.rmtree(folder, ignore_errors=True)


def finished(tag: str, accused: bool, guilty: bool) -> Result:
    return Result(accused=accused, guilty=guilty, truth="what happened",
                  transcript=(Exchange(f"{tag}: where were you?", f"{tag}: at home."),))


def test_a_database_url_is_used_as_given(monkeypatch, postgres):
    monkeypatch.setenv("IR_RESULTS_DB", postgres)
    assert GameConfig.from_env().results == postgres
    store = ResultStore(GameConfig.from_env().results)
    store.record("pg-1", "case-a", finished("pg-1", accused=True, guilty=True), finished_at=12.5)
    store.record("pg-2", "case-a", finished("pg-2", accused=True, guilty=False))
    assert store.games("case-a")[0] == {
        "game_id": "pg-1", "case_id": "case-a", "accused": True, "correct": True, "questions": 1,
        "finished_at": 12.5, "transcript": [{"question": "pg-1: where were you?", "answer": "pg-1: at home."}]}
    record = ResultStore(postgres).case_record("case-a")  # another server's store sees the same games
    assert (record.played, record.solved) == (2, 1)
    with pytest.raises(IntegrityError):
        store.record("pg-1", "case-a", finished("again", accused=False, guilty=False))


def play(url: str, case: dict, accused: bool, tag: str) -> str:
    """One whole game over the page's API; the result's text."""
    client = connect(url)
    client.predict(case["id"], api_name="/new_game")
    client.predict(f"{tag}: where were you last night?", [], api_name="/ask")
    result, *_ = client.predict(api_name="/guilty" if accused else "/innocent")
    return result


def test_two_web_servers_record_games_at_once_and_show_the_same_solve_rates(postgres, tmp_path):
    scenarios = write_scenarios(tmp_path / "scenarios", [MINIMAL_CASE, INNOCENT_CASE])
    env = {"IR_SCENARIOS": str(scenarios), "IR_ADAPTERS": str(tmp_path / "adapters"), "IR_RESULTS_DB": postgres,
           "IR_MAX_NEW_TOKENS": "6"}
    servers = []
    try:
        with ThreadPoolExecutor(2) as pool:  # both start at once, and both create the table if none is there
            for n in range(2):
                (tmp_path / f"server{n}").mkdir()
            servers = list(pool.map(lambda n: start_server(tmp_path / f"server{n}", **env), range(2)))
        urls = [url for _, url in servers]
        # Eight players at once, half on each server, right and wrong on both cases.
        games = [(urls[p % 2], (MINIMAL_CASE, INNOCENT_CASE)[p // 2 % 2], p % 3 == 0, f"player {p}") for p in range(8)]
        with ThreadPoolExecutor(len(games)) as pool:
            results = list(pool.map(lambda game: play(*game), games))
        assert all(RECORD.search(r) for r in results)
        right = sum("You were right" in r for r, (_, case, _, _) in zip(results, games) if case is MINIMAL_CASE)
        played = sum(case is MINIMAL_CASE for _, case, _, _ in games)
        # One more right game on each server, one after the other: each counts every game both servers recorded.
        first = RECORD.search(play(urls[0], MINIMAL_CASE, True, "last on server 0")).groups()
        second = RECORD.search(play(urls[1], MINIMAL_CASE, True, "last on server 1")).groups()
        assert (first, second) == ((str(right + 1), str(played + 1)), (str(right + 2), str(played + 2)))
    finally:
        for server, _ in servers:
            server.kill()
    stored = ResultStore(postgres).games()
    assert len([g for g in stored if g["transcript"][0]["question"].startswith(("player", "last on"))]) == 10
