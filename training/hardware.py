"""What the machine trains with: its GPU and the precision a run takes there, and the facts training_meta.json records
(device, peak memory, library versions). No model or trainer here: training/model.py and training/train.py ask and
act on the answers."""

from __future__ import annotations

import importlib.metadata
import json
import platform
import resource
from pathlib import Path

from game.base import Base

LARGE_BASE_PARAMS = 2e9  # from here on a base is loaded in 4-bit on the GPU unless told otherwise


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def parameter_count(base: Base) -> int:
    """Roughly, from the config alone: decides 4-bit loading before any weight is read."""
    config = json.loads((Path(base.path) / "config.json").read_text()) if Path(base.path).is_dir() else {}
    h, layers = config.get("hidden_size", 0), config.get("num_hidden_layers", 0)
    inter, vocab = config.get("intermediate_size", 4 * h), config.get("vocab_size", 0)
    return layers * (4 * h * h + 3 * h * inter) + vocab * h


def autocast(backend: str, on_gpu: bool, in_4bit: bool = False) -> str | None:
    """The mixed precision the trainer runs under, if any.

    On a bf16 GPU transformers + peft train a bf16 base without autocast: peft keeps the LoRA weights in fp32, so the
    base's matmuls run in bf16 as under autocast and the adapter's in fp32 (autocast's are bf16), without the ~2,000
    casts a step autocast adds between them: a step of 8 chats 1.5x as fast on an H200, the same loss
    (docs/training.md). Unsloth's kernels expect autocast; so does a 4-bit base, whose norms peft keeps in fp32 (only
    the 135M bf16 base was measured without it); an fp16 GPU needs its loss scaling.
    """
    if not on_gpu:
        return None
    return "fp16" if not bf16_ok() else "bf16" if backend == "unsloth" or in_4bit else None


def tf32(on_gpu: bool) -> bool:
    """The LoRA's fp32 matmuls on tensor cores (every GPU that does bf16 does tf32): the base's own run in bf16, so
    their inputs lose nothing that counts, and fp32's SIMT kernels were ~30% of a step's GPU time (docs/training.md)."""
    return on_gpu and bf16_ok()


def precision(backend: str, on_gpu: bool, in_4bit: bool = False, cpu_bf16: bool = False) -> str:
    if not on_gpu:
        return "bf16 base, fp32 LoRA" if cpu_bf16 else "fp32"
    mixed = autocast(backend, on_gpu, in_4bit)
    return (f"{mixed} autocast" if mixed else "bf16 base, fp32 LoRA") + (", tf32 matmuls" if tf32(on_gpu) else "")


def bf16_ok() -> bool:
    import torch

    return cuda_available() and torch.cuda.is_bf16_supported()


def device_name() -> str:
    import torch

    if cuda_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def peak_memory_gib(on_gpu: bool) -> float:
    import torch

    if on_gpu:
        return round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)  # ru_maxrss is in KiB on Linux


def versions(backend: str) -> dict:
    names = ["torch", "transformers", "trl", "peft", "datasets"] + (["unsloth"] if backend == "unsloth" else [])
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out
