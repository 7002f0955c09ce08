"""`python -m training`: fine-tune a case's suspect (a LoRA on the base) and write its adapter folder.

    python -m training museum-brooch                        # -> adapters/museum-brooch/, the bundled recipe
    python -m training museum-brooch --steps 200 --rank 4 --lr 1e-3 --output /tmp/brooch
    python -m training museum-brooch --data extra.jsonl --epochs 3
    python -m training museum-brooch --resume               # continue an interrupted run from its last checkpoint
    python -m training museum-brooch --backend hf           # plain transformers + peft + trl even on a GPU

main() reads as litgpt's finetune/lora.py: setup -> fit -> validate -> save. The trainer is trl's SFTTrainer on both
backends; the code here builds the data and the trainer and drives the run. training/model.py picks the backend,
loads the base for it and puts each case's LoRA on a copy; training/callbacks.py times the run (and keeps it within
--minutes); training/hardware.py says what the machine runs it with (precision, device facts); training/save.py
writes the adapter folder that game/adapters.py reads (PEFT files + training_meta.json + README.md + loss.png),
atomically.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from datasets import Dataset, concatenate_datasets

from game.bank import PATH as BANK
from game.base import EMBEDDED, Base, file_sha256, resolve
from game.prompt import chat
from game.scenario import LoadedCase, read_cases
from training.callbacks import TokenCount, step_meter, time_budget
from training.config import DataArguments, LoraArguments, ScriptArguments, TrainArguments, TrainingError, recipe
from training.cuda_graphs import PAD_MULTIPLE, fixed_length, graphed_layers
from training.data import borrowed_wordings, case_chats, load_case, load_conversations, tokenized
from training.hardware import (LARGE_BASE_PARAMS, autocast, cuda_available, device_name, parameter_count, peak_memory_gib,
                               precision, tf32, versions)
from training.model import add_lora, choose_backend, early_imports, from_init, load_base
from training.save import save_adapter

log = logging.getLogger("training")

TRAINING_TEMPLATE = Path(__file__).with_name("chatml_training.jinja")
RUN_FILE = "run.json"  # in the work dir: what the checkpoints there were trained with, checked by --resume
META_VERSION = 1
CHATS_PER_TOKENIZER = 500  # a tokenizing process for each this many chats: fewer cost more to start than they save


# ---------------------------------------------------------------------------------------------------------------
# main: setup -> fit -> validate -> save


def main(script: ScriptArguments, data_args: DataArguments, lora: LoraArguments, train: TrainArguments,
         callbacks: Sequence = (), started: float | None = None) -> list[Path]:
    """Train each case asked for and write its adapter folder; returns them. The base is loaded once and every case
    gets its LoRA on a fresh copy of it. `callbacks`: extra transformers TrainerCallbacks; `started`: when the command
    started (perf_counter; default now), from which the first case's wall time and --minutes count."""
    started = time.perf_counter() if started is None else started
    cases = [load_case(script.scenarios, case_id) for case_id in script.cases()]  # every bad case id before any work
    others = list(read_cases([script.scenarios])[0].values()) if data_args.mix else []
    if data_args.data is not None and len(cases) > 1:
        raise TrainingError("--data trains one case on a file of its conversations; give a single CASE_ID")
    base = resolve(script.base)
    backend = choose_backend(script.backend, base)
    on_gpu = cuda_available()
    if base.spec == EMBEDDED:  # the recipe's starting adapter was trained on it, and fits no other base
        lora = lora.resolved(recipe(on_gpu).init)
    train = train.resolved(on_gpu, from_init=lora.init is not None)
    in_4bit = train.load_in_4bit if train.load_in_4bit is not None else on_gpu and parameter_count(base) >= LARGE_BASE_PARAMS
    if in_4bit and not on_gpu:
        raise TrainingError("--load_in_4bit needs a CUDA GPU (bitsandbytes); the CPU trains the base unquantized")
    if train.compile and (backend != "hf" or not on_gpu):
        raise TrainingError("--compile is for --backend hf on a CUDA GPU (CUDA graphs; Unsloth compiles its own kernels)")
    if lora.init is not None:
        lora = from_init(lora, base)
    workers = script.workers(len(cases), on_gpu)
    if workers > 1 and not callbacks:  # every check above made once, before any process starts
        return train_side_by_side(dataclasses.replace(script, backend=backend), [loaded.case.id for loaded in cases],
                                  data_args, lora, train, workers, started)
    model, tokenizer = load_base(backend, base, train, data_args.max_length, in_4bit)
    log.info("base loaded, %.1f s after the start", time.perf_counter() - started)
    outputs = []
    since = started  # the first case's wall time includes the shared loading it waited for
    for loaded in cases:
        outputs.append(train_case(loaded, model, tokenizer, base, backend, on_gpu, in_4bit, script, data_args, lora,
                                  train, callbacks, since, others))
        since = time.perf_counter()
    if len(cases) > 1:
        log.info("%d adapters in %.0f s", len(cases), time.perf_counter() - started)
    return outputs


