"""Generation for every player at once on one torch model: one base, every case's LoRA stacked beside it.

The torch path of `game.suspect` (a GPU; a CPU without llama.cpp). One worker thread owns the model. Requests from
all players queue up, are prefilled together, then decoded together: one token per step for every active player,
each row of the batch at its own position, with its own case's adapter and its own stop. The adapters' A and B
matrices are stacked along a slot axis and each row gathers its own (the batched-LoRA idea of S-LoRA and punica),
so a batch mixes cases without merging weights or splitting the batch. The KV of each case's system prompt is kept
and copied into a new request's row instead of being computed again.

On CUDA each decode step is replayed as a CUDA graph, one per (batch, length) bucket, optionally of a torch.compile'd
step; on a CPU it runs eagerly. Each falls back to plain eager torch where it fails.
"""

from __future__ import annotations

import atexit
import logging
import math
import queue
import re
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# Projections that carry a LoRA, fused into one matrix per group: one matmul reads q, k and v (gate and up) at once.
GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"),
          "down": ("down_proj",)}
GROUP_OF = {name: (group, i) for group, names in GROUPS.items() for i, name in enumerate(names)}
_LORA_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
LENGTH_BUCKET = 256  # the decode step attends over a multiple of this, not over the whole cache


class AdapterError(ValueError):
    """An adapter folder this engine cannot apply."""


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
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


class PrefixCache:
    """KV already computed for token sequences (a case's system prompt; a conversation so far, answer included),
    per adapter, least recently used first out within a byte budget. A prompt reuses its longest cached prefix:
    the next question of a conversation recomputes only the cleaned answer's tail and the new question.

    Lookup goes through chained hashes of 16-token blocks (as vLLM's prefix caching does), not a scan of entries."""

    BLOCK = 16

    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self.used = 0
        self._entries: OrderedDict[tuple, tuple[object, int, list]] = OrderedDict()  # key -> (kv, bytes, hashes)
        self._index: dict[tuple, tuple] = {}  # (adapter, hash of the first i blocks) -> the newest entry with them

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
            key = self._index.get((adapter, hashes[blocks - 1]))
            n = blocks * self.BLOCK
            if key is not None and key in self._entries and key[1][:n] == tuple(tokens[:n]):
                return key, n + _common_prefix(key[1][n:], tokens[n:])
        return None, 0

    def get(self, key: tuple):
        self._entries.move_to_end(key)
        return self._entries[key][0]

    def put(self, adapter: str | None, tokens: list[int], kv, nbytes: int) -> None:
        key = (adapter, tuple(tokens))
        if key in self._entries or nbytes > self.budget or len(tokens) < self.BLOCK:
            return
        hashes = self._hashes(tokens)
        self._entries[key] = (kv, nbytes, hashes)
        self.used += nbytes
        for h in hashes:
            self._index[adapter, h] = key
        while self.used > self.budget:
            self._remove(next(iter(self._entries)))

    def _remove(self, key: tuple) -> None:
        _, nbytes, hashes = self._entries.pop(key)
        self.used -= nbytes
        for h in hashes:
            if self._index.get((key[0], h)) == key:
                del self._index[key[0], h]

    def drop(self, adapter: str | None) -> None:
        for key in [k for k in self._entries if k[0] == adapter]:
            self._remove(key)


