"""Twenty players at once against the game as it is served: each plays a whole game (five questions, then a
verdict) over the app's API on localhost. Measures answers/s and how long each answer takes to come back, and
checks that no answer went to the wrong session, no request failed and every game was recorded.

    .venv/bin/python benchmarks/load.py                                   # 20 players, whole games
    .venv/bin/python benchmarks/load.py --players 5 --questions 2 --label quick
    .venv/bin/python benchmarks/load.py --games 3 --label games3          # three games each, one after another
    .venv/bin/python benchmarks/load.py --engine_url http://127.0.0.1:8000/v1 --label llama-cpp-server   # model apart

Serves `python app.py` in a child process on a free port, as `make play` does: the bundled cases and adapters,
the game's own generation settings, and a fresh results database in a temporary folder. With --engine_url the
app asks that model server for every answer (game/remote.py; start one with `python -m game serve-config`). Each player is one
gradio_client Client (one browser session) in its own thread, and all start together once the server has computed
every case's system prompt (its log says "suspect ready"; the wait is server_warm_s). An answer's latency runs
from sending the question to its final text, so it includes the wait behind other players' answers; "first words"
runs to the first text of the answer. The machine's load average is recorded before and after: on a shared
machine the figures are only as good as that.

Prints one JSON object and writes benchmarks/results/load_<device>[_<label>].json.
"""

# No `from __future__ import annotations`: HfArgumentParser reads the field types at runtime.
import html
import importlib.metadata
import json
import os
import random
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import ROOT, RESULTS, machine, summary, versions, write_result  # noqa: E402

POLL_S = 0.01  # a player's look at the answer so far: first words are timed to within this
QUESTIONS = ["Where were you last night?", "Who else could get in?", "What did you see when you arrived?",
             "Why should I believe you?", "Did you do it?"]


@dataclass
class Arguments:
    players: int = field(default=20, metadata={"help": "Players at once; each plays one game."})
    questions: int = field(default=5, metadata={"help": "Questions per game (the game allows five)."})
    games: int = field(default=1, metadata={
        "help": "Games each player plays in a row, each a new game of the same case (a classroom's second round "
                "meets a server that has played the first); the figures are given for each round too."})
    max_new_tokens: int | None = field(default=None, metadata={"help": "Answer length cap; default: the game's."})
    think_s: float = field(default=0.0, metadata={
        "help": "Seconds a player takes between an answer and the next question (reading it, typing the next one), "
                "each pause drawn from half to one and a half times it; 0: at once, every player always waiting."})
    device: str | None = field(default=None, metadata={"help": "cpu or cuda for the server; default: the game's."})
    engine_url: str | None = field(default=None, metadata={
        "help": "An OpenAI-compatible model server that answers for the app (IR_ENGINE_URL; $IR_ENGINE_KEY is passed "
                "on); default: the model runs in the app's process."})
    scenarios: Path = field(default=ROOT / "scenarios", metadata={"help": "Folder of case files."})
    adapters: Path = field(default=ROOT / "adapters", metadata={"help": "Folder of trained adapters."})
    client_timeout_s: float = field(default=600, metadata={"help": "How long a player waits for any one reply."})
    client_nice: int = field(default=0, metadata={
        "help": "Niceness of the players' clients (this process, once the server has started): they share the "
                "server's CPU here, where real players' browsers run on their own devices."})
    label: str | None = field(default=None, metadata={"help": "Suffix of the result file."})
    out: Path = field(default=RESULTS, metadata={"help": "Folder for the JSON result."})


def text_of(message) -> str:
    content = message["content"]
    return content if isinstance(content, str) else "".join(part["text"] for part in content)


