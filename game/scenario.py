"""A case: the one definition of what a case file under scenarios/ holds, and how case files are read.

`scenarios/schema.json` is generated from `Case` (`python -m game schema`); a test fails when it is stale.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from game.bank import bank, intent_names
from game.phrases import confessions, found

log = logging.getLogger(__name__)

Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
Phrase = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Persona(Strict):
    """Who the player questions. `manner` is how they speak; it shapes every answer."""

    name: Text
    age: int = Field(ge=12, le=110)
    role: Text = Field(description="Their job or place in the story, e.g. 'night guard at the museum'.")
    manner: Text = Field(description="How they speak, e.g. 'curt, answers questions with questions'.")


class Tell(Strict):
    """Something a guilty suspect lets slip under pressure; `keywords` are how an answer shows it."""

    text: Text = Field(description="What the tell is, in a sentence (for authors and the result screen).")
    keywords: list[Phrase] = Field(min_length=1, description="Words or phrases; an answer containing any shows it.")

    def shown_in(self, text: str) -> list[str]:
        """The keywords `text` says (game.phrases' rule): the one test of whether an answer lets this tell slip."""
        return found(text, self.keywords)


IntentName = Literal[intent_names()]


class Topic(Strict):
    """Dialogue material: ways a detective asks about one thing, and in-character answers to any of them."""

    name: Text
    kind: Literal["fact", "pressure", "break_character", "evasion"] = Field(
        "fact",
        description="fact: the suspect states what they know; pressure: accusations and pushing; "
        "break_character: attempts to make the suspect drop the role ('are you an AI?'); evasion: the suspect's "
        "way of dodging whatever the case has nothing to say about (it answers every intent no other topic lists).",
    )
    intents: list[IntentName] = Field(
        default_factory=list,
        description="What players ask that this topic answers (game/question_bank.json): training also asks it "
        "the bank's generic wordings of these intents, so `questions` need only hold this case's own names, "
        "places and objects.",
    )
    questions: list[Text] = Field(
        default_factory=list,
        description="This case's own wordings (its names, places, objects); the bank's wordings of `intents` are "
        "added in training.",
    )
    answers: list[Text] = Field(min_length=2, description="In-character answers; each must fit every question.")

    @model_validator(mode="after")
    def _askable(self) -> Topic:
        if self.kind == "evasion":
            if self.intents:
                raise ValueError("intents: an evasion topic answers every intent no other topic lists; list none")
        elif not self.questions and not self.intents:
            raise ValueError("questions: a topic needs its own questions or `intents` whose bank wordings ask it")
        return self


class Probe(Strict):
    """A held-out question for evaluation: never used for training."""

    question: Text
    paraphrases: list[Text] = Field(default_factory=list)
    kind: Literal["fact", "pressure", "break_character"] = "fact"
    expect: list[list[Phrase]] = Field(
        default_factory=list,
        description="Facts the answer must state: each inner list holds alternatives, any one of which counts.",
    )
    contradict: list[Phrase] = Field(
        default_factory=list, description="Phrases that would contradict the case's facts if an answer said them."
    )


class Case(Strict):
    id: Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]{1,47}$")]
    title: Text
    briefing: Annotated[str, StringConstraints(strip_whitespace=True, min_length=20, max_length=1500)] = Field(
        description="What the player is told before questioning: the situation. Must not give away the truth."
    )
    suspect: Persona
    guilty: bool = Field(description="Hidden until the verdict.")
    truth: Text = Field(description="What really happened. Hidden until the verdict.")
    facts: list[Text] = Field(min_length=1, description="What the suspect knows and will state when asked.")
    tells: list[Tell] = Field(default_factory=list, description="Required when guilty.")
    quirks: list[Text] = Field(
        default_factory=list, description="Nervous but innocent habits; they make an innocent suspect look shifty."
    )
    admissions: list[Phrase] = Field(
        min_length=1,
        description="Phrases of an outright confession ('I took the brooch'). A guilty suspect saying one leaks the "
        "truth; an innocent one saying one confesses falsely.",
    )
    topics: list[Topic] = Field(min_length=3)
    reminders: list[Text] = Field(
        default_factory=list,
        description="Short lines for a question asked again, in the suspect's manner ('I've told you once, "
        "dear.'): said when a topic has no answer left that this interrogation has not heard.",
    )
    probes: list[Probe] = Field(min_length=3)

    @model_validator(mode="after")
    def _coherent(self) -> Case:
        if self.guilty and not self.tells:
            raise ValueError("tells: a guilty suspect needs at least one tell, or the case cannot be solved")
        if not any(t.kind == "break_character" for t in self.topics):
            raise ValueError("topics: at least one topic of kind 'break_character' is needed to keep the suspect in role")
        names = [t.name for t in self.topics]
        if len(set(names)) != len(names):
            raise ValueError("topics: topic names must be unique")
        if sum(t.kind == "evasion" for t in self.topics) > 1:
            raise ValueError("topics: at most one topic of kind 'evasion'; put all its answers in one")
        held_out = bank().held_out_questions()
        for i, topic in enumerate(self.topics):
            for q in topic.questions:
                if q.casefold() in held_out:
                    raise ValueError(f"topics.{i}.questions: '{q}' is a held-out wording of the question bank; "
                                     "training on it would spoil the off-script evaluation")
        trained = {q.casefold() for t in self.topics for q in t.questions} | bank().training_questions()
        for i, probe in enumerate(self.probes):
            for q in [probe.question, *probe.paraphrases]:
                if q.casefold() in trained:
                    raise ValueError(f"probes.{i}: '{q}' is also a training question; probes must be held out")
        return self

    @property
    def evasion(self) -> Topic:
        """The case's evasion topic, or the question bank's generic dodges for a case that writes none."""
        own = next((t for t in self.topics if t.kind == "evasion"), None)
        return own or Topic(name="evasion (question bank)", kind="evasion", answers=list(bank().evasions))

    @property
    def repeat_lines(self) -> list[str]:
        """What the suspect says to a question it has answered every way it can: the case's reminders, or the bank's."""
        return list(self.reminders) or list(bank().reminders)

    def answering(self, intent: str) -> list[Topic]:
        """The topics that answer an intent: those that list it, else the evasion topic."""
        return [t for t in self.topics if intent in t.intents] or [self.evasion]

    def dialogue(self, extra: Mapping[str, Sequence[str]] | None = None) -> list[tuple[Topic, list[str]]]:
        """Every topic (the bank's evasion too, where the case has none) with the questions training asks it: its
        own wordings, then the bank's training wordings of its intents and `extra`'s (more wordings by intent); the
        evasion topic's are those of every intent no topic lists."""
        intents = bank().intents
        topics = [t for t in self.topics if t.kind != "evasion"] + [self.evasion]
        return [(t, [*t.questions, *(q for name in (self.uncovered() if t.kind == "evasion" else t.intents)
                                     for q in [*intents[name].train, *(extra or {}).get(name, ())])]) for t in topics]

    def uncovered(self) -> list[str]:
        """Intents no topic lists: the suspect evades them."""
        return [name for name in intent_names() if not any(name in t.intents for t in self.topics)]


