"""What one decode step of the torch engine costs, and why: per batch size and per way of applying adapters.

    python3 benchmarks/decode_step.py                           # on the GPU machine (~1 min; --compile true: ~2)
    python3 benchmarks/decode_step.py --device cpu --batches 1 --steps 5

Loads every case's adapter beside the base as the game does (game.engine.BatchedEngine), then for each batch size
and mode ("base": no adapter; "merged": every row on one case, its adapter merged into the base; "stacked": rows on
different cases, each applying its own adapter) times --steps decode steps as the engine runs them (a CUDA graph
replay on CUDA) and a question's prefill, and counts the kernels of one eager step with torch.profiler. A step's
time over its kernel count says whether the GPU is waiting on launches (a few microseconds a kernel) or on memory
and arithmetic.

Prints one JSON object and writes benchmarks/results/decode_step_<device>[_compiled].json.
"""

# No `from __future__ import annotations`: HfArgumentParser reads the field types at runtime.
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import ROOT, RESULTS, case_adapters, device_slug, machine, versions, write_result  # noqa: E402


@dataclass
class Arguments:
    base: str = field(default="/tmp/base/base.gguf" if Path("/tmp/base/base.gguf").is_file() else "embedded",
                      metadata={"help": "Base model spec (game.base.resolve)."})
    device: str = field(default="cuda", metadata={"help": "cuda, or cpu for a smoke run."})
    batches: list[int] = field(default_factory=lambda: [1, 8, 32], metadata={"help": "Batch sizes to time."})
    context: int = field(default=300, metadata={"help": "Tokens already in each row's cache (a prompt's length)."})
    steps: int = field(default=200, metadata={"help": "Timed steps per configuration."})
    prefill: int = field(default=32, metadata={"help": "New tokens per row in the timed prefill (a question)."})
    compile: bool = field(default=False, metadata={"help": "torch.compile the layer (the engine's compile option)."})
    scenarios: Path = field(default=ROOT / "scenarios", metadata={"help": "Folder of case files."})
    adapters: Path = field(default=ROOT / "adapters", metadata={"help": "Folder of trained adapters."})
    out: Path = field(default=RESULTS, metadata={"help": "Folder for the JSON result."})


def kernels_of_one_step(engine, args: tuple) -> int | None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    if engine.device.type != "cuda":
        return None
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine._decode(*args)  # the step itself (compiled or eager), not its graph
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type.name == "CUDA")


def time_prefill(engine, batch: int, args: Arguments, mode: str, kv_len: int) -> dict:
    """A question's prefill as the engine runs it (--prefill new tokens per row after --context cached ones; a CUDA
    graph where the engine would use one): the first call of its shape, then the mean of 10."""
    import torch

    dev = engine.device
    tokens = torch.randint(0, engine.model.embed.shape[0], (batch, args.prefill), device=dev)
    rows, pos0 = torch.arange(batch, device=dev), torch.full((batch,), args.context, device=dev)
    last = torch.full((batch,), args.prefill - 1, device=dev)
    times = []
    for _ in range(11):
        began = time.perf_counter()
        engine._prefill_step(tokens, pos0, rows, last, kv_len, mode, False)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    return {"prefill_first_ms": round(times[0] * 1e3, 2), "prefill_ms": round(sum(times[1:]) / 10 * 1e3, 3)}


def main(args: Arguments) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from game.base import resolve
    from game.engine import LENGTH_BUCKET, BatchedEngine, round_up
    from game.scenario import load_cases

    base = resolve(args.base)
    cuda = args.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    model = AutoModelForCausalLM.from_pretrained(base.path, dtype=dtype).to(args.device).eval()
    engine = BatchedEngine(model, eos=set(), max_batch=max(args.batches), compile=args.compile, merge=True)
    loaded = load_cases(args.scenarios)
    with tempfile.TemporaryDirectory() as standins:
        adapters = case_adapters(loaded, base, args.adapters, Path(standins))
        for case_id, info in adapters.items():
            engine.load_adapter(case_id, info.path)
    names = sorted(adapters)
    kv_len = round_up(args.context + max(args.prefill, args.steps + 2), LENGTH_BUCKET)  # every timed step fits
    rows = []
    with engine._lock, torch.inference_mode():  # the worker thread stays idle meanwhile
        for batch in args.batches:
            for mode in ("base", "merged", "stacked"):
                # each row's state, as admission leaves it: rows take the cases in turn, as players do
                m = engine.model
                m.next_token[:batch] = torch.randint(0, model.config.vocab_size, (batch,))
                m.penalty[:batch] = 1.1
                cases = [names[0] if mode == "merged" else names[i % len(names)] for i in range(batch)]
                m.slot[:batch] = torch.tensor([0 if mode == "base" else m.slots[c] for c in cases])
                if mode == "merged":
                    m.merge_into(names[0])
                step = (batch, kv_len, mode, False)
                began = time.perf_counter()
                m.position[:batch] = args.context
                engine._decode_step(*step)  # compiles/captures
                warm_s = time.perf_counter() - began
                m.position[:batch] = args.context  # each step advances it: the timed ones stay inside kv_len
                if cuda:
                    torch.cuda.synchronize()
                began = time.perf_counter()
                for _ in range(args.steps):
                    engine._decode_step(*step)
                if cuda:
                    torch.cuda.synchronize()
                step_s = (time.perf_counter() - began) / args.steps
                kernels = kernels_of_one_step(engine, step)
                prefill_ms = time_prefill(engine, batch, args, mode, kv_len)
                row = {"batch": batch, "mode": mode, "step_ms": round(step_s * 1e3, 3),
                       "tokens_per_s": round(batch / step_s, 1), "kernels_per_step": kernels,
                       "us_per_kernel": round(step_s * 1e6 / kernels, 2) if kernels else None,
                       "first_step_s": round(warm_s, 2), **prefill_ms}
                print(row, flush=True)
                rows.append(row)
    result = {"benchmark": "decode_step", "machine": machine(args.device), "versions": versions(),
              "settings": {"base": args.base, "dtype": str(dtype).removeprefix("torch."), "compile": args.compile,
                           "cuda_graphs": engine.cuda_graphs, "context": args.context, "kv_len": kv_len,
                           "steps": args.steps, "adapters": {c: info.message for c, info in adapters.items()}},
              "steps": rows}
    write_result(f"decode_step_{device_slug(args.device)}{'_compiled' if args.compile else ''}", result, args.out)


if __name__ == "__main__":
    from transformers import HfArgumentParser

    (arguments,) = HfArgumentParser(Arguments).parse_args_into_dataclasses()
    main(arguments)
