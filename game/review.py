"""Where the suspect gave themself away: what the result screen marks on each answer of a finished game.

A guilty suspect's answer is marked with each tell whose keywords it says (`game.phrases`, the one matching rule
of tells). An innocent suspect's answer is marked with each quirk it shows. A quirk has no keywords in the case
file, so its own distinctive words stand for them: the words of its sentence left after dropping common English
ones and the words every quirk sentence uses to describe a habit ("keeps", "constantly", "sounds").
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import cache

from game.phrases import found, normalize
from game.scenario import Case
from game.session import Exchange

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
constantly often always habit habits tends tend moment suddenly oddly odd strange strangely awkward awkwardly
sound sounds sounding look looks looking seem seemed appear appears appearing talk talks talking
speaks speak speaking mention mentions mentioning nervous nervously guilty shifty suspicious suspiciously
times turns details subject changing entry
""".split())


@cache
def quirk_words(quirk: str) -> tuple[str, ...]:
    """The distinctive words of a quirk's sentence, standing in for the keywords a quirk does not have."""
    words = re.findall(r"[a-z]+(?:'[a-z]+)?", normalize(quirk))
    return tuple(dict.fromkeys(w for w in words if len(w) >= MIN_WORD and w not in COMMON))


def slips(case: Case, transcript: Sequence[Exchange]) -> tuple[tuple[str, ...], ...]:
    """For each exchange, what its answer gave away: tell texts if the suspect is guilty, quirks if innocent."""
    if case.guilty:
        return tuple(tuple(t.text for t in case.tells if t.shown_in(e.answer)) for e in transcript)
    return tuple(tuple(q for q in case.quirks if found(e.answer, quirk_words(q))) for e in transcript)
