import json

import pytest

from conftest import MINIMAL_CASE
from game import adapters as adapter_files
from game.prompt import chat, system_prompt
from game.scenario import Case, LoadedCase
from game.session import Exchange
from game.suspect import Suspect, clean_answer

CASE = Case.model_validate(MINIMAL_CASE)


@pytest.fixture(scope="module")
def suspect(base):
    return Suspect(base, device="cpu")


def test_system_prompt_has_the_persona_and_facts_but_not_the_truth():
    prompt = system_prompt(CASE)
    assert "Ivo Brandt, 58, head gardener" in prompt and "slow, precise" in prompt
    assert all(fact in prompt for fact in CASE.facts)
    assert CASE.truth not in prompt and "debts" not in prompt


def test_chat_replays_the_transcript_in_turn_order():
    messages = chat(CASE, [Exchange("Where were you?", "Home.")], "Who has a key?")
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[-1]["content"] == "Who has a key?"


def test_prompt_uses_the_tokenizers_chat_template(suspect):
    text = suspect.tokenizer.apply_chat_template(chat(CASE, [], "Who has a key?"), tokenize=False,
                                                 add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are Ivo Brandt")
    assert text.endswith("<|im_start|>user\nWho has a key?<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("raw,finished,expected", [
    ("I was home. I slept.<|im_end|>", True, "I was home. I slept."),
    ("I was home.\nuser\nWhere were you?", True, "I was home."),
    ("I was home.\nDetective: Really?", True, "I was home."),
    ("I was home. Then I went to the", False, "I was home."),
    ("I was home. I was home. I was home. I slept.", True, "I was home. I slept."),
    ("One. Two. Three. Four.", True, "One. Two. Three."),
    ("No", True, "No"),
    ("I went out and then", False, "I went out and then…"),
    ("  spaced\n\n out.  ", True, "spaced out."),
])
def test_answer_is_cut_cleanly(raw, finished, expected):
    assert clean_answer(raw, finished) == expected


def test_real_model_answers_in_one_clean_turn(suspect):
    partials = list(suspect.stream(CASE, [], "Where were you last night?"))
    final = partials[-1]
    assert final and "<|" not in final and "\nuser" not in final
    assert len(partials) > 1, "the answer should stream"
    assert final[-1] in ".!?…\"'" or partials[-2].startswith(final)


def test_answers_are_deterministic(base):
    # Greedy: the same question in the same state gets the same answer, here two suspects from their start. Within one
    # engine a conversation's KV can sit elsewhere in its case's cache, and attention then sums in another order: a near
    # tie between two tokens can part (as a pass of several players can, tests/test_llamacpp.py).
    first, second = Suspect(base, device="cpu"), Suspect(base, device="cpu")
    assert first.answer(CASE, [], "Who has the key?") == second.answer(CASE, [], "Who has the key?")


def write_adapter_meta(folder, **meta):
    folder.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (folder / name).write_text("{}")
    (folder / adapter_files.META_FILE).write_text(json.dumps(meta))


def loaded_case(tmp_path):
    path = tmp_path / "case.json"
    path.write_text(json.dumps(MINIMAL_CASE))
    return LoadedCase(CASE, path, "casehash")


def test_adapter_of_another_base_is_refused_with_the_base_it_needs(tmp_path, base):
    write_adapter_meta(tmp_path / "adapters" / CASE.id, base_id="Llama-3.1-8B", base_fingerprint="folder:abc",
                       case_sha256="casehash")
    info = adapter_files.inspect(tmp_path / "adapters", loaded_case(tmp_path), base)
    assert info.status is adapter_files.Status.MISMATCH and not info.usable
    assert "trained on base 'Llama-3.1-8B'" in info.message and "prompt-only" in info.message


def test_missing_adapter_means_prompt_only(tmp_path, base):
    info = adapter_files.inspect(tmp_path / "adapters", loaded_case(tmp_path), base)
    assert info.status is adapter_files.Status.MISSING and "prompt-only" in info.message


