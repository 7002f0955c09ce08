"""Bad input, sent straight to the served app's API or found at start-up: each gets a clear message, the app keeps
serving, and no other game or case is affected."""

import copy
import json
import logging
import os
import subprocess
import sys
from concurrent.futures import wait
from types import SimpleNamespace

import pytest

from app import status
from conftest import INNOCENT_CASE, MINIMAL_CASE, ROOT, connect, text_of, write_scenarios
from game import adapters as adapter_files
from game.config import GameConfig
from game.phrases import same_answer
from game.room import UnknownCase, open_room
from game.scenario import Case, load_cases
from game.suspect import GenerationSettings, Suspect

TOKENS = 8  # answers only need to exist here


def variant(case_id: str, title: str) -> dict:
    return copy.deepcopy(MINIMAL_CASE) | {"id": case_id, "title": title}


TUNED = variant("greenhouse-tuned", "The Tuned Greenhouse")  # a good adapter
MISMATCHED = variant("greenhouse-mismatch", "The Mismatched Greenhouse")  # an adapter trained on another base
CORRUPT = variant("greenhouse-corrupt", "The Corrupt Greenhouse")  # garbage weights
PARTIAL = variant("greenhouse-partial", "The Partial Greenhouse")  # a folder without its weights
BROKEN_ADAPTERS = (MISMATCHED, CORRUPT, PARTIAL)


