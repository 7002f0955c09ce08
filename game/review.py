"""Where the suspect gave themself away: what the result screen marks on each answer of a finished game.

A guilty suspect's answer is marked with each tell whose keywords it says (`game.phrases`, the one matching rule
of tells). An innocent suspect's answer is marked with each quirk it shows. A quirk has no keywords in the case
file, so its own distinctive words stand for them: the words of its sentence left after dropping common English
ones and the words every quirk sentence uses to describe a habit ("keeps", "constantly", "sounds").
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

from game.phrases import content_words, found
from game.scenario import Case
from game.session import Exchange

# The words every quirk sentence uses to describe a habit, which say nothing of which habit it is.
HABIT_WORDS = frozenset("""
constantly often always habit habits tends tend moment suddenly oddly odd strange strangely awkward awkwardly
sound sounds sounding look looks looking seem seemed appear appears appearing talk talks talking
speaks speak speaking mention mentions mentioning nervous nervously guilty shifty suspicious suspiciously
times turns details subject changing entry
""".split())


@cache
def quirk_words(quirk: str) -> tuple[str, ...]:
    """The distinctive words of a quirk's sentence, standing in for the keywords a quirk does not have."""
    return tuple(w for w in content_words(quirk) if w not in HABIT_WORDS)


def slips(case: Case, transcript: Sequence[Exchange]) -> tuple[tuple[str, ...], ...]:
    """For each exchange, what its answer gave away: tell texts if the suspect is guilty, quirks if innocent."""
    if case.guilty:
        return tuple(tuple(t.text for t in case.tells if t.shown_in(e.answer)) for e in transcript)
    return tuple(tuple(q for q in case.quirks if found(e.answer, quirk_words(q))) for e in transcript)