def test_adapter_older_than_its_case_is_stale_but_usable(tmp_path, base):
    write_adapter_meta(tmp_path / "adapters" / CASE.id, base_id="x", base_fingerprint=base.fingerprint,
                       case_sha256="older")
    info = adapter_files.inspect(tmp_path / "adapters", loaded_case(tmp_path), base)
    assert info.status is adapter_files.Status.STALE and info.usable


def test_corrupt_adapter_is_not_loaded_and_the_suspect_still_answers(tmp_path, base, suspect):
    write_adapter_meta(tmp_path / "adapters" / CASE.id, base_id="x", base_fingerprint=base.fingerprint,
                       case_sha256="casehash")
    info = adapter_files.inspect(tmp_path / "adapters", loaded_case(tmp_path), base)
    assert info.status is adapter_files.Status.READY  # the files look right; their content is garbage
    assert suspect.load_adapter(info) is False
    assert CASE.id not in suspect.adapters
    assert suspect.answer(CASE, [], "Where were you?")


def test_unreadable_meta_is_corrupt(tmp_path, base):
    folder = tmp_path / "adapters" / CASE.id
    write_adapter_meta(folder)
    (folder / adapter_files.META_FILE).write_text("not json")
    info = adapter_files.inspect(tmp_path / "adapters", loaded_case(tmp_path), base)
    assert info.status is adapter_files.Status.CORRUPT


def test_a_prepared_case_answers_its_first_question_without_recomputing_its_system_prompt(base):
    suspect = Suspect(base, device="cpu")
    prepared, unprepared = (CASE.model_copy(update={"id": f"{CASE.id}-{name.split()[0].lower()}",
                                                    "suspect": CASE.suspect.model_copy(update={"name": name})})
                            for name in ("Prudence Vale", "Ambrose Kettle"))
    warm_up = suspect.prepare(prepared)
    assert warm_up.wait(timeout=120) is None  # done: a question sent sooner goes before it
    cached = {}
    for case in (prepared, unprepared):
        stats = {}
        for _ in suspect.stream(case, [], "Where were you last night?", stats=stats):
            pass
        cached[case.id] = stats["cached_tokens"]
    system_tokens = suspect._prompt(prepared, chat(prepared, [], "?"))[1]
    assert system_tokens > 0 and cached[prepared.id] >= system_tokens > cached[unprepared.id]


class Silent:
    """An engine whose model ends its turn before a word."""
    draft_tokens = 0

    def submit(self, request):
        request.tokens.put(None)
        return request


def test_a_suspect_that_says_nothing_gives_an_evasion_not_an_empty_answer(suspect, monkeypatch):
    monkeypatch.setattr(suspect, "_engine", Silent())
    assert list(suspect.stream(CASE, [], "How did you feel when you heard?")) == [CASE.evasion.answers[0]]


@pytest.mark.parametrize("engine", ["llama.cpp", "torch"])
def test_an_engine_told_to_cancel_all_ends_every_answer_it_holds(base, engine):
    """What the exit hook (game.serving) asks of each engine: every answer in progress or waiting ends at once."""
    from game.serving import Request

    suspect = Suspect(base, device="cpu", engine=engine)
    prompt, prefix = suspect._prompt(CASE, chat(CASE, [], "Tell me all you did last week, day by day."))
    requests = [suspect._engine.submit(Request(prompt, None, prefix, 400, 1.0)) for _ in range(3)]
    first = requests[0].tokens.get(timeout=60)  # under way: one answering, the others answering or waiting
    assert isinstance(first, int)
    suspect._engine.cancel_all()
    for request in requests:
        produced = 0
        while (item := request.tokens.get(timeout=60)) is not None:
            assert not isinstance(item, BaseException)
            produced += 1
        assert produced < 390  # the 400 asked for (a repetition penalty of 1.0 lets the base loop until then)
