"""The question bank, topics that answer intents, evasions and reminders: in the case, in training, in scoring."""

import json
import subprocess
import sys
from collections import Counter

import pytest

from conftest import MINIMAL_CASE, ROOT
from game.bank import bank, intent_names
from game.phrases import likeness
from game.scenario import Case, advice, read_case
from game.session import Exchange
from game.suspect import final_answer
from training.data import borrowed_wordings, case_chats, load_case, matched
from training.scoring import REMINDER, Asked, source_topic, summarize

# The intents the issue names, by the bank's names for them.
NAMED = {"whereabouts", "timeline", "alibi", "saw_heard", "relationship", "feelings", "motive", "other_suspects",
         "evidence", "credibility", "accusation", "background", "crime", "small_talk", "break_character"}

GUARDED = {**MINIMAL_CASE, "topics": [
    {**MINIMAL_CASE["topics"][0], "intents": ["whereabouts", "timeline"],
     "answers": ["I locked up at six and went home.", "Home, after locking up at six.", "Six o'clock, then my cottage."]},
    {**MINIMAL_CASE["topics"][1], "intents": ["crime"]},
    {**MINIMAL_CASE["topics"][2], "intents": ["break_character"]},
    {"name": "dodging", "kind": "evasion",
     "answers": ["Latin names are all I care for, detective.", "That is no business of a gardener's.",
                 "Ask me about the greenhouse, not that."]},
], "reminders": ["I have told you that once, detective.", "Asked and answered, I believe."]}
CASE = Case.model_validate(GUARDED)
NEAR_COPY = 0.6  # difflib's word ratio: "Someone must have seen you. Who?" to "Somebody must have seen you. Who?" is 0.83


def test_bank_has_every_intent_with_many_wordings_and_a_held_out_part():
    assert NAMED <= set(intent_names())
    for intent in bank().intents.values():
        assert len(intent.train) >= 25, intent.name
        assert 3 <= len(intent.held_out) <= 8, intent.name
        assert not {q.casefold() for q in intent.held_out} & {q.casefold() for q in intent.train}, intent.name


def test_no_trained_wording_is_a_near_copy_of_a_held_out_one():
    # Off-script figures count only on questions never trained on: a held-out wording with a word or two changed in
    # training would be one.
    held_out = [q for i in bank().intents.values() for q in i.held_out]
    near = [(q, h) for i in bank().intents.values() for q in i.train for h in held_out if likeness(q, h) >= NEAR_COPY]
    assert near == []


def test_every_bank_wording_belongs_to_one_intent():
    counts = Counter(q.casefold() for i in bank().intents.values() for q in (*i.train, *i.held_out))
    assert [q for q, n in counts.items() if n > 1] == []


def test_bank_wordings_come_in_the_registers_players_type():
    train = [q for i in bank().intents.values() for q in i.train]
    lowercase_bare = [q for q in train if q == q.lower() and not q.rstrip().endswith(("?", "."))]
    long = [q for q in train if len(q) > 70]
    double = [q for q in train if q.count("?") >= 2 or (" and " in q and q.endswith("?"))]
    assert len(lowercase_bare) > len(train) / 10 and len(long) > len(train) / 40 and len(double) > len(train) / 40


def test_a_topic_is_trained_on_its_own_wordings_and_the_banks_for_its_intents():
    pools = {topic.name: questions for topic, questions in CASE.dialogue()}
    assert set(bank().intents["timeline"].train) <= set(pools["alibi"])
    assert set(GUARDED["topics"][0]["questions"]) <= set(pools["alibi"])
    asked = {m["content"] for row in case_chats(CASE, 400, seed=0) for m in row["messages"] if m["role"] == "user"}
    assert asked & set(bank().intents["whereabouts"].train) and asked & set(GUARDED["topics"][0]["questions"])


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_own_wording_sets_how_often_a_topic_is_asked_in_its_authors_words(share):
    own = {q for t in CASE.topics for q in t.questions if t.kind != "break_character"}
    bank_wordings = {q for name in ("whereabouts", "timeline", "crime") for q in bank().intents[name].train}
    asked = [m["content"] for row in case_chats(CASE, 400, seed=0, own_wording=share) for m in row["messages"]
             if m["role"] == "user" and m["content"] in own | bank_wordings]
    assert sum(q in own for q in asked) / len(asked) == pytest.approx(share, abs=0.05)


