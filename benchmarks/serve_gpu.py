"""One GPU, many players: the game's own answer path (game.suspect.Suspect, torch engine) on CUDA, with adapters.

    python3 benchmarks/serve_gpu.py --base /tmp/base/base.gguf            # on the GPU machine (~5 min)
    python3 benchmarks/serve_gpu.py --device cpu --compile false --players 4 --questions 2 --fixed_tokens 16 \
        --peft_reference false

Every case's adapter is loaded beside one bf16 base (adapters/<case_id>/ where the game would use it, else a
stand-in of the training recipe's shape). Then, after a warm-up round (torch.compile and the
CUDA graphs are built there, and timed):
1. single stream: one player questions one case, five questions in one interrogation, the game's settings
   (greedy, stop at the end of the turn or once the answer is settled): tokens/s while decoding, time to first
   token, answer time;
2. players: N players (default 32), on the cases in turn so that every batch mixes adapters, each questioning its
   case at once and at full speed: aggregate tokens/s, p50/p95 answer time and time to first token;
3. fixed length: 1 and N players each asking for exactly --fixed_tokens new tokens (no stop), one answer each: the
   shape of the issue's reference figures (plain transformers, 200-token prompt, 64 new tokens);
4. reference: peft's own mixed-adapter batch (generate with adapter_names=), eager, N players, same fixed length.

Prints one JSON object and writes benchmarks/results/serve_gpu_<gpu>.json. Needs only torch, transformers, peft,
gguf and pydantic.
"""

# No `from __future__ import annotations`: HfArgumentParser reads the field types at runtime.
import dataclasses
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import ROOT, RESULTS, case_adapters, device_slug, machine, summary, versions, write_result  # noqa: E402

WARM_UP_QUESTIONS = ["Where were you last night?", "Tell me about your evening, step by step, with times.",
                     "Did you see or hear anything unusual?", "What do you know about what happened?",
                     "I think you're lying to me."]


@dataclass
class Arguments:
    base: str = field(default="/tmp/base/base.gguf" if Path("/tmp/base/base.gguf").is_file() else "embedded",
                      metadata={"help": "Base model spec (game.base.resolve); the device keeps a GGUF in /tmp/base."})
    device: str = field(default="cuda", metadata={"help": "cuda, or cpu for a smoke run."})
    players: int = field(default=32, metadata={"help": "Concurrent players (and the engine's batch)."})
    questions: int = field(default=5, metadata={"help": "Questions per player, in one interrogation."})
    fixed_tokens: int = field(default=64, metadata={"help": "New tokens per answer in the fixed-length runs."})
    compile: bool = field(default=True, metadata={"help": "torch.compile the layer (the game's default on CUDA)."})
    switch_interval: float = field(default=0.0, metadata={"help": "sys.setswitchinterval for this run (seconds); "
                                                                 "0: Python's own (5 ms)."})
    cuda_graphs: bool = field(default=True, metadata={"help": "Replay decode steps as CUDA graphs."})
    overlap: bool = field(default=True, metadata={"help": "Launch each step before handing out the last one's tokens "
                                                         "(the game's default on CUDA)."})
    peft_reference: bool = field(default=True, metadata={"help": "Also time peft's mixed-adapter generate."})
    scenarios: Path = field(default=ROOT / "scenarios", metadata={"help": "Folder of case files."})
    adapters: Path = field(default=ROOT / "adapters", metadata={"help": "Folder of trained adapters."})
    out: Path = field(default=RESULTS, metadata={"help": "Folder for the JSON result."})


def load_adapters(suspect, cases: dict, base, args: Arguments, standins: Path) -> dict:
    """Load each case's adapter (a stand-in where the game would not use it: common.case_adapters) into the suspect:
    {case_id: (its folder, "trained" or "stand-in", plus " (failed to load)" where it did not load)}."""
    out = {}
    for case_id, info in case_adapters(cases, base, args.adapters, standins).items():
        kind = "stand-in" if info.message.startswith("stand-in") else "trained"
        out[case_id] = (info.path, kind + ("" if suspect.load_adapter(info) else " (failed to load)"))
    return out


