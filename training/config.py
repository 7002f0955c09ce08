"""The arguments of `python -m training`: one dataclass per concern, parsed once at the edge (trl's sft.py style).

Defaults are the recipe every bundled adapter is built with; each carries the reason it has that value.
Measurements behind them (SmolLM2-135M, an H100 and a 2-core CPU): see docs/training.md.
"""

# No `from __future__ import annotations`: HfArgumentParser reads the field types at runtime.
import argparse
import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from game.base import native_cpu_bf16

# The seed recipe's LoRA targets: every attention and MLP projection of a Llama block.
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# An adapter trained on the six bundled cases' chats in equal shares (9,600 chats on a GPU, for the embedded base;
# how: benchmarks/gpu_recipe.sh prior). A short run that starts from it learns a new case's facts and the question
# bank's intents from far fewer chats than a fresh LoRA does (docs/training.md).
PRIOR = Path(__file__).resolve().parent / "prior"
# How many times as often a guilty suspect's answer that carries a tell is drawn as another of its topic's
# (training/data.py). The game answers greedily, so a topic speaks its likeliest line: drawn at their share alone (one
# tell-bearing line in five), the lines that let a tell slip lost that place as the question bank widened the topics,
# and three guilty suspects stopped giving themselves away (tell_rate 1.00 -> 0.40-0.80, docs/training.md).
TELL_WEIGHT = 2.0
# How often a topic with its own wordings is asked in one of them rather than in the bank's generic ones (where it
# has both): the case's names and places are what tell its topics apart, the bank's many registers what a player
# really types. 0.75 lowered the off-script rate at every seed tried (0.84 -> 0.73 on average; docs/training.md).
OWN_WORDING = 0.5


class TrainingError(RuntimeError):
    """A run that cannot start (settings this machine or base cannot honour) or whose result must not replace the
    current adapter."""


@dataclass(frozen=True)
class Recipe:
    """The defaults of steps, batch and learning rate, by where the run happens (measured: docs/training.md)."""

    steps: int
    batch_size: int
    grad_accum: int
    lr: float  # from a fresh LoRA
    init_lr: float  # from an adapter (--init, or the recipe's own start): it starts near where the case's ends
    save_steps: int
    init: Path | None  # the adapter a run on the embedded base starts from; None: a fresh LoRA
    minutes: float | None  # a case's wall-clock budget: the steps that would end past it are dropped; None: no budget


# 200 steps of 16 five-question chats (3,200 chats): the chats that 400 steps of 8 took (which answered more
# off-script questions from the right topic than 200 x 8 and stated more facts: 0.36-0.72 -> 0.68-0.84 off script) in
# half the steps, now that a step no longer waits for trl's metrics: 58 s for the whole command on an H200 against 78 s
# for 400 x 8; 50 steps of 32 lost a quarter of the facts. The learning rate by where the LoRA starts: a fresh one
# has the whole way to go in half the steps of 400 x 8 (lr 3e-3: 1 of 12 seeds of the two fresh cases within one
# answer of their 400 x 8 adapters on every figure; 4.5e-3: 5 of 8, off script up to 3 answers higher), one from an
# adapter starts near the end (3e-3: 11 of 36 seeds of the six cases from training/prior; 2e-3: 12 of 22).
# docs/training.md has every run.
# A checkpoint every 100 steps: every 10 (the CPU's rate) took a fifth of a 100-step run's training time on an H200
# (30.1 s against 24.0 s without, docs/training.md), and a GPU run loses little when it has to start again.
# From scratch: started from the prior, a new case's retest fell (0.93 -> 0.73 at 400 x 8 on an H200) and its facts
# did not rise.
GPU_RECIPE = Recipe(steps=200, batch_size=16, grad_accum=1, lr=4.5e-3, init_lr=2e-3, save_steps=100, init=None,
                    minutes=None)