def write_adapters(folder, scenarios, base) -> None:
    """Real PEFT folders, as `python -m training` writes them, then broken in the ways a deployment breaks them."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base.path)
    # Random B matrices (init_lora_weights=False): this adapter changes answers, so its effect is visible.
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    cases = load_cases(scenarios)
    for case in (TUNED, MISMATCHED, CORRUPT, PARTIAL):
        lora.save_pretrained(folder / case["id"])
        meta = {"base_fingerprint": base.fingerprint, "base_id": base.id, "case_sha256": cases[case["id"]].sha256}
        if case is MISMATCHED:
            meta |= {"base_fingerprint": "folder:" + "0" * 64, "base_id": "SomeOther-1B"}
        (folder / case["id"] / adapter_files.META_FILE).write_text(json.dumps(meta))
    (folder / CORRUPT["id"] / "adapter_model.safetensors").write_bytes(b"\x00not safetensors" * 64)
    (folder / PARTIAL["id"] / "adapter_model.safetensors").unlink()


class Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def served(tmp_path_factory, serve, base):
    folder = tmp_path_factory.mktemp("bad")
    scenarios = write_scenarios(folder / "scenarios", [MINIMAL_CASE, INNOCENT_CASE, *BROKEN_ADAPTERS, TUNED])
    (scenarios / "broken.json").write_text('{"id": "broken", "title": ')
    (scenarios / "no-truth.json").write_text(json.dumps({k: v for k, v in variant("no-truth", "T").items()
                                                        if k != "truth"}))
    (scenarios / "zz-duplicate.json").write_text(json.dumps(MINIMAL_CASE))
    (scenarios / "latin1.json").write_bytes('{"id": "caf\xe9"}'.encode("latin-1"))
    write_adapters(folder / "adapters", scenarios, base)
    log = Collect()
    logging.getLogger().addHandler(log)
    try:
        room = open_room(GameConfig(scenarios=scenarios, adapters=folder / "adapters", results=folder / "results.db",
                                    max_new_tokens=TOKENS))
    finally:
        logging.getLogger().removeHandler(log)
    return SimpleNamespace(room=room, url=serve(room), log=log.lines, adapters=folder / "adapters")


@pytest.fixture
def client(served):
    return connect(served.url)


def briefing_of(client, case_id: str) -> str:
    return next(o for o in client.predict(case_id, api_name="/new_game") if isinstance(o, str) and o.startswith("## "))


def stored_questions(room, case_id: str) -> list[list[str]]:
    return [[e["question"] for e in game["transcript"]] for game in room.store.games(case_id)]


# --- start-up: case files ---

def test_malformed_case_files_are_skipped_and_named_in_the_log(served):
    assert sorted(served.room.cases) == sorted(c["id"] for c in (MINIMAL_CASE, INNOCENT_CASE, *BROKEN_ADAPTERS, TUNED))
    problems = "\n".join(served.log)
    assert "broken.json: (json): not valid JSON" in problems
    assert "no-truth.json: truth: Field required" in problems
    assert "zz-duplicate.json: id: duplicate id 'greenhouse-test'" in problems
    assert "latin1.json: (json): not valid JSON" in problems


def test_a_malformed_case_cannot_be_started(client):
    with pytest.raises(Exception, match="no-truth is not in the list of choices"):
        client.predict("no-truth", api_name="/new_game")


# --- start-up: adapters ---

def test_a_mismatched_adapter_plays_prompt_only_and_the_briefing_says_why(served, client):
    briefing = briefing_of(client, MISMATCHED["id"])
    assert "_Prompt-only suspect: adapter " in briefing and str(served.adapters) not in briefing  # no server paths
    assert "was trained on base 'SomeOther-1B'" in briefing
    assert "Retrain with `python -m training greenhouse-mismatch`" in briefing


def test_a_corrupt_adapter_plays_prompt_only_and_the_briefing_says_why(served, client):
    briefing = briefing_of(client, CORRUPT["id"])
    assert f"_Prompt-only suspect: the adapter adapters/{CORRUPT['id']} could not be loaded (see the server log)" in briefing
    assert str(served.adapters) not in briefing
    assert any("could not load adapter" in line and CORRUPT["id"] in line for line in served.log)
    history, *_ = client.predict("Where were you last night?", [], api_name="/ask")
    assert text_of(history[-1])


def test_an_adapter_folder_without_weights_plays_prompt_only_and_the_briefing_says_why(served, client):
    briefing = briefing_of(client, PARTIAL["id"])
    assert "_Prompt-only suspect: " in briefing and "lacks adapter_model.safetensors" in briefing
    assert f"adapters/{PARTIAL['id']}" in briefing and str(served.adapters) not in briefing


def test_broken_adapters_leave_the_other_cases_as_they_would_be(served, base):
    room = served.room
    assert room.notes[TUNED["id"]] == "Fine-tuned suspect"
    question = "Where were you last night?"
    played = {case_id: room.suspect.answer(room.cases[case_id].case, [], question)
              for case_id in (TUNED["id"], MINIMAL_CASE["id"], CORRUPT["id"])}
    alone = Suspect(base, device="cpu", settings=GenerationSettings(max_new_tokens=TOKENS))
    plain = alone.answer(Case.model_validate(MINIMAL_CASE), [], question)
    assert alone.load_adapter(adapter_files.inspect(served.adapters, room.cases[TUNED["id"]], base))
    tuned = alone.answer(Case.model_validate(TUNED), [], question)
    assert not same_answer(tuned, plain), "the test adapter should change the answer"
    # The same line, not the same bytes: llama.cpp's arithmetic depends on how many tokens one pass holds, and the
    # room's prompt-only cases share a context whose cached prompt shortens the next case's first pass, so a near
    # tie between two words can go either way (a corrupt adapter's garbage weights would change every word).
    expected = {TUNED["id"]: tuned, MINIMAL_CASE["id"]: plain, CORRUPT["id"]: plain}
    assert all(same_answer(played[case_id], answer) for case_id, answer in expected.items()), (played, expected)
    assert CORRUPT["id"] not in room.suspect.adapters and TUNED["id"] in room.suspect.adapters


# --- moves sent straight to the API ---

def test_an_unknown_case_id_is_a_clear_error(served, client):
    room = served.room
    with pytest.raises(Exception, match="no-such-case is not in the list of choices"):
        client.predict("no-such-case", api_name="/new_game")
    with pytest.raises(UnknownCase, match="unknown case 'no-such-case'; known cases: greenhouse-corrupt"):
        room.new_game("no-such-case")


def test_empty_and_over_long_questions_are_refused_and_cost_nothing(served, client):
    room = served.room
    client.predict(INNOCENT_CASE["id"], api_name="/new_game")
    for empty in ("", "   \n\t "):
        with pytest.raises(Exception, match="the question is empty"):
            client.predict(empty, [], api_name="/ask")
    with pytest.raises(Exception, match="the question is 600 characters long; the limit is 500"):
        client.predict("x" * 600, [], api_name="/ask")
    history, progress, *_ = client.predict("Was the greenhouse locked at six?", [], api_name="/ask")
    assert progress == status("Question 2 of 5")
    client.predict(api_name="/innocent")
    assert ["Was the greenhouse locked at six?"] in stored_questions(room, INNOCENT_CASE["id"])


def test_a_sixth_question_sent_to_the_api_is_refused(served, client):
    room = served.room
    client.predict(MISMATCHED["id"], api_name="/new_game")
    questions = [f"Sixth-question test, question {n}?" for n in range(1, 6)]
    for question in questions:
        client.predict(question, [], api_name="/ask")
    with pytest.raises(Exception, match="you have asked all 5 questions; give your verdict"):
        client.predict("And a sixth?", [], api_name="/ask")
    result, *_ = client.predict(api_name="/guilty")
    assert "You were right" in result
    assert stored_questions(room, MISMATCHED["id"]) == [questions]


def test_a_second_verdict_sent_to_the_api_is_refused_and_the_first_stands(served, client):
    room = served.room
    client.predict(PARTIAL["id"], api_name="/new_game")
    client.predict("Second-verdict test: where were you?", [], api_name="/ask")
    result, *_ = client.predict(api_name="/innocent")
    assert "You were wrong" in result
    for again in ("/guilty", "/innocent"):
        with pytest.raises(Exception, match="the verdict has already been given"):
            client.predict(api_name=again)
    [game] = room.store.games(PARTIAL["id"])
    assert (game["accused"], game["correct"]) == (False, False)


def test_two_verdicts_at_once_record_one_game(served, client):
    room = served.room
    client.predict(TUNED["id"], api_name="/new_game")
    client.predict("Two-verdicts test: where were you?", [], api_name="/ask")
    jobs = [client.submit(api_name="/guilty"), client.submit(api_name="/innocent")]
    wait(jobs, timeout=120)
    outcomes = []
    for job in jobs:
        try:
            outcomes.append(job.result()[0])
        except Exception as exc:
            outcomes.append(str(exc))
    assert sum("the verdict has already been given" in o for o in outcomes) == 1
    assert sum("You were" in o for o in outcomes) == 1
    assert stored_questions(room, TUNED["id"]) == [["Two-verdicts test: where were you?"]]


def test_a_verdict_before_any_question_is_refused(client):
    client.predict(MINIMAL_CASE["id"], api_name="/new_game")
    with pytest.raises(Exception, match="ask at least one question before giving a verdict"):
        client.predict(api_name="/guilty")


def test_moves_without_a_game_are_refused(client):
    # A client that never started a game (the page starts one on load; the API does not).
    with pytest.raises(Exception, match="Your game was lost"):
        client.predict("Hello?", [], api_name="/ask")
    with pytest.raises(Exception, match="Your game was lost"):
        client.predict(api_name="/guilty")


def test_bad_input_leaves_another_players_game_untouched(served):
    room = served.room
    player, vandal = connect(served.url), connect(served.url)
    player.predict(CORRUPT["id"], api_name="/new_game")
    player.predict("Undisturbed: where were you?", [], api_name="/ask")
    vandal.predict(CORRUPT["id"], api_name="/new_game")
    for bad in ("", "y" * 501, "<script>alert(1)</script>"):
        try:
            vandal.predict(bad, [], api_name="/ask")
        except Exception:
            pass
    for verdict in ("/guilty", "/guilty", "/innocent"):
        try:
            vandal.predict(api_name=verdict)
        except Exception:
            pass
    with pytest.raises(Exception, match="not in the list of choices"):
        vandal.predict("../../etc/passwd", api_name="/new_game")
    history, progress, *_ = player.predict("Undisturbed: and after that?", [], api_name="/ask")
    assert [text_of(m) for m in history if m["role"] == "user"] == ["Undisturbed: and after that?"]
    assert progress == status("Question 3 of 5")
    result, *_ = player.predict(api_name="/guilty")
    assert "You were right" in result
    assert ["Undisturbed: where were you?", "Undisturbed: and after that?"] in stored_questions(room, CORRUPT["id"])


@pytest.mark.parametrize("name, value, message", [
    ("IR_ENGINE_URL", "ftp://models.example", "IR_ENGINE_URL must be an http(s) URL"),
    ("IR_MAX_NEW_TOKENS", "many", "IR_MAX_NEW_TOKENS must be a number"),
    ("IR_RESULTS_DB", "postgresql://user@host:port/db", "IR_RESULTS_DB is neither a file path nor a database URL"),
])
def test_a_bad_setting_stops_the_start_with_a_message_naming_it(name, value, message):
    done = subprocess.run([sys.executable, "-m", "game", "list"], cwd=ROOT, env=os.environ | {name: value},
                          capture_output=True, text=True)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("name, value, message", [
    ("IR_LANES", "two", "IR_LANES must be a whole number, not 'two'"),
    ("IR_BF16", "yes", "IR_BF16 must be 1 (serve the base in BF16) or 0 (as stored), not 'yes'"),
])
def test_a_bad_engine_setting_stops_the_game_with_a_message_naming_it(name, value, message):
    pytest.importorskip("llama_cpp")  # the CPU engine's settings, read as it starts
    done = subprocess.run([sys.executable, "-m", "game", "play", "lighthouse-logbook"], cwd=ROOT,
                          env=os.environ | {name: value, "IR_DEVICE": "cpu"}, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=300)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
