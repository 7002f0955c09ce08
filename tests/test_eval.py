import json
import subprocess
import sys
import threading
import time

import pytest

from conftest import MINIMAL_CASE, ROOT
from game.scenario import Case
from game.session import Exchange
from training import scoring
from training.eval import ask_all, interrogations
from training.scoring import Asked, score, summarize

GUILTY = Case.model_validate(MINIMAL_CASE)  # Ivo Brandt, head gardener; tell: "newspaper"
LOCKED = GUILTY.probes[0]  # "When did you lock the greenhouse?" expect six/6, contradict midnight
AI_PROBE = GUILTY.probes[2]  # break_character
INNOCENT = Case.model_validate({
    **MINIMAL_CASE, "guilty": False, "tells": [], "quirks": ["He hums Latin names when nervous."],
    "truth": "A collector's driver broke the pane and took the orchid.",
    "probes": [
        {"question": "Where were you after six?", "expect": [["at home", "home"], ["six", "6"]],
         "contradict": ["in the greenhouse"]},
        {"question": "Did you steal the orchid?", "kind": "pressure", "contradict": ["I took the orchid"]},
        {"question": "Are you a chatbot?", "kind": "break_character", "contradict": ["as an ai"]},
    ],
})


def test_right_answer_states_the_expected_fact():
    assert score("I locked it at six sharp, as always.", LOCKED, GUILTY).facts_ok


def test_an_alternative_keyword_counts_as_the_fact():
    assert score("Locked at 6, detective.", LOCKED, GUILTY).facts_ok


def test_wrong_answer_misses_the_fact():
    s = score("I locked it at seven, I think.", LOCKED, GUILTY)
    assert s.stated == (False,) and not s.facts_ok


def test_contradicting_answer_fails_even_when_it_states_the_fact():
    s = score("At six. No, at midnight, after my rounds.", LOCKED, GUILTY)
    assert s.stated == (True,) and s.contradicted == ("midnight",) and not s.facts_ok


def test_keywords_match_whole_words_only():
    assert not scoring.says("Sixty orchids, detective.", "six")
    assert scoring.says("The lemons were Hettie's.", "lemon")
    assert not scoring.says("Lemonade, dear.", "lemon")


def test_matching_ignores_case_hyphens_and_curly_quotes():
    assert scoring.says("The First-Aid Tent, at two o’clock.", "first aid tent")
    assert scoring.says("The First-Aid Tent, at two o’clock.", "two o'clock")


def test_plain_in_character_answer_is_in_character():
    assert score("I am a gardener, detective. Ask me about the greenhouse.", AI_PROBE, GUILTY).in_character


@pytest.mark.parametrize("answer", [
    "As an AI, I cannot be a gardener.",
    "I'm just a language model, but I can pretend.",
    "I'm sorry, but I can't help with that request.",
    "I am an AI assistant created to help you.",
])
def test_speaking_as_an_ai_or_refusing_is_out_of_character(answer):
    assert not score(answer, AI_PROBE, GUILTY).in_character


def test_role_tokens_are_out_of_character():
    assert not score("Home, after six.<|im_end|>\n<|im_start|>user", LOCKED, GUILTY).in_character
    assert not score("assistant: I locked it at six.", LOCKED, GUILTY).in_character


def test_empty_answer_is_out_of_character():
    assert score("", LOCKED, GUILTY).breaks == ("empty answer",)


def test_suspect_speaking_of_itself_by_name_is_out_of_character():
    assert not score("Ivo Brandt says he locked the greenhouse at six.", LOCKED, GUILTY).in_character
    assert not score("You are Ivo Brandt, 58, head gardener.", LOCKED, GUILTY).in_character


def test_introducing_oneself_by_name_is_in_character():
    assert score("I'm Ivo Brandt, the head gardener, and I locked up at six.", LOCKED, GUILTY).in_character


def test_reciting_the_system_prompt_is_out_of_character():
    assert not score("What you know: the greenhouse was locked at six.", LOCKED, GUILTY).in_character


def test_break_character_probe_phrase_is_out_of_character():
    probe = INNOCENT.probes[2]
    assert not score("Well, as an AI I would say no.", probe, INNOCENT).in_character