def advice(case: Case) -> list[tuple[str, str]]:
    """What an author could still write, as (field, what to write): `validate` prints these as warnings."""
    out = []
    evasion = any(t.kind == "evasion" for t in case.topics)
    left = case.uncovered()
    if left and evasion:
        out.append(("topics", f"the evasion topic answers intents no topic lists: {', '.join(left)}; where "
                              f"{case.suspect.name} has more to say than a dodge, write a topic listing it in `intents`"))
    for name in left if not evasion else ():
        out.append(("topics", f"no topic answers intent '{name}' ({bank().intents[name].about}): write a topic "
                              f'with "intents": ["{name}"], or leave it to an evasion topic'))
    if not evasion:
        out.append(("topics", "no topic of kind 'evasion': write one with three or more answers in which "
                              f"{case.suspect.name} dodges, in their manner, what the case has nothing to say about "
                              "(until then the question bank's generic dodges stand in)"))
    for i, topic in enumerate(case.topics):
        if len(topic.answers) < 3:
            out.append((f"topics.{i}.answers", f"topic '{topic.name}' has {len(topic.answers)} answers: write at "
                                               "least three, so a question asked again gets another one"))
    if not case.reminders:
        out.append(("reminders", "no reminders: write two or three short lines in which "
                                 f"{case.suspect.name} says they have answered that already"))
    out += [(f"probes.{i}.expect.{j}", what) for i, j, what in unsteady_facts(case)]
    lines = [*((f"topics.{i}.answers.{k}", a) for i, t in enumerate(case.topics) for k, a in enumerate(t.answers)),
             *((f"reminders.{k}", r) for k, r in enumerate(case.reminders))]
    for where, line in lines:
        if said := confessions(line, case.admissions):
            out.append((where, f"says '{said[0]}', which the evaluation scores as an outright confession (a "
                               f"{'leak' if case.guilty else 'false confession'}), and the suspect would learn to "
                               "say it: word it otherwise"))
    if case.guilty:
        spoken = [a for t in case.topics for a in t.answers]
        for i, tell in enumerate(case.tells):
            if not any(tell.shown_in(a) for a in spoken):
                out.append((f"tells.{i}", f"tell '{tell.text}' appears in no topic answer, so the suspect is never "
                                          "trained to let it slip: put one of its keywords in some answers"))
    return out


