"""How long a player waits: time to first token, tokens/s, full-answer time and cold start of the game's suspect.

    .venv/bin/python benchmarks/answer_latency.py                     # this machine, every bundled case
    .venv/bin/python benchmarks/answer_latency.py --engine torch      # force the torch path (default: auto)
    .venv/bin/python benchmarks/answer_latency.py --rounds 3 --label fp32-baseline
    .venv/bin/python benchmarks/answer_latency.py --rounds 2 --draft_tokens 0 --label no-drafts  # CPU, no guessing

Each bundled case is questioned through `game.suspect.Suspect`, with the game's generation settings and the case's
adapter (a stand-in of the training recipe's shape, rank 4 on all seven projections, where a case has none yet):
its first five probe questions in one interrogation, the transcript growing as in the game. One warm-up answer is
not counted. Cold start is a fresh `python` process that resolves the base, opens the suspect, loads every adapter
and answers one question, timed from before its launch. The machine's load average is recorded before and after:
on a shared machine the figures are only as good as that.

Prints one JSON object and writes benchmarks/results/answer_latency_<device>[_<label>].json.
"""

# No `from __future__ import annotations`: HfArgumentParser reads the field types at runtime.
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

START = time.time()  # the cold-start child reports against its own launch too

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import ROOT, RESULTS, case_adapters, device_slug, machine, summary, versions, write_result  # noqa: E402

QUESTIONS_PER_CASE = 5  # one interrogation, as many questions as the game allows


@dataclass
class Arguments:
    base: str = field(default="embedded", metadata={"help": "Base model spec (game.base.resolve)."})
    device: str | None = field(default=None, metadata={"help": "cpu or cuda; default: cuda when there is one."})
    engine: str = field(default="auto", metadata={"help": "Suspect engine: auto, torch or llama.cpp."})
    scenarios: Path = field(default=ROOT / "scenarios", metadata={"help": "Folder of case files."})
    adapters: Path = field(default=ROOT / "adapters", metadata={"help": "Folder of trained adapters."})
    no_adapters: bool = field(default=False, metadata={"help": "Prompt-only suspects (no LoRA at all)."})
    rounds: int = field(default=1, metadata={"help": "Times the whole question set is asked."})
    threads: int | None = field(default=None, metadata={"help": "torch and llama.cpp threads; default: theirs."})
    draft_tokens: int | None = field(default=None, metadata={
        "help": "llama.cpp: most guessed tokens checked at once (game.drafts; 0: none); default: the engine's."})
    cold_start: bool = field(default=True, metadata={"help": "Also time a fresh process to its first answer."})
    label: str | None = field(default=None, metadata={"help": "Suffix of the result file, e.g. fp32-baseline."})
    out: Path = field(default=RESULTS, metadata={"help": "Folder for the JSON result."})
    cold_child: bool = field(default=False, metadata={"help": "(internal) be the cold-start process."})


def open_suspect(args: Arguments, cases: dict, standins: Path, settle: bool = True):
    """The suspect as game.room.open_room builds it: base resolved, adapters loaded beside it, every case's system
    prompt prepared; with `settle`, once those are done (the game a player meets a moment after its start)."""
    from game.base import resolve
    from game.suspect import Suspect

    base = resolve(args.base)
    kwargs = {"device": args.device}
    if "engine" in inspect.signature(Suspect).parameters:
        kwargs["engine"] = args.engine
    suspect = Suspect(base, **kwargs)
    infos = {} if args.no_adapters else case_adapters(cases, base, args.adapters, standins)
    loaded = {case_id: suspect.load_adapter(info) for case_id, info in infos.items()}
    prepared = [suspect.prepare(cases[case_id].case) for case_id in sorted(cases)]
    for request in prepared if settle else ():
        request.wait()
    kinds = {case_id: ("stand-in" if "stand-in" in info.message else "trained") for case_id, info in infos.items()}
    return suspect, loaded, kinds


def ask(suspect, case, transcript, question) -> dict:
    """One answer, timed as the player sees it: first visible text, first token (when the suspect reports it)."""
    from game.session import Exchange  # noqa: F401

    stats = {}
    takes_stats = "stats" in inspect.signature(suspect.stream).parameters
    started = time.perf_counter()
    first_text = None
    final = ""
    for final in suspect.stream(case, transcript, question, **({"stats": stats} if takes_stats else {})):
        if first_text is None:
            first_text = time.perf_counter() - started
    total = time.perf_counter() - started
    row = {"case": case.id, "question": question, "answer": final, "total_s": round(total, 4),
           "first_text_s": round(first_text if first_text is not None else total, 4)}
    if takes_stats:
        row.update({k: (round(v, 4) if isinstance(v, float) else v) for k, v in stats.items()})
    else:  # the unoptimised suspect reports nothing: count the answer's own tokens (the cut tail is missed)
        row["new_tokens"] = len(suspect.tokenizer(final)["input_ids"]) + 1
        row["tokens_estimated"] = True
    return row


