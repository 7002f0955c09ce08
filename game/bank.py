"""The question bank: generic interrogation questions, grouped by what the player wants to know (the intent).

A case's topic names the intents it answers (`Topic.intents`), and training asks it the bank's wordings of those
intents beside the topic's own, so an author writes answers and only the wordings their case needs (its names,
places and objects). Each intent's `held_out` wordings are never trained on: they are `python -m training.eval`'s
off-script questions. The data lives in `question_bank.json` beside this file; `evasions` and `reminders` there are
the fallback lines of a case that writes none of its own (an evasion topic, `Case.reminders`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

PATH = Path(__file__).with_name("question_bank.json")


@dataclass(frozen=True)
class Intent:
    name: str
    about: str  # what the player wants to know, for authors and validate's advice
    train: tuple[str, ...]
    held_out: tuple[str, ...]


@dataclass(frozen=True)
class Bank:
    intents: dict[str, Intent]
    evasions: tuple[str, ...]
    reminders: tuple[str, ...]

    def training_questions(self) -> set[str]:
        """Every trained wording, case-folded: a probe that is one of them would not be held out."""
        return {q.casefold() for intent in self.intents.values() for q in intent.train}

    def held_out_questions(self) -> set[str]:
        return {q.casefold() for intent in self.intents.values() for q in intent.held_out}


@cache
def bank(path: Path = PATH) -> Bank:
    data = json.loads(path.read_text(encoding="utf-8"))
    intents = {name: Intent(name, spec["about"], tuple(spec["train"]), tuple(spec["held_out"]))
               for name, spec in data["intents"].items()}
    return Bank(intents, tuple(data["evasions"]), tuple(data["reminders"]))


def intent_names() -> tuple[str, ...]:
    return tuple(bank().intents)