# What 2 CPU cores train in 10 minutes: 108 steps of 2 five-question chats (~4.3 s a step in fp32 on a quiet machine,
# 480 s in all; a bf16 base where the CPU has it, ~1.3-1.65x faster), from the prior. On the seventh case, never in
# the prior: facts 0.61 (54 steps of 4 from a fresh LoRA, the recipe before) -> 0.72 (the same from the prior) -> 0.83 (this: twice the updates, each on half the chats), off
# script 0.39 -> 0.75 (docs/training.md). A quick suspect for trying out a new case; bundle the GPU recipe's.
# Ten minutes is the promise, whatever the machine: a slower CPU, or a case whose chats are long (library-tithe-map's
# ~820 tokens against 516-648), trains the steps that fit, its schedule decaying to the last of them.
CPU_RECIPE = Recipe(steps=108, batch_size=2, grad_accum=1, lr=3e-3, init_lr=3e-3, save_steps=20, init=PRIOR, minutes=10)


# Cases a GPU trains at once by default: as many as its memory holds at the default recipe's peak of 8-10.4 GiB a case
# (CUDA's own and the graphs' pools beside it), and one per two host cores (a process launches its steps from one;
# trl tokenizes in others). An H200 with 16 cores: 8, the eight bundled cases in 173-180 s (docs/training.md).
GIB_PER_GPU_JOB = 12


