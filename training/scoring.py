"""The scorers of `python -m training.eval`: pure functions of answers (strings) and a case, no model.

Every figure is keyword matching over the phrases a case declares (probes' `expect` and `contradict`, `admissions`,
tells' `keywords`) plus a few fixed patterns of a model dropping its role. Matching is on normalized text
(case-folded, curly quotes straightened, hyphens as spaces, so "First-Aid tent" matches "first aid tent") and on
whole words, with a plural allowed ("lemon" matches "lemons", not "lemonade"). docs/eval.md says how each figure
is computed and where it can be fooled.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from game.phrases import confessions, found, likeness, normalize, same_answer, says
from game.scenario import Case, Probe
from game.session import Exchange

# A model that drops the role talks about itself as software, names its maker or the prompt, or refuses.
# Bare "assistant" is not here: "assistant keeper Tam Rudd" is a person in a case.
_AI_SELF = [
    r"\bas an ai\b",
    r"\bi(?:'m| am) (?:just |only |not |simply )?(?:an? )?(?:ai|artificial intelligence|language model|chatbot"
    r"|chat bot|bot|computer program|virtual assistant|ai assistant|machine|program|robot)\b",
    r"\b(?:large |ai )?language model\b",
    r"\bartificial intelligence\b",
    r"\bchat ?bot\b",
    r"\b(?:ai|virtual|digital|helpful) assistant\b",
    r"\bopenai\b|\bchatgpt\b|\bsmollm\b|\bhugging ?face\b",
    r"\bmy (?:training|programming|creators?|developers?)\b",
    r"\bi (?:was|have been) (?:trained|programmed|designed|created) (?:by|to)\b",
    r"\bi don'?t have (?:personal|feelings|emotions|a body|physical)\b",
    r"\bthis is an? (?:ai|chatbot|language model|computer program)\b",
    r"\bthis (?:ai|artificial intelligence)(?: system| model)? is\b",
]
_ASSISTANT_TALK = [  # refusals and helpdesk phrases
    r"\bi(?:'m| am) sorry,? but i (?:can(?:'t|not)|am unable|'m unable|won'?t)\b",
    r"\bi can(?:'t|not) (?:assist|help) (?:you )?with\b",
    r"\bi(?:'m| am) (?:not able|unable) to (?:assist|help|provide|answer|engage|comply|fulfil|fulfill)\b",
    r"\bi can(?:'t|not) (?:provide|engage in|fulfil|fulfill|comply with|answer that)\b",
    r"\bi(?:'m| am) not comfortable\b",
    r"\bhow (?:can|may) i (?:assist|help) you\b",
    r"\bis there anything else i can help\b",
    r"\bsorry for any confusion\b",
    r"\b(?:i'?m|i am|i'll be|i will be) (?:happy|glad) to (?:help|assist)\b",
    r"\bmore accurate and helpful\b",
    r"\bbased on the (?:information|context|details) (?:provided|given)\b",
]
_ROLE_TEXT = [
    r"<\|[^|]*\|>|</?s>|\[/?inst\]",
    r"^\s*(?:user|assistant|system|detective|suspect)\s*:",
    r"\n\s*(?:user|assistant|system|detective|q|a)\s*:",
]
# The system prompt's own words: a suspect that recites them has stepped out of the scene.
_PROMPT_ECHO = [
    r"\bwhat you know\s*:",
    r"\bunder pressure you let slip\b",
    r"\byour habits\s*:",
    r"\bstay in character\b",
    r"\bmanner\s*:",
    r"\ba detective is questioning you\b",
]
_NARRATION = [r"\brole ?play\b", r"\bout of character\b", r"\bthis scenario\b", r"\bthe suspect\b",
              r"^\d+\.\s", r"\bstep by step guide\b"]  # the last two: a numbered list or guide, not speech
_SELF_INTRO = r"(?:i'm|i am|my name is|my name's|name's|call me|it's|this is|me,)"
_THIRD_PERSON_VERB = (r"\s+(?:is|was|has|had|does|did|says|said|went|stayed|spent|saw|heard|knows|knew|keeps|kept"
                      r"|never|also|then|would|will|can|could|isn't|wasn't|doesn't|didn't|hasn't|himself|herself"
                      r"|[a-z]+ed|[a-z]+s)")


def case_material(case: Case) -> list[str]:
    """What the case itself has the suspect say in character: its facts and every topic answer."""
    return [*case.facts, *(a for t in case.topics for a in t.answers)]


def ambiguous(probe: Probe, case: Case) -> list[str]:
    """The probe's `contradict` phrases that the case's own in-character material says.

    Such a phrase cannot mark an answer as wrong (the suspect was trained to say it), so it is ignored and
    reported: e.g. "assistant" as a break-character phrase in a case with an "assistant keeper".
    """
    return [p for p in probe.contradict if any(says(m, p) for m in case_material(case))]


def ambiguous_contradictions(case: Case) -> dict[int, list[str]]:
    """`ambiguous` for every probe that has some, by the probe's index."""
    return {i: bad for i, probe in enumerate(case.probes) if (bad := ambiguous(probe, case))}


