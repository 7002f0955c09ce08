"""The players of benchmarks/load.py without the web server: each plays a whole game through `Room.ask` in a thread
of this process, so the figures are the engine's alone (no Gradio, no HTTP clients sharing the CPU).

    .venv/bin/python benchmarks/load_in_process.py                     # 20 players, whole games, at once
    IR_BF16=0 .venv/bin/python benchmarks/load_in_process.py --label q4_1   # the base as stored
    IR_LANES=1 .venv/bin/python benchmarks/load_in_process.py --label one-lane   # the cases' passes in turn
    .venv/bin/python benchmarks/load_in_process.py --games 5 --label games5     # five games each, in a row

The bundled cases and adapters, the game's settings; every case is asked one question first (one after another), so
that each has its context and system prompt before the players start together. Latencies as load.py's: an answer
from the question to its final text, first words to its first text. Prints one JSON object and writes
benchmarks/results/load_in_process_<device>[_<label>].json.
"""

# No `from __future__ import annotations`: HfArgumentParser reads the field types at runtime.
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS, machine, summary, versions, write_result  # noqa: E402
from benchmarks.load import QUESTIONS, by_round, in_round  # noqa: E402


@dataclass
class Arguments:
    players: int = field(default=20, metadata={"help": "Players at once; each plays one game."})
    questions: int = field(default=5, metadata={"help": "Questions per game."})
    games: int = field(default=1, metadata={"help": "Games each player plays in a row (load.py's --games)."})
    label: str | None = field(default=None, metadata={"help": "Suffix of the result file."})
    out: Path = field(default=RESULTS, metadata={"help": "Folder for the JSON result."})


def main(args: Arguments) -> dict:
    from game.config import GameConfig
    from game.room import open_room

    load_before = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory() as tmp:
        room = open_room(GameConfig(results=Path(tmp) / "results.db"))
        cases = sorted(room.cases)
        started = time.perf_counter()
        for case_id in cases:
            for _ in room.ask(room.new_game(case_id).game_id, "Hello."):
                pass
        warm_s = time.perf_counter() - started
        games = []

        def play(p: int) -> None:
            for round_ in range(args.games):
                game_id = room.new_game(cases[p % len(cases)]).game_id
                game = {"round": round_, "answer_s": [], "first_words_s": []}
                for q in range(args.questions):
                    sent, first = time.perf_counter(), None
                    question = in_round(f"{QUESTIONS[q % len(QUESTIONS)]} (detective {p + 1})", round_)
                    for partial in room.ask(game_id, question):
                        if first is None and partial.strip("… "):
                            first = time.perf_counter() - sent
                    game["answer_s"].append(time.perf_counter() - sent)
                    game["first_words_s"].append(first if first is not None else game["answer_s"][-1])
                room.decide(game_id, accused=p % 2 == 1)
                games.append(game)

        players = [threading.Thread(target=play, args=(p,)) for p in range(args.players)]
        began = time.perf_counter()
        for player in players:
            player.start()
        for player in players:
            player.join()
        wall = time.perf_counter() - began
        suspect = room.suspect
    answers = [s for g in games for s in g["answer_s"]]
    return {
        "benchmark": "load_in_process",
        "label": args.label,
        "machine": machine(suspect.device) | {"load_average_before": load_before,
                                              "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "versions": versions(),
        "settings": {"players": args.players, "questions_per_game": args.questions, "games_per_player": args.games,
                     "cases": cases,
                     "engine": suspect.engine_name, "base_weights": getattr(suspect, "weights", None),
                     "lanes": os.environ.get("IR_LANES")},
        "warm_s": round(warm_s, 2),
        "wall_s": round(wall, 2),
        "answers": len(answers),
        "answers_per_s": round(len(answers) / wall, 3),
        "answer_latency_s": summary(answers, 3),
        "first_words_latency_s": summary([s for g in games for s in g["first_words_s"]], 3),
        "rounds": by_round(games, args.games) if args.games > 1 else None,
    }


if __name__ == "__main__":
    from transformers import HfArgumentParser

    (arguments,) = HfArgumentParser(Arguments).parse_args_into_dataclasses()
    figures = main(arguments)
    slug = figures["machine"]["device"].split(":")[0] + (f"_{arguments.label}" if arguments.label else "")
    write_result(f"load_in_process_{slug}", figures, arguments.out)
