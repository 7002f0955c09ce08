"""Twenty players at once against the served app, over its API on localhost: every answer reaches the session
that asked, no request fails, every game is recorded. (benchmarks/load.py is the measured run: whole games,
full-length answers.)"""

import html
import importlib.util
import logging
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from conftest import INNOCENT_CASE, MINIMAL_CASE, ROOT, connect, text_of, write_scenarios
from game.config import GameConfig
from game.room import open_room

PLAYERS = 20
QUESTIONS = 2  # each; 40 answers in all keep the suite's time modest on a 2-core CPU
TOKENS = 8


@dataclass
class Played:
    case_id: str
    asked: list[str]
    answers: list[str]  # as the player's page got them
    result: str
    transcript: list[dict]


def play(url: str, p: int) -> Played:
    client = connect(url)
    case = (MINIMAL_CASE, INNOCENT_CASE)[p % 2]
    client.predict(case["id"], api_name="/new_game")
    history, asked, answers = [], [], []
    for q in range(1, QUESTIONS + 1):
        question = f"Player {p}, question {q}: what were you doing at {p % 12 + 1}:{q}5?"  # no two alike
        history, *_ = client.predict(question, history, api_name="/ask")
        asked.append(question)
        assert [text_of(m) for m in history if m["role"] == "user"] == asked
        answers.append(html.unescape(text_of(history[-1])))
    result, transcript, *_ = client.predict(api_name="/guilty" if p % 3 else "/innocent")
    return Played(case["id"], asked, answers, result, transcript)


@pytest.fixture(scope="module")
def served(tmp_path_factory, serve):
    folder = tmp_path_factory.mktemp("load")
    scenarios = write_scenarios(folder / "scenarios", [MINIMAL_CASE, INNOCENT_CASE])
    room = open_room(GameConfig(scenarios=scenarios, adapters=folder / "adapters", results=folder / "results.db",
                                max_new_tokens=TOKENS))
    return room, serve(room)


def test_twenty_players_at_once_each_get_their_own_answers_and_result(served):
    room, url = served
    with ThreadPoolExecutor(PLAYERS) as pool:
        games = list(pool.map(lambda p: play(url, p), range(PLAYERS)))  # re-raises any player's error

    stored = {tuple(e["question"] for e in g["transcript"]): g for g in room.store.games()}
    assert len(stored) == len(room.store.games()) == PLAYERS
    for game in games:
        row = stored[tuple(game.asked)]  # the game holds exactly this player's questions, in order
        assert row["case_id"] == game.case_id and row["questions"] == QUESTIONS
        assert [e["answer"] for e in row["transcript"]] == game.answers
        assert [text_of(m) for m in game.transcript if m["role"] == "user"] == game.asked
        assert "players got this case right" in game.result
    for case in (MINIMAL_CASE, INNOCENT_CASE):
        played = [g for g in games if g.case_id == case["id"]]
        record = room.store.case_record(case["id"])
        assert (record.played, record.solved) == (len(played), sum("You were right" in g.result for g in played))


def test_the_server_says_when_every_case_s_system_prompt_is_computed(tmp_path, caplog):
    scenarios = write_scenarios(tmp_path / "scenarios", [MINIMAL_CASE, INNOCENT_CASE])
    with caplog.at_level(logging.INFO, logger="game.room"):
        room = open_room(GameConfig(scenarios=scenarios, adapters=tmp_path / "adapters",
                                    results=tmp_path / "results.db", max_new_tokens=TOKENS))
        deadline = time.monotonic() + 120
        while "suspect ready" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.1)
    assert "suspect ready: 2 cases' system prompts computed" in caplog.text
    assert sorted(room.cases) == sorted([INNOCENT_CASE["id"], MINIMAL_CASE["id"]])


def load_benchmark():
    spec = importlib.util.spec_from_file_location("load_benchmark", ROOT / "benchmarks" / "load.py")
    load = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(load)
    return load


def test_the_load_benchmark_counts_the_cpu_time_a_process_takes():
    load = load_benchmark()
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(1.0)
        first = load.cpu_seconds(busy.pid)
        time.sleep(1.0)
        second = load.cpu_seconds(busy.pid)
    finally:
        busy.kill()
        busy.wait()
    assert 0 < first < second
    assert load.cpu_seconds(busy.pid) is None  # gone


def test_the_load_benchmark_gives_each_round_of_games_its_own_figures():
    load = load_benchmark()
    games = [{"round": 0, "answer_s": [1.0, 2.0], "first_words_s": [0.1, 0.2]},
             {"round": 1, "answer_s": [5.0], "first_words_s": [0.5]},
             {"round": 0, "answer_s": [3.0], "first_words_s": [0.3]}]
    first, second = load.by_round(games, 2)
    assert (first["round"], first["answer_latency_s"]["n"], first["answer_latency_s"]["max"]) == (0, 3, 3.0)
    assert (second["answer_latency_s"]["n"], second["first_words_latency_s"]["p50"]) == (1, 0.5)
