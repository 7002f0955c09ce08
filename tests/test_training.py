"""`python -m training`: the adapter folder it writes, and the data it trains on.

Real runs on the real embedded base, kept tiny (2 steps of 2 short chats): one trained adapter is shared by the
tests that only read it. GPU-only tests are marked `gpu` and skipped without CUDA.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from transformers import TrainerCallback

from conftest import MINIMAL_CASE, ROOT, recipe_trainer
from game import adapters
from game.phrases import found
from game.prompt import system_prompt
from game.base import file_sha256
from game.scenario import Case
from training import callbacks, hardware
from training import save as saving
from training import train as training
from training.config import CPU_RECIPE, GPU_RECIPE, PRIOR, LoraArguments, TrainingError, native_cpu_bf16, parse
from training.data import DataError, case_chats, load_case, load_conversations
from training.model import choose_backend, from_init

CASE = Case.model_validate(MINIMAL_CASE)
# Two short chats a step, two steps: the whole recipe end to end in seconds on a 2-core CPU.
TINY = ["--steps", "2", "--batch_size", "2", "--min_turns", "1", "--max_turns", "2", "--max_length", "320",
        "--logging_steps", "1"]


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scenarios")
    (folder / f"{CASE.id}.json").write_text(json.dumps(MINIMAL_CASE, indent=1))
    return folder


@pytest.fixture(scope="module")
def trained(scenarios, tmp_path_factory):
    """One adapter built by the real command line, shared by the tests that read it."""
    output = tmp_path_factory.mktemp("adapters") / CASE.id
    run = subprocess.run(
        [sys.executable, "-m", "training", CASE.id, "--scenarios", str(scenarios), "--output", str(output), *TINY],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:]
    return output, run.stdout


def args(scenarios: Path, output: Path, *extra: str):
    return parse([CASE.id, "--scenarios", str(scenarios), "--output", str(output), *TINY, *extra])


def snapshot(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


class StopAt(TrainerCallback):
    """Ctrl-C in the middle of training, after the checkpoint of the step before."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


# --- the command, end to end ------------------------------------------------------------------------------------


def test_command_writes_a_peft_folder_that_loads_on_the_base(trained, base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    output, _ = trained
    assert {p.name for p in output.iterdir()} == {
        "adapter_config.json", "adapter_model.safetensors", "training_meta.json", "README.md", "loss.png"
    }
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base.path), output)
    lora = [n for n, _ in model.named_parameters() if "lora_A" in n]
    assert len(lora) == 30 * 7  # every projection of every layer


def test_command_shows_progress_and_the_loss(trained):
    _, log = trained
    assert "'loss':" in log and "2/2" in log  # the logged loss and the tqdm bar
    assert "'entropy':" not in log  # trl's per-step metrics only with --step_metrics (each waits for the GPU)


def test_metadata_ties_the_adapter_to_its_base_and_case(trained, scenarios, base):
    meta = adapters.read_meta(trained[0])
    loaded = load_case(scenarios, CASE.id)
    assert meta["base_id"] == base.id and meta["base_fingerprint"] == base.fingerprint
    assert meta["case_id"] == CASE.id and meta["case_sha256"] == loaded.sha256
    assert meta["backend"] == "hf" and meta["device"].startswith("cpu")
    assert meta["steps"] == 2 and meta["final_loss"] > 0 and meta["wall_s"] > 0 and meta["tokens_per_s"] > 0
    h = meta["hyperparameters"]
    assert (h["rank"], h["alpha"], h["dropout"], h["seed"], h["batch_size"]) == (4, 4, 0.0, 3407, 2)
    # the CPU's recipe where unset, at its rate for a run that starts from the prior
    assert (h["lr"], h["grad_accum"]) == (CPU_RECIPE.init_lr, CPU_RECIPE.grad_accum)
    assert h["optim"] == "adamw_torch" and h["weight_decay"] == 0.01 and h["scheduler"] == "linear"
    assert h["precision"] == ("bf16 base, fp32 LoRA" if native_cpu_bf16() else "fp32")
    assert meta["sample"]["question"] == CASE.probes[0].question and meta["sample"]["answer"]


def test_adapter_is_stored_in_half_precision_and_small(trained):
    from safetensors import safe_open

    output, _ = trained
    with safe_open(output / "adapter_model.safetensors", "pt") as f:
        dtypes = {str(f.get_slice(k).get_dtype()) for k in f.keys()}
    assert dtypes == {"F16"}
    assert (output / "adapter_model.safetensors").stat().st_size < 2.7e6  # rank 4: ~2.5 MB


def test_game_accepts_the_adapter_on_its_base(trained, scenarios, base):
    output, _ = trained
    info = adapters.inspect(output.parent, load_case(scenarios, CASE.id), base)
    assert info.status is adapters.Status.READY, info.message