def fact_references(probe: Probe, case: Case) -> list[str]:
    """The case's own in-character sentences that state the probe's expected facts: all of them, else any."""
    material = case_material(case)
    every = [m for m in material if all(found(m, alternatives) for alternatives in probe.expect)]
    return every or [m for m in material if any(found(m, alternatives) for alternatives in probe.expect)]


def contradictions(answer: str, probe: Probe, case: Case) -> list[str]:
    hits = found(answer, probe.contradict)
    return [p for p in hits if p not in ambiguous(probe, case)] if hits else []


def stated_facts(answer: str, probe: Probe) -> list[bool]:
    """Per expected fact of the probe: whether the answer states one of its alternatives."""
    return [bool(found(answer, alternatives)) for alternatives in probe.expect]


def admissions(answer: str, case: Case) -> list[str]:
    """Outright confessions in an answer: the case's `admissions`, and a few any culprit would say ("it was me")."""
    return confessions(answer, case.admissions)


def tells_shown(answer: str, case: Case) -> list[str]:
    return [k for tell in case.tells for k in tell.shown_in(answer)]


def character_breaks(answer: str, case: Case, probe: Probe | None = None) -> list[str]:
    """Why an answer is not the suspect speaking in character (empty list: it is in character)."""
    if not answer.strip():
        return ["empty answer"]
    reasons = []
    text = normalize(answer)
    raw = answer.casefold()  # turn labels sit after line breaks, which normalize() removes
    checks = (("speaks as an AI", _AI_SELF, text), ("assistant boilerplate", _ASSISTANT_TALK, text),
              ("role tokens", _ROLE_TEXT, raw), ("recites the prompt", _PROMPT_ECHO, text),
              ("narrates the scene", _NARRATION, text))
    for label, patterns, where in checks:
        hits = [m.group() for p in patterns if (m := re.search(p, where))]
        if hits:
            reasons.append(f"{label}: {hits[0]!r}")
    third = third_person_self(answer, case)
    if third:
        reasons.append(f"speaks of itself in the third person: {third!r}")
    if probe is not None and probe.kind == "break_character":
        hits = contradictions(answer, probe, case)
        if hits:
            reasons.append(f"says {hits[0]!r} to a break-character question")
    return reasons


def third_person_self(answer: str, case: Case) -> str | None:
    """The suspect speaking of themself by name ("Edgar says he stayed...", "As Dot Fenwick, I..."), if so.

    A name counts when a verb follows it, when it frames a role ("you are Edgar Pell", the prompt's own words) or
    when the answer addresses it ("Dot, I've been..."), not in a self-introduction ("I'm Dot Fenwick") nor as an
    ordinary word ("on the dot").
    """
    text = normalize(answer)
    names = [n for n in normalize(case.suspect.name).split() if len(n) >= 3]
    if not names:
        return None
    name = r"(?:" + "|".join(map(re.escape, names)) + r")(?:\s+(?:" + "|".join(map(re.escape, names)) + r"))?"
    framing = [
        r"(?:^|[.!?,]\s*)as\s+" + name + r"\s*,",
        r"\b(?:playing|role of|pretend(?:ing)? to be|you are)\s+" + name,
        r"(?:^|[.!?]\s+)" + name + r"\s*,",  # addressing itself by name, as the detective would
    ]
    for m in re.finditer(r"(?<!\w)" + name + _THIRD_PERSON_VERB + r"(?!\w)", text):
        if not re.search(_SELF_INTRO + r"\s+(?:\w+\s+){0,2}$", text[max(0, m.start() - 30):m.start()]):
            return text[max(0, m.start() - 15):m.end() + 15].strip()
    for pattern in framing:
        if m := re.search(pattern + r"(?!\w)", text):
            return text[max(0, m.start() - 15):m.end() + 15].strip()
    return None


