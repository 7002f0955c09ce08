"""Training throughput: Unsloth against plain transformers + peft, same data, same seed, same trainer code.

    python benchmarks/train_throughput.py --shape smollm2-135m --backend unsloth
    python benchmarks/train_throughput.py --shape llama-3.1-8b --backend hf --steps 20
    python benchmarks/train_throughput.py --recipe before --backend unsloth   # the GPU recipe #15 started from
    python benchmarks/train_throughput.py --backend hf --sft '{"padding_free": true}' --profile /tmp/prof
    python benchmarks/train_throughput.py --backend hf --eager      # without the recipe's CUDA-graph layers
    python benchmarks/train_throughput.py --backend hf --step-metrics --batch-size 16 --lr 3e-3

One (shape, backend) per process: Unsloth patches transformers on import, so the two cannot share one.
The 135M shape is the embedded base at the bundled recipe (training/config.py); the Llama shapes are random
weights of the published configurations (nothing to download) at the seed recipe: batch 2 x grad-accum 4,
sequences up to 2048, 4-bit for 8B. Prints one JSON object and appends it to benchmarks/results/train_throughput.jsonl.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Published configurations (config.json of meta-llama/Llama-3.2-1B-Instruct and Llama-3.1-8B-Instruct).
SHAPES = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
                         max_position_embeddings=131072, rms_norm_eps=1e-5, head_dim=64),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0,
                         max_position_embeddings=131072, rms_norm_eps=1e-5, head_dim=128),
}


@dataclass
class Args:
    shape: str = "smollm2-135m"
    backend: str = "unsloth"
    steps: int | None = None
    recipe: str = "now"  # 135M only: "now" (training/config.py) or "before" (BEFORE)
    case: str = "lighthouse-logbook"
    base: str = "embedded"
    shapes_dir: Path = Path("/tmp/shapes")
    sft: str = ""  # a JSON object of SFTConfig fields over the recipe's, e.g. '{"torch_compile": true}'
    eager: bool = False  # the decoder layers run eagerly, not as the recipe's CUDA graphs (TrainArguments.compile)
    batch_size: int = 0  # chats a step (0: the recipe's); the run trains steps x batch_size chats
    lr: float = 0.0  # 0: the recipe's
    step_metrics: bool = False  # trl's per-step entropy and token accuracy, as before (TrainArguments.step_metrics)
    profile: str = ""  # a folder: torch.profiler's tables of steps 11-20 (where a step's time goes, host and GPU)
    out: Path = ROOT / "benchmarks" / "results" / "train_throughput.jsonl"


# The 135M GPU recipe measured in #15 (4,945 tokens/s on an H200): its batch and lr, with recomputed activations
# and 8-bit AdamW, as it ran under Unsloth.
BEFORE = dict(batch_size=8, grad_accum=1, lr=2e-3, gradient_checkpointing=True, optim="adamw_8bit")
RECIPES = {"now": {}, "before": BEFORE}


def random_base(shape: str, folder: Path, tokenizer_dir: str) -> Path:
    """A random-weight checkpoint of a published shape, saved once (the trainers load it like any folder)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").exists():
        return folder
    config = LlamaConfig(**SHAPES[shape], bos_token_id=1, eos_token_id=2, pad_token_id=2)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    # The embedded tokenizer (49k ids) fits inside the Llama-3 vocabulary; throughput does not depend on which ids.
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    return folder