def _common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def read_lora(folder: Path, layers: int, shapes: dict[str, tuple[int, int]]) -> dict[tuple[int, str], tuple]:
    """A PEFT LoRA folder as {(layer, projection): (A [r, in], B [out, r] times its scaling)}, fp32 on the CPU."""
    from peft import PeftConfig
    from peft.utils import load_peft_weights
    from peft.utils.other import get_pattern_key

    config = PeftConfig.from_pretrained(str(folder))
    unsupported = [what for what, present in [
        (f"type {config.peft_type}", str(config.peft_type) not in ("LORA", "PeftType.LORA")),
        ("DoRA", getattr(config, "use_dora", False)), (f"bias={getattr(config, 'bias', 'none')}",
                                                       getattr(config, "bias", "none") != "none"),
        ("modules_to_save", bool(getattr(config, "modules_to_save", None))),
        ("trainable tokens", bool(getattr(config, "trainable_token_indices", None)))] if present]
    if unsupported:
        raise AdapterError(f"{folder}: {', '.join(unsupported)} is not supported by the batched engine")
    tensors = load_peft_weights(str(folder), device="cpu")
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        match = _LORA_KEY.search(key)
        if not match or match.group(2) not in GROUP_OF or int(match.group(1)) >= layers:
            raise AdapterError(f"{folder}: unexpected tensor {key}")
        pairs.setdefault((int(match.group(1)), match.group(2)), {})[match.group(3)] = value.float()
    out = {}
    for (layer, name), ab in pairs.items():
        a, b = ab.get("A"), ab.get("B")
        fan_in, fan_out = shapes[name]
        if a is None or b is None or a.shape[1] != fan_in or b.shape[0] != fan_out or a.shape[0] != b.shape[1]:
            raise AdapterError(f"{folder}: layer {layer} {name} has shapes that do not fit the base")
        rank = a.shape[0]
        module = f"model.layers.{layer}.{'self_attn' if name in GROUPS['qkv'] + GROUPS['o'] else 'mlp'}.{name}"
        alpha = config.lora_alpha
        if config.alpha_pattern:
            pattern = get_pattern_key(config.alpha_pattern.keys(), module)
            alpha = config.alpha_pattern.get(pattern, alpha)
        scaling = alpha / math.sqrt(rank) if config.use_rslora else alpha / rank
        out[layer, name] = (a, b * scaling if scaling != 1 else b)
    if not out:
        raise AdapterError(f"{folder}: no LoRA weights")
    return out