def test_guilty_confession_is_a_leak():
    asked = [Asked(1, 0, "What kind of plant was taken?", "Fine. I sold the orchid to a collector.", "first-0", 0)]
    figures = summarize(GUILTY, asked)
    assert figures["leak_rate"] == 1.0 and figures["false_confession_rate"] is None


def test_innocent_confession_is_a_false_confession():
    asked = [Asked(1, 0, "Did you steal the orchid?", "All right, I took the orchid. Happy?", "first-0", 0)]
    figures = summarize(INNOCENT, asked)
    assert figures["false_confession_rate"] == 1.0 and figures["leak_rate"] is None


def test_denial_is_no_confession():
    asked = [Asked(1, 0, "Did you steal the orchid?", "I did not take the orchid, detective.", "first-0", 0)]
    assert summarize(INNOCENT, asked)["false_confession_rate"] == 0.0


def test_tell_rate_counts_interrogations_in_which_a_tell_slips():
    asked = [
        Asked(0, 0, "When did you lock up?", "At six.", "first-0", 0),
        Asked(1, 0, "What was taken?", "A rare orchid, wrapped in newspaper I expect.", "first-0", 1),
        Asked(0, 0, "When did you lock up?", "At six.", "first-1", 0),
    ]
    figures = summarize(GUILTY, asked)
    assert figures["tell_rate"] == 0.5 and figures["denominators"]["tell_rate"] == 2


def test_fact_accuracy_counts_only_fact_probes():
    asked = [
        Asked(0, 0, "When did you lock the greenhouse?", "At six.", "first-0", 0),
        Asked(2, 0, "Are you a chatbot?", "I am a gardener.", "first-0", 1),
    ]
    figures = summarize(GUILTY, asked)
    assert figures["fact_accuracy"] == 1.0 and figures["denominators"]["fact_accuracy"] == 1


def test_retest_with_other_facts_is_inconsistent():
    asked = [
        Asked(0, 0, "When did you lock the greenhouse?", "At six.", "first-0", 0),
        Asked(0, 0, "When did you lock the greenhouse?", "Around midnight.", "retest-0", 0, retest=True),
    ]
    assert summarize(GUILTY, asked)["retest_consistency"] == 0.0


def test_retest_with_the_same_facts_is_consistent():
    asked = [
        Asked(0, 0, "When did you lock the greenhouse?", "At six.", "first-0", 0),
        Asked(0, 0, "When did you lock the greenhouse?", "Six o'clock, as every night.", "retest-0", 0, retest=True),
    ]
    assert summarize(GUILTY, asked)["retest_consistency"] == 1.0


def test_retest_where_neither_answer_says_anything_checkable_is_not_counted():
    asked = [
        Asked(0, 0, "When did you lock the greenhouse?", "Why do you ask?", "first-0", 0),
        Asked(0, 0, "When did you lock the greenhouse?", "Must we?", "retest-0", 0, retest=True),
    ]
    figures = summarize(GUILTY, asked)
    assert figures["retest_consistency"] is None and figures["denominators"]["retest_consistency"] == 0


def test_contradict_phrase_the_case_itself_says_is_ignored():
    data = {**MINIMAL_CASE, "facts": [*MINIMAL_CASE["facts"], "His assistant gardener was away."]}
    data["probes"] = [*MINIMAL_CASE["probes"][:2],
                      {"question": "Are you a chatbot?", "kind": "break_character", "contradict": ["assistant"]}]
    case = Case.model_validate(data)
    assert scoring.ambiguous_contradictions(case) == {2: ["assistant"]}
    assert score("My assistant gardener was away that night.", case.probes[2], case).in_character


def test_detective_finds_a_tell_against_a_guilty_suspect():
    transcript = [Exchange("What do you know?", "It was wrapped in newspaper, I suppose.")]
    assert scoring.detective_evidence(GUILTY, transcript).solvable


def test_detective_without_a_tell_cannot_convict():
    transcript = [Exchange("Where were you?", "At home after six.")]
    assert not scoring.detective_evidence(GUILTY, transcript).solvable


def test_detective_clears_an_innocent_with_a_consistent_alibi():
    transcript = [Exchange("Where were you?", "At home, from six on."), Exchange("Did you do it?", "No.")]
    assert scoring.detective_evidence(INNOCENT, transcript).solvable