def interrogate(suspect, case, questions: list[str], rows: list, start: threading.Barrier | None = None) -> None:
    from game.session import Exchange

    if start is not None:
        start.wait()
    transcript = []
    for question in questions:
        stats: dict = {}
        answer = ""
        for answer in suspect.stream(case, transcript, question, stats=stats):
            pass
        rows.append(stats | {"case": case.id, "end": time.perf_counter()})
        transcript.append(Exchange(question, answer))


def players_run(suspect, cases: list, questions_of, players: int) -> dict:
    """Every player at once, each in its own thread as under the web server; players take the cases in turn."""
    rows: list = []
    start = threading.Barrier(players + 1)
    threads = [threading.Thread(target=interrogate, args=(suspect, cases[i % len(cases)],
                                                          questions_of(cases[i % len(cases)]), rows, start))
               for i in range(players)]
    for t in threads:
        t.start()
    start.wait()
    began = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - began
    return figures(rows, wall)


def figures(rows: list, wall: float) -> dict:
    tokens = sum(r["new_tokens"] for r in rows)
    decode = [(r["new_tokens"] - 1) / (r["total_s"] - r["first_token_s"]) for r in rows
              if r["new_tokens"] > 1 and r["total_s"] > r["first_token_s"]]
    return {"answers": len(rows), "new_tokens": tokens, "wall_s": round(wall, 3),
            "aggregate_tokens_per_s": round(tokens / wall, 1),
            "decode_tokens_per_s_per_player": summary(decode, 1),
            "answer_s": summary([r["total_s"] for r in rows]), "ttft_s": summary([r["first_token_s"] for r in rows]),
            "prompt_tokens": summary([r["prompt_tokens"] for r in rows], 0),
            "cached_prompt_tokens": summary([r["cached_tokens"] for r in rows], 0)}