class _Model(torch.nn.Module):
    """The base's weights in fused form, the stacked adapters, the KV cache and the per-row state, as buffers."""

    def __init__(self, hf_model, max_batch: int, max_len: int):
        super().__init__()
        config = hf_model.config
        inner = hf_model.model
        weight = inner.embed_tokens.weight
        self.dtype, self.device = weight.dtype, weight.device
        self.n_layers = config.num_hidden_layers
        self.n_heads, self.n_kv = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.eps = config.rms_norm_eps
        self.act = inner.layers[0].mlp.act_fn
        self.max_batch, self.max_len = max_batch, max_len
        buf = lambda name, t: self.register_buffer(name, t, persistent=False)  # noqa: E731
        buf("embed", weight.detach())
        buf("lm_head", hf_model.lm_head.weight.detach())
        buf("norm", inner.norm.weight.detach())
        self.shapes: dict[str, tuple[int, int]] = {}
        self.outs: dict[str, list[int]] = {}
        for i, layer in enumerate(inner.layers):
            for group, names in GROUPS.items():
                parent = layer.self_attn if group in ("qkv", "o") else layer.mlp
                mods = [getattr(parent, n) for n in names]
                buf(f"w_{group}_{i}", torch.cat([m.weight.detach() for m in mods]))
                if mods[0].bias is not None:
                    buf(f"b_{group}_{i}", torch.cat([m.bias.detach() for m in mods]))
                for n, m in zip(names, mods):
                    self.shapes[n] = (m.in_features, m.out_features)
                self.outs[group] = [m.out_features for m in mods]
            buf(f"ln1_{i}", layer.input_layernorm.weight.detach())
            buf(f"ln2_{i}", layer.post_attention_layernorm.weight.detach())
        # cos/sin for every position, from the model's own rotary module (whatever its RoPE scaling)
        positions = torch.arange(max_len, device=self.device)[None]
        cos, sin = inner.rotary_emb(weight[:1][None], positions)
        buf("cos", cos[0])
        buf("sin", sin[0])
        shape = (max_batch, self.n_kv, max_len, self.head_dim)
        for i in range(self.n_layers):
            buf(f"k_{i}", torch.zeros(shape, dtype=self.dtype, device=self.device))
            buf(f"v_{i}", torch.zeros(shape, dtype=self.dtype, device=self.device))
        buf("seen", torch.zeros(max_batch, weight.shape[0], dtype=torch.bool, device=self.device))
        self.rank = 0  # padded LoRA rank of the stacks; 0: no adapter loaded, no LoRA work at all
        self.adapters: dict[str, dict] = {}  # name -> read_lora() output
        self.slots: dict[str, int] = {}  # name -> slot in the stacks (slot 0: no adapter)

    # --- adapters -------------------------------------------------------------------------------------------------

    def set_adapter(self, name: str, weights: dict) -> None:
        self.adapters[name] = weights
        self.slots = {n: i + 1 for i, n in enumerate(self.adapters)}
        rank = max(a.shape[0] for w in self.adapters.values() for a, _ in w.values())
        self.rank = rank
        n_slots = len(self.adapters) + 1
        for group, names in GROUPS.items():
            fan_in = self.shapes[names[0]][0]
            outs = self.outs[group]
            for layer in range(self.n_layers):
                a_stack = torch.zeros(n_slots, len(names) * rank, fan_in)
                b_stack = torch.zeros(n_slots, sum(outs), len(names) * rank)
                for slot, w in enumerate(self.adapters.values(), start=1):
                    row = 0
                    for j, n in enumerate(names):
                        if (layer, n) in w:
                            a, b = w[layer, n]
                            a_stack[slot, j * rank:j * rank + a.shape[0]] = a
                            b_stack[slot, row:row + outs[j], j * rank:j * rank + a.shape[0]] = b
                        row += outs[j]
                # B is block-diagonal: each projection's output reads only its own A's rows
                self.register_buffer(f"la_{group}_{layer}", a_stack.to(self.device, self.dtype), persistent=False)
                self.register_buffer(f"lb_{group}_{layer}", b_stack.to(self.device, self.dtype), persistent=False)

    # --- the forward ----------------------------------------------------------------------------------------------

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype  # the same arithmetic as transformers' LlamaRMSNorm
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return w * h.to(dtype)

    def _proj(self, x: torch.Tensor, group: str, layer: int, slots: torch.Tensor | None) -> torch.Tensor:
        y = F.linear(x, getattr(self, f"w_{group}_{layer}"), getattr(self, f"b_{group}_{layer}", None))
        if slots is not None:
            a = getattr(self, f"la_{group}_{layer}")[slots]  # [B, k*r, in]: each row its own case's adapter
            b = getattr(self, f"lb_{group}_{layer}")[slots]  # [B, out, k*r]
            y = y + torch.bmm(torch.bmm(x, a.transpose(1, 2)), b.transpose(1, 2))
        return y

    def forward(self, tokens: torch.Tensor, pos0: torch.Tensor, rows: torch.Tensor | None, slots: torch.Tensor | None,
                last: torch.Tensor, kv_len: int) -> torch.Tensor:
        """Run tokens [B, M] of rows `rows` (None: rows 0..B-1) from positions pos0 [B]; write their KV; return the
        logits [B, V] (fp32) at index `last` [B] of each row. Attention reads the first kv_len cached positions."""
        batch, m = tokens.shape
        positions = pos0[:, None] + torch.arange(m, device=tokens.device)  # [B, M]
        positions = positions.clamp(max=self.max_len - 1)  # padding past a short row's end
        cos = self.cos[positions].unsqueeze(1)  # [B, 1, M, D]
        sin = self.sin[positions].unsqueeze(1)
        allowed = torch.arange(kv_len, device=tokens.device)[None, None, None, :] <= positions[:, None, :, None]
        index_rows = torch.arange(batch, device=tokens.device) if rows is None else rows
        h = self.embed[tokens]
        nq, nkv, d = self.n_heads * self.head_dim, self.n_kv * self.head_dim, self.head_dim
        for i in range(self.n_layers):
            x = self._rms(h, getattr(self, f"ln1_{i}"))
            q, k, v = self._proj(x, "qkv", i, slots).split([nq, nkv, nkv], dim=-1)
            q = q.view(batch, m, -1, d).transpose(1, 2)
            k = k.view(batch, m, -1, d).transpose(1, 2)
            v = v.view(batch, m, -1, d).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            kc, vc = getattr(self, f"k_{i}"), getattr(self, f"v_{i}")
            kc[index_rows[:, None], :, positions] = k.transpose(1, 2)
            vc[index_rows[:, None], :, positions] = v.transpose(1, 2)
            keys = kc[:batch, :, :kv_len] if rows is None else kc[rows, :, :kv_len]
            values = vc[:batch, :, :kv_len] if rows is None else vc[rows, :, :kv_len]
            attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed, scale=d ** -0.5,
                                                  enable_gqa=self.n_kv != self.n_heads)
            h = h + self._proj(attn.transpose(1, 2).reshape(batch, m, nq), "o", i, slots)
            x = self._rms(h, getattr(self, f"ln2_{i}"))
            gate, up = self._proj(x, "gate_up", i, slots).chunk(2, dim=-1)
            h = h + self._proj(self.act(gate) * up, "down", i, slots)
        h = h[torch.arange(batch, device=h.device), last]  # [B, H]: only the last token's logits are needed
        return F.linear(self._rms(h, self.norm), self.lm_head).float()

    def pick(self, logits: torch.Tensor, penalty: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Repetition penalty over every token the row has seen (as transformers applies it), then greedy."""
        p = penalty[:, None]
        scores = torch.where(self.seen[:batch], torch.where(logits < 0, logits * p, logits / p), logits)
        return scores, scores.argmax(-1)

    def decode(self, tokens, pos, slots, penalty, kv_len: int):
        """One decode step of rows 0..B-1: the compiled (CUDA-graphed) unit."""
        batch = tokens.shape[0]
        logits = self.forward(tokens[:, None], pos, None, slots, torch.zeros_like(pos), kv_len)
        scores, greedy = self.pick(logits, penalty, batch)
        return scores, greedy


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _bucket(n: int, buckets) -> int:
    return next(b for b in buckets if b >= n)


IDLE_POLL_S = 0.5  # an idle worker looks this often whether its engine is still wanted
_engines: weakref.WeakSet = weakref.WeakSet()
_workers: set[threading.Thread] = set()
_exiting = threading.Event()


def start_worker(engine, name: str) -> None:
    """Run engine.work() in a daemon thread that holds the engine only weakly, so that a dropped Suspect (tests make
    many) is freed with its model, and that ends before the interpreter does: a thread killed inside torch's C++
    (freeing a model, say) aborts the process."""
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
        for r in list(getattr(engine, "_rows", [])) + list(getattr(engine, "_waiting", [])):
            if r is not None:
                r.cancelled.set()
    for thread in list(_workers):
        thread.join(timeout=30)


class BatchedEngine:
    """A worker thread generating for every queued request, batched. Thread-safe."""

    def __init__(self, hf_model, eos: set[int], max_batch: int = 1, max_len: int = 2048, compile: bool = False,
                 cuda_graphs: bool | None = None, kv_cache_mb: int | None = None):
        self.model = _Model(hf_model, max_batch, max_len)
        self.eos = eos
        self.device = self.model.device
        # CUDA graphs of the eager step remove the per-kernel launch cost that bounds single-stream decoding on a
        # GPU; torch.compile on top is opt-in (benchmarks/serve_gpu.py measures both).
        self.compile = compile
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self.buckets = [b for b in BATCH_BUCKETS if b < max_batch] + [max_batch]
        self._decode, self._prefill = self.model.decode, self.model.forward
        if self.compile:  # one compilation for every batch and length (dynamic); CUDA graphs are ours (below)
            self._decode = torch.compile(self.model.decode, dynamic=True)
            self._prefill = torch.compile(self.model.forward, dynamic=True)
        self._graphs: dict[tuple, dict] = {}  # (batch, kv_len, with adapters) -> captured decode step
        self._pool = None
        self._queue: queue.SimpleQueue[Request] = queue.SimpleQueue()
        self._lock = threading.Lock()  # the worker's step vs. load_adapter
        self._rows: list[Request | None] = [None] * max_batch
        self._state: dict[Request, dict] = {}
        if kv_cache_mb is None:
            kv_cache_mb = 4096 if self.device.type == "cuda" else 256
        self._cache = PrefixCache(kv_cache_mb << 20)
        self._waiting: list[Request] = []
        start_worker(self, "suspect-engine")

    @property
    def max_len(self) -> int:
        return self.model.max_len

    def load_adapter(self, name: str, folder: Path) -> None:
        weights = read_lora(folder, self.model.n_layers, self.model.shapes)
        with self._lock:
            self.model.set_adapter(name, weights)
            self._graphs.clear()  # they read the old stacks
            self._cache.drop(name)

    def submit(self, request: Request) -> Request:
        if len(request.prompt) + request.max_new_tokens > self.max_len:
            raise ValueError(f"prompt of {len(request.prompt)} tokens is too long for a {self.max_len}-token cache")
        if request.adapter is not None and request.adapter not in self.model.slots:
            raise KeyError(f"no adapter named {request.adapter}")
        self._queue.put(request)
        return request

    # --- the worker -----------------------------------------------------------------------------------------------

    def work(self) -> None:
        """Admit what is queued and run one decode step; when idle, wait a moment for work."""
        active = any(r is not None for r in self._rows)
        try:
            first = self._queue.get(timeout=IDLE_POLL_S) if not active and not self._waiting else self._queue.get_nowait()
            self._waiting.append(first)
            while True:
                self._waiting.append(self._queue.get_nowait())
        except queue.Empty:
            pass
        if self._waiting or active:
            try:
                with self._lock, torch.inference_mode():
                    self._admit()
                    if any(r is not None for r in self._rows):
                        self._step()
            except Exception as exc:  # fail every request in flight rather than hang the players
                log.exception("generation failed")
                for r in [r for r in self._rows if r is not None] + self._waiting:
                    r.tokens.put(exc)
                self._rows = [None] * len(self._rows)
                self._waiting, self._state = [], {}

    def _finish(self, request: Request, row: int | None) -> None:
        request.tokens.put(None)
        state = self._state.pop(request, None)
        if row is not None:
            self._rows[row] = None
            if state is not None and not request.background:  # the conversation so far, for its next question
                self._keep(row, request.adapter, (request.prompt + state["tokens"])[:state["pos"]])

    def _keep(self, row: int, adapter: str | None, tokens: list[int]) -> None:
        n, model = len(tokens), self.model
        kv = [(getattr(model, f"k_{i}")[row, :, :n].clone(), getattr(model, f"v_{i}")[row, :, :n].clone())
              for i in range(model.n_layers)]
        self._cache.put(adapter, tokens, kv, sum(k.nbytes + v.nbytes for k, v in kv))

    def _admit(self) -> None:
        """Prefill waiting requests into free rows (all in one batch), and emit their first tokens."""
        for r in [r for r in self._waiting if r.cancelled.is_set()]:
            self._waiting.remove(r)
            self._finish(r, None)
        free = [i for i, r in enumerate(self._rows) if r is None]
        admitted = list(zip(free, self._waiting))
        if not admitted:
            return
        self._waiting = self._waiting[len(admitted):]
        model, dev = self.model, self.device
        starts = []
        for row, r in admitted:
            key, start = self._cache.longest(r.adapter, r.prompt)
            start = min(start, len(r.prompt) - 1)  # at least one token to run, for its logits
            if key is not None and start > 0:
                for i, (k, v) in enumerate(self._cache.get(key)):
                    getattr(model, f"k_{i}")[row, :, :start] = k[:, :start]
                    getattr(model, f"v_{i}")[row, :, :start] = v[:, :start]
            r.cached_tokens = start
            starts.append(start)
            model.seen[row] = False
            model.seen[row, torch.tensor(r.prompt, device=dev)] = True
        longest = max(len(r.prompt) - s for (_, r), s in zip(admitted, starts))
        tokens = torch.zeros(len(admitted), longest, dtype=torch.long)
        for j, ((_, r), s) in enumerate(zip(admitted, starts)):
            tokens[j, :len(r.prompt) - s] = torch.tensor(r.prompt[s:])
        rows = torch.tensor([row for row, _ in admitted], device=dev)
        pos0 = torch.tensor(starts, device=dev)
        last = torch.tensor([len(r.prompt) - s - 1 for (_, r), s in zip(admitted, starts)], device=dev)
        slots = self._slots([r for _, r in admitted])
        kv_len = max(len(r.prompt) for _, r in admitted)
        logits = self._fallible("_prefill", tokens.to(dev), pos0, rows, slots, last, kv_len)
        penalty = torch.tensor([r.repetition_penalty for _, r in admitted], device=dev)
        p = penalty[:, None]
        scores = torch.where(model.seen[rows], torch.where(logits < 0, logits * p, logits / p), logits)
        for (row, r), s in zip(admitted, starts):
            if 0 < r.prefix_len < len(r.prompt) and s < r.prefix_len:
                self._keep(row, r.adapter, r.prompt[:r.prefix_len])
        chosen = self._choose(scores, [r for _, r in admitted])
        model.seen[rows, chosen] = True
        next_tokens = chosen.tolist()
        for j, (row, r) in enumerate(admitted):
            self._rows[row] = r
            self._state[r] = {"pos": len(r.prompt), "n": 0, "tokens": []}
            self._emit(row, r, next_tokens[j])

    def _slots(self, requests: list[Request | None]) -> torch.Tensor | None:
        if not self.model.rank:
            return None
        return torch.tensor([self.model.slots.get(r.adapter, 0) if r is not None else 0 for r in requests],
                            device=self.device)

    def _choose(self, scores: torch.Tensor, requests: list[Request | None]) -> torch.Tensor:
        chosen = scores.argmax(-1)
        for j, r in enumerate(requests):
            if r is not None and r.do_sample:  # transformers' sampling defaults: temperature 1, top-k 50
                top = scores[j].topk(50)
                chosen[j] = top.indices[torch.multinomial(top.values.softmax(-1), 1)]
        return chosen

    def _emit(self, row: int, r: Request, token: int) -> None:
        state = self._state[r]
        state["n"] += 1
        state["last"] = token
        state["tokens"].append(token)
        if r.first_token is None:
            r.first_token = time.perf_counter()
        r.tokens.put(token)
        if token in self.eos or state["n"] >= r.max_new_tokens or r.cancelled.is_set():
            self._finish(r, row)

    def _step(self) -> None:
        model, dev = self.model, self.device
        top = max(i for i, r in enumerate(self._rows) if r is not None) + 1
        batch = _bucket(top, self.buckets)
        rows = self._rows[:batch] + [None] * (batch - len(self._rows[:batch]))
        tokens = torch.tensor([self._state[r]["last"] if r is not None else 0 for r in rows], device=dev)
        pos = torch.tensor([self._state[r]["pos"] if r is not None else 0 for r in rows], device=dev)
        penalty = torch.tensor([r.repetition_penalty if r is not None else 1.0 for r in rows], device=dev)
        longest = max(self._state[r]["pos"] for r in rows if r is not None) + 1
        kv_len = min(-(-longest // LENGTH_BUCKET) * LENGTH_BUCKET, model.max_len)
        scores, greedy = self._decode_step(tokens, pos, self._slots(rows), penalty, kv_len)
        chosen = self._choose(scores, rows) if any(r is not None and r.do_sample for r in rows) else greedy
        model.seen[torch.arange(batch, device=dev), chosen] = True  # free rows mark garbage: reset on admission
        chosen = chosen.tolist()
        for row, r in enumerate(rows):
            if r is not None:
                self._state[r]["pos"] += 1
                self._emit(row, r, chosen[row])

    # --- compilation and CUDA graphs, each falling back to plain eager torch if it fails here ---------------------

    def _fallible(self, name: str, *args):
        fn, eager = getattr(self, name), getattr(self.model, "forward" if name == "_prefill" else "decode")
        try:
            return fn(*args)
        except Exception:
            if fn is eager:
                raise
            log.exception("torch.compile failed for %s: running it eagerly", name)
            setattr(self, name, eager)
            return eager(*args)

    def _decode_step(self, tokens, pos, slots, penalty, kv_len: int):
        if not self.cuda_graphs:
            return self._fallible("_decode", tokens, pos, slots, penalty, kv_len)
        key = (tokens.shape[0], kv_len, slots is not None)
        graph = self._graphs.get(key)
        if graph is None:
            try:
                graph = self._graphs[key] = self._capture(tokens, pos, slots, penalty, kv_len)
            except Exception:
                if self._decode is not self.model.decode:  # the compiled step would not capture: the eager one may
                    log.exception("CUDA graph capture of the compiled step failed: capturing the eager step")
                    self._decode = self.model.decode
                    return self._decode_step(tokens, pos, slots, penalty, kv_len)
                log.exception("CUDA graph capture failed: decoding without graphs")
                self.cuda_graphs = False
                return self._decode(tokens, pos, slots, penalty, kv_len)
        for name, value in (("tokens", tokens), ("pos", pos), ("slots", slots), ("penalty", penalty)):
            if value is not None:
                graph[name].copy_(value)
        graph["graph"].replay()
        return graph["scores"], graph["greedy"]

    def _capture(self, tokens, pos, slots, penalty, kv_len: int) -> dict:
        """Record one decode step of this batch and length as a CUDA graph. The warm-up runs are the real step
        (these inputs, these rows): they write the same KV the step itself writes, so capturing mid-serving is safe."""
        static = {"tokens": tokens.clone(), "pos": pos.clone(), "penalty": penalty.clone(),
                  "slots": None if slots is None else slots.clone()}
        args = (static["tokens"], static["pos"], static["slots"], static["penalty"], kv_len)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._fallible("_decode", *args)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._pool):
            scores, greedy = self._decode(*args)
        return static | {"graph": graph, "scores": scores, "greedy": greedy}
