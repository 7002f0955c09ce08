"""The model tier apart: how an engine its operators already run serves the base and every case's adapter, each
under the name the game asks for (the base as `base`, a case's adapter as the case's id; game/remote.py).

    python -m game serve-config vllm                      # prints: vllm serve BASE --enable-lora --lora-modules ...
    python -m game serve-config llama-cpp --out s.json    # writes llama-cpp-python's config file, prints its command

Only adapters the game would load itself are served: an adapter of another base, or a damaged one, is left out (and
its case plays prompt-only, as it would here).
"""

from __future__ import annotations

import json
import logging
import shlex
from pathlib import Path

from game import adapters as adapter_files
from game.base import Base
from game.config import GameConfig
from game.scenario import load_cases

log = logging.getLogger(__name__)

ENGINES = ("vllm", "llama-cpp")
BASE_NAME = GameConfig.engine_model  # what the game asks for when a case has no adapter
N_CTX = 2048  # the game's own llama.cpp context (game/llamacpp.py)


def served_adapters(config: GameConfig, base: Base) -> dict[str, Path]:
    """case id -> adapter folder, for every case whose adapter the game may use on this base."""
    out = {}
    for case_id, loaded in sorted(load_cases(config.scenarios).items()):
        info = adapter_files.inspect(config.adapters, loaded, base)
        if info.usable:
            out[case_id] = info.path.resolve()
        elif info.status is not adapter_files.Status.MISSING:
            log.warning("%s: %s: not served", case_id, info.message)
    return out


def vllm_command(base: Base, adapters: dict[str, Path], host: str, port: int, key: str | None) -> list[str]:
    ranks = [json.loads((folder / "adapter_config.json").read_text())["r"] for folder in adapters.values()]
    command = ["vllm", "serve", base.path, "--served-model-name", BASE_NAME, "--host", host, "--port", str(port)]
    if adapters:
        # vLLM's default rank limit (16) and adapters in one batch (1) are raised to what these adapters need.
        command += ["--enable-lora", "--max-lora-rank", str(max(ranks)), "--max-loras", str(len(adapters)),
                    "--lora-modules", *(f"{case_id}={folder}" for case_id, folder in adapters.items())]
    return command + (["--api-key", key] if key else [])


def llama_cpp_config(base: Base, adapters: dict[str, Path], host: str, port: int, key: str | None) -> dict:
    """llama-cpp-python's server config: one model entry for the base, one per case with its GGUF LoRA beside it."""
    from transformers import AutoConfig

    from game import llamacpp, llamacpp_files

    gguf = llamacpp.gguf_of(base)
    if gguf is None:
        raise ValueError(f"llama.cpp's server needs a GGUF base, not {base.spec}: start the game's base as a .gguf")
    shape = AutoConfig.from_pretrained(base.path)
    model = {
        "model": str(gguf), "n_ctx": N_CTX, "n_threads": -1, "n_threads_batch": -1,  # -1: every core
        "logits_all": False,  # its default keeps every prompt token's logits, which only costs time here
        # The game penalises repeats over all it has seen; this server can only over what it generated, all of it.
        "last_n_tokens_size": N_CTX,
        "verbose": False,
    }
    models = [model | {"model_alias": BASE_NAME}]
    models += [model | {"model_alias": case_id, "lora_path": str(llamacpp_files.gguf_lora(folder, shape))}
               for case_id, folder in adapters.items()]
    # interrupt_requests: its default cuts a player's answer short whenever another player's question arrives.
    return {"host": host, "port": port, "interrupt_requests": False, "models": models} | (
        {"api_key": key} if key else {})


def serve_config(engine: str, config: GameConfig, base: Base, host: str, port: int, out: Path | None) -> str:
    """The command that starts `engine` serving every usable adapter (for llama-cpp, after writing `out`)."""
    adapters = served_adapters(config, base)
    if engine == "vllm":
        return shlex.join(vllm_command(base, adapters, host, port, config.engine_key))
    if out is None:
        raise ValueError("llama-cpp needs --out FILE: where to write the server's config file")
    settings = llama_cpp_config(base, adapters, host, port, config.engine_key)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(settings, indent=2) + "\n")
    return shlex.join(["python", "-m", "game.llama_server", "--config_file", str(out.resolve())])
