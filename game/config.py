"""Where the game finds its cases, adapters, base model and results: plain values, read from the environment once."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class GameConfig:
    scenarios: Path = ROOT / "scenarios"
    adapters: Path = ROOT / "adapters"
    base: str = "embedded"  # "embedded", a .gguf file, a Llama folder or a hub id
    results: Path = ROOT / ".cache" / "results.db"
    device: str | None = None  # None: cuda when there is one, else cpu
    max_new_tokens: int | None = None  # None: the suspect's default; fewer bounds the wait on a slow CPU (and tests')

    @classmethod
    def from_env(cls, **overrides) -> GameConfig:
        env = {
            "scenarios": os.environ.get("IR_SCENARIOS"),
            "adapters": os.environ.get("IR_ADAPTERS"),
            "base": os.environ.get("IR_BASE"),
            "results": os.environ.get("IR_RESULTS_DB"),
            "device": os.environ.get("IR_DEVICE"),
            "max_new_tokens": os.environ.get("IR_MAX_NEW_TOKENS"),
        }
        values = {k: v for k, v in env.items() if v} | {k: v for k, v in overrides.items() if v is not None}
        for key in ("scenarios", "adapters", "results"):
            if key in values:
                values[key] = Path(values[key])
        if "max_new_tokens" in values:
            values["max_new_tokens"] = int(values["max_new_tokens"])
        return cls(**values)