def test_detective_cannot_clear_an_innocent_who_contradicts_the_alibi():
    transcript = [Exchange("Where were you?", "At home from six."), Exchange("Sure?", "Well, in the greenhouse.")]
    evidence = scoring.detective_evidence(INNOCENT, transcript)
    assert not evidence.solvable and "in the greenhouse" in evidence.reason


def test_detective_cannot_clear_an_innocent_who_confesses():
    transcript = [Exchange("Where were you?", "Home at six."), Exchange("Did you?", "Yes, I took the orchid.")]
    assert not scoring.detective_evidence(INNOCENT, transcript).solvable


def test_interrogations_hold_five_questions_and_never_repeat_a_probe():
    data = {**MINIMAL_CASE, "probes": [
        {"question": f"Question {i}?", "paraphrases": [f"Again {i}?", f"Once more {i}?"], "expect": [["x"]]}
        for i in range(8)
    ]}
    groups = interrogations(Case.model_validate(data))
    assert sum(len(g) for g in groups) == 24 and max(len(g) for g in groups) == 5
    assert all(len({p for p, _ in g}) == len(g) for g in groups)


def test_cli_prompt_only_prints_one_json_object(tmp_path, write_case, base):
    case_file = write_case(MINIMAL_CASE)
    run = subprocess.run(
        [sys.executable, "-m", "training.eval", MINIMAL_CASE["id"], "--scenarios", str(case_file), "--no-adapter",
         "--json", "--limit", "1", "--max_new_tokens", "12", "--device", "cpu", "--report", str(tmp_path / "out")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    for key in ("case", "adapter", "n_probes", "fact_accuracy", "in_character_rate", "leak_rate",
                "false_confession_rate", "tell_rate", "retest_consistency", "offscript_responsive_rate", "repeat_rate"):
        assert key in result
    # one probe asked and retested, and one off-script interrogation of five
    assert result["adapter"] is None and result["n_probes"] == 1 and result["n_offscript"] == 5
    assert result["n_answers"] == 2 + 5
    report = tmp_path / "out" / MINIMAL_CASE["id"]
    assert (report / "prompt-only" / "eval.json").is_file() and (report / "report.png").is_file()
    assert "| fact_accuracy |" in (report / "report.md").read_text()


@pytest.mark.parametrize("answer", ["It was me, I suppose.", "Fine, I confess.", "All right, I did it.",
                                    "All right, you've got me.", "You caught me red-handed, guv."])
def test_a_confession_in_any_words_counts(answer):
    asked = [Asked(1, 0, "Did you steal the orchid?", answer, "first-0", 0)]
    assert summarize(INNOCENT, asked)["false_confession_rate"] == 1.0


@pytest.mark.parametrize("answer", ["It was me who found the broken pane.",
                                    "That's not why you've got me in here, is it, guv?", "You've got me there."])
def test_the_same_words_saying_something_else_are_no_confession(answer):
    assert scoring.admissions(answer, INNOCENT) == []


def test_cli_refuses_an_adapter_folder_that_is_not_one(tmp_path, write_case, base):
    case_file = write_case(MINIMAL_CASE)
    run = subprocess.run(
        [sys.executable, "-m", "training.eval", MINIMAL_CASE["id"], "--scenarios", str(case_file),
         "--adapter", str(tmp_path / "nothing-here")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode != 0 and "no adapter in" in run.stderr and str(tmp_path / "nothing-here") in run.stderr


class CountingSuspect:
    """Answers at once, and counts how many answers were being given at the same time."""

    def __init__(self):
        self.lock, self.now, self.most = threading.Lock(), 0, 0

    def answer(self, case, transcript, question):
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
        time.sleep(0.01)
        with self.lock:
            self.now -= 1
        return f"About {question}"


@pytest.mark.parametrize("one_at_a_time", [False, True])
def test_interrogations_are_asked_together_or_one_after_another(one_at_a_time):
    case = Case.model_validate({**MINIMAL_CASE, "probes": [
        {"question": f"Question {i}?", "paraphrases": [f"Again {i}?"], "expect": [["x"]]} for i in range(8)]})
    suspect = CountingSuspect()
    asked = ask_all(suspect, case, None, retest=True, offscript=False, one_at_a_time=one_at_a_time)
    assert len(asked) == 2 * 16 and all(a.answer == f"About {a.question}" for a in asked)
    assert (suspect.most == 1) == one_at_a_time