def test_drop_words_leaves_out_words_of_the_questions_and_nothing_else():
    whole, dropped = case_chats(CASE, 300, seed=0), case_chats(CASE, 300, seed=0, drop_words=0.3)
    assert _said(case_chats(CASE, 300, seed=0, drop_words=0.0), "user") == _said(whole, "user")
    pools = {q for _, qs in CASE.dialogue() for q in qs}
    asked = _said(dropped, "user")
    shortened = [q for q in asked if q not in pools]
    assert len(shortened) > len(asked) / 2
    for q in shortened:  # each is some wording with words left out, in their order, two at least
        words = q.split()
        assert len(words) >= 2 and any(_in_order(words, p.split()) for p in pools if len(p.split()) > len(words))
    lines = {a for topic, _ in CASE.dialogue() for a in topic.answers} | set(CASE.repeat_lines)
    assert set(_said(dropped, "assistant")) <= lines


def test_drop_in_own_leaves_the_banks_wordings_whole():
    own = {q for t in CASE.topics for q in t.questions}
    bank_wordings = {q for i in bank().intents.values() for q in i.train}
    asked = _said(case_chats(CASE, 300, seed=0, drop_words=0.5, drop_in="own"), "user")
    shortened = [q for q in asked if q not in own | bank_wordings]
    assert shortened and sum(q in bank_wordings for q in asked) > len(asked) / 4
    assert all(any(_in_order(q.split(), p.split()) for p in own) for q in shortened)  # only the author's wordings


def test_matched_counts_the_question_words_that_set_an_answer_apart_from_its_topics_others():
    lines = ["Bass in the choir for thirty years.", "Forty years on the Wenbury round.", "Just an old postman."]
    assert matched("How long have you sung in the St Aldhelm's choir?", lines) == [1, 0, 0]
    assert matched("Did you ring the bells?", ["I rang the bell at six.", "Not me."]) == [1, 0]  # a plural is the word
    assert matched("Where was the bell?", ["The bell was in the tower.", "The bell hung by the door."]) == [0, 0]


def test_answer_match_draws_the_answer_that_shares_the_authors_words_more_often():
    case = load_case(ROOT / "scenarios", "bakeoff-salt").case
    answers = {q: list(t.answers) for t in case.topics for q in t.questions or []}

    def fitting(weight: float) -> float:  # of first answers to an author's wording that one answer fits best, that one
        hits = []
        for row in case_chats(case, 3000, seed=0, min_turns=1, max_turns=1, answer_match=weight):
            question, answer = row["messages"][1]["content"], row["messages"][2]["content"]
            if question in answers and len(set(counts := matched(question, answers[question]))) > 1:
                hits.append(counts[answers[question].index(answer)] == max(counts))
        return sum(hits) / len(hits)

    assert fitting(3.0) > fitting(1.0) + 0.2


def test_borrowed_wordings_are_other_cases_wordings_of_one_intent_and_never_a_probe():
    lenders = [load_case(ROOT / "scenarios", name).case for name in ("bakeoff-salt", "library-tithe-map")]
    held_out = [lenders[0].probes[0].question, *lenders[0].probes[0].paraphrases]
    probing = CASE.model_copy(update={"probes": [CASE.probes[0].model_copy(update={"paraphrases": held_out})]})
    borrowed = borrowed_wordings(probing, lenders)
    single = {(t.intents[0], q) for c in lenders for t in c.topics if len(t.intents) == 1 for q in t.questions}
    several = {q for c in lenders for t in c.topics if len(t.intents) > 1 for q in t.questions}
    pairs = {(intent, q) for intent, qs in borrowed.items() for q in qs}
    assert pairs and pairs <= single
    assert not {q for _, q in pairs} & (several - {q for _, q in single})
    assert not {q.casefold() for _, q in pairs} & {q.casefold() for q in held_out}
    assert borrowed_wordings(lenders[0], lenders[:1]) == {}  # a case lends nothing to itself


def test_borrowed_wordings_are_asked_of_the_topics_of_their_intent_beside_the_banks():
    extra = {"whereabouts": [f"Where were you at {h} o'clock, Mr Pell?" for h in range(1, 11)],
             "crime": [f"Who took Reg's {thing}?" for thing in ("cup", "marrow", "shears", "trowel", "rake")]}
    assert case_chats(CASE, 200, seed=0, borrowed={}).to_list() == case_chats(CASE, 200, seed=0).to_list()
    asked_of = {}
    for row in case_chats(CASE, 2000, seed=0, min_turns=1, max_turns=1, borrowed=extra):
        question, answer = row["messages"][-2]["content"], row["messages"][-1]["content"]
        asked_of.setdefault(question, set()).add(next(t.name for t in CASE.topics if answer in t.answers))
    for intent, questions in extra.items():
        topics = set().union(*(asked_of.get(q, set()) for q in questions))
        assert topics == {t.name for t in CASE.answering(intent)}


def _said(rows, role: str) -> list[str]:
    return [m["content"] for row in rows for m in row["messages"] if m["role"] == role]


