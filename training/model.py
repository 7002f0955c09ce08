"""The model a case trains: the backend chosen for the machine and base, the base loaded once for it, and each
case's LoRA on a copy of that base (fresh, or the weights of an adapter folder given by --init)."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json

from game.adapters import META_FILE
from game.base import EMBEDDED, Base, BaseModelError, resolve
from training.config import LoraArguments, TrainArguments, TrainingError
from training.hardware import LARGE_BASE_PARAMS, bf16_ok, cuda_available, parameter_count


def choose_backend(requested: str, base: Base | None = None) -> str:
    """auto: Unsloth on a CUDA GPU for a base large enough to load in 4-bit, where its kernels pay (1.7x on the
    Llama-3.1-8B shape); elsewhere transformers + peft, which on a small base is the faster (the embedded base's
    default recipe on an H200: 58 s for the whole command with CUDA-graph layers, ~190 s with Unsloth)."""
    has_unsloth = importlib.util.find_spec("unsloth") is not None
    if requested == "auto":
        if not (has_unsloth and cuda_available()):
            return "hf"
        return "unsloth" if base is not None and parameter_count(base) >= LARGE_BASE_PARAMS else "hf"
    if requested == "unsloth" and not (has_unsloth and cuda_available()):
        missing = "unsloth is not installed" if not has_unsloth else "no CUDA GPU is visible"
        raise TrainingError(f"--backend unsloth: {missing}; use --backend hf (or auto) to train with transformers")
    return requested


def early_imports(argv: list[str]) -> None:
    """Import Unsloth before anything loads transformers, trl or peft: it patches them on import.

    Called by __main__ before the arguments are parsed (the parser itself comes from trl), so it peeks at --backend
    and --base.
    """
    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--backend", default="auto")
    peek.add_argument("--base", default=EMBEDDED)
    known, _ = peek.parse_known_args(argv)
    try:
        base = resolve(known.base) if known.backend == "auto" and importlib.util.find_spec("unsloth") else None
        if choose_backend(known.backend, base) == "unsloth":
            import unsloth  # noqa: F401
    except (TrainingError, BaseModelError):
        pass  # main() reports it after parsing, with the rest of the usage errors


def load_base(backend: str, base: Base, train: TrainArguments, max_length: int, in_4bit: bool):
    """(model, tokenizer): the base, loaded once for every case of the command."""
    import torch

    if backend == "unsloth":
        from unsloth import FastLanguageModel

        return FastLanguageModel.from_pretrained(
            model_name=base.path, max_seq_length=max_length, dtype=None, load_in_4bit=in_4bit
        )

    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    on_gpu = cuda_available()
    kwargs = {"dtype": (torch.bfloat16 if bf16_ok() else torch.float16) if on_gpu else
              torch.bfloat16 if train.cpu_bf16 else torch.float32}
    if in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=kwargs["dtype"],
        )
    if on_gpu:
        kwargs["device_map"] = {"": 0}
    return AutoModelForCausalLM.from_pretrained(base.path, **kwargs), AutoTokenizer.from_pretrained(base.path)


def from_init(lora: LoraArguments, base: Base) -> LoraArguments:
    """The LoRA settings of the adapter to start from, checked before the base loads: its folder, files and base."""
    folder = lora.init
    absent = [name for name in ("adapter_config.json", "adapter_model.safetensors") if not (folder / name).is_file()]
    if absent:
        raise TrainingError(f"--init {folder}: not an adapter folder (no {', '.join(absent)})")
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
        rank, alpha, modules = int(config["r"]), int(config["lora_alpha"]), sorted(config["target_modules"])
    except (ValueError, KeyError, TypeError) as exc:
        raise TrainingError(f"--init {folder}/adapter_config.json: not a LoRA config ({exc!r})") from exc
    meta = folder / META_FILE
    trained_on = json.loads(meta.read_text()).get("base_fingerprint") if meta.is_file() else None
    if trained_on is not None and trained_on != base.fingerprint:
        raise TrainingError(f"--init {folder} was trained on another base ({trained_on[:30]}…), not {base.id}")
    return dataclasses.replace(lora, rank=rank, alpha=alpha, target_modules=modules)


def add_lora(backend: str, base_model, lora: LoraArguments, train: TrainArguments, checkpointing):
    """(model, peft_config) for one case: Unsloth returns the LoRA model itself, plain HF leaves the wrapping to trl.

    Each case gets a copy of the loaded base, so no LoRA of an earlier case (nor its injected layers) is left in it.
    """
    import copy

    from transformers import set_seed

    set_seed(train.seed)  # the LoRA init draws from the global generator: the same adapter alone or with others
    model = copy.deepcopy(base_model)
    if backend == "unsloth":
        from unsloth import FastLanguageModel

        model = FastLanguageModel.get_peft_model(
            model,
            r=lora.rank,
            lora_alpha=lora.lora_alpha,
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules),
            bias="none",
            # Unsloth's offloaded checkpointing saves memory a large base needs and costs time a small one does not.
            use_gradient_checkpointing="unsloth" if checkpointing else False,
            random_state=train.seed,
        )
        if lora.init is not None:
            from peft import set_peft_model_state_dict
            from peft.utils import load_peft_weights

            set_peft_model_state_dict(model, load_peft_weights(str(lora.init)))
        return model, None

    from peft import LoraConfig

    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    if lora.init is None:
        return model, config
    from peft import PeftModel

    # The same settings as a fresh LoRA's (from_init took rank, alpha and modules from the folder), its weights.
    return PeftModel.from_pretrained(model, str(lora.init), config=config, is_trainable=True), None
