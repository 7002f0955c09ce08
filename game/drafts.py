"""Guesses at how an answer goes on, for speculative decoding on the CPU.

A suspect fine-tuned on its case's answers says much of them again word for word, and its system prompt's facts
too. The llama.cpp engine checks a guess of k tokens in one pass of k + 1 tokens and keeps the part the model would
have produced itself, so answers stay the model's own while taking fewer passes (on 2 cores one pass of 6 tokens
costs ~3.3 of 1).

The guess is what followed the longest recent suffix (MIN_N to MAX_N tokens) of the text so far where it appears in
the sources: prompt-lookup decoding (transformers' `prompt_lookup_num_tokens`, llama.cpp's n-gram drafts) over a
case's own material rather than the prompt alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

MIN_N, MAX_N = 2, 8  # one token matches too much to guess from; longer matches than 8 guess no better


class Drafts:
    def __init__(self, sources: Iterable[Sequence[int]], ends: Iterable[int] = ()):
        """ends: tokens that end an answer (a guess stops at one: nothing after it would be used)."""
        self._sources = [list(source) for source in sources]
        self._ends = frozenset(ends)
        self._index: dict[tuple[int, ...], tuple[int, int]] = {}  # n tokens -> (source, where they end), first seen
        for s, source in enumerate(self._sources):
            for end in range(MIN_N, len(source)):  # something follows every indexed run
                for n in range(MIN_N, min(MAX_N, end) + 1):
                    self._index.setdefault(tuple(source[end - n:end]), (s, end))

    def guess(self, text: Sequence[int], k: int) -> list[int]:
        """Up to k tokens that may follow text, or [] when no suffix of it of MIN_N tokens is in the sources."""
        for n in range(min(MAX_N, len(text)), MIN_N - 1, -1):
            found = self._index.get(tuple(text[-n:]))
            if found is not None:
                source, end = found
                guess = self._sources[source][end:end + max(k, 0)]
                stop = next((i for i, token in enumerate(guess) if token in self._ends), len(guess))
                return guess[:stop + 1]
        return []
