"""The interrogation room: the server side of many concurrent games, keyed by an opaque game id.

It pairs each game's `Session` (the rules) with its case and the shared `Suspect` (the model). Whatever is
secret (the truth, the verdict that would be right) stays in here; callers get a briefing, answers, and after
the verdict a result.
"""

from __future__ import annotations

import logging
import random
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Protocol

from game import adapters as adapter_files
from game.base import resolve
from game.config import GameConfig
from game.results import CaseRecord, ResultStore
from game.review import slips
from game.scenario import LoadedCase, Persona, load_cases
from game.session import Exchange, MoveRefused, Result, Session

log = logging.getLogger(__name__)

MAX_GAMES = 10_000  # finished and abandoned games are forgotten oldest first beyond this
GAME_LOST = ("Your game was lost: the server restarted (or your browser reached another server) and the questions "
             "so far are gone. Start a new case.")


class UnknownCase(LookupError):
    pass


class UnknownGame(LookupError):
    pass


class Answerer(Protocol):
    def stream(self, case, transcript, question) -> Iterator[str]: ...


@dataclass(frozen=True)
class Briefing:
    game_id: str
    case_id: str
    title: str
    briefing: str
    suspect: Persona
    max_questions: int
    suspect_note: str  # which suspect plays: fine-tuned, or prompt-only and why


@dataclass(frozen=True)
class Verdict:
    result: Result
    record: CaseRecord | None  # this case's record over all players, this game included
    slips: tuple[tuple[str, ...], ...]  # per exchange: the tells (guilty) or quirks (innocent) its answer showed


class Room:
    def __init__(self, cases: dict[str, LoadedCase], suspect: Answerer, notes: dict[str, str],
                 store: ResultStore | None = None):
        if not cases:
            raise UnknownCase("no valid case to play: add a case file under scenarios/ (see README)")
        self.cases, self.suspect, self.notes, self.store = cases, suspect, notes, store
        self._games: OrderedDict[str, Session] = OrderedDict()
        self._lock = threading.Lock()

    def new_game(self, case_id: str | None = None, rng: random.Random | None = None) -> Briefing:
        if case_id is None:
            case_id = (rng or random).choice(sorted(self.cases))
        if case_id not in self.cases:
            raise UnknownCase(f"unknown case '{case_id}'; known cases: {', '.join(sorted(self.cases))}")
        case = self.cases[case_id].case
        game_id = secrets.token_urlsafe(16)
        session = Session(case_id=case.id, guilty=case.guilty, truth=case.truth).begin()
        with self._lock:
            self._games[game_id] = session
            while len(self._games) > MAX_GAMES:
                self._games.popitem(last=False)
        return Briefing(game_id, case.id, case.title, case.briefing, case.suspect, session.max_questions,
                        self.notes.get(case.id, ""))

    def session(self, game_id: str) -> Session:
        with self._lock:
            return self._games[self._known(game_id)]

    def _known(self, game_id: str | None) -> str:
        # A game in progress lives only in the memory of the server that started it; a game id (or, from a page
        # whose server state is gone, none) that this server does not hold is a game it lost, most likely to a
        # restart. The player reads this, not a failure.
        if game_id not in self._games:
            raise UnknownGame(GAME_LOST)
        return game_id

    def _swap(self, game_id: str, move) -> Session:
        """Apply a move atomically: the session may be touched by two requests of the same player at once."""
        with self._lock:
            game_id = self._known(game_id)
            self._games[game_id] = new = move(self._games[game_id])
            return new

    def persona(self, game_id: str) -> Persona:
        return self.cases[self.session(game_id).case_id].case.suspect

    def check_question(self, game_id: str, question: str) -> None:
        """Raise what `ask` would refuse this question with now (MoveRefused, UnknownGame), without asking it."""
        self.session(game_id).ask(question)

    def ask(self, game_id: str, question: str) -> Iterator[str]:
        """Refuse an illegal question at once (MoveRefused), else stream the suspect's answer as it grows."""
        session = self._swap(game_id, lambda s: s.ask(question))
        case = self.cases[session.case_id].case
        return self._answer(game_id, case, session.transcript, session.pending)

    def _answer(self, game_id: str, case, transcript: tuple[Exchange, ...], question: str) -> Iterator[str]:
        answer = ""
        try:
            for answer in self.suspect.stream(case, transcript, question):
                yield answer
        except BaseException:
            # The suspect failed or the player left mid-answer: the question does not count.
            self._swap(game_id, lambda s: s.withdraw())
            raise
        self._swap(game_id, lambda s: s.answer(answer))

    def decide(self, game_id: str, accused: bool) -> Verdict:
        session = self._swap(game_id, lambda s: s.decide(accused))
        record = None
        if self.store is not None:
            try:
                self.store.record(game_id, session.case_id, session.result)
                record = self.store.case_record(session.case_id)
            except Exception:  # a full disk must not take the result from the player
                log.exception("could not record game %s", game_id)
        case = self.cases[session.case_id].case
        return Verdict(session.result, record, slips(case, session.result.transcript))