def train_side_by_side(script: ScriptArguments, case_ids: list[str], data_args: DataArguments, lora: LoraArguments,
                       train: TrainArguments, workers: int, started: float) -> list[Path]:
    """The cases dealt to `workers` spawned processes (CUDA does not survive a fork), each loading the base once and
    training its share one after another. A failed case fails the command once the others have finished."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    shares = [case_ids[i::workers] for i in range(workers)]
    if train.graphs == "auto":  # side by side, the GPU is the limit: fused kernels pay back their compiling
        train = dataclasses.replace(train, graphs="compiled")
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=worker_setup,
                             initargs=(script.backend,)) as pool:
        futures = [pool.submit(main, dataclasses.replace(script, case_ids=share, all=False, jobs=1), data_args, lora,
                               train) for share in shares]
        for future in futures:
            future.result()
    log.info("%d adapters in %.0f s, %d at once", len(case_ids), time.perf_counter() - started, workers)
    return [script.output_for(case_id) for case_id in case_ids]


def worker_setup(backend: str) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    early_imports(["--backend", backend])


def train_case(loaded: LoadedCase, base_model, tokenizer, base: Base, backend: str, on_gpu: bool, in_4bit: bool,
               script: ScriptArguments, data_args: DataArguments, lora: LoraArguments, train: TrainArguments,
               callbacks: Sequence, started: float, others: Sequence[LoadedCase] = ()) -> Path:
    """One case: setup -> fit -> validate -> save. Its wall time counts from `started` (perf_counter); with --mix,
    a share of its chats come from `others`."""
    # setup
    setup = time.perf_counter()
    dataset, data_source = build_dataset(loaded, data_args, train, others)
    hyper = hyperparameters(data_args, lora, train, backend, on_gpu, in_4bit)
    output = script.output_for(loaded.case.id)
    work = output.with_name(output.name + ".work")
    run = {"case_sha256": loaded.sha256, "base_fingerprint": base.fingerprint, "data": data_source, "hyperparameters": hyper}
    checkpoint = prepare_work_dir(work, run, script.resume)
    log.info("case %s, base %s, backend %s (%s), %d chats, %s", loaded.case.id, base.id, backend, device_name(), len(dataset),
             f"{train.steps} steps" if train.steps else f"{train.epochs} epochs")
    model, peft_config = add_lora(backend, base_model, lora, train, hyper["gradient_checkpointing"])
    trainer = make_trainer(model, tokenizer, peft_config, dataset, work, hyper, backend, on_gpu, data_args, train)
    log.info("chats built and tokenized, LoRA added in %.1f s", time.perf_counter() - setup)

    # fit
    meter = step_meter(trainer)
    budget = [time_budget(train.minutes * 60, started)] if train.minutes else []
    for callback in (meter, *budget, *callbacks):
        trainer.add_callback(callback)
    if on_gpu:
        import torch

        torch.cuda.reset_peak_memory_stats()
    result = trainer.train(resume_from_checkpoint=checkpoint)
    model = trainer.model

    # validate: a diverged run must not replace a working adapter
    losses = [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]
    final_loss = losses[-1][1] if losses else result.training_loss
    if not math.isfinite(final_loss):
        raise TrainingError(f"training diverged (final loss {final_loss}); the previous adapter, if any, is kept. Try a lower --lr.")
    probe = loaded.case.probes[0].question
    sample = (probe, answer(model, tokenizer, loaded, probe, backend))
    log.info("sample (held-out probe): %r -> %r", *sample)

    # save
    wall = time.perf_counter() - started
    meta = {
        "format": META_VERSION,
        "base_id": base.id,
        "base_fingerprint": base.fingerprint,
        "case_id": loaded.case.id,
        "case_sha256": loaded.sha256,
        "case_file": loaded.path.name,
        "data": data_source,
        "backend": backend,
        "device": device_name(),
        "hyperparameters": hyper,
        "steps": trainer.state.global_step,
        "steps_cut_for_time": hyper["steps"] - trainer.state.global_step if budget and hyper["steps"] else 0,
        "examples": len(dataset),
        "final_loss": round(final_loss, 4),
        "mean_loss": round(result.training_loss, 4),
        "wall_s": round(wall, 1),
        "train_s": round(meter.seconds, 1),
        "tokens": meter.tokens,
        "tokens_per_s": round(meter.tokens / meter.seconds, 1) if meter.seconds else None,
        "peak_memory_gib": peak_memory_gib(on_gpu),
        "peak_memory_kind": "cuda max allocated" if on_gpu else "process max RSS",
        "resumed_from": Path(checkpoint).name if checkpoint else None,
        "sample": {"question": sample[0], "answer": sample[1]},
        "versions": versions(backend),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    save_adapter(output, model, base, meta, losses, loaded)
    shutil.rmtree(work, ignore_errors=True)  # checkpoints only serve --resume of an unfinished run
    log.info("adapter written to %s (%.0f s, %.0f tokens/s, final loss %.3f)", output, wall, meta["tokens_per_s"] or 0, final_loss)
    return output


# ---------------------------------------------------------------------------------------------------------------
# setup


def build_dataset(loaded: LoadedCase, data_args: DataArguments, train: TrainArguments,
                  others: Sequence[LoadedCase] = ()) -> tuple[Dataset, dict]:
    """The case's chats, or a file's; with --mix, a share of them from `others` (the cases beside it)."""
    if data_args.data is not None:
        dataset = load_conversations(data_args.data, loaded.case)
        return dataset, {"source": "file", "file": data_args.data.name, "sha256": file_sha256(data_args.data)}
    n = data_args.chats or (train.steps * train.examples_per_step if train.steps else 256)
    source = {"source": "case", "chats": n, "question_bank_sha256": file_sha256(BANK)}
    others = [other for other in others if other.case.id != loaded.case.id] if data_args.mix else []
    mixed_in = round(n * data_args.mix) if others else 0
    shape = dict(min_turns=data_args.min_turns, max_turns=data_args.max_turns, tell_weight=data_args.tell_weight,
                 own_wording=data_args.own_wording, drop_words=data_args.drop_words, drop_in=data_args.drop_in,
                 answer_match=data_args.answer_match)
    wordings = {}
    if data_args.borrow_wordings is not None:
        lenders = [c for c in read_cases([data_args.borrow_wordings])[0].values() if c.case.id != loaded.case.id]
        wordings = borrowed_wordings(loaded.case, [c.case for c in lenders])
        source |= {"borrowed_wordings": {c.case.id: c.sha256 for c in lenders}}
    parts = [case_chats(loaded.case, n - mixed_in, train.seed, **shape, borrowed=wordings)]
    for i, other in enumerate(others):  # an even share each, the remainder to the first ones
        share = mixed_in // len(others) + (i < mixed_in % len(others))
        parts.append(case_chats(other.case, share, train.seed + 1 + i, **shape))
    if mixed_in:
        source |= {"mix": data_args.mix, "others": {o.case.id: o.sha256 for o in others}}
    return concatenate_datasets(parts).shuffle(seed=train.seed), source


def hyperparameters(data_args: DataArguments, lora: LoraArguments, train: TrainArguments, backend: str, on_gpu: bool,
                    in_4bit: bool) -> dict:
    """Every setting the adapter depends on, resolved (no None for 'default'), as stored in training_meta.json."""
    return {
        "rank": lora.rank,
        "alpha": lora.lora_alpha,
        "dropout": lora.dropout,
        "target_modules": list(lora.target_modules),
        "init": None if lora.init is None else {"folder": str(lora.init),
                                                "sha256": file_sha256(lora.init / "adapter_model.safetensors")},
        "steps": train.steps,
        "epochs": train.epochs,
        "minutes": train.minutes or None,
        "lr": train.lr,
        "batch_size": train.batch_size,
        "grad_accum": train.grad_accum,
        "warmup_ratio": train.warmup_ratio,
        "scheduler": train.scheduler,
        "weight_decay": train.weight_decay,
        "optim": train.optim or default_optim(on_gpu, in_4bit),
        "seed": train.seed,
        "neftune": train.neftune,
        "precision": ("4bit+" if in_4bit else "") + precision(backend, on_gpu, in_4bit, bool(train.cpu_bf16)),
        "gradient_checkpointing": train.checkpointing(in_4bit) and ("unsloth" if backend == "unsloth" else True),
        "compile": train.cuda_graphs(backend, on_gpu, in_4bit) or False,
        "max_length": data_args.max_length,
        "min_turns": data_args.min_turns,
        "max_turns": data_args.max_turns,
        "tell_weight": data_args.tell_weight,
        "own_wording": data_args.own_wording,
        "drop_words": data_args.drop_words,
        "drop_in": data_args.drop_in,
        "answer_match": data_args.answer_match,
        "borrow_wordings": None if data_args.borrow_wordings is None else str(data_args.borrow_wordings),
        "loss": "assistant tokens only",
    }


def default_optim(on_gpu: bool, in_4bit: bool) -> str:
    if in_4bit and importlib.util.find_spec("bitsandbytes") is not None:
        return "adamw_8bit"  # a large base: optimizer memory matters; needs bitsandbytes and a GPU
    # A LoRA of a small base has ~1M parameters: 8-bit states save nothing, one fused kernel saves many launches.
    return "adamw_torch_fused" if on_gpu else "adamw_torch"


def prepare_work_dir(work: Path, run: dict, resume: bool) -> str | None:
    """The checkpoint to resume from, if asked and present; otherwise a fresh, empty work dir."""
    from transformers.trainer_utils import get_last_checkpoint

    if resume and work.is_dir():
        checkpoint = get_last_checkpoint(str(work))
        if checkpoint is not None:
            try:
                previous = json.loads((work / RUN_FILE).read_text())
            except (OSError, ValueError):
                previous = None
            if previous != run:
                changed = sorted(k for k in run if previous is None or previous.get(k) != run[k])
                raise TrainingError(
                    f"--resume: the checkpoints in {work} were made with other settings ({', '.join(changed)}); "
                    "run again with the same arguments, or without --resume to start over"
                )
            log.info("resuming from %s", checkpoint)
            return checkpoint
        log.warning("--resume: no checkpoint in %s, starting from scratch", work)
    elif resume:
        log.warning("--resume: no work dir %s, starting from scratch", work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / RUN_FILE).write_text(json.dumps(run, indent=1) + "\n")
    return None


def training_chat_template(tokenizer) -> str | None:
    """Our ChatML template with generation markers when it renders exactly as the base's own; else None (trl then
    looks up its own training template for the base's family, or says it has none)."""
    probe = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "A2"},
    ]
    ours = TRAINING_TEMPLATE.read_text()
    try:
        same = all(
            tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=g)
            == tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=g, chat_template=ours)
            for m in (probe, probe[1:], probe[:4])
            for g in (False, True)
        )
    except Exception:  # a template that cannot render our probe is not ChatML
        same = False
    return str(TRAINING_TEMPLATE) if same else None


