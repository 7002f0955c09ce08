"""What every engine shares: the request a player's question becomes, the KV already computed for prompts (per
adapter), and the worker thread that serves an engine's requests.

Both engines (`game.engine`'s torch one and `game.llamacpp`'s) take `Request`s from `game.suspect` and hand their tokens
back on the request's queue; each keeps computed prompts in a `PrefixCache` and runs in a thread `start_worker` owns.
"""

from __future__ import annotations

import atexit
import queue
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

from game.drafts import Drafts


@dataclass(eq=False)
class Request:
    prompt: list[int]
    adapter: str | None  # a loaded adapter's name, or None for the bare base
    prefix_len: int  # the first prefix_len prompt tokens are the same for every prompt of this adapter: cached
    max_new_tokens: int
    repetition_penalty: float
    do_sample: bool = False
    background: bool = False  # a warm-up (Suspect.prepare): served when no player is waiting, where that matters
    tokens: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)  # ints, then None (or an exception)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    shown: bool = False  # the reader has shown the player this answer's first words (the engine serves those first)
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    drafts: Drafts | None = None  # guesses at the answer (the llama.cpp engine checks them; this one batches players)
    drafted_tokens: int = 0  # guessed tokens checked, and those the model produced itself
    accepted_tokens: int = 0

    def wait(self, timeout: float | None = None) -> BaseException | None:
        """Read this request's tokens to their end; its error if it failed (an engine puts the error in place of the
        closing None). `timeout`: for each token, as queue.get's (queue.Empty past it)."""
        while (item := self.tokens.get(timeout=timeout)) is not None:
            if isinstance(item, BaseException):
                return item
        return None


class PrefixCache:
    """KV already computed for token sequences (a case's system prompt; a conversation so far, answer included),
    per adapter, least recently used first out within a byte budget. A prompt reuses its longest cached prefix:
    the next question of a conversation recomputes only the cleaned answer's tail and the new question. Entries put
    with pin (a case's system prompt: one per case, and every new game starts from it) are never pushed out by
    conversations.

    Lookup goes through chained hashes of 16-token blocks (as vLLM's prefix caching does), not a scan of entries."""

    BLOCK = 16

    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self.used = 0
        self._entries: OrderedDict[tuple, tuple[object, int, list]] = OrderedDict()  # key -> (kv, bytes, hashes)
        self._pinned: set[tuple] = set()
        # (adapter, hash of the first i blocks) -> the entries with them, newest last (an ordered set: when one goes,
        # the others, a pinned system prompt say, can still be found)
        self._index: dict[tuple, dict[tuple, None]] = {}

    def _hashes(self, tokens) -> list[int]:
        h, out = 0, []
        for i in range(0, len(tokens) - self.BLOCK + 1, self.BLOCK):
            h = hash((h, tuple(tokens[i:i + self.BLOCK])))
            out.append(h)
        return out

    def longest(self, adapter: str | None, tokens: list[int]) -> tuple[tuple | None, int]:
        """The entry sharing the longest prefix with tokens, and that prefix's length."""
        hashes = self._hashes(tokens)
        for blocks in range(len(hashes), 0, -1):
            keys = self._index.get((adapter, hashes[blocks - 1]))
            key = next(reversed(keys)) if keys else None
            n = blocks * self.BLOCK
            if key is not None and key[1][:n] == tuple(tokens[:n]):
                return key, n + common_prefix(key[1][n:], tokens[n:])
        return None, 0

    def get(self, key: tuple):
        self._entries.move_to_end(key)
        return self._entries[key][0]

    def put(self, adapter: str | None, tokens: list[int], kv, nbytes: int, pin: bool = False) -> None:
        key = (adapter, tuple(tokens))
        if key in self._entries or nbytes > self.budget or len(tokens) < self.BLOCK:
            return
        hashes = self._hashes(tokens)
        self._entries[key] = (kv, nbytes, hashes)
        self.used += nbytes
        for h in hashes:
            self._index.setdefault((adapter, h), {})[key] = None
        if pin:
            self._pinned.add(key)
        while self.used > self.budget:
            oldest = next((k for k in self._entries if k not in self._pinned), None)
            if oldest is None:
                break
            self._remove(oldest)

    def _remove(self, key: tuple) -> None:
        _, nbytes, hashes = self._entries.pop(key)
        self._pinned.discard(key)
        self.used -= nbytes
        for h in hashes:
            keys = self._index[key[0], h]
            del keys[key]
            if not keys:
                del self._index[key[0], h]

    def discard(self, key: tuple) -> None:
        """Forget an entry, if it is still here and not pinned (its KV has gone back where it was made)."""
        if key in self._entries and key not in self._pinned:
            self._remove(key)

    def drop(self, adapter: str | None) -> None:
        for key in [k for k in self._entries if k[0] == adapter]:
            self._remove(key)


def common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


IDLE_POLL_S = 0.5  # an idle worker looks this often whether its engine is still wanted
_engines: weakref.WeakSet = weakref.WeakSet()
_workers: set[threading.Thread] = set()
_exiting = threading.Event()


def start_worker(engine, name: str) -> None:
    """Run engine.work() in a daemon thread that holds the engine only weakly, so that a dropped Suspect (tests make
    many) is freed with its model, and that ends before the interpreter does (engine.cancel_all() first): a thread
    killed inside torch's C++ (freeing a model, say) aborts the process."""
    ref = weakref.ref(engine)

    def loop() -> None:
        try:
            while not _exiting.is_set():
                engine = ref()
                if engine is None:
                    return
                engine.work()
                del engine
        finally:
            _workers.discard(threading.current_thread())

    thread = threading.Thread(target=loop, name=name, daemon=True)
    _engines.add(engine)
    _workers.add(thread)
    thread.start()


@atexit.register
def _stop_workers() -> None:
    _exiting.set()
    for engine in list(_engines):
        engine.cancel_all()
    for thread in list(_workers):
        thread.join(timeout=30)