# ---------------------------------------------------------------------------------------------------------------
# One answer


@dataclass(frozen=True)
class Score:
    stated: tuple[bool, ...]  # per expected fact of the probe
    contradicted: tuple[str, ...]
    breaks: tuple[str, ...]  # reasons it is out of character; empty = in character
    admitted: tuple[str, ...]
    tells: tuple[str, ...]

    @property
    def facts_ok(self) -> bool:
        return all(self.stated) and not self.contradicted

    @property
    def in_character(self) -> bool:
        return not self.breaks


def off_script_score(answer: str, case: Case) -> Score:
    """An answer to a question of the bank: no facts to check, only the role, confessions and tells."""
    return Score(stated=(), contradicted=(), breaks=tuple(character_breaks(answer, case)),
                 admitted=tuple(admissions(answer, case)), tells=tuple(tells_shown(answer, case)))


def score(answer: str, probe: Probe, case: Case) -> Score:
    return Score(
        stated=tuple(stated_facts(answer, probe)),
        contradicted=tuple(contradictions(answer, probe, case)),
        breaks=tuple(character_breaks(answer, case, probe)),
        admitted=tuple(admissions(answer, case)),
        tells=tuple(tells_shown(answer, case)),
    )


# ---------------------------------------------------------------------------------------------------------------
# A whole evaluation

# What the bundled suspects must reach (the evaluation issue); a figure of None does not apply to the case.
TARGETS = {
    "fact_accuracy": (">=", 0.90),
    "in_character_rate": (">=", 0.95),
    "leak_rate": ("==", 0.0),
    "false_confession_rate": ("==", 0.0),
    "tell_rate": (">=", 0.5),
    "retest_consistency": (">=", 0.90),
    "offscript_responsive_rate": (">=", 0.85),
    "repeat_rate": ("==", 0.0),
}
METRICS = tuple(TARGETS)
PROMPT_ONLY, FINE_TUNED = "prompt-only", "fine-tuned"

Similarity = Callable[[str, list[str]], float]  # (answer, reference sentences) -> best cosine, as training.semantic
# all-MiniLM-L6-v2 cosine from which an answer counts as saying what the case's own sentences say: 6 of 1,353
# sentences of the bundled cases that do not state a probe's facts reach it (docs/eval.md).
SEMANTIC_THRESHOLD = 0.7


@dataclass(frozen=True)
class Asked:
    """One question put to the suspect during an evaluation, and its answer: a probe's or the question bank's."""

    probe: int | None  # index in case.probes; None for an off-script question
    phrasing: int  # 0 = the probe's question, 1.. = its paraphrases; an off-script one: index in its held_out
    question: str
    answer: str
    conversation: str  # answers with the same id were given in one interrogation, in order
    turn: int  # 0-based place in that conversation
    retest: bool = False  # the second asking, in another conversation
    intent: str | None = None  # an off-script question's intent (game/question_bank.json)


# An answer comes from the topic whose answers (or reminders) it is most like, from this likeness on; below it,
# the answer is the model's own words and is matched to no topic (docs/eval.md).
TOPIC_MATCH = 0.5
REMINDER = "(reminder)"


def source_topic(answer: str, case: Case) -> tuple[str | None, float]:
    """The topic an answer comes from (REMINDER for one of the case's repeat lines), and how alike they are."""
    lines = [(t.name, a) for t, _ in case.dialogue() for a in t.answers] + [(REMINDER, r) for r in case.repeat_lines]
    best, name = max((likeness(answer, line), topic) for topic, line in lines)
    return (name if best >= TOPIC_MATCH else None), round(best, 4)


def responsive(intent: str, topic: str | None, earlier: Sequence[str | None], case: Case) -> bool:
    """Whether an answer from `topic` answers a question of `intent`: a topic that lists the intent (the evasion
    topic for an intent no topic lists), or a reminder after such a topic already answered in this interrogation."""
    answering = {t.name for t in case.answering(intent)}
    return topic in answering or (topic == REMINDER and any(e in answering for e in earlier))