def test_game_refuses_the_adapter_on_another_base(trained, scenarios, base):
    output, _ = trained
    other = replace(base, id="SomeOther-1B", fingerprint="folder:" + "0" * 64)
    info = adapters.inspect(output.parent, load_case(scenarios, CASE.id), other)
    assert info.status is adapters.Status.MISMATCH and not info.usable
    assert base.id in info.message  # says which base the adapter needs


def test_adapter_of_an_older_case_file_is_stale(trained, scenarios, base, tmp_path):
    output, _ = trained
    edited = tmp_path / f"{CASE.id}.json"
    edited.write_text(json.dumps({**MINIMAL_CASE, "title": "The Greenhouse Orchid, revised"}))
    info = adapters.inspect(output.parent, load_case(edited, CASE.id), base)
    assert info.status is adapters.Status.STALE


def test_work_dir_is_gone_after_a_finished_run(trained):
    output, _ = trained
    assert not output.with_name(output.name + ".work").exists()
    assert [p.name for p in output.parent.iterdir()] == [output.name]


# --- atomic write and resume ----------------------------------------------------------------------------------


def test_crash_while_saving_leaves_the_previous_adapter(trained, scenarios, base, tmp_path, monkeypatch):
    import shutil

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    output = tmp_path / CASE.id
    shutil.copytree(trained[0], output)
    before = snapshot(output)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base.path), output)
    meta = adapters.read_meta(output)

    def crash(*a, **k):  # by then the new weights are written: the new folder is half done
        raise KeyboardInterrupt

    monkeypatch.setattr(saving, "plot_loss", crash)
    with pytest.raises(KeyboardInterrupt):
        saving.save_adapter(output, model, base, meta, [(1, 2.0)], load_case(scenarios, CASE.id))
    assert snapshot(output) == before
    assert [p.name for p in tmp_path.iterdir()] == [CASE.id]  # no half-written folder left beside it


def test_interrupted_run_resumes_from_its_last_checkpoint(scenarios, tmp_path):
    output = tmp_path / CASE.id
    work = tmp_path / (CASE.id + ".work")
    with pytest.raises(KeyboardInterrupt):
        training.main(*args(scenarios, output, "--steps", "3", "--save_steps", "1"), callbacks=[StopAt(2)])
    assert not output.exists() and (work / "checkpoint-1").is_dir()

    training.main(*args(scenarios, output, "--steps", "3", "--save_steps", "1", "--resume"))
    meta = adapters.read_meta(output)
    assert meta["resumed_from"] == "checkpoint-1" and meta["steps"] == 3
    assert not work.exists()


def test_resume_refuses_checkpoints_made_with_other_settings(tmp_path):
    work = tmp_path / "case.work"
    run = {"case_sha256": "a", "base_fingerprint": "b", "data": {}, "hyperparameters": {"lr": 2e-3}}
    assert training.prepare_work_dir(work, run, resume=False) is None
    (work / "checkpoint-5").mkdir()
    with pytest.raises(TrainingError, match="other settings \\(hyperparameters\\)"):
        training.prepare_work_dir(work, {**run, "hyperparameters": {"lr": 1e-4}}, resume=True)
    assert training.prepare_work_dir(work, run, resume=True) == str(work / "checkpoint-5")


def test_a_run_past_its_minutes_drops_the_steps_that_do_not_fit_and_says_so(scenarios, tmp_path):
    # A budget no step can meet: the run keeps the steps that measured the pace (a first one, then PACE_STEPS).
    output = tmp_path / CASE.id
    training.main(*args(scenarios, output, "--steps", "30", "--minutes", "0.001"))
    meta = adapters.read_meta(output)
    kept = 1 + callbacks.PACE_STEPS
    assert meta["steps"] == kept and meta["steps_cut_for_time"] == 30 - kept
    assert meta["hyperparameters"]["steps"] == 30 and meta["hyperparameters"]["minutes"] == 0.001
    assert f"{kept} steps ({30 - kept} more planned, dropped to end within 0.001 minutes)" in (
        output / "README.md").read_text()


def run_on_a_clock(monkeypatch, step_seconds, seconds: float):
    """Steps of a 100-step linear schedule under time_budget(seconds), step i taking step_seconds(i) on a fake clock:
    the steps trained, the plan after each step, and the last learning rate."""
    import torch
    from transformers import TrainerControl, TrainerState, get_scheduler

    now = [0.0]
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: now[0])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=100)
    budget = callbacks.time_budget(seconds=seconds + callbacks.AFTER_TRAINING_S, started=0.0)
    state, control, plans = TrainerState(max_steps=100), TrainerControl(), []
    while not control.should_training_stop:
        now[0] += step_seconds(state.global_step)
        optimizer.step()
        scheduler.step()
        state.global_step += 1
        budget.on_step_end(None, state, control, lr_scheduler=scheduler)
        plans.append(state.max_steps)
    return state.global_step, plans, scheduler.get_last_lr()[0]


