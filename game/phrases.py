"""Whether a text says a phrase: the one matching rule of tells, admissions and a case's expected facts.

Normalized text (case-folded, curly quotes straightened, hyphens as spaces, so "First-Aid tent" matches "first aid
tent"), whole words, a plural of the last word allowed ("lemon" matches "lemons", not "lemonade"). The game marks
tells on the result screen, `validate` checks that answers carry them, and the evaluation scores with it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from difflib import SequenceMatcher
from functools import lru_cache


def normalize(text: str) -> str:
    text = text.casefold().replace("’", "'").replace("‘", "'").replace("“", '"').replace("”", '"')
    text = re.sub(r"[-‐‑–—]", " ", text)
    return " ".join(text.split())


@lru_cache(maxsize=4096)
def _phrase_pattern(phrase: str) -> re.Pattern:
    return re.compile(r"(?<![\w])" + re.escape(normalize(phrase)) + r"(?:s|es)?(?![\w])")


def says(text: str, phrase: str) -> bool:
    """Whether `text` contains `phrase` as whole words (normalized; a plural of its last word counts)."""
    return bool(_phrase_pattern(phrase).search(normalize(text)))


def found(text: str, phrases: Iterable[str]) -> list[str]:
    return [p for p in phrases if says(text, p)]


# Outright confessions in any case's words, besides a case's own `admissions`. "It was me" and "you've got me" count
# only where they end the clause: "it was me who found the pane" and "that's not why you've got me in here" confess
# nothing (the second is a fourteenth case's author's dodge, scored a false confession until this rule).
CONFESSIONS = [
    r"\bit was me(?=\s*(?:[,.!?;…]|$))",
    r"\bi confess\b",
    r"\bi(?:'m| am) guilty\b",
    r"\bi admit it\b",
    r"\bi did it\b",
    r"\byou(?:'ve)? (?:got|caught) me(?=\s*(?:[,.!?;…]|$|red handed|bang to rights|fair and square))",
]


def confessions(text: str, admissions: Iterable[str]) -> list[str]:
    """The outright confessions `text` makes: any of a case's `admissions`, and those of CONFESSIONS."""
    own = found(text, admissions)
    norm = normalize(text)
    generic = [m.group() for p in CONFESSIONS if (m := re.search(p, norm))]
    return own + [g for g in dict.fromkeys(generic) if g not in {normalize(o) for o in own}]


# Two answers whose words agree this much are the same line said again (a word or two changed, a clause dropped);
# two different answers of one topic, which share its fact, stay well below (docs/eval.md).
SAME_ANSWER = 0.8


def words(text: str) -> list[str]:
    return re.findall(r"[\w']+", normalize(text))


MIN_WORD = 4  # shorter words ("on", "off", "her", "rag") are mostly grammar; the few that are not rarely decide
COMMON = frozenset("""
about above after again against also although always another anyone anything around asked asking aside away
back because been before being below between both came cannot come comes could does doing done down during each
either else even ever every from gets give gives going gone good have having here hers herself himself into
just keep keeps kept know knows like likes made make makes many might more most much must never next nothing
once only other others over quite rather really said same says seem seems should since some something soon still
such take takes tell tells than that their theirs them themselves then there these they thing things this those
though through thus together told took toward towards under until upon very want wants was were what when where
whether which while whom whose will with within without would your yours
""".split())


def content_words(text: str) -> tuple[str, ...]:
    """The words of `text` that say what it is about, in order, once each: those left after common English ones."""
    found_words = re.findall(r"[a-z]+(?:'[a-z]+)?", normalize(text))
    return tuple(dict.fromkeys(w for w in found_words if len(w) >= MIN_WORD and w not in COMMON))


def likeness(a: str, b: str) -> float:
    """How much of two texts is the same words in the same order (difflib's ratio over words, 0..1)."""
    return SequenceMatcher(None, words(a), words(b), autojunk=False).ratio()


def same_answer(a: str, b: str) -> bool:
    """Whether answer `a` repeats answer `b`: the suspect saying the same line twice in one interrogation."""
    return likeness(a, b) >= SAME_ANSWER
