"""The suspect served over the network by a real model server: llama-cpp-python's OpenAI-compatible server, started
here on a free port exactly as `python -m game serve-config llama-cpp` says, with the base GGUF and two cases' GGUF
LoRAs. The game asks it through game/remote.py; a server that is down, slow or killed mid-answer costs the player
nothing but a message.

Skipped where llama-cpp-python or its `server` extra is not installed."""

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("sse_starlette")  # the `server` extra
pytest.importorskip("starlette_context")

from app import status  # noqa: E402
from conftest import ROOT, connect, free_port, text_of  # noqa: E402
from playwright.sync_api import expect  # noqa: E402
from test_browser import browser, opened, play_whole_game, shoot  # noqa: E402,F401  (browser: the fixture)
from game import adapters as adapter_files  # noqa: E402
from game.config import GameConfig  # noqa: E402
from game.remote import EngineUnavailable, RemoteSuspect  # noqa: E402
from game.room import open_room  # noqa: E402
from game.scenario import load_cases  # noqa: E402
from game.session import Phase  # noqa: E402
from game.suspect import GenerationSettings, Suspect  # noqa: E402
from training.scoring import source_topic  # noqa: E402

SERVED = ("lighthouse-logbook", "museum-glass-hare")  # the server offers these cases' adapters
UNSERVED = "bakeoff-salt"  # this one has an adapter in adapters/, but the server does not offer it
KEY = "test-engine-key"
TOKENS = 40  # answers of a sentence or two keep the module's time modest on a 2-core CPU


