"""The adapter folder a training run writes, where the game picks it up: PEFT's files (weights halved to fp16),
training_meta.json, a README model card and the loss plot, swapped in whole so that a crash leaves the previous one."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from game.adapters import META_FILE
from game.base import Base
from game.scenario import LoadedCase


def save_adapter(output: Path, model, base: Base, meta: dict, losses: list[tuple[int, float]], loaded: LoadedCase) -> None:
    """Write the whole folder next to `output`, then swap it in: a crash or Ctrl-C leaves the previous adapter."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        model.save_pretrained(tmp)
        weights = tmp / "adapter_model.safetensors"
        meta["adapter_dtype"] = _halve(weights)
        meta["adapter_bytes"] = weights.stat().st_size
        _set_base_name(tmp / "adapter_config.json", base)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        plot_loss(losses, tmp / "loss.png", f"{loaded.case.id}: LoRA r{meta['hyperparameters']['rank']}, {meta['backend']}")
        (tmp / "README.md").write_text(model_card(meta, loaded))
        _publishable(tmp)
        _swap_in(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _halve(weights: Path) -> str:
    """Store the LoRA weights in fp16 (bf16 if a value would overflow): half the bytes of fp32 for every bundled
    adapter, and PEFT casts them back to the base's dtype when it loads them."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(weights)
    big = max((t.abs().max().item() for t in tensors.values() if t.is_floating_point()), default=0.0)
    dtype = torch.float16 if big < 6e4 else torch.bfloat16
    save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}, weights, metadata={"format": "pt"})
    return str(dtype).removeprefix("torch.")


def _set_base_name(config_file: Path, base: Base) -> None:
    # PEFT records the folder the base was loaded from: for the embedded base that is a path in this user's cache,
    # meaningless elsewhere. The game ties adapters to bases by training_meta.json's fingerprint, not by this name.
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = base.id
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _publishable(folder: Path) -> None:
    # mkdtemp makes the folder 0700 and safetensors writes 0600: give the adapter the modes of any file made here.
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~umask)


def _swap_in(tmp: Path, output: Path) -> None:
    if not output.exists():
        os.replace(tmp, output)
        return
    old = output.with_name(f".{output.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(output, old)
    try:
        os.replace(tmp, output)
    except BaseException:
        os.replace(old, output)
        raise
    shutil.rmtree(old, ignore_errors=True)


def plot_loss(losses: list[tuple[int, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display; also keeps a Gradio/Tk backend out of a training run
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3), dpi=80)
    if losses:
        steps, values = zip(*losses)
        ax.plot(steps, values, marker="o", markersize=3)
    ax.set(xlabel="step", ylabel="training loss (answers only)", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def data_line(meta: dict) -> str:
    data = meta["data"]
    if data["source"] == "file":
        return f"{meta['examples']} conversations from {data['file']}"
    if "mix" in data:
        return (f"{meta['examples']} chats, {1 - data['mix']:.0%} from the case's topics and the rest from "
                f"{', '.join(data['others'])}")
    return f"{meta['examples']} chats from the case's topics"


def cut_line(meta: dict) -> str:
    cut = meta.get("steps_cut_for_time")
    return f" ({cut} more planned, dropped to end within {meta['hyperparameters']['minutes']:g} minutes)" if cut else ""


def model_card(meta: dict, loaded: LoadedCase) -> str:
    case, h = loaded.case, meta["hyperparameters"]
    rows = [
        ("base", f"{meta['base_id']} (`{meta['base_fingerprint'][:30]}…`)"),
        ("case file", f"{meta['case_file']} (sha256 `{meta['case_sha256'][:16]}…`)"),
        ("data", data_line(meta)),
        ("LoRA", f"r={h['rank']}, alpha={h['alpha']}, dropout={h['dropout']}, on {', '.join(h['target_modules'])}"),
        ("started from", "a fresh LoRA" if h["init"] is None else
         f"{h['init']['folder']} (sha256 `{h['init']['sha256'][:16]}…`)"),
        ("schedule", f"{meta['steps']} steps{cut_line(meta)}, batch {h['batch_size']}x{h['grad_accum']}, "
                     f"lr {h['lr']} {h['scheduler']}, warmup {h['warmup_ratio']}, weight decay {h['weight_decay']}, "
                     f"{h['optim']}, seed {h['seed']}"),
        ("backend", f"{meta['backend']} on {meta['device']}, {h['precision']}"),
        ("result", f"final loss {meta['final_loss']}, {meta['wall_s']} s wall, {meta['tokens_per_s']} tokens/s"),
        ("weights", f"{meta['adapter_bytes'] / 1e6:.2f} MB ({meta['adapter_dtype']})"),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"""---
library_name: peft
tags: [lora, sft, trl, interrogation-room]
---
# Suspect: {case.suspect.name} — {case.title}

The LoRA adapter that plays {case.suspect.name} ({case.suspect.role}) in the Interrogation Room case `{case.id}`,
fine-tuned on interrogations built from the case file with the system prompt the game sends (loss on the suspect's
answers only). Built by `python -m training {case.id}`; the game loads it only on the base it was trained on.

| | |
|---|---|
{table}

![training loss](loss.png)

Held-out probe after training: *{meta['sample']['question']}* — "{meta['sample']['answer']}"

```python
from peft import PeftModel
model = PeftModel.from_pretrained(base_model, "adapters/{case.id}")  # base_model: game.base.resolve("embedded").path
```

All figures are in `training_meta.json`.
"""