def test_the_budget_ends_the_schedule_at_the_last_step_that_fits(monkeypatch):
    trained, plans, last_lr = run_on_a_clock(monkeypatch, lambda step: 10, seconds=400)  # 40 steps of 10 s fit
    assert trained == plans[-1] == 40
    assert last_lr == 0.0  # the linear decay reached its end at the last step trained


def test_steps_dropped_while_the_machine_was_slow_come_back_when_it_is_not(monkeypatch):
    trained, plans, last_lr = run_on_a_clock(monkeypatch, lambda step: 20 if step < 8 else 5, seconds=600)
    assert min(plans) < 40  # at 20 s a step, 30 fit
    assert trained == plans[-1] > 80 and last_lr == 0.0


def test_steps_asked_for_are_trained_whole_unless_minutes_are_given_too():
    *_, recipe_steps = parse([CASE.id])
    assert recipe_steps.resolved(on_gpu=False).minutes == CPU_RECIPE.minutes == 10
    assert recipe_steps.resolved(on_gpu=True).minutes is None
    *_, asked = parse([CASE.id, "--steps", "300"])
    assert asked.resolved(on_gpu=False).minutes is None
    *_, both = parse([CASE.id, "--steps", "300", "--minutes", "20"])
    assert both.resolved(on_gpu=False).minutes == 20
    with pytest.raises(SystemExit):
        parse([CASE.id, "--minutes", "-1"])


def test_a_new_run_without_resume_starts_from_scratch(tmp_path):
    work = tmp_path / "case.work"
    (work / "checkpoint-5").mkdir(parents=True)
    assert training.prepare_work_dir(work, {"hyperparameters": {}}, resume=False) is None
    assert not (work / "checkpoint-5").exists()


# --- data ---------------------------------------------------------------------------------------------------------