class EngineServer:
    """llama-cpp-python's server in a child process, configured and started as the README tells an operator."""

    def __init__(self, folder: Path):
        self.folder = folder
        adapters = folder / "adapters"
        adapters.mkdir(parents=True, exist_ok=True)
        for case_id in SERVED:
            if not (adapters / case_id).exists():
                (adapters / case_id).symlink_to(ROOT / "adapters" / case_id, target_is_directory=True)
        self.port = free_port()
        printed = subprocess.run(
            [sys.executable, "-m", "game", "--adapters", str(adapters), "serve-config", "llama-cpp",
             "--port", str(self.port), "--out", str(folder / "llama-cpp.json")],
            cwd=ROOT, env=os.environ | {"IR_ENGINE_KEY": KEY}, capture_output=True, text=True, check=True).stdout
        self.command = shlex.split(printed.strip().splitlines()[-1])
        assert self.command[:3] == ["python", "-m", "game.llama_server"], printed
        self.command[0] = sys.executable
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.process = None

    def start(self) -> "EngineServer":
        log = open(self.folder / "server.log", "a")
        self.process = subprocess.Popen(self.command, cwd=self.folder, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("the model server exited:\n" + (self.folder / "server.log").read_text()[-3000:])
            try:
                if httpx.get(self.url + "/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError("the model server did not start")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    server = EngineServer(tmp_path_factory.mktemp("engine")).start()
    yield server
    server.kill()


def config(folder: Path, engine: EngineServer, **overrides) -> GameConfig:
    return GameConfig(results=folder / "results.db", engine_url=engine.url, engine_key=KEY,
                      max_new_tokens=TOKENS, **overrides)


@pytest.fixture(scope="module")
def room(engine, tmp_path_factory):
    return open_room(config(tmp_path_factory.mktemp("room"), engine))


@pytest.fixture(scope="module")
def cases():
    return {case_id: loaded.case for case_id, loaded in load_cases(ROOT / "scenarios").items()}


def test_the_server_plays_the_cases_it_has_adapters_for_and_the_others_prompt_only(room):
    assert set(SERVED) <= set(room.cases) and UNSERVED in room.cases
    assert {case_id: room.notes[case_id] for case_id in (*SERVED, UNSERVED)} == {
        **{case_id: "Fine-tuned suspect" for case_id in SERVED},
        UNSERVED: "Prompt-only suspect: the model server offers no adapter for this case"}
    assert room.suspect.adapters == {case_id: case_id for case_id in SERVED}


def test_a_wrong_key_stops_the_start_with_a_clear_message(engine, tmp_path):
    with pytest.raises(EngineUnavailable, match=f"model server at {engine.url} did not list its models.*401"):
        open_room(GameConfig(results=tmp_path / "results.db", engine_url=engine.url, engine_key="wrong"))


def answers(suspect, case, questions) -> list[str]:
    return [suspect.answer(case, [], question) for question in questions]


def test_the_served_adapter_answers_as_the_local_engine_does(engine, cases, base):
    # Same prompt, same weights, same greedy decoding: the answers come from the same topic of the case, in its own
    # lines. Not always the same line: a topic's answers are trained alike, so which one comes first is a near tie
    # that the repetition penalty (llama-cpp-python's server penalises only the answer's own tokens, the game's
    # engine the prompt's too) or llama.cpp's arithmetic in a batch of another size can tip.
    case = cases[SERVED[0]]
    questions = [probe.question for probe in case.probes[:4]]
    settings = GenerationSettings(max_new_tokens=TOKENS)
    remote = RemoteSuspect(engine.url, KEY, settings=settings)
    bare = answers(remote, case, questions)
    assert remote.use_served_adapter(case.id)
    tuned = answers(remote, case, questions)
    local = Suspect(base, device="cpu", engine="llama.cpp", settings=settings)
    assert local.load_adapter(adapter_files.inspect(ROOT / "adapters", load_cases(ROOT / "scenarios")[case.id], base))
    here = answers(local, case, questions)
    served_topics, local_topics = [[source_topic(a, case)[0] for a in said] for said in (tuned, here)]
    assert None not in served_topics, tuned
    assert sum(a == b for a, b in zip(served_topics, local_topics)) >= len(questions) - 1, (tuned, here)
    assert sum(a != b for a, b in zip(tuned, bare)) >= len(questions) - 1, (tuned, bare)  # the adapter is applied


def counts(result: dict) -> dict[str, int]:
    """Each figure of an evaluation as the number of answers (interrogations, for tell_rate) behind it."""
    return {metric: round(result[metric] * n) for metric, n in result["denominators"].items()
            if result.get(metric) is not None}


def test_an_evaluation_through_the_server_scores_within_one_answer_of_the_local_engine(engine, tmp_path):
    from training import eval as evaluation

    case_id = SERVED[1]
    run = [case_id, "--scenarios", str(ROOT / "scenarios"), "--adapters", str(ROOT / "adapters"), "--limit", "4",
           "--retest", "false", "--semantic", "false", "--json"]
    here = evaluation.main(*evaluation.parse(run))
    served = evaluation.main(*evaluation.parse(run + ["--engine_url", engine.url, "--engine_key", KEY]))
    assert served["variant"] == here["variant"] == "fine-tuned" and served["engine"].startswith("remote")
    assert served["n_answers"] == here["n_answers"] >= 10
    assert served["denominators"] == here["denominators"]
    served_counts, local_counts = counts(served), counts(here)
    assert all(abs(served_counts[m] - local_counts[m]) <= 1 for m in local_counts), (served_counts, local_counts)


@pytest.mark.browser
def test_a_whole_game_through_the_browser_on_the_server(room, serve, browser):
    case = json.loads((ROOT / "scenarios" / f"{SERVED[0]}.json").read_text())
    with opened(browser, serve(room)) as page:
        play_whole_game(page, case, "guilty" if case["guilty"] else "innocent", "served-game",
                        note="Fine-tuned suspect")
        expect(page.locator("#result")).to_contain_text("You were right")
        shoot(page, "served-game-4-result")
    [game] = room.store.games(case["id"])
    assert game["questions"] == 5 and all(e["answer"] for e in game["transcript"])


@pytest.fixture
def own_engine(tmp_path):
    """A server of this test's own, to kill."""
    server = EngineServer(tmp_path / "engine").start()
    yield server
    server.kill()


def test_the_server_killed_mid_answer_costs_the_player_only_a_message(own_engine, tmp_path):
    room = open_room(config(tmp_path, own_engine))
    game = room.new_game(SERVED[0]).game_id
    question = "Tell me everything you did that night, hour by hour."
    stream = room.ask(game, question)
    next(stream)  # the first words are on the player's screen
    own_engine.kill()
    with pytest.raises(EngineUnavailable, match="stopped in the middle of the answer.*ask it again"):
        for _ in stream:
            pass
    session = room.session(game)
    assert session.phase is Phase.QUESTIONING and session.questions_asked == 0  # the question was not used

    with pytest.raises(EngineUnavailable, match="cannot be reached.*ask it again"):  # down: refused at once
        list(room.ask(game, question))
    own_engine.start()
    answer = list(room.ask(game, question))[-1]
    assert answer and room.session(game).questions_asked == 1
    room.decide(game, accused=True)
    [stored] = room.store.games(SERVED[0])
    assert stored["transcript"] == [{"question": question, "answer": answer}]


def test_a_server_down_is_a_message_on_the_page_and_the_question_can_be_asked_again(own_engine, tmp_path, serve):
    room = open_room(config(tmp_path, own_engine))
    client = connect(serve(room))
    client.predict(SERVED[1], api_name="/new_game")
    history, progress, box, *_ = client.predict("Where were you during the blackout?", [], api_name="/ask")
    assert progress == status("Question 2 of 5")
    own_engine.kill()
    question = "Who else went down to the basement?"
    history, progress, box, *_ = client.predict(question, history, api_name="/ask")
    assert "model server cannot be reached" in progress and "ask it again" in progress
    assert box == question  # back in the box, to send again
    assert [text_of(m) for m in history if m["role"] == "user"] == ["Where were you during the blackout?"]
    own_engine.start()
    history, progress, box, *_ = client.predict(question, history, api_name="/ask")
    assert progress == status("Question 3 of 5") and text_of(history[-1])
    assert [text_of(m) for m in history if m["role"] == "user"] == ["Where were you during the blackout?", question]


def test_a_slow_server_is_a_clear_message(engine, cases):
    # The server answers one request at a time: behind a long completion, a question waits longer than allowed.
    impatient = RemoteSuspect(engine.url, KEY, settings=GenerationSettings(max_new_tokens=8), timeout_s=0.5)
    started = threading.Event()

    def hog():
        body = {"model": "base", "prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "max_tokens": 400, "temperature": 0,
                "stream": True}
        with httpx.stream("POST", engine.url + "/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                          timeout=300) as response:
            for _ in response.iter_lines():
                started.set()

    thread = threading.Thread(target=hog)
    thread.start()
    try:
        assert started.wait(120)
        with pytest.raises(EngineUnavailable, match="too slow to answer right now.*ask it again"):
            impatient.answer(cases[SERVED[0]], [], "Where were you?")
    finally:
        thread.join(300)


def test_serve_config_names_every_usable_adapter_for_vllm(tmp_path):
    usable = [case_id for case_id, loaded in load_cases(ROOT / "scenarios").items()
              if adapter_files.inspect(ROOT / "adapters", loaded, None).usable]
    out = subprocess.run([sys.executable, "-m", "game", "serve-config", "vllm", "--port", "8123"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    command = shlex.split(out.strip().splitlines()[-1])
    assert command[:2] == ["vllm", "serve"] and Path(command[2], "config.json").is_file()  # the base's folder
    assert command[command.index("--served-model-name") + 1] == "base"
    assert "--enable-lora" in command and command[command.index("--port") + 1] == "8123"
    modules = command[command.index("--lora-modules") + 1:]
    assert sorted(m.split("=")[0] for m in modules) == sorted(usable) and len(usable) >= 2
    assert all(Path(m.split("=", 1)[1], "adapter_config.json").is_file() for m in modules)