def make_trainer(model, tokenizer, peft_config, dataset: Dataset, work: Path, hyper: dict, backend: str, on_gpu: bool,
                 data_args: DataArguments, train: TrainArguments, sft_overrides: dict | None = None):
    """trl's SFTTrainer at the recipe's settings; `sft_overrides` (SFTConfig fields) lets benchmarks try others."""
    from trl import SFTConfig, SFTTrainer

    mixed = autocast(backend, on_gpu, getattr(model, "is_loaded_in_4bit", False))
    template = training_chat_template(tokenizer)
    if template is not None and backend == "hf":  # Unsloth's trainer prepares its data its own way
        dataset = tokenized(dataset, tokenizer, Path(template).read_text())
    prepared = "input_ids" in dataset.column_names
    settings = dict(
        output_dir=str(work),
        max_steps=train.steps or -1,
        num_train_epochs=train.epochs or 1,
        per_device_train_batch_size=train.batch_size,
        gradient_accumulation_steps=train.grad_accum,
        learning_rate=train.lr,
        lr_scheduler_type=train.scheduler,
        warmup_steps=train.warmup_ratio,  # a float below 1 is a ratio of the total steps (transformers 5)
        weight_decay=train.weight_decay,
        optim=hyper["optim"],
        seed=train.seed,
        neftune_noise_alpha=train.neftune,
        # trl defaults both to True; autocast only where autocast() says, and recomputing activations only costs time
        # on a small base.
        bf16=mixed == "bf16",
        fp16=mixed == "fp16",
        tf32=tf32(on_gpu) or None,
        gradient_checkpointing=hyper["gradient_checkpointing"] is True,
        max_length=data_args.max_length,
        # Loss on the suspect's answers only: what lies outside {% generation %} in the chat template is masked, by
        # tokenized() where it prepared the chats (trl asks for conversations to do it itself), else by trl.
        assistant_only_loss=not prepared,
        chat_template_path=template,
        logging_steps=train.logging_steps,
        logging_nan_inf_filter=False,  # a NaN must reach the validation step, not be smoothed over
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=1,
        include_num_input_tokens_seen="non_padding",
        report_to="none",
        disable_tqdm=False,
        # trl tokenizes ~500 chats a second in one process: the GPU recipe's 3,200 took ~6 s of a 65-100 s command.
        # What is left of its preparation for chats tokenized here (a cut and a filter) is quicker than a pool's start.
        dataset_num_proc=None if prepared else min(os.cpu_count() or 1, len(dataset) // CHATS_PER_TOKENIZER) or None,
        dataloader_num_workers=0,
        dataloader_pin_memory=on_gpu,
    )
    if hyper["compile"] == "compiled":
        settings["pad_to_multiple_of"] = PAD_MULTIPLE  # a handful of lengths: each new one is a graph of its own
    # Unsloth's SFTTrainer computes its loss its own way; Liger's asks trl's compute_loss for its token accuracy
    settings |= sft_overrides or {}
    quiet = not train.step_metrics and backend == "hf" and not settings.get("use_liger_kernel")
    if quiet:  # transformers' token count waits for the GPU too: TokenCount counts on the host
        settings["include_num_input_tokens_seen"] = "no"
    config = SFTConfig(**settings)
    trainer_class = loss_only_sft_trainer() if quiet else SFTTrainer
    trainer = trainer_class(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                            peft_config=peft_config)
    layers = trainer.model.get_base_model().model.layers if hyper["compile"] else []
    if hyper["compile"] == "captured":  # one batch shape, captured once: every batch padded to the longest chat's
        trainer.data_collator.pad_to_multiple_of = fixed_length(map(len, trainer.train_dataset["input_ids"]))
        trainer.add_callback(graphed_layers(layers))
    elif hyper["compile"] == "compiled":
        for layer in layers:
            layer.compile(mode="reduce-overhead")
    if quiet:
        trainer.data_collator = TokenCount(trainer.data_collator)
    return trainer


def loss_only_sft_trainer():
    """trl's SFTTrainer whose training steps compute the loss as transformers' Trainer does, without trl's per-step
    metrics: each of those (entropy, token accuracy, tokens) is a `.item()` that makes the host wait for the GPU, so
    no step could be launched while the one before ran. The loss is the same: trl's chunked cross-entropy is patched
    into the model's forward, which Trainer.compute_loss calls. Evaluation keeps trl's own compute_loss."""
    from transformers import Trainer
    from trl import SFTTrainer

    class LossOnlySFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if not model.training:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            inputs["use_cache"] = False  # as trl sets it: no KV cache is built in training
            return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

    return LossOnlySFTTrainer


# ---------------------------------------------------------------------------------------------------------------
# validate


def answer(model, tokenizer, loaded: LoadedCase, question: str, backend: str) -> str:
    """The trained suspect's answer to one question, generated and cleaned as the game does (game.suspect)."""
    import torch

    from game.suspect import GenerationSettings, clean_answer

    if backend == "unsloth":
        from unsloth import FastLanguageModel

        FastLanguageModel.for_inference(model)
    model.eval()
    s = GenerationSettings()
    inputs = tokenizer.apply_chat_template(
        chat(loaded.case, [], question), add_generation_prompt=True, return_tensors="pt", return_dict=True
    ).to(model.device)
    # eager: layers compiled for training's shapes would be recompiled for every length generation passes through
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        ids = model.generate(**inputs, max_new_tokens=s.max_new_tokens, do_sample=s.do_sample,
                             repetition_penalty=s.repetition_penalty, pad_token_id=tokenizer.pad_token_id)
    new = ids[0, inputs["input_ids"].shape[1]:]
    return clean_answer(tokenizer.decode(new, skip_special_tokens=False), finished=len(new) < s.max_new_tokens)
