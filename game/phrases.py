"""Whether a text says a phrase: the one matching rule of tells, admissions and a case's expected facts.

Normalized text (case-folded, curly quotes straightened, hyphens as spaces, so "First-Aid tent" matches "first aid
tent"), whole words, a plural of the last word allowed ("lemon" matches "lemons", not "lemonade"). The game marks
tells on the result screen, `validate` checks that answers carry them, and the evaluation scores with it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
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