def test_case_chats_start_with_the_games_system_prompt_and_end_with_an_answer():
    chats = case_chats(CASE, 50, seed=0)
    answers = {a for t, _ in CASE.dialogue() for a in t.answers} | set(CASE.repeat_lines)
    for row in chats:
        m = row["messages"]
        assert m[0] == {"role": "system", "content": system_prompt(CASE)}
        assert [x["role"] for x in m[1:]] == ["user", "assistant"] * ((len(m) - 1) // 2)
        assert 1 <= (len(m) - 1) // 2 <= 5 and m[-1]["content"] in answers


def test_case_chats_never_contain_a_probe():
    probes = {q for p in CASE.probes for q in [p.question, *p.paraphrases]}
    said = {x["content"] for row in case_chats(CASE, 200, seed=0) for x in row["messages"]}
    assert not probes & said


def test_case_chats_are_reproducible_from_the_seed():
    assert case_chats(CASE, 20, seed=7).to_list() == case_chats(CASE, 20, seed=7).to_list()
    assert case_chats(CASE, 20, seed=7).to_list() != case_chats(CASE, 20, seed=8).to_list()


def test_mix_draws_its_share_of_chats_from_the_other_cases_each_under_its_own_prompt():
    loaded = [load_case(ROOT / "scenarios", case_id) for case_id in ("bakeoff-salt", "lighthouse-logbook", "museum-glass-hare")]
    _, data_args, _, train_args = parse([loaded[0].case.id, "--mix", "0.5", "--steps", "10", "--batch_size", "4",
                                         "--grad_accum", "1"])
    dataset, source = training.build_dataset(loaded[0], data_args, train_args, loaded)
    prompts = [row["messages"][0]["content"] for row in dataset]
    counts = {c.case.id: prompts.count(system_prompt(c.case)) for c in loaded}
    assert counts == {"bakeoff-salt": 20, "lighthouse-logbook": 10, "museum-glass-hare": 10}
    assert prompts[:20] != [system_prompt(loaded[0].case)] * 20, "the cases' chats should be shuffled together"
    assert source["mix"] == 0.5 and set(source["others"]) == {"lighthouse-logbook", "museum-glass-hare"}
    alone, plain = training.build_dataset(loaded[0], parse([loaded[0].case.id, "--steps", "10", "--batch_size", "4"])[1],
                                          train_args, loaded)
    assert {row["messages"][0]["content"] for row in alone} == {system_prompt(loaded[0].case)} and "mix" not in plain


def test_a_guilty_suspects_lines_that_let_a_tell_slip_are_drawn_tell_weight_times_as_often():
    guilty = load_case(ROOT / "scenarios", "ski-lodge-bracelet").case
    keywords = [k for tell in guilty.tells for k in tell.keywords]
    topic = next(t for t, _ in guilty.dialogue() if 0 < sum(bool(found(a, keywords)) for a in t.answers) < len(t.answers))
    slips = sum(bool(found(a, keywords)) for a in topic.answers)

    def share(weight: float) -> float:  # of the topic's lines said first in a chat, those that let a tell slip
        first = [row["messages"][2]["content"] for row in case_chats(guilty, 4000, seed=0, tell_weight=weight)]
        said = [a for a in first if a in topic.answers]
        return sum(bool(found(a, keywords)) for a in said) / len(said)

    for weight in (1.0, 2.0):
        assert share(weight) == pytest.approx(weight * slips / (weight * slips + len(topic.answers) - slips), abs=0.08)
    innocent = load_case(ROOT / "scenarios", "bakeoff-salt").case
    assert case_chats(innocent, 30, seed=0, tell_weight=3.0).to_list() == case_chats(innocent, 30, seed=0).to_list()


@pytest.mark.parametrize("argv,message", [
    (["a", "--mix", "0.95"], "--mix is a share of the chats, 0 to 0.9"),
    (["a", "--mix", "0.5", "--data", "x.jsonl"], "--mix draws chats from the cases"),
    (["a", "--tell_weight", "0"], "--tell_weight must be positive"),
    (["a", "--neftune", "0"], "--neftune is the noise's alpha, positive"),
    (["a", "--own_wording", "1.5"], "--own_wording is a share of a topic's questions, 0 to 1"),
    (["a", "--drop_words", "1"], "--drop_words is each word's chance to be left out"),
    (["a", "--answer_match", "0.5"], "--answer_match weighs the answers that share the question's words, 1 or more"),
    (["a", "--borrow_wordings", "no/such/folder"], "--borrow_wordings: no such folder or file: no/such/folder"),
])
def test_bad_data_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse(argv)
    assert message in capsys.readouterr().err


def test_labels_cover_the_suspects_answers_and_nothing_else(base, tmp_path):
    """What SFTTrainer actually feeds the model: every label outside the answers (and their <|im_end|>) is -100."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    messages = [
        {"role": "system", "content": system_prompt(CASE)},
        {"role": "user", "content": "Where were you last night?"},
        {"role": "assistant", "content": "Home, after locking up at six."},
        {"role": "user", "content": "Are you an AI?"},
        {"role": "assistant", "content": "I am a gardener, detective."},
    ]
    trainer = recipe_trainer(base, tmp_path, Dataset.from_list([{"messages": messages}]))
    tokenizer = trainer.processing_class
    batch = trainer.data_collator([trainer.train_dataset[0]])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    trained_text = tokenizer.decode([i for i, label in zip(ids, labels) if label != -100])
    assert trained_text == "Home, after locking up at six.<|im_end|>I am a gardener, detective.<|im_end|>"
    # and the text the model reads is exactly what the game's chat template makes of the chat
    assert tokenizer.decode(ids) == AutoTokenizer.from_pretrained(base.path).apply_chat_template(messages, tokenize=False)


@pytest.mark.parametrize("max_length", [768, 124])
def test_the_chats_reach_trl_tokenized_as_trl_itself_tokenizes_them(base, tmp_path, max_length):
    """make_trainer tokenizes every chat in one call (training.data.tokenized); trl's own preparation of the same
    chats gives the same input ids and labels, cut and dropped alike where a chat runs past max_length."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    chats = case_chats(CASE, 40, seed=5)
    ours = recipe_trainer(base, tmp_path / "ours", chats, "--max_length", str(max_length))
    tokenizer = ours.processing_class
    config = SFTConfig(output_dir=str(tmp_path / "trl"), assistant_only_loss=True, max_length=max_length, bf16=False,
                       chat_template_path=training.training_chat_template(tokenizer), use_cpu=True, report_to="none")
    trls = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(base.path), args=config, train_dataset=chats,
                      processing_class=tokenizer, peft_config=LoraConfig(r=2, task_type="CAUSAL_LM"))
    assert "messages" not in ours.train_dataset.column_names  # prepared here, not by trl
    assert ours.train_dataset["input_ids"] == trls.train_dataset["input_ids"]
    assert ours.train_dataset["labels"] == trls.train_dataset["labels"]
    if max_length < 768:  # the cut was exercised: some chats were dropped for it, and some cut short
        assert len(trls.train_dataset) < len(chats)
        assert max(len(ids) for ids in ours.train_dataset["input_ids"]) == max_length


def two_chat_trainer(base, work: Path, *argv: str):
    """The recipe's CPU trainer, as `python -m training CASE *argv` makes it, on two one-question chats."""
    from datasets import Dataset

    chats = [{"messages": [{"role": "system", "content": system_prompt(CASE)},
                           {"role": "user", "content": question},
                           {"role": "assistant", "content": "Home, after locking up at six."}]}
             for question in ("Where were you last night?", "And before that, where were you?")]
    return recipe_trainer(base, work, Dataset.from_list(chats), *argv)


@pytest.mark.parametrize("step_metrics", [False, True])
def test_a_training_step_computes_trls_loss_and_its_metrics_only_when_asked(base, tmp_path, step_metrics):
    """trl's per-step metrics each read a value back from the device, so the recipe's trainer leaves them out unless
    told; its loss is trl's own, and the tokens are counted on the host as the batches are built."""
    import torch
    from trl import SFTTrainer

    trainer = two_chat_trainer(base, tmp_path, "--step_metrics", str(step_metrics))
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    if not step_metrics:  # with them, transformers counts the tokens, reading the count back from the device
        assert trainer.data_collator.tokens == int(batch["attention_mask"].sum()) > 0
    assert (trainer.args.include_num_input_tokens_seen == "no") is not step_metrics
    trainer.model.train()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch))
        logged = set(trainer._metrics["train"])
        trls = SFTTrainer.compute_loss(trainer, trainer.model, dict(batch))
    assert torch.allclose(loss, trls)
    assert ("entropy" in logged) is step_metrics and ("mean_token_accuracy" in logged) is step_metrics


