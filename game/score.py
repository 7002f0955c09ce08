"""A player's score across the games of one browser session: games played, verdicts right, the current streak."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Score:
    played: int = 0
    right: int = 0
    streak: int = 0  # right verdicts in a row, up to the last game

    def after(self, correct: bool) -> Score:
        return replace(self, played=self.played + 1, right=self.right + correct,
                       streak=self.streak + 1 if correct else 0)