def cold_child(args: Arguments) -> None:
    from game.scenario import load_cases

    cases = load_cases(args.scenarios)
    imported = time.time()
    with tempfile.TemporaryDirectory() as standins:
        suspect, loaded, _ = open_suspect(args, cases, Path(standins), settle=False)
        ready = time.time()
        case = cases[sorted(cases)[0]].case
        answer = suspect.answer(case, [], case.probes[0].question)
    print(json.dumps({"imported": imported, "ready": ready, "answered": time.time(), "answer": answer,
                      "adapters_loaded": sum(loaded.values())}))


def measure_cold_start(args: Arguments) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--cold_child", "--engine", args.engine,
               "--base", args.base, "--scenarios", str(args.scenarios), "--adapters", str(args.adapters)]
    if args.device:
        command += ["--device", args.device]
    if args.no_adapters:
        command.append("--no_adapters")
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = env["IR_THREADS"] = str(args.threads)
    launched = time.time()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        return {"error": done.stderr[-2000:]}
    child = json.loads(done.stdout.strip().splitlines()[-1])
    return {"process_start_to_first_answer_s": round(child["answered"] - launched, 3),
            "to_imports_and_cases_s": round(child["imported"] - launched, 3),
            "to_suspect_ready_s": round(child["ready"] - launched, 3),
            "first_answer_s": round(child["answered"] - child["ready"], 3),
            "adapters_loaded": child["adapters_loaded"], "answer": child["answer"]}


def main(args: Arguments) -> None:
    import torch

    from game.scenario import load_cases
    from game.session import Exchange
    from game.suspect import GenerationSettings

    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["IR_THREADS"] = str(args.threads)  # game.llamacpp's
    if args.draft_tokens is not None:
        os.environ["IR_DRAFT_TOKENS"] = str(args.draft_tokens)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cases = load_cases(args.scenarios)
    load_before = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory() as standins:
        opened = time.perf_counter()
        suspect, loaded, kinds = open_suspect(args, cases, Path(standins))
        open_s = time.perf_counter() - opened
        first = cases[sorted(cases)[0]].case
        ask(suspect, first, [], "Warm-up: what is your name?")
        rows = []
        for _ in range(args.rounds):
            for case_id in sorted(cases):
                case = cases[case_id].case
                transcript: list = []
                for probe in case.probes[:QUESTIONS_PER_CASE]:
                    row = ask(suspect, case, transcript, probe.question)
                    row["turn"] = len(transcript) + 1
                    rows.append(row)
                    transcript.append(Exchange(probe.question, row["answer"]))
    cold = measure_cold_start(args) if args.cold_start else None
    tokens = sum(r["new_tokens"] for r in rows)
    decode_rates = [(r["new_tokens"] - 1) / (r["total_s"] - r["first_token_s"]) for r in rows
                    if "first_token_s" in r and r["new_tokens"] > 1 and r["total_s"] > r["first_token_s"]]
    engine = getattr(suspect, "engine_name", "transformers generate (unoptimised)")
    threads = getattr(getattr(suspect, "_engine", None), "threads", None) or torch.get_num_threads()
    drafted, accepted = (sum(r.get(k, 0) for r in rows) for k in ("drafted_tokens", "accepted_tokens"))
    result = {
        "benchmark": "answer_latency",
        "label": args.label,
        "machine": machine(device) | {"load_average_before": load_before},
        "versions": versions(),
        "settings": {"engine": engine, "engine_requested": args.engine, "threads": threads, "base": args.base,
                     "generation": asdict(GenerationSettings()), "adapters": kinds if not args.no_adapters else None,
                     "adapters_loaded": sum(loaded.values()), "cases": sorted(cases),
                     "draft_tokens": getattr(suspect, "draft_tokens", None),
                     "questions_per_case": QUESTIONS_PER_CASE, "rounds": args.rounds},
        "open_suspect_s": round(open_s, 3),
        "answers": len(rows),
        "new_tokens": tokens,
        "ttft_s": summary([r["first_token_s"] for r in rows if "first_token_s" in r]),
        "first_text_s": summary([r["first_text_s"] for r in rows]),
        "decode_tokens_per_s": summary(decode_rates, 2),
        "tokens_per_s_overall": round(tokens / sum(r["total_s"] for r in rows), 2),
        "drafts": {"drafted_tokens": drafted, "accepted_tokens": accepted,
                   "accepted_share": round(accepted / drafted, 3) if drafted else None},
        "answer_s": summary([r["total_s"] for r in rows]),
        "cold_start": cold,
        "rows": rows,
    }
    slug = device_slug(device) + (f"_{args.label}" if args.label else "")
    write_result(f"answer_latency_{slug}", result, args.out)


if __name__ == "__main__":
    from transformers import HfArgumentParser

    (arguments,) = HfArgumentParser(Arguments).parse_args_into_dataclasses()
    if arguments.cold_child:
        cold_child(arguments)
    else:
        main(arguments)