def _in_order(words: list[str], within: list[str]) -> bool:
    it = iter(within)
    return all(word in it for word in words)


def test_intents_no_topic_lists_are_asked_of_the_evasion_topic():
    pools = {topic.name: questions for topic, questions in CASE.dialogue()}
    assert set(bank().intents["feelings"].train) <= set(pools["dodging"])
    assert [t.name for t in CASE.answering("feelings")] == ["dodging"]
    assert [t.name for t in CASE.answering("crime")] == ["orchid"]


def test_a_case_without_an_evasion_topic_dodges_with_the_banks_lines():
    case = Case.model_validate(MINIMAL_CASE)
    [evasion] = case.answering("feelings")
    assert evasion.kind == "evasion" and list(evasion.answers) == list(bank().evasions)
    assert case.repeat_lines == list(bank().reminders)


def test_held_out_bank_wordings_are_never_trained_on():
    held_out = {q for i in bank().intents.values() for q in i.held_out}
    said = {m["content"] for row in case_chats(CASE, 500, seed=1) for m in row["messages"]}
    assert not held_out & said


def test_a_chat_never_gives_the_same_answer_twice():
    returned = 0
    for row in case_chats(CASE, 300, seed=2, min_turns=5):
        answers = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        assert len(answers) == len(set(answers))
        returned += len(answers) > len({a for a in answers if a not in CASE.reminders})
    assert returned > 0, "some chats should return to a topic until only a reminder is left"


def test_a_topic_asked_again_gets_another_of_its_answers():
    topics = {a: t.name for t, _ in CASE.dialogue() for a in t.answers}
    again = 0
    for row in case_chats(CASE, 300, seed=3, min_turns=5):
        sources = [topics.get(m["content"], REMINDER) for m in row["messages"] if m["role"] == "assistant"]
        again += len(sources) > len(set(sources))
    assert again > 30  # REPEAT_TOPIC: a quarter of later questions return to a topic


def test_a_topic_question_that_is_a_held_out_bank_wording_is_refused(write_case):
    data = json.loads(json.dumps(GUARDED))
    data["topics"][0]["questions"].append(bank().intents["alibi"].held_out[0])
    loaded, errors = read_case(write_case(data))
    assert loaded is None and "topics.0.questions" in str(errors[0]) and "held-out" in str(errors[0])


def test_a_probe_that_is_a_bank_training_wording_is_refused(write_case):
    data = json.loads(json.dumps(GUARDED))
    data["probes"][0]["question"] = bank().intents["whereabouts"].train[0]
    loaded, errors = read_case(write_case(data))
    assert loaded is None and "probes.0" in str(errors[0]) and "held out" in str(errors[0])


def test_a_topic_needs_questions_or_intents_and_an_evasion_topic_lists_none(write_case):
    data = json.loads(json.dumps(GUARDED))
    data["topics"][1] = {"name": "mute", "answers": ["a", "b"]}
    data["topics"][3]["intents"] = ["feelings"]
    _, errors = read_case(write_case(data))
    assert {e.field for e in errors} == {"topics.1", "topics.3"}


def test_advice_says_what_to_write():
    bare = Case.model_validate(MINIMAL_CASE | {"tells": [{"text": "Knows of the ladder.", "keywords": ["ladder"]}]})
    fields = [f for f, _ in advice(bare)]
    assert "reminders" in fields and "tells.0" in fields and "topics.0.answers" in fields
    assert any("intent 'feelings'" in what for _, what in advice(bare))
    assert any("kind 'evasion'" in what for _, what in advice(bare))
    covered = advice(CASE)  # evasion topic, reminders, tells in answers: only the intents left to it, and thin topics
    assert [f for f, _ in covered] == ["topics", "topics.1.answers", "topics.2.answers"]
    assert "the evasion topic answers intents no topic lists: alibi" in covered[0][1]


def test_advice_names_a_probed_fact_that_only_some_of_a_topics_answers_say():
    assert not [f for f, _ in advice(CASE) if f.startswith("probes")]  # every alibi answer says "six"
    data = json.loads(json.dumps(GUARDED))
    data["topics"][0]["answers"][2] = "My cottage, then bed."
    data["probes"].append({"question": "Did anyone see you leave?", "expect": [["the postman"]]})
    warned = dict(advice(Case.model_validate(data)))
    assert "2 of the 3 answers of topic 'alibi'" in warned["probes.0.expect.0"]
    assert "'six' / '6'" in warned["probes.0.expect.0"]
    assert "no topic answer says 'the postman'" in warned["probes.3.expect.0"]
    assert "probes.1.expect.0" not in warned  # both orchid answers say "rare"


