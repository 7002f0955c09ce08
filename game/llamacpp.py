"""The CPU engine: the base's own GGUF run by llama.cpp, each case's adapter converted once to a GGUF LoRA.

llama.cpp's Q4_1 kernels read the base as it is stored (the transformers path runs a dequantized fp32 copy of the
same weights), which on a 2-core CPU is ~5x the tokens/s of the torch engine. The adapter is applied beside the base,
unmerged, so the base's weights stay exactly the GGUF's. Decoding is the game's own: greedy with transformers'
repetition penalty over every token seen, so answers match the torch path's up to llama.cpp's arithmetic. Where the
case's own material guesses how an answer goes on (game.drafts), the guess is checked in the same pass as the token
before it (speculative decoding): every token is still the model's choice, ~1.5x as many a second.

One request at a time (a llama.cpp context holds one adapter set); each case's system-prompt KV is kept as a
saved state in memory, and a question that continues a recent conversation reuses all of it.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from game.base import EMBEDDED, Base, cache_dir, embedded_gguf
from game.engine import GROUP_OF, IDLE_POLL_S, PrefixCache, Request, _common_prefix, read_lora, start_worker

log = logging.getLogger(__name__)

LORA_FORMAT = "v1"  # bump when to_gguf_lora changes what it writes
# transformers' projection names -> llama.cpp's tensor names
GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
KV_CACHE_MB = 256  # saved conversations and system prompts (23 kB a token on the 135M base: ~20 conversations)
DRAFT_TOKENS = 5  # a request's guesses (game.drafts) checked at once: measured best on 2 cores, docs/speed.md
RESTORE_GAIN = 16  # restore a saved state only when it saves this many more tokens than the context already has


@contextmanager
def plain_cpu_buffers():
    """Load a model with its weights in plain CPU buffers where this CPU has AMX.

    ggml repacks weights for AMX into an extra buffer type, and its AMX matrix multiply crashes this build
    (llama.cpp issue #20824: a segfault in ggml_backend_amx_mul_mat on the first decode, with or without an adapter).
    llama-cpp-python's Llama takes no `use_extra_bufts`, so the default model parameters it starts from are wrapped
    for the one construction. Elsewhere nothing changes: the Q4_1 base has no other repacked layout on x86.
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


def _permute(w, n_head: int):
    # llama.cpp stores q and k with the rotary halves interleaved (convert_hf_to_gguf's LlamaModel.permute); a
    # LoRA's B writes those rows, so its rows move the same way.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def to_gguf_lora(folder: Path, out: Path, config) -> None:
    """Write a PEFT LoRA folder as a llama.cpp GGUF LoRA (fp32, scaling folded into B), atomically."""
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    i, h = config.intermediate_size, config.hidden_size
    shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
              "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    weights = read_lora(folder, config.num_hidden_layers, shapes)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent)) / out.name
    try:
        writer = gguf.GGUFWriter(str(tmp), "llama")
        writer.add_string("general.type", "adapter")
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 0.0)  # 0: scale 1, the scaling is already in B
        for (layer, name), (a, b) in sorted(weights.items()):
            if name == "q_proj":
                b = _permute(b, config.num_attention_heads)
            elif name == "k_proj":
                b = _permute(b, config.num_key_value_heads)
            base_name = f"blk.{layer}.{GGUF_NAMES[name]}.weight"
            writer.add_tensor(base_name + ".lora_a", a.contiguous().numpy().astype(np.float32))
            writer.add_tensor(base_name + ".lora_b", b.contiguous().numpy().astype(np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def _digest(folder: Path) -> str:
    h = hashlib.sha256(LORA_FORMAT.encode())
    for name in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"):
        if (folder / name).is_file():
            h.update(name.encode() + (folder / name).read_bytes())
    return h.hexdigest()[:16]


def gguf_lora(folder: Path, config) -> Path:
    """The adapter folder as a GGUF LoRA in the cache, converted on first use (config: the base's AutoConfig)."""
    out = cache_dir() / "lora-gguf" / f"{_digest(folder)}.gguf"
    if not out.is_file():
        to_gguf_lora(folder, out, config)
    return out


assert set(GGUF_NAMES) == set(GROUP_OF)


class LlamaCppEngine:
    """A worker thread answering one request at a time with llama.cpp. Thread-safe."""

    def __init__(self, gguf: Path, eos: set[int], config_path: str | None = None, n_ctx: int = 2048,
                 threads: int | None = None, threads_batch: int | None = None, draft_tokens: int | None = None):
        """config_path: the transformers folder of the same base (for the adapters' shapes); default: resolved.
        threads (one token at a time) and threads_batch (prompts): default $IR_THREADS, $IR_THREADS_BATCH, else
        every core. draft_tokens: the most guessed tokens checked in one pass (0: none); default $IR_DRAFT_TOKENS,
        else DRAFT_TOKENS."""
        import llama_cpp

        self._lib = llama_cpp
        self.gguf = gguf
        self.config_path = config_path
        self.eos = eos
        self.max_len = n_ctx
        threads_env, cores = int(os.environ.get("IR_THREADS") or 0), os.cpu_count() or 1
        self.threads = threads or threads_env or cores
        self.threads_batch = threads_batch or int(os.environ.get("IR_THREADS_BATCH") or 0) or threads_env or cores
        env_drafts = os.environ.get("IR_DRAFT_TOKENS")
        self.draft_tokens = draft_tokens if draft_tokens is not None else int(env_drafts or DRAFT_TOKENS)
        with plain_cpu_buffers():
            self.llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=n_ctx, n_batch=512, n_threads=self.threads,
                                       n_threads_batch=self.threads_batch, verbose=False)
        self._config = None
        self._adapters: dict[str, object] = {}  # name -> llama_adapter_lora pointer
        self._current: str | None = None  # adapter set on the context
        self._cache = PrefixCache(KV_CACHE_MB << 20)  # values: (sequence state buffer, its size, tokens)
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[Request] = queue.SimpleQueue()
        self._players: deque[Request] = deque()
        self._warm_ups: deque[Request] = deque()
        start_worker(self, "suspect-llama.cpp")

    def load_adapter(self, name: str, folder: Path) -> None:
        if self._config is None:
            from transformers import AutoConfig

            from game.base import resolve

            self._config = AutoConfig.from_pretrained(self.config_path or resolve(str(self.gguf)).path)
        out = gguf_lora(folder, self._config)
        with self._lock:
            adapter = self._lib.llama_adapter_lora_init(self.llm.model, str(out).encode())
            if not adapter:
                raise ValueError(f"llama.cpp refused the converted adapter {out}")
            self._adapters[name] = adapter
            if self._current == name:
                self._current = None  # set again before the next use
            self._cache.drop(name)
            self._rewind(0)  # the context's KV may have been computed with the old weights

    def submit(self, request: Request) -> Request:
        if len(request.prompt) + request.max_new_tokens > self.max_len:
            raise ValueError(f"prompt of {len(request.prompt)} tokens is too long for a {self.max_len}-token context")
        if request.adapter is not None and request.adapter not in self._adapters:
            raise KeyError(f"no adapter named {request.adapter}")
        self._queue.put(request)
        return request

    def work(self) -> None:
        """Answer the next queued request, if one comes within a moment."""
        waiting = self._players or self._warm_ups
        try:
            item = self._queue.get_nowait() if waiting else self._queue.get(timeout=IDLE_POLL_S)
            while True:
                (self._warm_ups if item.background else self._players).append(item)
                item = self._queue.get_nowait()
        except queue.Empty:
            pass
        if not (self._players or self._warm_ups):
            return
        request = (self._players or self._warm_ups).popleft()  # a player first: a warm-up can wait
        if request.cancelled.is_set():
            request.tokens.put(None)
            return
        try:
            with self._lock:
                self._generate(request)
        except Exception as exc:
            log.exception("generation failed")
            self._rewind(0)
            request.tokens.put(exc)

    def _use_adapter(self, name: str | None) -> None:
        if name == self._current:
            return
        lib = self._lib
        if name is None:
            status = lib.llama_set_adapters_lora(self.llm.ctx, None, 0, None)
        else:
            adapters = (lib.llama_adapter_lora_p_ctypes * 1)(self._adapters[name])
            status = lib.llama_set_adapters_lora(self.llm.ctx, adapters, 1, (ctypes.c_float * 1)(1.0))
        if status != 0:
            raise RuntimeError(f"llama.cpp could not apply adapter {name}")
        self._current = name
        self._rewind(0)  # the cached KV belongs to the other adapter

    def _rewind(self, n: int) -> None:
        self.llm._ctx.kv_cache_seq_rm(0, n, -1)
        self.llm.n_tokens = n

    def _save(self, adapter: str | None, pin: bool = False) -> tuple:
        """Keep the context's KV (sequence 0: all there is) under its tokens (pin: a system prompt; PrefixCache)."""
        lib, ctx = self._lib, self.llm.ctx
        size = lib.llama_state_seq_get_size(ctx, 0)
        data = (ctypes.c_uint8 * size)()
        written = lib.llama_state_seq_get_data(ctx, data, size, 0)
        tokens = self.llm.input_ids[:self.llm.n_tokens].tolist()
        value = (data, written, tokens)
        self._cache.put(adapter, tokens, value, written, pin)
        return value

    def _restore(self, key: tuple) -> int:
        data, size, tokens = self._cache.get(key)
        self._rewind(0)
        if not self._lib.llama_state_seq_set_data(self.llm.ctx, data, size, 0):
            self._rewind(0)
            return 0
        self.llm.input_ids[:len(tokens)] = tokens
        self.llm.n_tokens = len(tokens)
        return len(tokens)

    def _logits(self) -> np.ndarray:
        pointer = self._lib.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(pointer, shape=(self.llm.n_vocab(),)).copy()

    def _check(self, tokens: list[int]) -> np.ndarray:
        """Evaluate tokens at the context's end; the logits after each of them, one row each (a draft's check reads
        every row, which Llama.eval does not return without keeping every logit of the context)."""
        llm = self.llm
        start = llm.n_tokens
        llm._batch.set_batch(batch=tokens, n_past=start, logits_all=True)
        llm._ctx.decode(llm._batch)
        llm.input_ids[start:start + len(tokens)] = tokens
        llm.n_tokens += len(tokens)
        return np.ctypeslib.as_array(self._lib.llama_get_logits(llm.ctx), shape=(len(tokens), llm.n_vocab())).copy()

    def _generate(self, r: Request) -> None:
        llm = self.llm
        self._use_adapter(r.adapter)
        prompt = r.prompt
        # The longest prefix already in the context (the same conversation, one question on), or saved.
        common = _common_prefix(llm.input_ids[:llm.n_tokens].tolist(), prompt)
        key, saved = self._cache.longest(r.adapter, prompt)
        system = 0 < r.prefix_len < len(prompt)
        if saved > common + RESTORE_GAIN:
            common = saved if self._restore(key) else 0
        common = min(common, len(prompt) - 1)  # at least one token to evaluate, for its logits
        self._rewind(common)
        r.cached_tokens = common
        if system and common < r.prefix_len:
            llm.eval(prompt[common:r.prefix_len])  # the case's system prompt alone, kept for its other players
            self._save(r.adapter, pin=True)
            common = r.prefix_len
        llm.eval(prompt[common:])
        seen = np.zeros(llm.n_vocab(), dtype=bool)
        seen[prompt] = True
        p = np.float32(r.repetition_penalty)
        rng = np.random.default_rng() if r.do_sample else None
        text = list(prompt)
        rows, guess = self._logits()[None], []
        while True:
            start = llm.n_tokens - len(rows)
            # Row i holds the logits after guess[:i]: its token is the model's own whether or not it matches the
            # guess, and the rows after it count only while it does.
            for i, logits in enumerate(rows):
                hit = logits[seen]
                logits[seen] = np.where(hit < 0, hit * p, hit / p)
                token = int(logits.argmax()) if rng is None else _sample(logits, rng)
                seen[token] = True
                text.append(token)
                if r.first_token is None:
                    r.first_token = time.perf_counter()
                r.tokens.put(token)
                r.accepted_tokens += i < len(guess) and token == guess[i]
                done = token in self.eos or len(text) - len(prompt) == r.max_new_tokens or r.cancelled.is_set()
                if done or i == len(guess) or token != guess[i]:
                    break
            self._rewind(start + i + 1)  # the KV of the rejected guesses goes
            if done:
                break
            left = r.max_new_tokens - (len(text) - len(prompt)) - 1
            guess = r.drafts.guess(text, min(self.draft_tokens, left)) if r.drafts is not None else []
            r.drafted_tokens += len(guess)
            rows = self._check([token] + guess)
        r.tokens.put(None)
        if not r.background:  # a warm-up has no conversation to continue: its system prompt is saved above
            self._save(r.adapter)  # the conversation so far, for its next question


def _sample(logits: np.ndarray, rng) -> int:
    top = np.argpartition(logits, -50)[-50:]  # transformers' sampling defaults: temperature 1, top-k 50
    p = np.exp(logits[top] - logits[top].max())
    return int(top[rng.choice(len(top), p=p / p.sum())])
