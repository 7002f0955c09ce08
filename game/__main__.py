"""Command line of the game.

    python -m game validate [PATH ...]        check case files (default: scenarios/); warnings: what to write next
    python -m game list [--json]              the playable cases and their adapters
    python -m game schema                     print the JSON schema of a case file
    python -m game play CASE_ID [--questions-file F --verdict guilty|innocent] [--json]
    python -m game serve-config vllm|llama-cpp [--host H --port P --out FILE]
                                              the command that serves every adapter from a model server
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from game import adapters as adapter_files
from game import model_server
from game.config import ConfigError, GameConfig
from game.scenario import advice, json_schema, load_cases, read_cases
from game.session import MoveRefused


def validate(args: argparse.Namespace, config: GameConfig) -> int:
    """Errors (the file cannot be played: exit 1) and, for valid cases, warnings on what is worth writing next."""
    cases, problems = read_cases(args.paths or [config.scenarios])
    for problem in problems:
        print(problem)
    warnings = [f"{loaded.path}: {where}: warning: {what}" for loaded in cases.values()
                for where, what in advice(loaded.case)]
    if not args.quiet:
        for warning in warnings:
            print(warning)
    if not problems:
        print(f"{len(cases)} case(s) valid" + (f", {len(warnings)} warning(s)" if warnings else ""))
    return 1 if problems else 0


def list_cases(args: argparse.Namespace, config: GameConfig) -> int:
    # No base is loaded here (seconds, not a listing's job): staleness and presence come from the files alone.
    rows = []
    for case_id, loaded in sorted(load_cases(config.scenarios).items()):
        info = adapter_files.inspect(config.adapters, loaded, base=None)
        rows.append({"id": case_id, "title": loaded.case.title,
                     "adapter": str(info.path) if info.usable else None, "adapter_status": info.status.value})
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            print(f"{row['id']:28} {row['adapter_status']:8} {row['title']}")
    return 0


def play(args: argparse.Namespace, config: GameConfig) -> int:
    from game.remote import EngineUnavailable
    from game.room import UnknownCase, open_room

    try:
        room = open_room(config)
    except EngineUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        briefing = room.new_game(args.case_id)
    except UnknownCase as exc:
        print(exc, file=sys.stderr)
        return 2
    out = sys.stderr if args.json else sys.stdout
    print(f"{briefing.title}\n\n{briefing.briefing}\n\nSuspect: {briefing.suspect.name}, {briefing.suspect.age}, "
          f"{briefing.suspect.role}. [{briefing.suspect_note}]\n", file=out)
    if args.questions_file:
        questions = [q for q in Path(args.questions_file).read_text().splitlines() if q.strip()]
    else:
        questions = iter(lambda: input(f"Question ({room.session(briefing.game_id).questions_left} left, "
                                       "empty line to decide)> "), "")
    for question in questions:
        try:
            answer = ""
            for answer in room.ask(briefing.game_id, question):
                pass
        except MoveRefused as exc:
            print(f"Refused: {question!r}: {exc}", file=out)
            continue
        except EngineUnavailable as exc:
            print(f"Not answered: {question!r}: {exc}", file=out)
            continue
        print(f"Q: {question}\nA: {answer}\n", file=out)
        if not args.questions_file and room.session(briefing.game_id).questions_left == 0:
            break
    verdict = args.verdict
    while verdict not in ("guilty", "innocent"):
        verdict = input("Verdict (guilty/innocent)> ").strip().lower()
    try:
        result = room.decide(briefing.game_id, accused=verdict == "guilty").result
    except MoveRefused as exc:
        print(f"Refused: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({
            "case": briefing.case_id,
            "transcript": [{"question": e.question, "answer": e.answer} for e in result.transcript],
            "verdict": verdict, "correct": result.correct, "truth": result.truth,
        }, indent=2))
    else:
        print(f"Your verdict: {verdict}. You were {'right' if result.correct else 'wrong'}: the suspect was "
              f"{'guilty' if result.guilty else 'innocent'}.\n\nWhat really happened: {result.truth}")
    return 0


def serve_config(args: argparse.Namespace, config: GameConfig) -> int:
    from game.base import resolve

    try:
        print(model_server.serve_config(args.engine, config, resolve(config.base), args.host, args.port, args.out))
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m game", description=__doc__.split("\n")[0])
    parser.add_argument("--scenarios", type=Path, help="case folder (default: scenarios/, or $IR_SCENARIOS)")
    parser.add_argument("--adapters", type=Path, help="adapter folder (default: adapters/, or $IR_ADAPTERS)")
    parser.add_argument("--base", help="base model: embedded, a .gguf, a Llama folder or a hub id ($IR_BASE)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("validate", help="check case files; exit 1 on an error, warnings say what to write next")
    p.add_argument("paths", nargs="*", type=Path)
    p.add_argument("--quiet", action="store_true", help="errors only, no coverage warnings")
    p.set_defaults(run=validate)
    p = sub.add_parser("list", help="the playable cases")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=list_cases)
    p = sub.add_parser("schema", help="print the JSON schema of a case file")
    p.set_defaults(run=lambda args, config: print(json_schema(), end="") or 0)
    p = sub.add_parser("play", help="play one game on the terminal")
    p.add_argument("case_id")
    p.add_argument("--questions-file", help="one question per line; the sixth and later are refused")
    p.add_argument("--verdict", choices=["guilty", "innocent"])
    p.add_argument("--json", action="store_true", help="print the transcript and result as one JSON object")
    p.set_defaults(run=play)
    p = sub.add_parser("serve-config", help="print the command that serves every adapter from a model server")
    p.add_argument("engine", choices=model_server.ENGINES)
    p.add_argument("--host", default="127.0.0.1", help="interface the model server binds (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="its port (default 8000)")
    p.add_argument("--out", type=Path, help="llama-cpp: where to write its config file")
    p.set_defaults(run=serve_config)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:  # the engine's own settings are read as it starts, within the command
        return args.run(args, GameConfig.from_env(scenarios=args.scenarios, adapters=args.adapters, base=args.base))
    except ConfigError as exc:  # say which setting, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
