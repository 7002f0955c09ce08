"""What every benchmark here shares: the machine and versions it ran on, the bundled cases with their adapters
(or stand-ins of the training recipe's shape where a case has none yet), and where results go."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "llama_cpp_python", "gguf"):
        try:
            out[name] = importlib.metadata.version(name.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine(device: str) -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"device": device, "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average": [round(x, 2) for x in os.getloadavg()]}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def device_slug(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
        return re.sub(r"[^a-z0-9]+", "-", name.lower().replace("nvidia", "")).strip("-")
    return "cpu"


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summary(values: list[float], digits: int = 4) -> dict:
    if not values:
        return {"n": 0}
    return {"n": len(values), "p50": round(statistics.median(values), digits),
            "p95": round(percentile(values, 0.95), digits), "mean": round(statistics.fmean(values), digits),
            "min": round(min(values), digits), "max": round(max(values), digits)}


def write_standin(folder: Path, config, seed: int, rank: int = 4) -> Path:
    """A LoRA folder of the training recipe's shape (rank 4 on all seven projections) with random non-zero B:
    costs what a trained adapter costs, answers like nothing in particular. Only for timing."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    LoraConfig(r=rank, lora_alpha=rank, target_modules=PROJECTIONS, lora_dropout=0.0,
               task_type="CAUSAL_LM").save_pretrained(str(folder))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    h, i = config.hidden_size, config.intermediate_size
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
              "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config.num_hidden_layers):
        for name, (fan_in, fan_out) in shapes.items():
            parent = "mlp" if name in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            key = f"base_model.model.model.layers.{layer}.{parent}.{name}"
            tensors[f"{key}.lora_A.weight"] = (torch.rand(rank, fan_in, generator=g) * 2 - 1) / fan_in ** 0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, rank, generator=g) * 0.01
    save_file({k: v.half().contiguous() for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"))
    return folder


def case_adapters(cases: dict, base, adapters_dir: Path, standin_dir: Path) -> dict:
    """{case_id: AdapterInfo}: the case's own adapter when the game would use it, else a stand-in."""
    from transformers import AutoConfig

    from game import adapters as adapter_files

    config = AutoConfig.from_pretrained(base.path)
    out = {}
    for n, (case_id, loaded) in enumerate(sorted(cases.items())):
        info = adapter_files.inspect(adapters_dir, loaded, base)
        if info.usable:
            out[case_id] = info
            continue
        folder = write_standin(standin_dir / case_id, config, seed=n)
        out[case_id] = adapter_files.AdapterInfo(case_id, folder, adapter_files.Status.READY, "stand-in (random LoRA)")
    return out


def write_result(name: str, data: dict, out_dir: Path = RESULTS) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    text = json.dumps(data, indent=1, ensure_ascii=False)
    path.write_text(text + "\n")
    print(text)
    return path
