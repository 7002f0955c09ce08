"""A case's llama.cpp context in the CPU engine (game.llamacpp), and the conversations it holds as sequences.

Sequence 0 holds the case's system prompt, which the others share; each other sequence is one player's
conversation, its KV kept between questions and saved aside (and dropped) when room is short, least recent first.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from game.serving import Request

BATCH_TOKENS = 512  # the most tokens in one llama_decode


class Saved(NamedTuple):
    """A conversation's KV saved aside (llama_state_seq_get_data): its cells after the first `shared`, which are its
    case's system prompt and come back from sequence 0."""
    data: object
    size: int
    tokens: list[int]
    shared: int


@dataclass(eq=False)
class Sequence:
    """One conversation's KV in its case's context (llama.cpp sequence `seq`), and the answer it is giving."""
    seq: int
    tokens: list[int] = field(default_factory=list)  # what its KV holds, position by position
    shared: int = 0  # its first cells are sequence 0's (the system prompt), not its own
    used: float = 0.0  # when it last answered: the least recent goes first when room is short
    request: Request | None = None
    pending: list[int] = field(default_factory=list)  # prompt tokens not yet evaluated
    answer: list[int] = field(default_factory=list)  # chosen so far (the last one not yet evaluated)
    text: list[int] = field(default_factory=list)  # the prompt and the answer so far, for the guesses
    guess: list[int] = field(default_factory=list)  # checked in this pass
    seen: np.ndarray | None = None  # every token of the prompt and answer, for the repetition penalty
    rng: np.random.Generator | None = None

    def start(self, r: Request, n_vocab: int) -> None:
        self.request, self.pending, self.answer, self.text = r, list(r.prompt[len(self.tokens):]), [], list(r.prompt)
        self.guess = []
        self.seen = np.zeros(n_vocab, dtype=bool)
        self.seen[r.prompt] = True
        self.rng = np.random.default_rng() if r.do_sample else None

    def end(self) -> None:
        self.request, self.pending, self.answer, self.text, self.guess, self.seen = None, [], [], [], [], None
        self.used = time.perf_counter()

    def cells(self, draft_tokens: int) -> int:
        """KV cells it holds of its own, or, while answering, may come to hold."""
        return (len(self.tokens) if self.request is None else promised(self.request, draft_tokens)) - self.shared


def promised(r: Request, draft_tokens: int) -> int:
    """The most KV cells a request's sequence can come to hold: its prompt, its answer and a guess beyond it."""
    return len(r.prompt) + r.max_new_tokens + draft_tokens + 1


class CaseContext:
    """One llama.cpp context over the engine's model, with one adapter set (a case's, or None for the bare base):
    sequence 0 holds the case's system prompt, the others its conversations."""

    def __init__(self, lib, adapter: str | None, ctx, cells: int, sequences: int, draft_tokens: int):
        self._lib, self.adapter, self.ctx, self.mem = lib, adapter, ctx, lib.llama_get_memory(ctx)
        self.batch = lib.llama_batch_init(BATCH_TOKENS, 0, 1)  # its own: passes of several contexts run at once
        self.cells, self.n_sequences, self.draft_tokens = cells, sequences, draft_tokens
        self.threads: tuple[int, int] | None = None
        self.held = 0  # answers in progress when its running pass started (a lane owns it while it runs)
        self.system: list[int] = []
        self.sequences: dict[int, Sequence] = {}

    def answering(self) -> int:
        return sum(s.request is not None for s in self.sequences.values())

    def due(self) -> tuple[bool, float]:
        """Its most urgent answer in progress, as a sort key: one whose first words the player has not seen yet
        (Request.shown) before any other, then the one asked longest ago."""
        answers = [s for s in self.sequences.values() if s.request is not None]
        starting = [s.request.submitted for s in answers if not s.request.shown]
        return (not starting, min(starting or [s.request.submitted for s in answers], default=math.inf))

    def use_threads(self, threads: int, threads_batch: int) -> None:
        if self.threads != (threads, threads_batch):
            self._lib.llama_set_n_threads(self.ctx, threads, threads_batch)
            self.threads = (threads, threads_batch)

    def spare_id(self) -> int | None:
        return next((i for i in range(1, self.n_sequences) if i not in self.sequences), None)

    def shares(self, entry: Saved) -> bool:
        """Whether a saved conversation's first cells, left to sequence 0, are still there (the system prompt)."""
        return len(self.system) >= entry.shared and self.system[:entry.shared] == entry.tokens[:entry.shared]

    def new_sequence(self) -> Sequence:
        seq = self.spare_id()
        s = self.sequences[seq] = Sequence(seq)
        return s

    def drop(self, s: Sequence) -> None:
        self._lib.llama_memory_seq_rm(self.mem, s.seq, -1, -1)
        del self.sequences[s.seq]

    def make_room(self, needed: int, keep: Sequence | None, save) -> bool:
        """Room for a sequence of `needed` cells of its own (and a free sequence id, unless it is `keep`): idle
        conversations other than `keep` are saved aside (save(context, sequence)) and dropped, least recent first.
        False where the answering ones leave too little."""
        def short() -> bool:
            promised = len(self.system) + sum(s.cells(self.draft_tokens) for s in self.sequences.values() if s is not keep)
            return promised + needed > self.cells or (keep is None and len(self.sequences) >= self.n_sequences - 1)

        idle = sorted((s for s in self.sequences.values() if s.request is None and s is not keep), key=lambda s: s.used)
        while short() and idle:
            s = idle.pop(0)
            save(self, s)
            self.drop(s)
        return not short()

    def close(self) -> None:
        self._lib.llama_free(self.ctx)
        self._lib.llama_batch_free(self.batch)

    def fail(self, exc: Exception) -> None:
        """After a failed pass: every answer in progress ends with the error, and the KV starts empty."""
        for s in self.sequences.values():
            if s.request is not None:
                s.request.tokens.put(exc)
        self._lib.llama_memory_clear(self.mem, True)
        self.sequences.clear()
        self.system = []