def test_neftune_noises_the_embeddings_only_while_training_and_only_when_asked(base, tmp_path):
    import torch

    def embedded_twice(trainer) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.tensor([trainer.train_dataset[0]["input_ids"]])
        embeddings = trainer.model.get_input_embeddings()
        return embeddings(ids), embeddings(ids)

    for argv, noised in (((), False), (("--neftune", "5"), True)):
        trainer = two_chat_trainer(base, tmp_path / str(noised), "--steps", "1", *argv)
        seen = []
        trainer.add_callback(type("Look", (TrainerCallback,), {
            "on_step_end": lambda self, *a, **k: seen.append(embedded_twice(trainer))})())
        trainer.train()
        first, second = seen[0]
        assert (not torch.equal(first, second)) is noised
        assert torch.equal(*embedded_twice(trainer))  # the noise's hook is gone once training ends


def test_training_template_renders_exactly_as_the_bases(base):
    from transformers import AutoTokenizer

    assert training.training_chat_template(AutoTokenizer.from_pretrained(base.path)) is not None


def test_external_conversations_train_an_adapter(scenarios, tmp_path):
    data = tmp_path / "extra.jsonl"
    rows = [{"conversations": [{"role": "user", "content": "Who are you?"},
                               {"role": "assistant", "content": "Ivo Brandt, head gardener."}]},
            {"conversations": [{"role": "system", "content": "You are Ivo."},
                               {"role": "user", "content": "Where were you?"},
                               {"role": "assistant", "content": "At home."}]}]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    [output] = training.main(*args(scenarios, tmp_path / CASE.id, "--data", str(data), "--steps", "1"))
    meta = adapters.read_meta(output)
    assert meta["data"]["source"] == "file" and meta["data"]["file"] == "extra.jsonl" and meta["examples"] == 2


def test_external_conversation_without_system_gets_the_games_prompt(tmp_path):
    data = tmp_path / "extra.json"  # a JSON array, the other accepted layout
    data.write_text(json.dumps([{"conversations": [{"role": "user", "content": "Hi"},
                                                   {"role": "assistant", "content": "Detective."}]}]))
    (row,) = load_conversations(data, CASE)
    assert row["messages"][0] == {"role": "system", "content": system_prompt(CASE)}


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "the file is empty"),
        ("[]", "no conversations"),
        ('{"conversations": [{"role": "user", "content": "Hi"}', "line 1: not valid JSON"),
        ('{"messages": []}', 'expected an object with a "conversations" list'),
        ('{"conversations": []}', "non-empty list"),
        ('{"conversations": [{"role": "bot", "content": "Hi"}]}', "role 'bot' is not one of system, user, assistant"),
        ('{"conversations": [{"role": "user", "content": "Hi"}]}', "no assistant turn"),
        ('{"conversations": [{"role": "assistant", "content": "Hi"}]}', "message 1: role 'assistant' where 'user'"),
        ('{"conversations": [{"role": "user", "content": "Q"}, {"role": "user", "content": "Q"}]}', "message 2"),
        ('{"conversations": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": " "}]}',
         "content must be non-empty text"),
        ('{"conversations": [{"role": "user"}]}', 'message 1: expected {"role": ..., "content": ...}'),
    ],
)
def test_bad_external_data_is_refused_with_a_clear_error(tmp_path, content, message):
    data = tmp_path / "bad.jsonl"
    data.write_text(content)
    with pytest.raises(DataError, match=f"bad.jsonl: .*{re.escape(message)}"):
        load_conversations(data, CASE)


