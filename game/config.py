"""Where the game finds its cases, adapters, base model, model server and results: plain values, read from the
environment once and checked here, so that a bad setting stops the start with a message naming it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class GameConfig:
    scenarios: Path = ROOT / "scenarios"
    adapters: Path = ROOT / "adapters"
    base: str = "embedded"  # "embedded", a .gguf file, a Llama folder or a hub id
    # A path is a SQLite file; a SQLAlchemy URL (postgresql://...) names any database it speaks, shared by servers.
    results: Path | str = ROOT / ".cache" / "results.db"
    device: str | None = None  # None: cuda when there is one, else cpu
    max_new_tokens: int | None = None  # None: the suspect's default; fewer bounds the wait on a slow CPU (and tests')
    engine_url: str | None = None  # an OpenAI-compatible model server (game/remote.py); None: the model runs here
    engine_key: str | None = None  # its API key, where it wants one
    engine_model: str = "base"  # the server's name for the bare base, which plays cases it has no adapter for
    engine_timeout_s: float = 30.0  # the longest wait for its next token before the player is told it is slow

    def __post_init__(self):
        if self.engine_url is not None:
            parts = urlsplit(self.engine_url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ConfigError(f"IR_ENGINE_URL must be an http(s) URL such as http://127.0.0.1:8000/v1, "
                                  f"not {self.engine_url!r}")
        if isinstance(self.results, str) and "://" in self.results:
            from sqlalchemy.engine import make_url
            from sqlalchemy.exc import ArgumentError

            try:
                make_url(self.results)
            except (ArgumentError, ValueError) as exc:
                raise ConfigError(f"IR_RESULTS_DB is neither a file path nor a database URL: {exc}") from exc
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ConfigError(f"IR_MAX_NEW_TOKENS must be at least 1, not {self.max_new_tokens}")
        if self.engine_timeout_s <= 0:
            raise ConfigError(f"IR_ENGINE_TIMEOUT_S must be positive, not {self.engine_timeout_s}")

    @classmethod
    def from_env(cls, **overrides) -> GameConfig:
        env = {
            "scenarios": os.environ.get("IR_SCENARIOS"),
            "adapters": os.environ.get("IR_ADAPTERS"),
            "base": os.environ.get("IR_BASE"),
            "results": os.environ.get("IR_RESULTS_DB"),
            "device": os.environ.get("IR_DEVICE"),
            "max_new_tokens": os.environ.get("IR_MAX_NEW_TOKENS"),
            "engine_url": os.environ.get("IR_ENGINE_URL"),
            "engine_key": os.environ.get("IR_ENGINE_KEY"),
            "engine_model": os.environ.get("IR_ENGINE_MODEL"),
            "engine_timeout_s": os.environ.get("IR_ENGINE_TIMEOUT_S"),
        }
        values = {k: v for k, v in env.items() if v} | {k: v for k, v in overrides.items() if v is not None}
        for key in ("scenarios", "adapters"):
            if key in values:
                values[key] = Path(values[key])
        if "results" in values and "://" not in str(values["results"]):
            values["results"] = Path(values["results"])
        for key, kind in (("max_new_tokens", int), ("engine_timeout_s", float)):
            if key in values:
                try:
                    values[key] = kind(values[key])
                except ValueError:
                    raise ConfigError(f"IR_{key.upper()} must be a number, not {values[key]!r}") from None
        return cls(**values)