def main(args: Args) -> dict:
    if args.recipe not in RECIPES or (args.recipe != "now" and args.shape != "smollm2-135m"):
        raise SystemExit(f"--recipe {args.recipe}: one of {', '.join(RECIPES)}, and only 'now' for the Llama shapes "
                         "(they run the seed recipe)")
    if args.backend == "unsloth":
        import unsloth  # noqa: F401  (first: it patches transformers, trl and peft)
    import torch

    from game.base import resolve
    from training.config import DataArguments, LoraArguments, TrainArguments
    from training.data import case_chats, load_case
    from training.callbacks import step_meter
    from training.model import add_lora, load_base
    from training.train import hyperparameters, make_trainer

    embedded = resolve(args.base)
    if args.shape == "smollm2-135m":
        base, data_args = embedded, DataArguments()
        # the GPU recipe's batch and lr (or the one before); no checkpoints: not what is measured
        recipe = RECIPES[args.recipe] | {k: v for k, v in (("batch_size", args.batch_size), ("lr", args.lr)) if v}
        train = TrainArguments(steps=args.steps or 60, save_steps=10**6, compile=False if args.eager else None,
                               step_metrics=args.step_metrics, **recipe).resolved(on_gpu=True)
        in_4bit = False
    else:
        base = resolve(str(random_base(args.shape, args.shapes_dir / args.shape, embedded.path)))
        data_args = DataArguments(max_length=2048)
        train = TrainArguments(steps=args.steps or 20, batch_size=2, grad_accum=4, lr=2e-4, save_steps=10**6)
        in_4bit = args.shape == "llama-3.1-8b"
    lora = LoraArguments(rank=16) if args.shape != "smollm2-135m" else LoraArguments()
    loaded = load_case(ROOT / "scenarios", args.case)
    dataset = case_chats(loaded.case, train.steps * train.examples_per_step, train.seed, data_args.min_turns,
                         data_args.max_turns)
    hyper = hyperparameters(data_args, lora, train, args.backend, True, in_4bit)
    work = Path(f"/tmp/throughput-{args.shape}-{args.backend}")
    t0 = time.perf_counter()
    model, tokenizer = load_base(args.backend, base, train, data_args.max_length, in_4bit)
    model, peft_config = add_lora(args.backend, model, lora, train, hyper["gradient_checkpointing"])
    load_s = time.perf_counter() - t0
    overrides = json.loads(args.sft) if args.sft else {}
    t0 = time.perf_counter()
    trainer = make_trainer(model, tokenizer, peft_config, dataset, work, hyper, args.backend, True, data_args, train,
                           overrides)
    init_s = time.perf_counter() - t0  # trl tokenizes the chats here
    meter = step_meter(trainer)
    trainer.add_callback(meter)
    if args.profile:
        run = "-".join([args.shape, args.backend, args.recipe, *(f"{k}_{v}" for k, v in overrides.items())])
        trainer.add_callback(profiler(Path(args.profile), re.sub(r"[^A-Za-z0-9._-]+", "_", run)))
    torch.cuda.reset_peak_memory_stats()
    result = trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    figures = {
        "shape": args.shape, "recipe": args.recipe if args.shape == "smollm2-135m" else "seed", "backend": args.backend,
        "gpu": torch.cuda.get_device_name(0),
        "steps": trainer.state.global_step,
        "batch": f"{trainer.args.per_device_train_batch_size}x{trainer.args.gradient_accumulation_steps}",
        "lora_rank": lora.rank, "load_in_4bit": in_4bit, "gradient_checkpointing": hyper["gradient_checkpointing"],
        "optim": hyper["optim"], "sft_overrides": overrides, "compile": hyper["compile"], "lr": train.lr,
        "step_metrics": train.step_metrics,
        "load_s": round(load_s, 1), "trainer_init_s": round(init_s, 1), "train_s": round(meter.seconds, 1),
        "tokens": meter.tokens,
        "tokens_per_s": round(meter.tokens / meter.seconds, 1) if meter.seconds else None,
        "steps_per_s": round(trainer.state.global_step / meter.seconds, 2) if meter.seconds else None,
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "final_loss": round(losses[-1], 4) if losses else round(result.training_loss, 4),
        "versions": {name: _version(name) for name in ("torch", "transformers", "trl", "peft", "unsloth", "bitsandbytes")},
    }
    print(json.dumps(figures))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(figures) + "\n")
    return figures


def profiler(folder: Path, name: str, first: int = 10, steps: int = 10):
    """A callback recording the `steps` steps after the first `first` with torch.profiler: tables by host time and by
    GPU time, and how much of those steps' wall time the GPU was busy (kernel time over wall)."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    class Profiler(TrainerCallback):
        prof = t0 = None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == first:
                torch.cuda.synchronize()
                self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
                self.prof.__enter__()
                self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if self.prof is None or state.global_step != first + steps:
                return
            torch.cuda.synchronize()
            wall = time.perf_counter() - self.t0
            self.prof.__exit__(None, None, None)
            events = self.prof.key_averages()
            gpu_s = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA) / 1e6
            folder.mkdir(parents=True, exist_ok=True)
            head = f"{name}: {steps} steps in {wall:.3f} s wall, GPU kernels {gpu_s:.3f} s ({gpu_s / wall:.0%} busy)\n"
            (folder / f"profile-{name}.txt").write_text(
                head + "\nby host time\n" + events.table(sort_by="self_cpu_time_total", row_limit=40)
                + "\nby GPU time\n" + events.table(sort_by="self_device_time_total", row_limit=25))
            print(head, end="")
            self.prof = None

    return Profiler()


def _version(name: str) -> str | None:
    import importlib.metadata

    return importlib.metadata.version(name) if importlib.util.find_spec(name) else None


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for key, value in asdict(Args()).items():
        if isinstance(value, bool):
            parser.add_argument(f"--{key.replace('_', '-')}", action="store_true")
        else:
            parser.add_argument(f"--{key.replace('_', '-')}", type=type(value) if value is not None else int,
                                default=value)
    main(Args(**vars(parser.parse_args())))