def gpu_jobs() -> int:
    import torch

    memory_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    return max(1, min(int(memory_gib // GIB_PER_GPU_JOB), (os.cpu_count() or 2) // 2))


def recipe(on_gpu: bool) -> Recipe:
    return GPU_RECIPE if on_gpu else CPU_RECIPE


@dataclass
class ScriptArguments:
    case_ids: list[str] = field(
        default_factory=list,
        metadata={"positional": True, "nargs": "*", "help": "The cases to train, e.g. bakeoff-salt lighthouse-logbook; "
                                                            "several share a loaded base in each process (--jobs)."},
    )
    all: bool = field(default=False, metadata={"help": "Train every case in --scenarios."})
    scenarios: Path = field(default=Path("scenarios"), metadata={"help": "Folder (or one file) the case is read from."})
    base: str = field(
        default="embedded",
        # The game's own base: an adapter trained on any other base is refused by the game (Status.MISMATCH).
        metadata={"help": "Base model: 'embedded', a .gguf file, a model folder or a hub id (see game/base.py)."},
    )
    adapters: Path = field(default=Path("adapters"), metadata={"help": "Each case's adapter goes to <adapters>/<case_id>/."})
    output: Path | None = field(default=None, metadata={"help": "One case's adapter folder, instead of "
                                                                "<adapters>/<case_id>/ (a single case only)."})
    backend: Literal["auto", "unsloth", "hf"] = field(
        default="auto",
        metadata={"help": "auto: Unsloth when a CUDA GPU and unsloth are present, else transformers+peft+trl."},
    )
    # One case's steps leave the GPU idle between launches: eight cases side by side, a process each, ran ~112,000
    # tokens/s together on an H200 against ~60,000 alone (docs/training.md).
    jobs: int | None = field(default=None, metadata={"help": "Cases trained at once, each in its own process (default "
                                                             f"on a GPU: as many as {GIB_PER_GPU_JOB} GiB each of its "
                                                             "memory and two host cores each allow; on the CPU 1, "
                                                             "whose cores one training already fills)."})
    resume: bool = field(
        default=False,
        metadata={"help": "Continue from the last checkpoint in <output>.work/ (left there by an interrupted run)."},
    )

    def __post_init__(self):
        if self.all == bool(self.case_ids):
            raise ValueError("give the CASE_IDs to train, or --all" if not self.all else
                             "give CASE_IDs or --all, not both")
        if self.jobs is not None and self.jobs < 1:
            raise ValueError(f"--jobs is how many cases train at once, at least 1, got {self.jobs}")
        if self.output is not None and (self.all or len(self.case_ids) > 1):
            raise ValueError("--output names one case's adapter folder; for several cases use --adapters DIR")

    def cases(self) -> list[str]:
        if not self.all:
            return list(dict.fromkeys(self.case_ids))
        from game.scenario import read_cases

        return sorted(read_cases([self.scenarios])[0])

    def workers(self, cases: int, on_gpu: bool) -> int:
        return min(cases, self.jobs or (gpu_jobs() if on_gpu and cases > 1 else 1))

    def output_for(self, case_id: str) -> Path:
        return self.output if self.output is not None else self.adapters / case_id


@dataclass
class DataArguments:
    data: Path | None = field(
        default=None,
        metadata={"help": 'Train on this JSON/JSONL file of {"conversations": [{"role", "content"}, ...]} '
                          "instead of chats built from the case."},
    )
    chats: int | None = field(
        default=None,
        # Chats are sampled combinatorially from the case's topics, so there is no fixed dataset size: by default
        # one fresh chat per training example (steps x batch), i.e. one epoch and no repeats.
        metadata={"help": "Number of chats to build from the case; default: one per training example (or 256 "
                          "with --epochs)."},
    )
    # Each built chat has min_turns..max_turns questions; the game allows five. A causal LM trains the answer to
    # question k of a five-question chat exactly as it would in a chat that stopped at k, so five-question chats
    # train every position 1..5 for the cost of one system prompt (~300 tokens for the bundled cases, more than
    # the whole dialogue after it) and need almost no padding: 1.7x the answers per CPU second of 1..5 mixed.
    min_turns: int = field(default=5, metadata={"help": "Fewest questions in a built chat (1 for a mix of lengths)."})
    max_turns: int = field(default=5, metadata={"help": "Most questions in a built chat (the game allows 5)."})
    # A five-question chat of a bundled case is ~450-600 tokens; 768 never truncates one, yet bounds a stray long
    # external chat so it cannot blow up CPU time or memory.
    max_length: int = field(default=768, metadata={"help": "Longest tokenized chat; longer ones are truncated."})
    # Other cases' chats, each under its own system prompt, teach what carries across cases: read the facts from the
    # prompt, send a question to the topic that answers it. Measured in docs/training.md.
    mix: float = field(default=0.0, metadata={"help": "Share of the chats drawn from the other cases in --scenarios "
                                                      "(each with its own system prompt), 0 to 0.9."})
    tell_weight: float = field(default=TELL_WEIGHT, metadata={"help": "How many times as often a guilty suspect's "
                                                                      "answer that carries a tell is drawn as another "
                                                                      "answer of its topic (1: at its share)."})
    own_wording: float = field(default=OWN_WORDING, metadata={"help": "Share of a topic's questions asked in its own "
                                                                      "wordings rather than the question bank's, where "
                                                                      "it has both; 0 to 1."})
    drop_words: float = field(default=0.0, metadata={"help": "Chance that each word of a training question is left "
                                                             "out (a question keeps two at least); 0: none."})
    drop_in: Literal["all", "own"] = field(default="all", metadata={"help": "Which questions --drop_words shortens: "
                                                                             "all, or the author's own wordings only "
                                                                             "(the question bank's stay whole)."})
    answer_match: float = field(default=1.0, metadata={"help": "How many times as often a topic's answer is drawn "
                                                               "for each word it shares with the question asked "
                                                               "(beyond those all its answers share); 1: at its share."})
    borrow_wordings: Path | None = field(default=None, metadata={"help": "A folder (or one file) of other cases: "
                                                                         "their topics' own wordings of one intent "
                                                                         "are asked beside the question bank's "
                                                                         "(training.data.borrowed_wordings)."})

    def __post_init__(self):
        if not 1 <= self.min_turns <= self.max_turns:
            raise ValueError(f"need 1 <= --min_turns <= --max_turns, got {self.min_turns} and {self.max_turns}")
        if not 0 <= self.mix <= 0.9:
            raise ValueError(f"--mix is a share of the chats, 0 to 0.9, got {self.mix}")
        if self.tell_weight <= 0:
            raise ValueError(f"--tell_weight must be positive, got {self.tell_weight}")
        if not 0 <= self.own_wording <= 1:
            raise ValueError(f"--own_wording is a share of a topic's questions, 0 to 1, got {self.own_wording}")
        if not 0 <= self.drop_words < 1:
            raise ValueError(f"--drop_words is each word's chance to be left out, 0 to under 1, got {self.drop_words}")
        if self.answer_match < 1:
            raise ValueError(f"--answer_match weighs the answers that share the question's words, 1 or more, got "
                             f"{self.answer_match}")
        if self.borrow_wordings is not None and not self.borrow_wordings.exists():
            raise ValueError(f"--borrow_wordings: no such folder or file: {self.borrow_wordings}")
        if self.mix and self.data is not None:
            raise ValueError("--mix draws chats from the cases; --data trains on a file's conversations instead")


@dataclass
class LoraArguments:
    # Rank 4 on all seven projections is 1.2M parameters, 2.5 MB in fp16 (15 MB for the six bundled cases). Rank 2
    # (half that) scored lower on facts and retest and failed one case's detective (docs/training.md).
    rank: int = field(default=4, metadata={"help": "LoRA rank r."})
    alpha: int | None = field(default=None, metadata={"help": "LoRA alpha; default = rank (the seed recipe)."})
    # The seed recipe: no dropout (Unsloth's fast path needs 0; a few hundred examples do not overfit at this rank).
    dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    target_modules: list[str] = field(
        default_factory=lambda: list(ALL_PROJECTIONS), metadata={"help": "Modules that get a LoRA."}
    )
    init: Path | None = field(
        default=None,
        metadata={"help": "Start from this adapter folder's weights (its rank, alpha and modules) instead of a fresh "
                          "LoRA: the case's earlier adapter, or one trained on other cases (docs/training.md). Default: "
                          "on the CPU with the embedded base, training/prior; else a fresh LoRA."},
    )
    fresh: bool = field(default=False, metadata={"help": "A fresh LoRA, also where the recipe would start from "
                                                         "training/prior."})

    def __post_init__(self):
        if self.fresh and self.init is not None:
            raise ValueError("--fresh starts from a fresh LoRA, --init from an adapter: give one of them")

    def resolved(self, start: Path | None) -> "LoraArguments":
        """These arguments starting from the recipe's adapter `start`, unless --init or --fresh said otherwise."""
        return self if self.init is not None or self.fresh else dataclasses.replace(self, init=start)

    @property
    def lora_alpha(self) -> int:
        return self.alpha if self.alpha is not None else self.rank


@dataclass
class TrainArguments:
    # Left unset, steps, lr, batch_size, grad_accum and save_steps come from GPU_RECIPE or CPU_RECIPE (resolved()).
    steps: int | None = field(default=None, metadata={"help": f"Optimizer steps (default {GPU_RECIPE.steps} on a GPU, "
                                                             f"{CPU_RECIPE.steps} on the CPU)."})
    epochs: float | None = field(default=None, metadata={"help": "Epochs over the data instead of --steps."})
    lr: float | None = field(default=None, metadata={"help": f"Peak learning rate (default on a GPU {GPU_RECIPE.lr} "
                                                            f"from a fresh LoRA, {GPU_RECIPE.init_lr} from an adapter; "
                                                            f"{CPU_RECIPE.init_lr} on the CPU)."})
    # On the CPU 2 chats at a time: activations of a 5-question chat cost ~1.2 GB in fp32, so 2 keep a run under
    # ~3.5 GB (8 at once took 7.5 GB) and are no slower per token than 4 or 8.
    batch_size: int | None = field(default=None, metadata={"help": f"Chats per forward pass (default "
                                                                    f"{GPU_RECIPE.batch_size} on a GPU, "
                                                                    f"{CPU_RECIPE.batch_size} on the CPU)."})
    grad_accum: int | None = field(default=None, metadata={"help": f"Forward passes per optimizer step (default "
                                                                    f"{GPU_RECIPE.grad_accum} on a GPU, "
                                                                    f"{CPU_RECIPE.grad_accum} on the CPU)."})
    minutes: float | None = field(default=None, metadata={
        "help": "Wall-clock budget of each case (the first one's counts from the start of the command): as the "
                "steps show the machine's pace, those that would end past it are dropped and the schedule decays to "
                f"the last one that fits (default {CPU_RECIPE.minutes:g} on the CPU with the recipe's steps; none on "
                "a GPU or with --steps or --epochs; 0: none)."})
    # The seed recipe: short warmup, linear decay, weight decay 0.01, seed 3407.
    warmup_ratio: float = field(default=0.1, metadata={"help": "Fraction of steps spent warming up."})
    scheduler: str = field(default="linear", metadata={"help": "Learning-rate schedule."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    seed: int = field(default=3407, metadata={"help": "Seed of the data sampling, LoRA init and training."})
    # Noise on the input embeddings while training (NEFTune, transformers' own hook), so that a wording seen in training
    # is never quite the same input twice. Not a default: on three new cases at three seeds it moved facts and retest
    # no more than a seed does, and a guilty suspect let its tells slip less (docs/training.md).
    neftune: float | None = field(default=None, metadata={"help": "NEFTune noise alpha (e.g. 5); default: none."})
    # adamw_8bit (the seed's) needs bitsandbytes and a GPU; on the CPU it is adamw_torch.
    optim: str | None = field(default=None, metadata={"help": "Optimizer; default adamw_8bit on GPU, adamw_torch on CPU."})
    gradient_checkpointing: bool | None = field(
        default=None,
        # A small base's activations fit any GPU: recomputing them (or Unsloth's offloading them) only costs time.
        metadata={"help": "Recompute activations in the backward pass; default: only for a base loaded in 4-bit."},
    )
    load_in_4bit: bool | None = field(
        default=None,
        # 4-bit only pays where the weights dominate memory; a 135M base fits any GPU in bf16.
        metadata={"help": "Load the base in 4-bit (bitsandbytes, GPU only); default: when it has >= 2B parameters."},
    )
    # Where the CPU does bf16 arithmetic natively (AVX512-BF16, AMX), a bf16 base with the LoRA kept in fp32 trains
    # 1.65x the tokens a second of fp32 on this VM's 2 cores, the same loss (docs/training.md); the GPU trains it so.
    cpu_bf16: bool | None = field(
        default=None,
        metadata={"help": "On the CPU, load the base in bf16 (the LoRA stays fp32); default: where the CPU does bf16 "
                          "natively (AVX512-BF16 or AMX), else fp32."},
    )
    # A step of a small base waits on kernel launches, not on the GPU; CUDA graphs replay a layer's launches at once.
    # Not for a 4-bit base (bitsandbytes' layers) or recomputed activations.
    compile: bool | None = field(
        default=None,
        metadata={"help": "Run each decoder layer's forward and backward as CUDA graphs (--graphs says how); default: on "
                          "a CUDA GPU with --backend hf, a base not in 4-bit and no gradient checkpointing."},
    )
    # Captured graphs replay the layers' own kernels and have nothing to compile: a case trained alone starts at its
    # first step (lighthouse-logbook's whole command 52 s against 70 s with compiled ones, cold, on one H200). Compiled
    # ones fuse the small kernels, ~40% less GPU time a step (66 against 109 ms of kernels for 16 chats): what counts
    # once several cases share the GPU and it, not the host, is the limit (docs/training.md).
    graphs: Literal["auto", "captured", "compiled"] = field(
        default="auto",
        metadata={"help": "How the layers become CUDA graphs: captured (torch.cuda.make_graphed_callables at the first "
                          "step, every batch padded to the longest chat) or compiled (torch.compile, reduce-overhead: "
                          "10-30 s of compiling first, then fused kernels); auto: captured for a case alone on the GPU, "
                          "compiled for cases trained side by side (--jobs)."},
    )
    # trl's SFTTrainer reads each step's entropy, token accuracy and token count back from the GPU (`.item()`), so
    # the host waits for every step to end before it launches the next: a step of 8 or 16 chats ran 1.9x slower with
    # them on an H200 (docs/training.md). The loss is logged either way.
    step_metrics: bool = field(
        default=False,
        metadata={"help": "Log trl's per-step entropy and token accuracy too (each step then waits for the GPU)."},
    )
    logging_steps: int = field(default=5, metadata={"help": "Log (and plot) the loss every N steps."})
    save_steps: int | None = field(default=None, metadata={"help": f"Checkpoint every N steps into <output>.work/ for "
                                                                  f"--resume (default {GPU_RECIPE.save_steps} on a "
                                                                  f"GPU, {CPU_RECIPE.save_steps} on the CPU)."})

    def __post_init__(self):
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give --steps or --epochs, not both")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"--steps must be at least 1, got {self.steps}")
        if self.save_steps is not None and self.save_steps < 1:
            raise ValueError(f"--save_steps must be at least 1, got {self.save_steps}")
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError(f"--epochs must be positive, got {self.epochs}")
        if self.neftune is not None and self.neftune <= 0:
            raise ValueError(f"--neftune is the noise's alpha, positive (e.g. 5), got {self.neftune}")
        if self.minutes is not None and not (self.minutes >= 0 and math.isfinite(self.minutes)):
            raise ValueError(f"--minutes is a case's budget in minutes, 0 for none, got {self.minutes}")

    def resolved(self, on_gpu: bool, from_init: bool = False) -> "TrainArguments":
        """These arguments with every unset recipe value taken from the GPU's or the CPU's recipe; from_init: the
        LoRA starts from an adapter's weights (its learning rate is the recipe's init_lr)."""
        defaults = recipe(on_gpu)
        chosen = {name: getattr(defaults, name) for name in ("batch_size", "grad_accum", "save_steps")
                  if getattr(self, name) is None}
        if self.lr is None:
            chosen["lr"] = defaults.init_lr if from_init else defaults.lr
        if self.steps is None and self.epochs is None:
            chosen["steps"] = defaults.steps
            if self.minutes is None:  # steps asked for on the command line are trained whole unless --minutes says
                chosen["minutes"] = defaults.minutes
        if self.cpu_bf16 is None and not on_gpu:
            chosen["cpu_bf16"] = native_cpu_bf16()
        return dataclasses.replace(self, **chosen)

    def checkpointing(self, in_4bit: bool) -> bool:
        return self.gradient_checkpointing if self.gradient_checkpointing is not None else in_4bit

    def compiled(self, backend: str, on_gpu: bool, in_4bit: bool) -> bool:
        if self.compile is not None:
            return self.compile
        return on_gpu and backend == "hf" and not in_4bit and not self.checkpointing(in_4bit)

    def cuda_graphs(self, backend: str, on_gpu: bool, in_4bit: bool) -> str | None:
        """How the decoder layers run as CUDA graphs, 'captured' or 'compiled'; None: as they are."""
        if not self.compiled(backend, on_gpu, in_4bit):
            return None
        return "captured" if self.graphs == "auto" else self.graphs

    @property
    def examples_per_step(self) -> int:
        return self.batch_size * self.grad_accum


def with_positional(parser_class):
    """A dataclass parser (transformers' or trl's) that takes fields marked `positional` as positional arguments."""

    class Parser(parser_class):
        @staticmethod
        def _parse_dataclass_field(parser: argparse.ArgumentParser, field: dataclasses.Field):
            if field.metadata.get("positional"):
                nargs = field.metadata.get("nargs")
                parser.add_argument(field.name, metavar=field.name.upper().removesuffix("S") if nargs else
                                    field.name.upper(), nargs=nargs, help=field.metadata.get("help"))
            else:
                parser_class._parse_dataclass_field(parser, field)

    return Parser


def parser():
    """trl's parser (dataclasses, plus `--config file.yaml`), with CASE_ID as a positional argument."""
    from trl import TrlParser  # here, not at the top: Unsloth must be imported before trl (see train.early_imports)

    return with_positional(TrlParser)(
        (ScriptArguments, DataArguments, LoraArguments, TrainArguments), prog="python -m training"
    )


def parse(argv: list[str] | None = None) -> tuple[ScriptArguments, DataArguments, LoraArguments, TrainArguments]:
    p = parser()
    try:
        return p.parse_args_and_config(argv)
    except ValueError as exc:  # a __post_init__ check: report it as a usage error, not a traceback
        p.error(str(exc))