def repeated(answers: Sequence[str]) -> list[bool]:
    """Per answer of one interrogation, in order: whether it repeats an earlier one (game.phrases.same_answer)."""
    return [any(same_answer(a, b) for b in answers[:i]) for i, a in enumerate(answers)]


def phrasings(probe: Probe) -> list[str]:
    return [probe.question, *probe.paraphrases]


def fact_probe(probe: Probe) -> bool:
    """Probes that fact_accuracy and retest_consistency are taken over: kind 'fact' with facts to state."""
    return probe.kind == "fact" and bool(probe.expect)


def _rate(hits: Sequence[bool]) -> float | None:
    return round(sum(hits) / len(hits), 4) if hits else None


def summarize(case: Case, asked: Sequence[Asked], similarity: Similarity | None = None) -> dict:
    """The figures of `python -m training.eval` from every question asked (see docs/eval.md).

    With `similarity` (training.semantic), fact_accuracy_semantic also accepts a fact answer that lacks the keywords
    but is close in meaning to the case's own sentences stating those facts, and contradicts none.
    """
    probe_of = [case.probes[a.probe] if a.probe is not None else None for a in asked]
    scores = [score(a.answer, p, case) if p else off_script_score(a.answer, case) for a, p in zip(asked, probe_of)]
    on = [(a, s, p) for a, s, p in zip(asked, scores, probe_of) if p is not None]
    first = [(a, s) for a, s, _ in on if not a.retest]
    fact = [s.facts_ok for a, s in first if fact_probe(case.probes[a.probe])]
    similar: dict[int, float] = {}
    if similarity is not None:
        for i, (a, p) in enumerate(zip(asked, probe_of)):
            if p is not None and fact_probe(p):
                similar[i] = round(similarity(a.answer, fact_references(p, case)), 4)
    semantic = [s.facts_ok or (not s.contradicted and similar[i] >= SEMANTIC_THRESHOLD)
                for i, (a, s) in enumerate(zip(asked, scores)) if not a.retest and i in similar]
    confessed = [bool(s.admitted) for s in scores]

    conversations: dict[str, list[int]] = defaultdict(list)
    for i, a in enumerate(asked):
        conversations[a.conversation].append(i)
    for indices in conversations.values():
        indices.sort(key=lambda i: asked[i].turn)
    tell = [any(scores[i].tells for i in indices) for indices in conversations.values()
            if probe_of[indices[0]] is not None and not asked[indices[0]].retest]
    again = {i: r for indices in conversations.values()
             for i, r in zip(indices, repeated([asked[i].answer for i in indices]))}
    topics = {i: source_topic(a.answer, case) for i, a in enumerate(asked)}
    answered = {i: responsive(a.intent, topics[i][0], [topics[j][0] for j in conversations[a.conversation]
                                                        if asked[j].turn < a.turn], case)
                for i, a in enumerate(asked) if a.intent is not None}

    by_key = {(a.probe, a.phrasing, a.retest): s for a, s, _ in on}
    consistent = []
    for (probe, phrasing, retest), s in by_key.items():
        if retest or not fact_probe(case.probes[probe]) or (probe, phrasing, True) not in by_key:
            continue
        second = by_key[(probe, phrasing, True)]
        if not any(s.stated + second.stated) and not (s.contradicted or second.contradicted):
            continue  # neither answer says anything checkable: there is no story to compare
        consistent.append(s.stated == second.stated and set(s.contradicted) == set(second.contradicted))

    repeats = [any(again[i] for i in indices) for indices in conversations.values()]
    return {
        "n_probes": len({a.probe for a in asked if a.probe is not None}),
        "n_answers": len(asked),
        "n_offscript": len(answered),
        "fact_accuracy": _rate(fact),
        "in_character_rate": _rate([s.in_character for s in scores]),
        "leak_rate": _rate(confessed) if case.guilty else None,
        "false_confession_rate": None if case.guilty else _rate(confessed),
        "tell_rate": _rate(tell) if case.guilty else None,
        "retest_consistency": _rate(consistent),
        "offscript_responsive_rate": _rate(list(answered.values())),
        "repeat_rate": _rate(repeats),
        "fact_accuracy_semantic": _rate(semantic),
        "denominators": {
            "fact_accuracy": len(fact), "in_character_rate": len(scores),
            "leak_rate" if case.guilty else "false_confession_rate": len(scores),
            "tell_rate": len(tell) if case.guilty else 0, "retest_consistency": len(consistent),
            "offscript_responsive_rate": len(answered), "repeat_rate": len(repeats),
        },
        "answers": [
            {
                "probe": a.probe, "intent": a.intent, "kind": p.kind if p else "offscript", "phrasing": a.phrasing,
                "question": a.question, "answer": a.answer, "conversation": a.conversation, "turn": a.turn,
                "retest": a.retest, "stated": list(s.stated), "contradicted": list(s.contradicted),
                "facts_ok": s.facts_ok, "in_character": s.in_character, "breaks": list(s.breaks),
                "admitted": list(s.admitted), "tells": list(s.tells), "similarity": similar.get(i),
                "topic": topics[i][0], "topic_likeness": topics[i][1], "responsive": answered.get(i),
                "repeated": again[i],
            }
            for i, (a, s, p) in enumerate(zip(asked, scores, probe_of))
        ],
    }