def test_bad_data_stops_the_command_with_the_error_and_no_traceback(scenarios, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"conversations": [{"role": "user", "content": "Hi"}]}\n')
    run = subprocess.run(
        [sys.executable, "-m", "training", CASE.id, "--scenarios", str(scenarios), "--data", str(data),
         "--output", str(tmp_path / "out")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 1
    assert "error: " in run.stderr and "no assistant turn" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "out").exists()


def test_init_starts_from_an_adapters_weights(trained, scenarios, tmp_path):
    from safetensors.torch import load_file

    start, _ = trained
    out = tmp_path / "continued"
    training.main(*args(scenarios, out, "--init", str(start), "--steps", "1", "--lr", "1e-12"))
    before, after = load_file(start / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert any(w.abs().sum() > 0 for k, w in before.items() if "lora_B" in k), "a fresh LoRA's B is zero"
    assert before.keys() == after.keys() and all((before[k].float() - after[k].float()).abs().max() < 1e-3
                                                  for k in before)
    meta = json.loads((out / "training_meta.json").read_text())
    assert meta["hyperparameters"]["init"]["sha256"] == file_sha256(start / "adapter_model.safetensors")


@pytest.mark.skipif(hardware.cuda_available(), reason="the GPU recipe starts from a fresh LoRA")
def test_a_cpu_run_on_the_embedded_base_starts_from_the_prior_unless_told_otherwise(trained, scenarios, tmp_path,
                                                                                  monkeypatch):
    start, _ = trained  # built by the command line with the CPU's defaults
    meta = json.loads((start / "training_meta.json").read_text())
    assert meta["hyperparameters"]["init"]["sha256"] == file_sha256(PRIOR / "adapter_model.safetensors")
    assert f"| started from | {PRIOR} " in (start / "README.md").read_text()
    out = tmp_path / "fresh"
    # The two starts train at the recipe's two rates (the CPU's recipe has one; here two, to tell them apart).
    monkeypatch.setattr("training.config.CPU_RECIPE", replace(CPU_RECIPE, init_lr=CPU_RECIPE.lr / 2))
    training.main(*args(scenarios, out, "--fresh", "--steps", "1"))
    fresh = json.loads((out / "training_meta.json").read_text())["hyperparameters"]
    assert fresh["init"] is None and fresh["lr"] == CPU_RECIPE.lr
    assert "| started from | a fresh LoRA |" in (out / "README.md").read_text()
    training.main(*args(scenarios, tmp_path / "from-prior", "--steps", "1"))
    assert json.loads((tmp_path / "from-prior" / "training_meta.json").read_text())["hyperparameters"]["lr"] == \
        CPU_RECIPE.lr / 2
    with pytest.raises(SystemExit):
        parse([CASE.id, "--fresh", "--init", str(PRIOR)])


def test_the_prior_is_an_adapter_of_the_embedded_base(base):
    lora = from_init(LoraArguments(init=PRIOR), base)
    assert lora.rank == 4 and sorted(lora.target_modules) == sorted(LoraArguments().target_modules)


def test_init_must_be_an_adapter_of_the_same_base(trained, scenarios, tmp_path):
    start, _ = trained
    out = tmp_path / "out"
    with pytest.raises(TrainingError, match="not an adapter folder"):
        training.main(*args(scenarios, out, "--init", str(tmp_path)))
    other = tmp_path / "other"
    shutil.copytree(start, other)
    meta = json.loads((other / "training_meta.json").read_text())
    (other / "training_meta.json").write_text(json.dumps(meta | {"base_fingerprint": "gguf-sha256:0000"}))
    with pytest.raises(TrainingError, match="trained on another base"):
        training.main(*args(scenarios, out, "--init", str(other)))
    assert not out.exists()


def test_unknown_case_is_named_with_the_cases_that_exist(scenarios):
    with pytest.raises(DataError, match=f"no case 'nope'.*{CASE.id}"):
        load_case(scenarios, "nope")


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_several_cases_train_in_one_command_each_into_its_own_folder(tmp_path, base, jobs):
    folder = tmp_path / "scenarios"
    other = {**MINIMAL_CASE, "id": "greenhouse-window", "guilty": False, "tells": [], "quirks": ["Hums."]}
    for data in (MINIMAL_CASE, other):
        (folder / f"{data['id']}.json").parent.mkdir(exist_ok=True)
        (folder / f"{data['id']}.json").write_text(json.dumps(data))
    run = subprocess.run([sys.executable, "-m", "training", "--all", "--scenarios", str(folder), "--adapters",
                          str(tmp_path / "out"), "--jobs", jobs, *TINY], cwd=ROOT, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    for data in (MINIMAL_CASE, other):
        meta = adapters.read_meta(tmp_path / "out" / data["id"])
        assert meta["case_id"] == data["id"] and meta["steps"] == 2
        loaded = load_case(folder, data["id"])
        assert adapters.inspect(tmp_path / "out", loaded, base).status is adapters.Status.READY
    assert "2 adapters in" in run.stderr and ("2 at once" in run.stderr) == (jobs == "2")


@pytest.mark.parametrize("argv,message", [
    ([], "give the CASE_IDs to train, or --all"),
    (["a", "--all"], "give CASE_IDs or --all, not both"),
    (["a", "b", "--output", "x"], "--output names one case's adapter folder"),
    (["a", "b", "--jobs", "0"], "--jobs is how many cases train at once"),
])
def test_which_cases_to_train_is_checked(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse(argv)
    assert message in capsys.readouterr().err


# --- arguments --------------------------------------------------------------------------------------------------


def test_steps_and_epochs_exclude_each_other():
    with pytest.raises(SystemExit):
        parse([CASE.id, "--steps", "5", "--epochs", "1"])
    with pytest.raises(SystemExit):
        parse([CASE.id, "--save_steps", "0"])


def test_defaults_are_the_bundled_recipe_on_a_gpu_and_a_ten_minute_one_on_the_cpu():
    script, data, lora, train = parse([CASE.id])
    assert script.output_for(CASE.id) == Path("adapters") / CASE.id and script.base == "embedded"
    assert script.backend == "auto" and script.cases() == [CASE.id]
    assert lora.lora_alpha == lora.rank and lora.dropout == 0 and len(lora.target_modules) == 7
    assert train.seed == 3407 and train.weight_decay == 0.01
    for on_gpu, recipe in ((True, GPU_RECIPE), (False, CPU_RECIPE)):
        chosen = train.resolved(on_gpu)
        assert (chosen.steps, chosen.batch_size, chosen.grad_accum, chosen.lr, chosen.save_steps) == (
            recipe.steps, recipe.batch_size, recipe.grad_accum, recipe.lr, recipe.save_steps)
        assert train.resolved(on_gpu, from_init=True).lr == recipe.init_lr
    assert GPU_RECIPE.init_lr < GPU_RECIPE.lr  # a LoRA that starts from an adapter's weights takes smaller steps
    assert GPU_RECIPE.steps * GPU_RECIPE.batch_size * GPU_RECIPE.grad_accum > CPU_RECIPE.steps * CPU_RECIPE.batch_size


def test_what_the_trainer_sets_wins_over_the_recipe():
    *_, train = parse([CASE.id, "--steps", "7", "--lr", "1e-4", "--batch_size", "3", "--save_steps", "2"])
    chosen = train.resolved(on_gpu=True)
    assert (chosen.steps, chosen.lr, chosen.batch_size, chosen.grad_accum, chosen.save_steps) == (
        7, 1e-4, 3, GPU_RECIPE.grad_accum, 2)
    assert train.resolved(on_gpu=True, from_init=True).lr == 1e-4
    *_, by_epochs = parse([CASE.id, "--epochs", "2"])
    assert by_epochs.resolved(on_gpu=False).steps is None and by_epochs.resolved(on_gpu=False).epochs == 2


def test_the_cpu_trains_a_bf16_base_only_where_it_does_bf16_natively(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": False, "amx_bf16": False})
    assert parse([CASE.id])[3].resolved(on_gpu=False).cpu_bf16 is False
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": True, "amx_bf16": False})
    assert parse([CASE.id])[3].resolved(on_gpu=False).cpu_bf16 is True
    assert parse([CASE.id, "--cpu_bf16", "false"])[3].resolved(on_gpu=False).cpu_bf16 is False
    assert parse([CASE.id])[3].resolved(on_gpu=True).cpu_bf16 is None  # a GPU's base dtype is the GPU's own
    assert hardware.precision("hf", on_gpu=False, cpu_bf16=True) == "bf16 base, fp32 LoRA"


def test_only_unsloth_4bit_bases_and_fp16_gpus_train_under_autocast(monkeypatch):
    assert hardware.autocast("hf", on_gpu=False) is None and hardware.precision("hf", on_gpu=False) == "fp32"
    monkeypatch.setattr(hardware, "bf16_ok", lambda: True)
    assert hardware.autocast("hf", on_gpu=True) is None  # bf16 base, fp32 LoRA: no casts between them
    assert hardware.precision("hf", on_gpu=True) == "bf16 base, fp32 LoRA, tf32 matmuls"
    assert hardware.autocast("unsloth", on_gpu=True) == hardware.autocast("hf", on_gpu=True, in_4bit=True) == "bf16"
    monkeypatch.setattr(hardware, "bf16_ok", lambda: False)
    assert hardware.autocast("hf", on_gpu=True) == hardware.autocast("unsloth", on_gpu=True) == "fp16"


def test_layers_run_as_cuda_graphs_by_default_only_for_plain_hf_on_a_gpu_with_a_full_precision_base():
    _, _, _, train = parse([CASE.id])
    assert train.compiled("hf", on_gpu=True, in_4bit=False)
    assert not train.compiled("hf", on_gpu=False, in_4bit=False)
    assert not train.compiled("unsloth", on_gpu=True, in_4bit=False)
    assert not train.compiled("hf", on_gpu=True, in_4bit=True)  # bitsandbytes' layers and recomputed activations
    assert not parse([CASE.id, "--compile", "false"])[3].compiled("hf", on_gpu=True, in_4bit=False)
    assert train.cuda_graphs("hf", on_gpu=True, in_4bit=False) == "captured"  # a case alone: nothing to compile
    assert parse([CASE.id, "--graphs", "compiled"])[3].cuda_graphs("hf", on_gpu=True, in_4bit=False) == "compiled"
    assert train.cuda_graphs("hf", on_gpu=False, in_4bit=False) is None


@pytest.mark.parametrize("memory_gib,cores,jobs", [(141, 16, 8), (80, 16, 6), (24, 16, 2), (141, 4, 2), (8, 2, 1)])
def test_a_gpu_trains_as_many_cases_at_once_as_its_memory_and_cores_hold(monkeypatch, memory_gib, cores, jobs):
    import torch

    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: type("Properties", (), {"total_memory": memory_gib * 2**30}))
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    script = parse(["--all"])[0]
    assert script.workers(cases=9, on_gpu=True) == jobs
    assert script.workers(cases=1, on_gpu=True) == 1 and script.workers(cases=9, on_gpu=False) == 1
    assert parse(["--all", "--jobs", "3"])[0].workers(cases=9, on_gpu=True) == 3


@pytest.mark.skipif(hardware.cuda_available(), reason="checks the refusal on a machine without a GPU")
def test_compile_is_refused_without_a_gpu_before_anything_loads(scenarios, tmp_path):
    with pytest.raises(TrainingError, match="--compile is for --backend hf on a CUDA GPU"):
        training.main(*args(scenarios, tmp_path / "out", "--compile", "true"))
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.work").exists()


def test_cpu_without_unsloth_trains_with_hf():
    assert choose_backend("auto") == "hf" or hardware.cuda_available()


def test_auto_takes_unsloth_on_a_gpu_only_for_a_base_it_loads_in_4bit(monkeypatch, base, tmp_path):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name == "unsloth" else find_spec(name))
    monkeypatch.setattr("training.model.cuda_available", lambda: True)
    large = tmp_path / "llama-8b"
    large.mkdir()
    (large / "config.json").write_text(json.dumps({"hidden_size": 4096, "num_hidden_layers": 32,
                                                   "intermediate_size": 14336, "vocab_size": 128256}))
    assert choose_backend("auto", base) == "hf"  # the 135M base: plain transformers is the faster
    assert choose_backend("auto", replace(base, path=str(large))) == "unsloth"
    assert choose_backend("unsloth", base) == "unsloth" and choose_backend("hf", base) == "hf"


@pytest.mark.skipif(hardware.cuda_available(), reason="checks the refusal on a machine without a GPU")
def test_unsloth_backend_is_refused_without_a_gpu():
    with pytest.raises(TrainingError, match="--backend unsloth"):
        choose_backend("unsloth")


# --- GPU ----------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["unsloth", "hf"])
def test_gpu_adapter_plays_in_the_cpu_game(scenarios, tmp_path, backend, base):
    """Trained on the GPU (Unsloth or plain HF), loaded by the game's CPU suspect."""
    from game.suspect import Suspect

    if backend == "unsloth":
        pytest.importorskip("unsloth")
    output = tmp_path / CASE.id
    run = subprocess.run(
        [sys.executable, "-m", "training", CASE.id, "--scenarios", str(scenarios), "--output", str(output),
         "--backend", backend, *TINY],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    meta = adapters.read_meta(output)
    assert meta["backend"] == backend and meta["peak_memory_kind"] == "cuda max allocated"
    assert meta["hyperparameters"]["compile"] == ("captured" if backend == "hf" else False)  # not with Unsloth
    loaded = load_case(scenarios, CASE.id)
    suspect = Suspect(base, device="cpu")
    assert suspect.load_adapter(adapters.inspect(output.parent, loaded, base))
    assert suspect.answer(CASE, (), CASE.probes[0].question)


UNSLOTH_LABELS = """
import sys
from training.model import early_imports
early_imports(["--backend", "unsloth"])  # Unsloth before transformers, as `python -m training` does
from datasets import Dataset
from game.base import resolve
from game.scenario import Case
from game.prompt import system_prompt
from training import train
from training.config import CPU_RECIPE, GPU_RECIPE, parse
from training.model import add_lora, load_base
from conftest import MINIMAL_CASE
case = Case.model_validate(MINIMAL_CASE)
_, data_args, lora, train_args = parse([case.id, "--batch_size", "1"])
train_args = train_args.resolved(on_gpu=True)
model, tokenizer = load_base("unsloth", resolve("embedded"), train_args, 512, False)
model, peft = add_lora("unsloth", model, lora, train_args, "unsloth")
messages = [{"role": "system", "content": system_prompt(case)},
            {"role": "user", "content": "Where were you last night?"},
            {"role": "assistant", "content": "Home, after locking up at six."}]
trainer = train.make_trainer(model, tokenizer, peft, Dataset.from_list([{"messages": messages}]), sys.argv[1],
                             {"optim": "adamw_torch", "gradient_checkpointing": "unsloth", "compile": False},
                             "unsloth", True,
                             data_args, train_args)
batch = trainer.data_collator([trainer.train_dataset[0]])
ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
print("TRAINED:" + tokenizer.decode([i for i, l in zip(ids, labels) if l != -100]))
"""


@pytest.mark.gpu
def test_unsloth_trainer_also_masks_all_but_the_answers(tmp_path):
    pytest.importorskip("unsloth")
    run = subprocess.run([sys.executable, "-c", UNSLOTH_LABELS, str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=900, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                             [str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "TRAINED:Home, after locking up at six.<|im_end|>" in run.stdout