def open_room(config: GameConfig) -> Room:
    """Read the cases, and load the base once and every usable adapter beside it, or ask the model server which
    adapters it offers."""
    from game.suspect import GenerationSettings

    cases = load_cases(config.scenarios)
    settings = GenerationSettings()
    if config.max_new_tokens:
        settings = replace(settings, max_new_tokens=config.max_new_tokens)
    if config.engine_url:
        suspect, notes = _served(config, cases, settings)
    else:
        suspect, notes = _local(config, cases, settings)
    return Room(cases, suspect, notes, ResultStore(config.results))


def _served(config: GameConfig, cases: dict[str, LoadedCase], settings):
    """The model tier runs elsewhere: no base or adapter is read here."""
    from game.remote import RemoteSuspect

    suspect = RemoteSuspect(config.engine_url, config.engine_key, config.engine_model, settings,
                            config.engine_timeout_s)
    notes = {}
    for case_id in cases:
        if suspect.use_served_adapter(case_id):
            notes[case_id] = "Fine-tuned suspect"
        else:
            log.warning("%s: the model server offers no adapter named %s: playing prompt-only", case_id, case_id)
            notes[case_id] = "Prompt-only suspect: the model server offers no adapter for this case"
    log.info("suspect ready: the model server at %s answers", config.engine_url)
    return suspect, notes


def _local(config: GameConfig, cases: dict[str, LoadedCase], settings):
    from game.suspect import Suspect

    base = resolve(config.base)
    suspect = Suspect(base, device=config.device, settings=settings)
    notes, warm_ups = {}, []
    for case_id, loaded in cases.items():
        info = adapter_files.inspect(config.adapters, loaded, base)
        if info.status is not adapter_files.Status.MISSING and info.status is not adapter_files.Status.READY:
            log.warning("%s: %s", case_id, info.message)
        # Players read why, not where: the server's own paths stay in its log.
        if info.usable and suspect.load_adapter(info):
            notes[case_id] = "Fine-tuned suspect" + (" (stale adapter: retrain it)" if info.status.value == "stale" else "")
        elif info.usable:
            notes[case_id] = f"Prompt-only suspect: the adapter adapters/{case_id} could not be loaded (see the server log)"
        else:
            notes[case_id] = "Prompt-only suspect: " + info.message.replace(str(info.path), f"adapters/{case_id}")
        warm_ups.append(suspect.prepare(loaded.case))
    threading.Thread(target=_say_when_warm, args=(warm_ups, time.perf_counter()), name="warm-up", daemon=True).start()
    return suspect, notes


def _say_when_warm(warm_ups: list, started: float) -> None:
    """Log when every case's system prompt is computed: until then a first question shares the CPU with them
    (~2 s a case on 2 cores). benchmarks/load.py waits for this line."""
    for request in warm_ups:
        request.wait()
    log.info("suspect ready: %d cases' system prompts computed in %.1f s", len(warm_ups), time.perf_counter() - started)


__all__ = ["Room", "open_room", "Briefing", "Verdict", "UnknownCase", "UnknownGame", "MoveRefused"]