def serve(args: Arguments, folder: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = os.environ | {"IR_SCENARIOS": str(args.scenarios), "IR_ADAPTERS": str(args.adapters),
                        "IR_RESULTS_DB": str(folder / "results.db")}
    if args.max_new_tokens:
        env["IR_MAX_NEW_TOKENS"] = str(args.max_new_tokens)
    if args.device:
        env["IR_DEVICE"] = args.device
    if args.engine_url:
        env["IR_ENGINE_URL"] = args.engine_url
    log = open(folder / "server.log", "w")
    server = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=ROOT, env=env, stdout=log,
                              stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    while True:
        if server.poll() is not None:
            raise RuntimeError("the server exited:\n" + (folder / "server.log").read_text()[-3000:])
        try:
            urllib.request.urlopen(url, timeout=5)
            return server, url
        except OSError:
            time.sleep(0.5)


def warm(server: subprocess.Popen, log: Path, timeout_s: float) -> float:
    """When the server says every case's system prompt is computed (game.room): players who came sooner would share
    the CPU with that start-up work, which is not what this measures."""
    deadline = time.perf_counter() + timeout_s
    while "suspect ready:" not in log.read_text() and server.poll() is None and time.perf_counter() < deadline:
        time.sleep(0.2)
    return time.perf_counter()


def in_round(question: str, round_: int) -> str:
    """A question as a player's game number round_ (from 0) asks it: a later game's begin otherwise, as a new game's
    would, and no two are alike."""
    return f"Game {round_ + 1}: {question}" if round_ else question


def play(url: str, p: int, case_id: str, args: Arguments, start: threading.Barrier) -> list[dict]:
    """One player's games, one after another in one browser session."""
    from gradio_client import Client

    # ssl_verify=False: the server is plain HTTP on localhost, and gradio_client makes a new httpx client (which
    # loads the CA bundle when it verifies, ~10 ms of CPU) for every request it sends.
    try:
        client = Client(url, verbose=False, ssl_verify=False, httpx_kwargs={"timeout": args.client_timeout_s})
    except Exception as exc:  # each of this player's games fails with it: counted, as any failed game
        client = exc
    finally:
        start.wait()  # the others start anyway
    pauses = random.Random(p)
    return [play_game(client, p, case_id, round_, args, pauses) for round_ in range(args.games)]


def play_game(client, p: int, case_id: str, round_: int, args: Arguments, pauses: random.Random) -> dict:
    game = {"player": p, "case": case_id, "round": round_, "asked": [], "answers": [], "answer_s": [],
            "first_words_s": [], "error": None}
    try:
        if isinstance(client, Exception):
            raise client
        client.predict(case_id, api_name="/new_game")
        history = []
        for q in range(args.questions):
            if q or round_:
                time.sleep(args.think_s * pauses.uniform(0.5, 1.5))
            question = in_round(f"{QUESTIONS[q % len(QUESTIONS)]} (detective {p + 1}, question {q + 1})", round_)
            sent = time.perf_counter()
            first_words = None
            job = client.submit(question, history, api_name="/ask")
            # The streamed updates, looked at every POLL_S until the first words, then the job waited for (a future):
            # iterating over the job instead waits in a 1 ms sleep loop (gradio_client's Job.__next__), and twenty
            # players looking all along wake 2,000 times a second on the two cores of the server they measure, which
            # real players' browsers, on their own devices, do not.
            while first_words is None and not job.done():
                outputs = job.outputs()
                if outputs and text_of(outputs[-1][0][-1]).strip("… "):
                    first_words = time.perf_counter() - sent
                else:
                    time.sleep(POLL_S)
            history = job.result()[0]
            game["answer_s"].append(time.perf_counter() - sent)
            game["first_words_s"].append(first_words if first_words is not None else game["answer_s"][-1])
            game["asked"].append(question)
            if [text_of(m) for m in history if m["role"] == "user"] != game["asked"]:
                raise AssertionError(f"player {p} got a chat that is not theirs")
            game["answers"].append(html.unescape(text_of(history[-1])))
        client.predict(api_name="/guilty" if p % 2 else "/innocent")
    except Exception as exc:  # counted, not fatal: the figures say how many failed
        game["error"] = f"{type(exc).__name__}: {exc}"
    return game


def cpu_seconds(pid: int) -> float | None:
    """CPU time a process has used, all its threads (Linux's /proc; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def code_version() -> dict:
    """Which code was measured: the commit, and the game's files that differed from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.rstrip()

    return {"commit": git("rev-parse", "--short", "HEAD").strip(),
            "uncommitted": git("status", "--porcelain", "--", "app.py", "game").splitlines()}


def check(games: list[dict], db: Path) -> dict:
    """Did each finished game land in the store whole, with this player's own questions and answers?"""
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT case_id, questions, transcript FROM games").fetchall()
    stored = {}
    for case_id, questions, transcript in rows:
        exchanges = json.loads(transcript)
        stored[tuple(e["question"] for e in exchanges)] = (case_id, questions, [e["answer"] for e in exchanges])
    finished = [g for g in games if g["error"] is None]
    mixups = [g["player"] for g in finished
              if stored.get(tuple(g["asked"])) != (g["case"], len(g["asked"]), g["answers"])]
    return {"games_finished": len(finished), "games_recorded": len(rows), "sessions_mixed_up": len(mixups),
            "players_mixed_up": mixups}


def by_round(games: list[dict], rounds: int) -> list[dict]:
    """The latencies of the players' first games, of their second ones, and so on."""
    def latencies(r: int, key: str) -> dict:
        return summary([s for g in games if g["round"] == r for s in g[key]], 3)

    return [{"round": r, "answer_latency_s": latencies(r, "answer_s"),
             "first_words_latency_s": latencies(r, "first_words_s")} for r in range(rounds)]


def main(args: Arguments) -> dict:
    import torch

    from app import ANSWERS_AT_ONCE
    from game.scenario import load_cases
    from game.suspect import GenerationSettings

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cases = sorted(load_cases(args.scenarios))
    load_before = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        started = time.perf_counter()
        server, url = serve(args, folder)
        ready_s = time.perf_counter() - started
        warm_s = warm(server, folder / "server.log", args.client_timeout_s) - started
        os.nice(args.client_nice)
        try:
            start = threading.Barrier(args.players + 1)  # the players and this thread, which starts the clock
            with ThreadPoolExecutor(args.players) as pool:
                futures = [pool.submit(play, url, p, cases[p % len(cases)], args, start) for p in range(args.players)]
                start.wait()
                began, server_began, clients_began = time.perf_counter(), cpu_seconds(server.pid), time.process_time()
                games = [game for f in futures for game in f.result()]
            wall = time.perf_counter() - began
            # Where the machine's cores went: the server (engine and web tier), and these clients, which real
            # players' browsers would not take from it. None where /proc is missing or the server has gone.
            server_ended = cpu_seconds(server.pid)
            server_cpu = None if None in (server_began, server_ended) else server_ended - server_began
            clients_cpu = time.process_time() - clients_began
            checked = check(games, folder / "results.db")
        finally:
            server.terminate()
            server.wait(timeout=30)
        server_log = (folder / "server.log").read_text()
    answers = [s for g in games for s in g["answer_s"]]
    errors = [g["error"] for g in games if g["error"]]
    engine = next((line.split("suspect engine:", 1)[1].strip() for line in server_log.splitlines()
                   if "suspect engine:" in line), None)
    settings = GenerationSettings()
    return {
        "benchmark": "load",
        "label": args.label,
        "machine": machine(device) | {"load_average_before": load_before},
        "code": code_version(),
        "versions": versions() | {name: importlib.metadata.version(name) for name in ("gradio", "gradio_client")},
        "settings": {"players": args.players, "questions_per_game": args.questions, "cases": cases,
                     "max_new_tokens": args.max_new_tokens or settings.max_new_tokens, "engine": engine,
                     "answers_at_once": ANSWERS_AT_ONCE, "threads": os.environ.get("IR_THREADS"),
                     "draft_tokens": os.environ.get("IR_DRAFT_TOKENS"), "lanes": os.environ.get("IR_LANES"),
                     "games_per_player": args.games, "think_s": args.think_s, "client_nice": args.client_nice,
                     "engine_url": args.engine_url,
                     "transport": "gradio_client over HTTP on localhost", "client_poll_s": POLL_S},
        "server_ready_s": round(ready_s, 2),
        "server_warm_s": round(warm_s, 2),
        "wall_s": round(wall, 2),
        "answers": len(answers),
        "answers_per_s": round(len(answers) / wall, 3),
        "cpu_s": {"server": None if server_cpu is None else round(server_cpu, 1), "clients": round(clients_cpu, 1),
                  "cores_x_wall": round((os.cpu_count() or 1) * wall, 1)},
        "games_per_minute": round(checked["games_finished"] / wall * 60, 2),
        "answer_latency_s": summary(answers, 3),
        "first_words_latency_s": summary([s for g in games for s in g["first_words_s"]], 3),
        "errors": len(errors),
        "error_messages": errors[:10],
        **checked,
        "every_game_recorded": checked["games_recorded"] == args.players * args.games and not errors,
        "rounds": by_round(games, args.games) if args.games > 1 else None,
        "games": [{"player": g["player"], "case": g["case"], "round": g["round"],
                   "answer_s": [round(s, 3) for s in g["answer_s"]],
                   "first_words_s": [round(s, 3) for s in g["first_words_s"]], "error": g["error"]} for g in games],
    }


if __name__ == "__main__":
    from transformers import HfArgumentParser

    (arguments,) = HfArgumentParser(Arguments).parse_args_into_dataclasses()
    figures = main(arguments)
    figures["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    slug = figures["machine"]["device"].split(":")[0] + (f"_{arguments.label}" if arguments.label else "")
    write_result(f"load_{slug}", figures, arguments.out)