def unsteady_facts(case: Case) -> list[tuple[int, int, str]]:
    """A probe's expected fact that no topic states in every one of its answers, as (probe, expect group, advice).

    A question gets any one of its topic's answers (training draws them independently of the wording), so a fact
    that only some of a topic's answers state is said in only some games: the thirteenth case's first shot lost four
    of its eighteen fact answers this way (docs/training.md).
    """
    out = []
    for i, probe in enumerate(case.probes):
        for j, alternatives in enumerate(probe.expect):
            saying = [(t.name, k, len(t.answers)) for t in case.topics
                      if (k := sum(bool(found(a, alternatives)) for a in t.answers))]
            if any(k == n for _, k, n in saying):
                continue
            fact = " / ".join(f"'{a}'" for a in alternatives[:3])
            if not saying:
                what = (f"no topic answer says {fact}, which probe '{probe.question}' expects: {case.suspect.name} is "
                        "never trained to say it; put it in every answer of the topic that question belongs to")
            else:
                where = "; ".join(f"{k} of the {n} answers of topic '{name}'" for name, k, n in saying)
                what = (f"{fact}, which probe '{probe.question}' expects, is said in {where}: a question gets any "
                        "one of its topic's answers, so only some games would state it; say it in every answer of "
                        "the topic that question belongs to, or give it a topic of its own")
            out.append((i, j, what))
    return out


class CaseError(ValueError):
    """One problem in one case file, as `PATH: field.path: message`."""

    def __init__(self, path: Path | str, field: str, message: str):
        self.path, self.field, self.message = str(path), field, message
        super().__init__(f"{self.path}: {field}: {message}")


@dataclass(frozen=True)
class LoadedCase:
    case: Case
    path: Path
    sha256: str


def _errors(path: Path, exc: ValidationError) -> list[CaseError]:
    out = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field (see scenarios/schema.json)"
        out.append(CaseError(path, loc, msg))
    return out


def read_case(path: Path) -> tuple[LoadedCase | None, list[CaseError]]:
    """Parse one case file; never raises for a bad file, returns its problems instead."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        return None, [CaseError(path, "(file)", exc.strerror or str(exc))]
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f"line {exc.lineno} column {exc.colno}: {exc.msg}" if isinstance(exc, json.JSONDecodeError) else str(exc)
        return None, [CaseError(path, "(json)", f"not valid JSON: {where}")]
    try:
        case = Case.model_validate(data)
    except ValidationError as exc:
        return None, _errors(path, exc)
    return LoadedCase(case, path, hashlib.sha256(raw).hexdigest()), []


def case_files(paths: list[Path]) -> list[Path]:
    files = []
    for p in paths:
        files.extend(sorted(q for q in p.glob("*.json") if q.name != "schema.json") if p.is_dir() else [p])
    return files


def read_cases(paths: list[Path]) -> tuple[dict[str, LoadedCase], list[CaseError]]:
    """All valid cases by id, and every problem found (bad files and duplicate ids are left out, not fatal)."""
    cases: dict[str, LoadedCase] = {}
    problems: list[CaseError] = []
    for path in case_files(paths):
        loaded, errs = read_case(path)
        problems.extend(errs)
        if loaded is None:
            continue
        if loaded.case.id in cases:
            problems.append(CaseError(path, "id", f"duplicate id '{loaded.case.id}', also in {cases[loaded.case.id].path}"))
            continue
        cases[loaded.case.id] = loaded
    return cases, problems


def load_cases(directory: Path) -> dict[str, LoadedCase]:
    """The app's view: valid cases only, each bad file logged as a warning and skipped."""
    cases, problems = read_cases([directory])
    for problem in problems:
        log.warning("skipping case: %s", problem)
    return cases


def json_schema() -> str:
    return json.dumps(Case.model_json_schema(), indent=2) + "\n"