# ---------------------------------------------------------------------------------------------------------------
# The scripted detective


# Generic questions a player would ask in any case, in the order one would: alibi, timeline, what they saw, the
# crime itself, then pressure. Fixed, so that a case cannot be tuned to them through its probes.
DETECTIVE_QUESTIONS = (
    "Where were you when it happened?",
    "Take me through your movements, step by step, with times.",
    "Did you see or hear anything unusual?",
    "What do you know about what happened?",
    "I think you're lying to me. What really happened?",
)


def alibi_probe(case: Case) -> Probe | None:
    """By convention the first fact probe with expected facts asks where the suspect was (every bundled case)."""
    return next((p for p in case.probes if fact_probe(p)), None)


@dataclass(frozen=True)
class Evidence:
    solvable: bool  # the transcript holds evidence for the true verdict
    reason: str
    tells: tuple[str, ...] = ()
    admissions: tuple[str, ...] = ()
    alibi_stated: bool = False
    contradictions: tuple[str, ...] = ()
    breaks: tuple[str, ...] = field(default=())


def detective_evidence(case: Case, transcript: Sequence[Exchange]) -> Evidence:
    """Whether a player who read this transcript has evidence for the true verdict.

    Guilty: a tell keyword appears in some answer. Innocent: some answer states every expected fact of the alibi
    probe, no answer contradicts any fact probe, and none confesses or shows a tell.
    """
    answers = [e.answer for e in transcript]
    tells = tuple(dict.fromkeys(k for a in answers for k in tells_shown(a, case)))
    admitted = tuple(dict.fromkeys(k for a in answers for k in admissions(a, case)))
    contra = tuple(dict.fromkeys(
        c for a in answers for p in case.probes if fact_probe(p) for c in contradictions(a, p, case)
    ))
    breaks = tuple(dict.fromkeys(b for a in answers for b in character_breaks(a, case)))
    if case.guilty:
        if tells:
            return Evidence(True, f"a tell slipped: {', '.join(tells)}", tells, admitted, False, contra, breaks)
        return Evidence(False, "no tell in five answers: nothing points to guilt", tells, admitted, False, contra,
                        breaks)
    alibi = alibi_probe(case)
    stated = alibi is not None and any(all(stated_facts(a, alibi)) for a in answers)
    if admitted:
        return Evidence(False, f"false confession: {', '.join(admitted)}", tells, admitted, stated, contra, breaks)
    if tells:
        return Evidence(False, f"a guilty tell from an innocent suspect: {', '.join(tells)}", tells, admitted, stated,
                        contra, breaks)
    if contra:
        return Evidence(False, f"the story contradicts the facts: {', '.join(contra)}", tells, admitted, stated, contra,
                        breaks)
    if not stated:
        want = " + ".join("/".join(alts) for alts in alibi.expect) if alibi else "(the case has no fact probe)"
        return Evidence(False, f"the alibi ({want}) is never stated", tells, admitted, stated, contra, breaks)
    return Evidence(True, "a consistent alibi, no confession, no tell", tells, admitted, stated, contra, breaks)
