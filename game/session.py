"""The rules of one game, as a pure state machine: no model, no UI, no clock.

briefing -> questioning (question n of 5) <-> answering -> verdict -> result

Every move returns a new `Session`; an illegal move raises a specific `MoveRefused` and changes nothing.
The suspect's answer is produced outside (by whoever drives the session) and handed back with `answer()`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import Enum

MAX_QUESTIONS = 5
MAX_QUESTION_CHARS = 500


class Phase(str, Enum):
    BRIEFING = "briefing"
    QUESTIONING = "questioning"
    ANSWERING = "answering"  # a question is out; the suspect has not answered yet
    VERDICT = "verdict"  # all questions used: only a verdict is left
    RESULT = "result"


class MoveRefused(Exception):
    """A move the rules do not allow now; the message is fit to show a player."""


class OutOfOrder(MoveRefused):
    pass


class InvalidQuestion(MoveRefused):
    pass


class NoQuestionsLeft(MoveRefused):
    pass


class VerdictAlreadyGiven(MoveRefused):
    pass


@dataclass(frozen=True)
class Exchange:
    question: str
    answer: str


@dataclass(frozen=True)
class Result:
    accused: bool  # the player's verdict: True = guilty
    guilty: bool
    truth: str
    transcript: tuple[Exchange, ...]

    @property
    def correct(self) -> bool:
        return self.accused == self.guilty


@dataclass(frozen=True)
class Session:
    case_id: str
    guilty: bool
    truth: str
    max_questions: int = MAX_QUESTIONS
    phase: Phase = Phase.BRIEFING
    transcript: tuple[Exchange, ...] = ()
    pending: str | None = None
    result: Result | None = field(default=None)

    @property
    def questions_asked(self) -> int:
        return len(self.transcript) + (self.pending is not None)

    @property
    def questions_left(self) -> int:
        return self.max_questions - self.questions_asked

    def begin(self) -> Session:
        self._require(Phase.BRIEFING, "the interrogation has already begun")
        return replace(self, phase=Phase.QUESTIONING)

    def ask(self, question: str) -> Session:
        if self.phase is Phase.VERDICT:
            raise NoQuestionsLeft(f"you have asked all {self.max_questions} questions; give your verdict")
        if self.phase is Phase.ANSWERING:
            raise OutOfOrder("the suspect is still answering your last question")
        self._require(Phase.QUESTIONING, "you cannot ask questions now")
        question = " ".join(question.split())
        if not question:
            raise InvalidQuestion("the question is empty")
        if len(question) > MAX_QUESTION_CHARS:
            raise InvalidQuestion(f"the question is {len(question)} characters long; the limit is {MAX_QUESTION_CHARS}")
        return replace(self, phase=Phase.ANSWERING, pending=question)

    def answer(self, text: str) -> Session:
        self._require(Phase.ANSWERING, "no question is waiting for an answer")
        transcript = (*self.transcript, Exchange(self.pending, text.strip()))
        phase = Phase.QUESTIONING if len(transcript) < self.max_questions else Phase.VERDICT
        return replace(self, phase=phase, transcript=transcript, pending=None)

    def withdraw(self) -> Session:
        """Take back the pending question, e.g. when the suspect failed to answer; it does not count."""
        self._require(Phase.ANSWERING, "no question is waiting for an answer")
        return replace(self, phase=Phase.QUESTIONING, pending=None)

    def decide(self, accused: bool) -> Session:
        if self.phase is Phase.RESULT:
            raise VerdictAlreadyGiven("the verdict has already been given")
        if self.phase is Phase.ANSWERING:
            raise OutOfOrder("wait for the suspect's answer before giving a verdict")
        if self.phase is Phase.BRIEFING or not self.transcript:
            raise OutOfOrder("ask at least one question before giving a verdict")
        result = Result(accused=accused, guilty=self.guilty, truth=self.truth, transcript=self.transcript)
        return replace(self, phase=Phase.RESULT, result=result)

    def _require(self, phase: Phase, message: str) -> None:
        if self.phase is not phase:
            raise OutOfOrder(message)
