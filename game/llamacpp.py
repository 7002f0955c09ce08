"""The CPU engine: the base's own GGUF run by llama.cpp, each case's adapter converted once to a GGUF LoRA.

llama.cpp reads the base as it is stored (Q4_1), or where the CPU does bf16 natively in BF16 (made once from the
GGUF: the values the adapters were trained against, and twice as fast for a pass of many tokens); on a 2-core CPU
that is ~5x the tokens/s of the torch engine. In BF16 each case's adapter is merged into its own copy of the weights
(game.llamacpp_files); beside a quantized base it is applied unmerged. Decoding is the
game's own: greedy with transformers' repetition penalty over every token seen, so answers match the torch path's up
to llama.cpp's arithmetic. Where the case's own material guesses how an answer goes on (game.drafts), the guess is
checked in the same pass as the token before it (speculative decoding): every token is still the model's choice,
~1.5x as many a second.

Many players at once: every conversation is a llama.cpp sequence, and all the sequences of one case go through one
`llama_decode` a pass (a new question's prompt beside the others' next tokens). llama.cpp applies LoRA adapters to a
whole context, not per sequence, so each case has its own context over its weights (its adapter set once, or merged)
(docs/speed.md#many-players-at-once says why not one context switching adapters). Lanes, one per core, run the cases'
passes side by side, each lane starting another as soon as its pass ends: first the case of a question still short of
its first words, then the case of the answer asked longest ago.
A case's system prompt is computed once into its sequence 0, which new conversations share (`llama_memory_seq_cp`);
a conversation's KV stays in its sequence for its next question, and is saved aside when room is short
(game.llamacpp_context).
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import queue
import threading
import time
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

from game.base import EMBEDDED, Base, embedded_gguf, native_cpu_bf16
from game.config import ConfigError
from game.llamacpp_context import BATCH_TOKENS, CaseContext, Saved, Sequence, promised
from game.llamacpp_files import bf16_gguf, gguf_lora, merged_gguf
from game.serving import IDLE_POLL_S, PrefixCache, Request, common_prefix, start_worker

log = logging.getLogger(__name__)

KV_CACHE_MB = 512  # conversations saved aside, their own cells (23 kB a token on the 135M base: ~50 conversations)
IDLE_KEEP_S = 1.0  # a conversation between questions stays in its case's KV this long, then goes aside: every token
#                   a case decodes attends over all the cells of its KV, the idle conversations' and the finished
#                   games' too (twenty players, five games each: 5.5 -> 3.1 answers/s by the fifth; docs/speed.md)
DRAFT_TOKENS = 8  # an answer's guesses (game.drafts) checked at once: a lone player's answer 0.30 -> 0.25 s, docs/speed.md
DRAFT_BUDGET = 24  # a case's pass holds guesses only up to this many tokens in all: with many players a wrong guess
#                    costs as much as a right token, but each pass also reads every weight once (twenty players over
#                    HTTP: answer p95 5.5 -> 5.0 s against 12; docs/speed.md)
STARTING_BUDGET = 12  # ... and up to this many while one of its answers is short of its first words, so that a new
#                       question's pass is not slowed by the others' guesses (first words as with 12 throughout)
THREADS_TOGETHER = 1  # llama.cpp threads while several players are answered: the rest of the CPU turns their tokens
#                      into words and streams them, and ggml's threads wait for each other at every operation, so one
#                      descheduled thread stalls the pass (20 players, 2 cores: answers 2.4x sooner; docs/speed.md)
RESTORE_GAIN = 16  # restore a saved state only when it saves this many more tokens than the context already has
KV_CELLS = 4096  # a case's KV: its system prompt and ~8 whole conversations at once (94 MB on the 135M base)
SEQUENCES = 32  # a case's system prompt and up to 31 conversations kept at once
PREFILL_CHUNK = 128  # the most tokens of one prompt in a pass: a long one does not hold everyone's next token up


@contextmanager
def plain_cpu_buffers():
    """While inside, llama-cpp-python's `Llama` loads a model with its weights in plain CPU buffers where this CPU
    has AMX, as this engine loads its own (game.llama_server runs llama.cpp's server inside it).

    ggml repacks weights for AMX into an extra buffer type, and its AMX matrix multiply crashes this build
    (llama.cpp issue #20824: a segfault in ggml_backend_amx_mul_mat on the first decode, with or without an adapter).
    `Llama` takes no `use_extra_bufts`, so the default model parameters it starts from are wrapped. Elsewhere nothing
    changes: the Q4_1 base has no other repacked layout on x86.
    """
    from llama_cpp import llama_cpp  # the bindings module, whose default parameters Llama reads

    if b"AMX_INT8 = 1" not in llama_cpp.llama_print_system_info():
        yield
        return
    default = llama_cpp.llama_model_default_params

    def without_extra_buffers():
        params = default()
        params.use_extra_bufts = False
        return params

    llama_cpp.llama_model_default_params = without_extra_buffers
    try:
        yield
    finally:
        llama_cpp.llama_model_default_params = default


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def gguf_of(base: Base) -> Path | None:
    """The GGUF file the base was converted from, or None for a folder or hub base."""
    if base.spec == EMBEDDED:
        return embedded_gguf()
    return Path(base.spec) if base.spec.endswith(".gguf") else None


def unavailable_reason(base: Base, device: str) -> str:
    if device != "cpu":
        return f"the llama.cpp engine runs on the CPU, not {device}"
    if gguf_of(base) is None:
        return f"the llama.cpp engine needs a GGUF base, not {base.spec}"
    return "the llama.cpp engine needs llama-cpp-python: pip install llama-cpp-python"


class LlamaCppEngine:
    """A worker thread answering every player's request with llama.cpp, each case's players in one batch. Thread-safe.
    """

    def __init__(self, gguf: Path, eos: set[int], config_path: str | None = None, n_ctx: int = 2048,
                 threads: int | None = None, threads_batch: int | None = None, draft_tokens: int | None = None,
                 kv_cells: int = KV_CELLS, sequences: int = SEQUENCES, threads_together: int | None = None,
                 kv_cache_mb: int = KV_CACHE_MB, lanes: int | None = None, bf16: bool | None = None,
                 merge: bool | None = None, idle_keep_s: float = IDLE_KEEP_S):
        """config_path: the transformers folder of the same base (for the adapters' shapes); default: resolved.
        n_ctx: the longest conversation, in tokens; kv_cells and sequences: each case's KV, and how many sequences
        it holds (its system prompt's and its conversations'); kv_cache_mb: conversations saved aside; idle_keep_s: how
        long a conversation waits for its next question in its case's KV before it goes aside. threads
        (passes of one token) and threads_batch (more) while one player is answered: default $IR_THREADS,
        $IR_THREADS_BATCH, else every core; threads_together while several are: default $IR_THREADS_TOGETHER, else
        THREADS_TOGETHER. lanes: cases whose passes run at once then, each on its own threads_together; default
        $IR_LANES, else as many as the cores hold. draft_tokens: the most guessed tokens checked in one pass (0:
        none); default $IR_DRAFT_TOKENS, else DRAFT_TOKENS. bf16: serve the base's weights in BF16 (bf16_gguf)
        rather than as stored; default $IR_BF16 (0 or 1), else where the CPU does bf16 natively. merge: each adapter
        merged into its own copy of the BF16 weights (merged_gguf) rather than applied beside them; default: where
        they are BF16 (a quantized base keeps its adapters beside it: merging would round their deltas away)."""
        import llama_cpp

        self._lib = lib = llama_cpp
        self.gguf = gguf
        self.config_path = config_path
        self.eos = eos
        self.max_len = n_ctx
        self.kv_cells, self.sequences, self.idle_keep_s = kv_cells, sequences, idle_keep_s
        threads_env, cores = _env_count("IR_THREADS"), os.cpu_count() or 1
        self.threads = threads or threads_env or cores
        self.threads_batch = threads_batch or _env_count("IR_THREADS_BATCH") or threads_env or cores
        self.threads_together = threads_together or _env_count("IR_THREADS_TOGETHER") or THREADS_TOGETHER
        self.lanes = lanes or _env_count("IR_LANES") or max(1, cores // self.threads_together)
        # Each case's pass is a llama_decode of its own context, which releases the GIL: passes of different cases
        # share no threads, so a descheduled one stalls only its own case (unlike ggml's threads within one pass).
        self._lanes = ThreadPoolExecutor(self.lanes, thread_name_prefix="suspect-llama.cpp-lane")
        env_drafts = _env_count("IR_DRAFT_TOKENS")
        if draft_tokens is None:
            draft_tokens = DRAFT_TOKENS if env_drafts is None else env_drafts
        self.draft_tokens = draft_tokens
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp's own log: as Llama(verbose=False)
        lib.llama_backend_init()
        params = lib.llama_model_default_params()
        # No extra buffer types: the AMX one (built where the CPU has AMX) crashes in ggml_backend_amx_mul_mat on a
        # Q4_1 base in this llama.cpp, and the CPU repack ones have no Q4_1 layout, so this costs nothing elsewhere.
        params.use_extra_bufts = False
        if bf16 is None:
            env_bf16 = os.environ.get("IR_BF16")
            if env_bf16 not in (None, "", "0", "1"):
                raise ConfigError(f"IR_BF16 must be 1 (serve the base in BF16) or 0 (as stored), not {env_bf16!r}")
            bf16 = env_bf16 == "1" if env_bf16 else native_cpu_bf16()
        # A pass of many tokens (several players, guesses, a prompt) runs 2.1-2.3x faster in BF16 than in Q4_1 on an
        # AVX512-BF16 core, one of 1-4 tokens alike (docs/speed.md); without native bf16 the stored type is faster.
        self._served = bf16_gguf(gguf) if bf16 else gguf
        self.weights = "BF16" if bf16 else "as stored"
        if merge and not bf16:
            raise ValueError("adapters are merged only into BF16 weights")
        self.merged = bf16 if merge is None else merge  # merged, a case's pass costs what the base's does
        self._model_params = params
        self._model = self._load_model(self._served)
        self.n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self._model))
        self._contexts: dict[str | None, CaseContext] = {}
        self._config = None
        self._adapters: dict[str, _Adapter] = {}
        self._finalizer = weakref.finalize(self, _free, lib, self._model, self._contexts, self._adapters, self._lanes)
        self._finalizer.atexit = False  # at exit the process goes anyway, perhaps with the worker mid-pass
        self._cache = PrefixCache(kv_cache_mb << 20)  # conversations moved out of their context for room
        self._lock = threading.Lock()
        self._pass_ended = threading.Condition(self._lock)
        self._running: dict[CaseContext, int] = {}  # contexts in a pass -> the lanes it holds
        self._queue: queue.SimpleQueue[Request | None] = queue.SimpleQueue()  # None: a pass ended
        self._players: deque[Request] = deque()
        self._warm_ups: deque[Request] = deque()
        start_worker(self, "suspect-llama.cpp")

    def load_adapter(self, name: str, folder: Path) -> None:
        if self._config is None:
            from transformers import AutoConfig

            from game.base import resolve

            self._config = AutoConfig.from_pretrained(self.config_path or resolve(str(self.gguf)).path)
        out = gguf_lora(folder, self._config)
        if self.merged:
            adapter = _Adapter(self._load_model(merged_gguf(self._served, out)), None)
        else:
            lora = self._lib.llama_adapter_lora_init(self._model, str(out).encode())
            if not lora:
                raise ValueError(f"llama.cpp could not read the converted adapter {out}")
            adapter = _Adapter(self._model, lora)
        with self._lock:
            replaced = self._adapters.get(name)
            self._adapters[name] = adapter
            old = self._contexts.pop(name, None)  # its KV was computed with the old weights
            if old is not None:
                while old in self._running:
                    self._pass_ended.wait()
                old.fail(RuntimeError(f"adapter {name} was replaced"))
                old.close()
            self._cache.drop(name)
        if replaced is not None:
            replaced.free(self._lib, self._model)

    def _load_model(self, path: Path):
        model = self._lib.llama_model_load_from_file(str(path).encode(), self._model_params)
        if not model:
            raise ValueError(f"llama.cpp could not load {path}")
        return model

    def submit(self, request: Request) -> Request:
        if len(request.prompt) + request.max_new_tokens > self.max_len:
            raise ValueError(f"prompt of {len(request.prompt)} tokens is too long for a {self.max_len}-token context")
        if request.adapter is not None and request.adapter not in self._adapters:
            raise KeyError(f"no adapter named {request.adapter}")
        self._queue.put(request)
        return request

    def cancel_all(self) -> None:
        """Stop every answer it holds (the interpreter is exiting)."""
        answering = [s.request for c in list(self._contexts.values()) for s in list(c.sequences.values())]
        for r in [*list(self._players), *list(self._warm_ups), *answering]:
            if r is not None:
                r.cancelled.set()

    def work(self) -> None:
        """Take the queued requests, give each waiting one a sequence where its case's context is between passes, and
        start a pass of every case with answers in progress that a free lane can take. There is no step that every
        case waits for: a lane starts the next case's pass as soon as its last one ends, the case whose answers are
        due soonest first (CaseContext.due; docs/speed.md)."""
        try:
            item = self._queue.get_nowait() if self._can_start() else self._queue.get(timeout=IDLE_POLL_S)
            while True:
                if item is not None:
                    (self._warm_ups if item.background else self._players).append(item)
                item = self._queue.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            self._admit(self._players)
            self._put_idle_aside()
            if not self._running and not any(c.answering() for c in self._contexts.values()):
                self._admit(self._warm_ups, most=1)  # one at a time: a system prompt holds every player's pass up
            started = self._start_passes()
        if not started and (self._players or self._warm_ups) and self._can_start():
            time.sleep(0.01)  # a request that fits nowhere yet, and no pass to wait for: do not spin

    def _put_idle_aside(self) -> None:
        """Save aside (PrefixCache) the conversations of contexts between passes that have waited idle_keep_s for
        their next question: a player reading the answer, or a game over. Under the lock."""
        now = time.perf_counter()
        for c in self._contexts.values():
            if c not in self._running:
                for s in [s for s in c.sequences.values() if s.request is None and now - s.used > self.idle_keep_s]:
                    self._save(c, s)
                    c.drop(s)

    def _idle(self) -> list[CaseContext]:
        """Contexts with answers in progress and no pass running (only these may be read: a lane owns the others)."""
        return [c for c in self._contexts.values() if c not in self._running and c.answering()]

    def _can_start(self) -> bool:
        """Whether there is work to start without waiting for a request or a pass to end."""
        with self._lock:
            waiting = any(self._contexts.get(r.adapter) not in self._running for r in self._players)
            return self._free_lanes() > 0 and (bool(self._idle()) or waiting or
                                               (not self._running and bool(self._warm_ups)))

    def _free_lanes(self) -> int:
        return self.lanes - sum(self._running.values())

    def _start_passes(self) -> int:
        """Hand free lanes the passes due, most urgent first. Under the lock."""
        idle = self._idle()
        answering = sum(c.answering() for c in idle) + sum(c.held for c in self._running)
        idle.sort(key=CaseContext.due)
        free, started = self._free_lanes(), 0
        for context in idle:
            alone = answering <= 1 and not self._running
            lanes = self.lanes if alone else 1
            if lanes > free:
                break
            context.use_threads(*((self.threads, self.threads_batch) if alone else (self.threads_together,) * 2))
            context.held = context.answering()
            self._running[context] = lanes
            free -= lanes
            try:
                self._lanes.submit(self._pass, context, answering > context.held)
            except RuntimeError:  # the pool refuses work only once the interpreter exits
                del self._running[context]
                return started
            started += 1
        return started

    def _pass(self, c: CaseContext, crowded: bool) -> None:
        try:
            self._step(c, crowded)
        except Exception as exc:
            log.exception("generation failed")
            c.fail(exc)
        finally:
            with self._lock:
                del self._running[c]
                self._pass_ended.notify_all()
            self._queue.put(None)  # the worker may start this case's next pass, or a waiting request in it

    def _context(self, adapter: str | None) -> CaseContext:
        context = self._contexts.get(adapter)
        if context is None:
            lib = self._lib
            params = lib.llama_context_default_params()
            params.n_ctx, params.n_batch, params.n_ubatch = self.kv_cells, BATCH_TOKENS, BATCH_TOKENS
            params.n_seq_max = self.sequences
            # One KV buffer for all the case's sequences: the conversations share their system prompt's cells, and
            # a batch takes any sequences in any order (per-sequence buffers split a batch by sequence id).
            params.kv_unified = True
            params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_DISABLED  # llama-cpp-python's default: same answers
            if self.weights == "BF16":
                # The KV in bf16, as the adapters were trained with it (torch's bf16 attention), rather than fp16:
                # a pass 3-14% quicker (docs/speed.md).
                params.type_k = params.type_v = int(GGMLQuantizationType.BF16)
            params.n_threads, params.n_threads_batch = self.threads, self.threads_batch
            chosen = self._adapters.get(adapter) if adapter is not None else None
            ctx = lib.llama_init_from_model(self._model if chosen is None else chosen.model, params)
            if not ctx:
                raise RuntimeError("llama.cpp could not make a context")
            if chosen is not None and chosen.lora is not None:
                adapters = (lib.llama_adapter_lora_p_ctypes * 1)(chosen.lora)
                if lib.llama_set_adapters_lora(ctx, adapters, 1, (ctypes.c_float * 1)(1.0)) != 0:
                    lib.llama_free(ctx)
                    raise RuntimeError(f"llama.cpp could not apply adapter {adapter}")
            context = self._contexts[adapter] = CaseContext(lib, adapter, ctx, self.kv_cells, self.sequences,
                                                          self.draft_tokens)
        return context

    def _admit(self, waiting: deque[Request], most: int | None = None) -> None:
        """Give each waiting request (the first `most`) a sequence in its case's context, as long as there is room;
        the rest wait."""
        for _ in range(len(waiting) if most is None else min(most, len(waiting))):
            r = waiting.popleft()
            if r.cancelled.is_set():
                r.tokens.put(None)
                continue
            try:
                context = self._context(r.adapter)
                if context in self._running or not self._place(context, r):  # a lane owns a running context
                    waiting.append(r)
            except Exception as exc:
                log.exception("could not start an answer")
                r.tokens.put(exc)

    def _place(self, c: CaseContext, r: Request) -> bool:
        lib, prompt = self._lib, r.prompt
        system = len(c.system) if c.system and prompt[:len(c.system)] == c.system else 0
        # The longest start of this prompt already computed: a conversation kept in its sequence (the same player,
        # one question on), one saved aside, or the case's system prompt.
        idle = [s for s in c.sequences.values() if s.request is None]
        resident = max(idle, key=lambda s: common_prefix(s.tokens, prompt), default=None)
        kept = common_prefix(resident.tokens, prompt) if resident is not None else 0
        key, saved = self._cache.longest(c.adapter, prompt)
        # Only its own conversation goes on in an idle sequence: another one shares the system prompt and the
        # chat template's few tokens after it, and taking its sequence would lose it instead of saving it aside.
        if kept > system + RESTORE_GAIN and kept + RESTORE_GAIN >= saved:
            s, shared = resident, min(resident.shared, kept)
        else:
            # Taken now, not at restoring: making room below saves conversations aside, which can push this one
            # out of the cache.
            s, entry = None, self._cache.get(key) if saved > max(kept, system) + RESTORE_GAIN else None
            if entry and not c.shares(entry):
                entry = None
            shared = entry.shared if entry else system  # a saved state's first cells are sequence 0's, or its own
        if not c.make_room(promised(r, self.draft_tokens) - shared, keep=s, save=self._save):
            return False
        if s is not None:
            common = kept
        else:
            s = c.new_sequence()
            if entry and self._restore(c, s, entry):
                common = len(s.tokens)
                self._cache.discard(key)  # in its sequence again, and saved anew once idle
            elif system:
                lib.llama_memory_seq_cp(c.mem, 0, s.seq, 0, system)
                s.tokens, s.shared, common = list(c.system), system, system
            else:
                common = 0
        common = min(common, len(prompt) - 1)  # at least one token to evaluate, for its logits
        lib.llama_memory_seq_rm(c.mem, s.seq, common, -1)
        del s.tokens[common:]
        s.shared = min(s.shared, common)
        s.start(r, self.n_vocab)
        r.cached_tokens = common
        return True

    def _save(self, c: CaseContext, s: Sequence) -> None:
        """Keep a conversation's KV aside (PrefixCache), so that its sequence can go: only its own cells where its
        first ones are the case's system prompt (sequence 0's, shared again when it comes back, so that a
        conversation back does not bring a copy of them into the KV)."""
        lib, seq, shared = self._lib, s.seq, s.shared
        spare = c.spare_id() if shared else None
        if spare is None:
            shared = 0
        else:  # llama.cpp saves a sequence's cells: a spare one holds the conversation's own, for the moment
            lib.llama_memory_seq_cp(c.mem, s.seq, spare, shared, -1)
            seq = spare
        size = lib.llama_state_seq_get_size(c.ctx, seq)
        data = (ctypes.c_uint8 * size)()
        written = lib.llama_state_seq_get_data(c.ctx, data, size, seq)
        if spare is not None:
            lib.llama_memory_seq_rm(c.mem, spare, -1, -1)
        self._cache.put(c.adapter, s.tokens, Saved(data, written, list(s.tokens), shared), written)

    def _restore(self, c: CaseContext, s: Sequence, entry: Saved) -> bool:
        data, size, tokens, shared = entry
        lib = self._lib
        if not lib.llama_state_seq_set_data(c.ctx, data, size, s.seq):
            lib.llama_memory_seq_rm(c.mem, s.seq, -1, -1)
            return False
        if shared:
            lib.llama_memory_seq_cp(c.mem, 0, s.seq, 0, shared)
        s.tokens, s.shared = list(tokens), shared
        return True

    def _step(self, c: CaseContext, crowded: bool) -> None:
        """One llama_decode of every answering sequence of the context: a chunk of a new prompt, or the last chosen
        token and a guess at the next ones (fewer guesses the more sequences share the pass: docs/speed.md).
        crowded: other contexts have answers in progress too (a long prompt goes in chunks then)."""
        lib, batch = self._lib, c.batch
        for s in [s for s in c.sequences.values() if s.request is not None and s.request.cancelled.is_set()]:
            self._finish(c, s)
        decoding = [s for s in c.sequences.values() if s.request is not None and not s.pending]
        prefilling = [s for s in c.sequences.values() if s.request is not None and s.pending]
        starting = prefilling or any(not s.request.shown for s in decoding)
        budget = STARTING_BUDGET if starting else DRAFT_BUDGET
        guess_len = min(self.draft_tokens, budget // max(len(decoding), 1) - 1)
        plan: list[tuple[Sequence, list[int], int]] = []  # (sequence, tokens evaluated, logits rows)
        for s in decoding:
            r = s.request
            left = r.max_new_tokens - len(s.answer) - 1
            s.guess = r.drafts.guess(s.text, min(guess_len, left)) if r.drafts is not None and guess_len > 0 else []
            r.drafted_tokens += len(s.guess)
            plan.append((s, [s.answer[-1]] + s.guess, 1 + len(s.guess)))
        room = BATCH_TOKENS - sum(len(tokens) for _, tokens, _ in plan)
        for s in prefilling:
            if room <= 0:
                break
            chunk = s.pending[:min(room, PREFILL_CHUNK if decoding or crowded else room)]
            plan.append((s, chunk, int(len(chunk) == len(s.pending))))
            room -= len(chunk)
        if not plan:  # its answers were all cancelled (read to their end): nothing to decode, their KV kept
            return
        n = 0
        for s, tokens, rows in plan:
            for i, token in enumerate(tokens):
                batch.token[n], batch.pos[n], batch.n_seq_id[n], batch.seq_id[n][0] = token, len(s.tokens) + i, 1, s.seq
                batch.logits[n] = i >= len(tokens) - rows
                n += 1
        batch.n_tokens = n
        status = lib.llama_decode(c.ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")
        outputs = sum(rows for _, _, rows in plan)
        logits = np.ctypeslib.as_array(lib.llama_get_logits(c.ctx), shape=(outputs, self.n_vocab)) if outputs else None
        row = 0
        for s, tokens, rows in plan:
            s.tokens += tokens
            if s.pending:
                del s.pending[:len(tokens)]
                self._share_system_prompt(c, s)
            if rows:
                self._choose(c, s, logits[row:row + rows])
            row += rows

    def _share_system_prompt(self, c: CaseContext, s: Sequence) -> None:
        """Once a sequence has computed its case's system prompt, sequence 0 keeps it for the case's next games."""
        r, lib = s.request, self._lib
        n = r.prefix_len
        if not 0 < n < len(r.prompt) or len(s.tokens) < n or c.system == r.prompt[:n]:
            return
        lib.llama_memory_seq_rm(c.mem, 0, -1, -1)
        lib.llama_memory_seq_cp(c.mem, s.seq, 0, 0, n)
        c.system = list(r.prompt[:n])
        for other in c.sequences.values():
            other.shared = 0  # the old system prompt's cells are theirs alone now
        s.shared = n

    def _choose(self, c: CaseContext, s: Sequence, rows: np.ndarray) -> None:
        """The model's own token from each row of logits. Row i holds the logits after guess[:i]: its token stands
        whether or not it matches the guess, and the rows after it count only while it does."""
        r, p = s.request, np.float32(s.request.repetition_penalty)
        start = len(s.tokens) - len(rows)
        done = False
        for i in range(len(rows)):
            logits = rows[i].copy()
            hit = logits[s.seen]
            logits[s.seen] = np.where(hit < 0, hit * p, hit / p)
            token = int(logits.argmax()) if s.rng is None else _sample(logits, s.rng)
            s.seen[token] = True
            s.answer.append(token)
            s.text.append(token)
            if r.first_token is None:
                r.first_token = time.perf_counter()
            r.tokens.put(token)
            r.accepted_tokens += i < len(s.guess) and token == s.guess[i]
            done = token in self.eos or len(s.answer) == r.max_new_tokens or r.cancelled.is_set()
            if done or i == len(s.guess) or token != s.guess[i]:
                break
        if start + i + 1 < len(s.tokens):  # the KV of the rejected guesses goes
            self._lib.llama_memory_seq_rm(c.mem, s.seq, start + i + 1, -1)
            del s.tokens[start + i + 1:]
        if done:
            self._finish(c, s)

    def _finish(self, c: CaseContext, s: Sequence) -> None:
        r = s.request
        s.end()
        r.tokens.put(None)
        if r.background:  # a warm-up has no conversation to continue: its system prompt stays in sequence 0
            c.drop(s)


@dataclass
class _Adapter:
    """A case's weights: its own merged model (lora None), or the base's model with its LoRA applied beside it."""
    model: object
    lora: object | None

    def free(self, lib, base_model) -> None:
        # A LoRA goes with its model (llama.cpp frees a model's adapters with it); only a merged model is the case's.
        if self.model is not base_model:
            lib.llama_model_free(self.model)


def _env_count(name: str) -> int | None:
    """A whole number >= 0 from the environment, None where it is unset."""
    value = os.environ.get(name)
    if not value:
        return None
    if not value.isdigit():
        raise ConfigError(f"{name} must be a whole number, not {value!r}")
    return int(value)


def _free(lib, model, contexts: dict, adapters: dict, lanes: ThreadPoolExecutor) -> None:
    lanes.shutdown(wait=False)
    for context in contexts.values():
        context.close()
    contexts.clear()
    for adapter in adapters.values():
        adapter.free(lib, model)
    adapters.clear()
    lib.llama_model_free(model)


def _sample(logits: np.ndarray, rng) -> int:
    top = np.argpartition(logits, -50)[-50:]  # transformers' sampling defaults: temperature 1, top-k 50
    p = np.exp(logits[top] - logits[top].max())
    return int(top[rng.choice(len(top), p=p / p.sum())])