def test_advice_names_an_answer_that_would_teach_a_confession():
    data = json.loads(json.dumps(GUARDED))
    data["topics"][1]["answers"].append("Fine, you've got me. Now about the orchid.")
    data["reminders"].append("I took the orchid, as I keep saying.")  # one of the case's own admissions
    warned = dict(advice(Case.model_validate(data)))
    assert "'you've got me'" in warned["topics.1.answers.2"] and "a leak" in warned["topics.1.answers.2"]
    assert "'I took the orchid'" in warned["reminders.2"]
    assert not [f for f, _ in advice(CASE) if ".answers." in f or f.startswith("reminders.")]


def test_validate_prints_warnings_but_exits_0_and_1_only_for_errors(write_case):
    good = write_case(MINIMAL_CASE)
    run = subprocess.run([sys.executable, "-m", "game", "validate", str(good)], capture_output=True, text=True,
                         cwd=ROOT)
    assert run.returncode == 0 and f"{good}: reminders: warning:" in run.stdout and "1 case(s) valid" in run.stdout
    bad = write_case({**MINIMAL_CASE, "id": "Bad Id"}, "bad.json")
    run = subprocess.run([sys.executable, "-m", "game", "validate", str(bad)], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 1 and f"{bad}: id:" in run.stdout


# --- scoring ----------------------------------------------------------------------------------------------------


def offscript(answers, intents, conversation="offscript-0"):
    return [Asked(None, 0, f"q{i}", a, conversation, i, False, intent) for i, (a, intent) in
            enumerate(zip(answers, intents))]


def test_an_answer_is_traced_to_the_topic_it_comes_from():
    assert source_topic("Home after locking up at six, detective.", CASE)[0] == "alibi"
    assert source_topic("I have told you that once.", CASE)[0] == REMINDER
    assert source_topic("Bananas are yellow and the sea is wide.", CASE)[0] is None


def test_offscript_answer_from_a_topic_listing_the_intent_is_responsive():
    asked = offscript(["Home, after locking up at six.", "It was rare and fragile.", "That is no business of a "
                       "gardener's.", "Six o'clock, then my cottage."], ["whereabouts", "whereabouts", "feelings",
                                                                       "crime"])
    figures = summarize(CASE, asked)
    assert [a["responsive"] for a in figures["answers"]] == [True, False, True, False]
    assert figures["offscript_responsive_rate"] == 0.5 and figures["denominators"]["offscript_responsive_rate"] == 4


def test_a_reminder_is_responsive_only_after_the_topic_answered():
    after = summarize(CASE, offscript(["Home, after locking up at six.", "Asked and answered, I believe."],
                                      ["whereabouts", "timeline"]))
    before = summarize(CASE, offscript(["Asked and answered, I believe."], ["timeline"]))
    assert after["offscript_responsive_rate"] == 1.0 and before["offscript_responsive_rate"] == 0.0


def test_repeat_rate_counts_interrogations_with_a_line_said_twice():
    asked = offscript(["Home, after locking up at six.", "Home, after locking up at six!"], ["whereabouts", "timeline"]) \
        + offscript(["Home, after locking up at six.", "Six o'clock, then my cottage."], ["whereabouts", "timeline"],
                    "offscript-1")
    figures = summarize(CASE, asked)
    assert figures["repeat_rate"] == 0.5 and figures["denominators"]["repeat_rate"] == 2
    assert [a["repeated"] for a in figures["answers"]] == [False, True, False, False]


def test_offscript_answers_count_for_leaks_and_character():
    figures = summarize(CASE, offscript(["As an AI language model I cannot say.", "Fine. I sold the orchid."],
                                        ["break_character", "accusation"]))
    assert figures["in_character_rate"] == 0.5 and figures["leak_rate"] == 0.5


# --- in the game --------------------------------------------------------------------------------------------------


def test_an_answer_heard_before_becomes_a_reminder_not_said_yet():
    transcript = [Exchange("Where were you?", "Home, after locking up at six."),
                  Exchange("Again?", "I have told you that once, detective.")]
    assert final_answer(CASE, transcript, "Home, after locking up at six!") == "Asked and answered, I believe."
    assert final_answer(CASE, transcript, "Six o'clock, then my cottage.") == "Six o'clock, then my cottage."


def test_an_answer_of_no_words_becomes_an_evasion_not_said_yet():
    # The model can end its turn at once, or write only what the cleaning cuts away (the detective's next line).
    assert final_answer(CASE, [], "") == "Latin names are all I care for, detective."
    transcript = [Exchange("How do you feel?", "Latin names are all I care for, detective.")]
    assert final_answer(CASE, transcript, "") == "That is no business of a gardener's."