def fixed_run(suspect, cases: list, players: int, tokens: int, offset: int) -> dict:
    """Each player asks one question and gets exactly `tokens` new tokens: the engine's eos is set aside. Runs with
    different offsets ask different questions, so that none finds its whole prompt cached by an earlier run."""
    from game.serving import Request
    from game.prompt import chat

    engine = suspect._engine
    eos, engine.eos = engine.eos, set()
    try:
        requests = []
        began = time.perf_counter()
        for i in range(players):
            case = cases[i % len(cases)]
            prompt, prefix = suspect._prompt(case, chat(case, [], case.probes[(i + offset) % len(case.probes)].question))
            requests.append(engine.submit(Request(prompt, case.id if case.id in suspect.adapters else None, prefix,
                                                  tokens, suspect.settings.repetition_penalty)))
        rows = []
        for r in requests:
            n = 0
            while (item := r.tokens.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                n += 1
            end = time.perf_counter()
            rows.append({"new_tokens": n, "total_s": end - r.submitted, "first_token_s": r.first_token - r.submitted,
                         "prompt_tokens": len(r.prompt), "cached_tokens": r.cached_tokens})
        return figures(rows, max(time.perf_counter(), end) - began)
    finally:
        engine.eos = eos


def peft_reference(base, cases: list, adapters: dict, players: int, tokens: int, device: str) -> dict:
    """peft's own way to batch players of different cases: one generate with adapter_names=, eager."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from game.prompt import chat

    tokenizer = AutoTokenizer.from_pretrained(base.path)
    tokenizer.padding_side = "left"
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(base.path, dtype=dtype).to(device).eval()
    names = sorted(adapters)
    model = PeftModel.from_pretrained(model, str(adapters[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(adapters[name]), adapter_name=name)
    model.eval()
    out = {}
    for batch in sorted({1, players}):
        chosen = [cases[i % len(cases)] for i in range(batch)]
        texts = [tokenizer.apply_chat_template(chat(c, [], c.probes[0].question), add_generation_prompt=True,
                                               tokenize=False) for c in chosen]
        inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        kwargs = dict(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                      repetition_penalty=1.1, pad_token_id=tokenizer.pad_token_id,
                      adapter_names=[c.id if c.id in adapters else "__base__" for c in chosen])
        with torch.inference_mode():
            model.generate(**(kwargs | {"max_new_tokens": 2, "min_new_tokens": 2}))  # warm-up
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            began = time.perf_counter()
            model.generate(**kwargs)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
        wall = time.perf_counter() - began
        out[f"batch_{batch}"] = {"wall_s": round(wall, 3), "tokens_per_s": round(batch * tokens / wall, 1),
                                 "prompt_tokens": int(inputs["input_ids"].shape[1])}
    return out


def main(args: Arguments) -> None:
    import torch

    from game.base import resolve
    from game.scenario import load_cases
    from game.suspect import GenerationSettings, Suspect

    if args.switch_interval:  # how long a thread that wants the GIL may wait for it (the engine's worker, say)
        sys.setswitchinterval(args.switch_interval)
    loaded = load_cases(args.scenarios)
    cases = [loaded[c].case for c in sorted(loaded)]
    base = resolve(args.base)
    opened = time.perf_counter()
    graphs = args.cuda_graphs and args.device.startswith("cuda")
    suspect = Suspect(base, device=args.device, engine="torch", max_batch=args.players, compile=args.compile,
                      cuda_graphs=graphs, overlap=args.overlap)
    with tempfile.TemporaryDirectory() as standins:
        adapters = load_adapters(suspect, loaded, base, args, Path(standins))
        kinds = {case_id: kind for case_id, (_, kind) in adapters.items()}
        open_s = time.perf_counter() - opened

        probes = lambda case: [p.question for p in case.probes[:args.questions]]  # noqa: E731
        warm = lambda case: WARM_UP_QUESTIONS[:args.questions]  # noqa: E731
        began = time.perf_counter()
        for players in sorted({1, 2, 4, 8, 16, args.players}):  # every batch bucket compiles/captures here
            if players <= args.players:
                players_run(suspect, cases, warm, players)
        fixed_run(suspect, cases, args.players, args.fixed_tokens, offset=2)
        warm_up_s = time.perf_counter() - began

        result = {
            "benchmark": "serve_gpu",
            "machine": machine(args.device),
            "versions": versions(),
            "settings": {"engine": suspect.engine_name, "base": args.base, "dtype": "bfloat16" if
                         args.device.startswith("cuda") else "float32", "compile": suspect._engine.compile,
                         "switch_interval_s": sys.getswitchinterval(),
                         "cuda_graphs": suspect._engine.cuda_graphs, "overlap": suspect._engine.overlap,
                         "players": args.players,
                         "questions_per_player": args.questions, "fixed_tokens": args.fixed_tokens,
                         "generation": dataclasses.asdict(GenerationSettings()), "adapters": kinds,
                         "cases": [c.id for c in cases]},
            "open_suspect_s": round(open_s, 2),
            "warm_up_s": round(warm_up_s, 2),
            "single_stream": players_run(suspect, cases[:1], probes, 1),
            "players": players_run(suspect, cases, probes, args.players),
            "fixed_single_stream": fixed_run(suspect, cases, 1, args.fixed_tokens, offset=0),
            "fixed_players": fixed_run(suspect, cases, args.players, args.fixed_tokens, offset=1),
        }
        if args.device.startswith("cuda"):
            result["gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if args.peft_reference:
            try:
                del suspect
                result["peft_mixed_batch_reference"] = peft_reference(
                    base, cases, {c: folder for c, (folder, kind) in adapters.items() if "failed" not in kind},
                    args.players, args.fixed_tokens, args.device)
            except Exception as exc:  # a reference only: its failure must not lose the figures above
                result["peft_mixed_batch_reference"] = {"error": repr(exc)}
    slug = device_slug(args.device)
    write_result(f"serve_gpu_{slug}{'' if args.compile else '_eager'}{'' if args.overlap else '_no_overlap'}"
                 f"{f'_switch{args.switch_interval:g}' if args.switch_interval else ''}", result, args.out)


if __name__ == "__main__":
    from transformers import HfArgumentParser

    (arguments,) = HfArgumentParser(Arguments).parse_args_into_dataclasses()
    main(arguments)
