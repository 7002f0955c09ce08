"""Generation for every player at once on one torch model: one base, every case's LoRA stacked beside it.

The torch path of `game.suspect` (a GPU; a CPU without llama.cpp). One worker thread owns the model. Requests from
all players queue up, are prefilled together, then decoded together: one token per step for every active player,
each row of the batch at its own position, with its own case's adapter and its own stop. Every adapter's A rows sit
below the base's in each fused weight and each row keeps its own adapter's part (the batched-LoRA idea of S-LoRA
and punica), so a batch mixes cases without splitting it; a step serving one case alone runs that case's adapter
merged into the base. The KV of each case's system prompt (and of each conversation so far) is kept and copied
into a new request's row instead of being computed again.

On CUDA each decode step (and each question's prefill) is replayed as a CUDA graph, one per (batch, length, mode)
bucket, of a torch.compile'd layer, and each step is launched before the previous step's tokens are handed out: each
row's next token and position stay on the GPU, where the step writes them. On a CPU it all runs eagerly, one step
after the other. Each falls back to plain eager torch where it fails.
"""

from __future__ import annotations

import functools
import logging
import math
import queue
import re
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from game.serving import IDLE_POLL_S, PrefixCache, Request, start_worker

log = logging.getLogger(__name__)

# Projections that carry a LoRA, fused into one matrix per group: one matmul reads q, k and v (gate and up) at once.
GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"),
          "down": ("down_proj",)}
GROUP_OF = {name: (group, i) for group, names in GROUPS.items() for i, name in enumerate(names)}
_LORA_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
LENGTH_BUCKET = 256  # the decode step attends over a multiple of this, not over the whole cache
PREFILL_BUCKET = 16  # a prefill runs a multiple of this many tokens per row (the padding's KV is never attended)
PREFILL_GRAPH_TOKENS = 64  # prefills up to this many tokens a row (a question; not a system prompt) replay graphs,
PREFILL_GRAPH_BUCKET = 32  # padded to a multiple of this: with the batch buckets, a few dozen graphs serve them all


class AdapterError(ValueError):
    """An adapter folder this engine cannot apply."""


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
    """The base's weights in fused form, the adapters, the KV cache and the per-row state, as buffers.

    Each fused projection weight w_<group>_<layer> holds the base's rows and, below them, every loaded adapter's A
    rows, so one matmul gives both the base output and every adapter's LoRA input; a per-row mask keeps the row's
    own adapter's part, and lb_<group>_<layer> (every adapter's B, side by side) adds it back. Where a step serves
    one adapter only (one player, say), m_<group>_<layer> hold that adapter merged into the base and the step runs
    with no LoRA work at all."""

    def __init__(self, hf_model, max_batch: int, max_len: int, merge: bool):
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
        self.merge = merge
        buf = lambda name, t: self.register_buffer(name, t, persistent=False)  # noqa: E731
        self._buf = buf
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
        # cos/sin for every position, from the model's own rotary module (whatever its RoPE scaling); sin's first
        # half negated, so that x * cos + roll(x) * sin is transformers' x * cos + rotate_half(x) * sin
        positions = torch.arange(max_len, device=self.device)[None]
        cos, sin = inner.rotary_emb(weight[:1][None], positions)
        half = self.head_dim // 2
        buf("cos", cos[0])
        buf("sin", torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1))
        # every layer's KV in one tensor: a row's cached prefix is copied in (and kept) in one operation, not 2 a layer.
        # One row more than the batch: the filler entries of a prefill padded to a batch bucket write there.
        self.scratch = max_batch
        rows, dev = max_batch + 1, self.device
        shape = (self.n_layers, rows, self.n_kv, max_len, self.head_dim)
        buf("keys", torch.zeros(shape, dtype=self.dtype, device=dev))
        buf("values", torch.zeros(shape, dtype=self.dtype, device=dev))
        # Each row's state between steps lives on the device, where the step itself updates it, so that the next
        # step can be launched before this one's tokens have been read back: the token to feed next, its position,
        # every token seen (for the repetition penalty), and the row's own settings.
        buf("next_token", torch.zeros(rows, dtype=torch.long, device=dev))
        buf("position", torch.zeros(rows, dtype=torch.long, device=dev))
        buf("seen", torch.zeros(rows, weight.shape[0], dtype=torch.bool, device=dev))
        buf("penalty", torch.ones(rows, device=dev))
        buf("slot", torch.zeros(rows, dtype=torch.long, device=dev))
        buf("sample", torch.zeros(rows, dtype=torch.bool, device=dev))
        self.rank = 0  # padded LoRA rank of the stacks; 0: no adapter loaded, no LoRA work at all
        self.adapters: dict[str, dict] = {}  # name -> read_lora() output
        self.slots: dict[str, int] = {}  # name -> slot in the stacks (slot 0: no adapter)
        self.merged: str | None = None  # the adapter m_* hold

    def width(self, group: str) -> int:
        return sum(self.outs[group])

    # --- adapters -------------------------------------------------------------------------------------------------

    def set_adapter(self, name: str, weights: dict) -> None:
        self.adapters[name] = weights
        self.slots = {n: i + 1 for i, n in enumerate(self.adapters)}
        rank = self.rank = max(a.shape[0] for w in self.adapters.values() for a, _ in w.values())
        n = len(self.adapters)
        for group, names in GROUPS.items():
            k, outs, width = len(names), self.outs[group], self.width(group)
            mask = torch.zeros(n + 1, n * k * rank)  # slot -> the columns of its own adapter
            for slot in range(1, n + 1):
                mask[slot, (slot - 1) * k * rank:slot * k * rank] = 1
            self._buf(f"lm_{group}", mask.to(self.device, self.dtype))
            for layer in range(self.n_layers):
                a_all = torch.zeros(n * k * rank, self.shapes[names[0]][0])
                b_all = torch.zeros(width, n * k * rank)  # block-diagonal: each output reads its own A's rows only
                for slot, w in enumerate(self.adapters.values()):
                    row = 0
                    for j, proj in enumerate(names):
                        if (layer, proj) in w:
                            a, b = w[layer, proj]
                            col = (slot * k + j) * rank
                            a_all[col:col + a.shape[0]] = a
                            b_all[row:row + outs[j], col:col + a.shape[0]] = b
                        row += outs[j]
                fused = getattr(self, f"w_{group}_{layer}")
                self._buf(f"w_{group}_{layer}", torch.cat([fused[:width], a_all.to(self.device, self.dtype)]))
                if (bias := getattr(self, f"b_{group}_{layer}", None)) is not None:
                    self._buf(f"b_{group}_{layer}", F.pad(bias[:width], (0, n * k * rank)))
                self._buf(f"lb_{group}_{layer}", b_all.to(self.device, self.dtype))
        self.merged = None

    def merge_into(self, name: str) -> None:
        """Make m_* the base with this adapter merged in: W + B A, computed in fp32."""
        slot = self.slots[name]
        for group, names in GROUPS.items():
            width, cols = self.width(group), slice((slot - 1) * len(names) * self.rank, slot * len(names) * self.rank)
            for layer in range(self.n_layers):
                fused = getattr(self, f"w_{group}_{layer}")
                a, b = fused[width:][cols].float(), getattr(self, f"lb_{group}_{layer}")[:, cols].float()
                merged = (fused[:width].float() + b @ a).to(self.dtype)
                if hasattr(self, f"m_{group}_{layer}"):
                    getattr(self, f"m_{group}_{layer}").copy_(merged)  # in place: CUDA graphs read these buffers
                else:
                    self._buf(f"m_{group}_{layer}", merged)
        self.merged = name

    # --- the forward ----------------------------------------------------------------------------------------------

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # normalised in fp32, rounded, then scaled: transformers' LlamaRMSNorm, in one fused kernel where torch has it
        return w * F.rms_norm(x, (x.shape[-1],), eps=self.eps)

    def forward(self, tokens: torch.Tensor, pos0: torch.Tensor, rows: torch.Tensor | None, last: torch.Tensor,
                kv_len: int, mode: str = "stacked", layer=None) -> torch.Tensor:
        """Run tokens [B, M] of rows `rows` (None: rows 0..B-1) from positions pos0 [B]; write their KV; return the
        logits [B, V] (fp32) at index `last` [B] of each row. Attention reads the first kv_len cached positions.
        mode: see weights(); "stacked" reads each row's adapter slot (0: none). layer: self.layer, or a
        compiled version of it (one compilation serves every layer: their weights are its arguments)."""
        batch, m = tokens.shape
        positions = pos0[:, None] + torch.arange(m, device=tokens.device)  # [B, M]
        positions = positions.clamp(max=self.max_len - 1)  # padding past a short row's end
        allowed = torch.arange(kv_len, device=tokens.device)[None, None, None, :] <= positions[:, None, :, None]
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=tokens.device).masked_fill_(~allowed, -math.inf)
        slots = self.slot[:batch] if rows is None else self.slot[rows]
        step = {"cos": self.cos[positions].unsqueeze(2), "sin": self.sin[positions].unsqueeze(2),  # [B, M, 1, D]
                "mask": mask.repeat(1, 1, self.n_heads // self.n_kv, 1),  # [B, 1, group x M, kv_len], as layer()'s q
                "positions": positions, "rows": torch.arange(batch, device=tokens.device) if rows is None else rows,
                "masks": None if mode != "stacked" else {g: getattr(self, f"lm_{g}")[slots][:, None, :] for g in GROUPS}}
        h = self.embed[tokens]
        for i in range(self.n_layers):
            h = (layer or self.layer)(h, self.weights(i, mode), self.keys[i], self.values[i], step, kv_len,
                                      rows is None)
        h = h[torch.arange(batch, device=h.device), last]  # [B, H]: only the last token's logits are needed
        return F.linear(self._rms(h, self.norm), self.lm_head).float()

    def weights(self, i: int, mode: str) -> dict:
        """Layer i's tensors for a step in this mode: "base", the base alone; "merged", the base with the adapter
        merge_into() chose merged in; "stacked", the base plus, for each row, its own adapter (_proj's mask)."""
        out = {"ln1": getattr(self, f"ln1_{i}"), "ln2": getattr(self, f"ln2_{i}")}
        for group in GROUPS:
            weight, bias = getattr(self, f"w_{group}_{i}"), getattr(self, f"b_{group}_{i}", None)
            if mode == "stacked":
                out[group] = (weight, bias, getattr(self, f"lb_{group}_{i}"))
                continue
            width = self.width(group)  # the base's rows, without the adapters' A rows below them
            weight = getattr(self, f"m_{group}_{i}") if mode == "merged" else weight[:width]
            out[group] = (weight, None if bias is None else bias[:width], None)
        return out

    def layer(self, h: torch.Tensor, w: dict, kc: torch.Tensor, vc: torch.Tensor, step: dict, kv_len: int,
              first_rows: bool) -> torch.Tensor:
        """One decoder layer over h [B, M, H]; writes this layer's KV of the new tokens into kc/vc. first_rows: the
        batch is the cache's rows 0..B-1 (decoding), so that attention reads them as a slice, not a gather."""
        batch, m, _ = h.shape
        heads, kv_heads, d = self.n_heads, self.n_kv, self.head_dim
        masks = step["masks"]
        qkv = _proj(self._rms(h, w["ln1"]), w["qkv"], masks and masks["qkv"]).view(batch, m, heads + 2 * kv_heads, d)
        qk = qkv[:, :, :heads + kv_heads]
        qk = qk * step["cos"] + qk.roll(d // 2, dims=-1) * step["sin"]  # RoPE on q and k at once
        q, k, v = qk[:, :, :heads], qk[:, :, heads:], qkv[:, :, heads + kv_heads:]
        rows, positions = step["rows"], step["positions"]
        kc[rows[:, None], :, positions] = k
        vc[rows[:, None], :, positions] = v
        keys = kc[:batch, :, :kv_len] if first_rows else kc[rows, :, :kv_len]
        values = vc[:batch, :, :kv_len] if first_rows else vc[rows, :, :kv_len]
        # grouped-query attention as plain attention: each kv head's queries side by side ([B, kv heads, group x M,
        # D]; a view when decoding), so no key is repeated and no GQA-specific kernel (or lack of one) is involved
        attn = F.scaled_dot_product_attention(q.transpose(1, 2).reshape(batch, kv_heads, -1, d), keys, values,
                                              attn_mask=step["mask"], scale=d ** -0.5)
        attn = attn.reshape(batch, heads, m, d).transpose(1, 2)
        h = h + _proj(attn.reshape(batch, m, heads * d), w["o"], masks and masks["o"])
        gate, up = _proj(self._rms(h, w["ln2"]), w["gate_up"], masks and masks["gate_up"]).chunk(2, dim=-1)
        return h + _proj(self.act(gate) * up, w["down"], masks and masks["down"])

    @staticmethod
    def penalised(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
        """Repetition penalty [B] over every token each row has seen (seen [B, V]), as transformers applies it."""
        p = penalty[:, None]
        return torch.where(seen, torch.where(logits < 0, logits * p, logits / p), logits)

    @staticmethod
    def choose(scores: torch.Tensor, sample: torch.Tensor | None) -> torch.Tensor:
        """Each row's next token: the best, or where sample [B] is set, a draw with transformers' sampling defaults
        (temperature 1, top-k 50), made on the device (Gumbel-max over the top 50) so that a CUDA graph holds it."""
        best = scores.argmax(-1)
        if sample is None:
            return best
        top = scores.topk(50)
        gumbel = -torch.log(-torch.log(torch.rand_like(top.values).clamp_(min=1e-20)))
        drawn = top.indices.gather(-1, (top.values + gumbel).argmax(-1, keepdim=True))[:, 0]
        return torch.where(sample, drawn, best)

    def _advance(self, rows: torch.Tensor, logits: torch.Tensor, position: torch.Tensor, sampling: bool):
        """Choose rows' next tokens from their logits and make them the rows' state."""
        chosen = self.choose(self.penalised(logits, self.seen[rows], self.penalty[rows]),
                             self.sample[rows] if sampling else None)
        self.seen[rows, chosen] = torch.ones_like(chosen, dtype=torch.bool)  # a device True: a CUDA graph holds it
        self.next_token[rows] = chosen
        self.position[rows] = position
        return chosen

    def prefill(self, tokens, pos0, rows, last, kv_len: int, mode: str, sampling: bool, layer=None):
        """Run prompts (forward's arguments) into rows, whose seen, penalty, slot and sample are already set; each
        row's first new token becomes its state. Returns the chosen tokens [B]."""
        logits = self.forward(tokens, pos0, rows, last, kv_len, mode, layer)
        return self._advance(rows, logits, pos0 + last + 1, sampling)

    def decode(self, batch: int, kv_len: int, mode: str, sampling: bool, layer=None):
        """One step of rows 0..batch-1 from their state, which it advances: the CUDA-graphed unit. Returns the
        chosen tokens [batch]."""
        tokens, pos = self.next_token[:batch], self.position[:batch]
        logits = self.forward(tokens[:, None], pos, None, torch.zeros_like(pos), kv_len, mode, layer)
        return self._advance(torch.arange(batch, device=pos.device), logits, pos + 1, sampling)

    def state(self) -> tuple[torch.Tensor, ...]:
        """What a step changes besides the KV (which a step repeated with the same inputs rewrites alike)."""
        return self.next_token, self.position, self.seen


def _proj(x: torch.Tensor, weights: tuple, mask: torch.Tensor | None) -> torch.Tensor:
    """A fused projection: weights (W, bias, B) from _Model.weights. With a mask [B, 1, adapter columns] (mode
    "stacked"), W's rows past B's output width are every adapter's A, and each row keeps its own adapter's part."""
    weight, bias, lora_b = weights
    y = F.linear(x, weight, bias)
    if mask is None:
        return y
    width = lora_b.shape[0]
    return y[..., :width] + F.linear(y[..., width:] * mask, lora_b)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _bucket(n: int, buckets) -> int:
    return next(b for b in buckets if b >= n)


class BatchedEngine:
    """A worker thread generating for every queued request, batched. Thread-safe."""

    draft_tokens = 0  # no guessing (game.drafts): the GPU's spare work goes to other players' rows

    def __init__(self, hf_model, eos: set[int], max_batch: int = 1, max_len: int = 2048, compile: bool | None = None,
                 cuda_graphs: bool | None = None, kv_cache_mb: int | None = None, merge: bool | None = None,
                 overlap: bool | None = None):
        """On a GPU a step is a few hundred tiny kernels, and their launches are what it costs
        (benchmarks/decode_step.py): so by default on CUDA, each decode step and each short prefill is replayed as a
        CUDA graph (no launch from Python), the layer is compiled (torch.compile fuses its elementwise work: ~40%
        fewer kernels), merge keeps a copy of the base with one adapter merged in, for steps that serve that adapter
        alone (no LoRA kernels at all; it costs one more copy of the projection weights), and overlap launches each
        step before handing out the previous step's tokens, so that the GPU does not wait for Python between steps
        (a finished answer costs one step computed in vain). On a CPU, where the arithmetic is the cost, none of
        them pays: plain eager torch."""
        on_cuda = next(hf_model.parameters()).device.type == "cuda"
        self.model = _Model(hf_model, max_batch, max_len, merge=on_cuda if merge is None else merge)
        self.eos = eos
        self.device = self.model.device
        self.compile = on_cuda if compile is None else compile
        self.cuda_graphs = on_cuda if cuda_graphs is None else cuda_graphs
        self.overlap = on_cuda if overlap is None else overlap
        self.buckets = [b for b in BATCH_BUCKETS if b < max_batch] + [max_batch]
        self._decode, self._prefill = self.model.decode, self.model.prefill
        if self.compile:  # one compiled layer serves every layer (their weights are its arguments), batch and length
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            layer = torch.compile(self.model.layer, dynamic=True)
            self._decode = functools.partial(self.model.decode, layer=layer)
            self._prefill = functools.partial(self.model.prefill, layer=layer)
        self._graphs: dict[tuple, dict] = {}  # ("decode" | "prefill", shapes..., mode, sampling) -> captured step
        self._pool = None
        # where a step's tokens land for the worker to read, two in turn: one being written while the other is read
        self._landing = [torch.zeros(max_batch, dtype=torch.long, pin_memory=on_cuda) for _ in range(2)]
        self._pending: tuple | None = None  # a launched step whose tokens are not handed out yet (overlap)
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
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # a launched step may still read the stacks being replaced
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

    def cancel_all(self) -> None:
        """Stop every answer it holds (the interpreter is exiting)."""
        for r in [r for r in list(self._rows) if r is not None] + list(self._waiting):
            r.cancelled.set()

    # --- the worker -----------------------------------------------------------------------------------------------

    def work(self) -> None:
        """Admit what is queued, launch one decode step and hand out the previous one's tokens (or this one's, without
        overlap); when idle, wait a moment for work."""
        active = any(r is not None for r in self._rows)
        try:
            busy = active or self._waiting or self._pending
            self._waiting.append(self._queue.get_nowait() if busy else self._queue.get(timeout=IDLE_POLL_S))
            while True:
                self._waiting.append(self._queue.get_nowait())
        except queue.Empty:
            pass
        if self._waiting or active or self._pending:
            try:
                with self._lock, torch.inference_mode():
                    self._admit()
                    launched = self._launch() if any(r is not None for r in self._rows) else None
                    if self.overlap:
                        launched, self._pending = self._pending, launched
                    if launched is not None:
                        self._hand_out(*launched)
            except Exception as exc:  # fail every request in flight rather than hang the players
                log.exception("generation failed")
                for r in [r for r in self._rows if r is not None] + self._waiting:
                    r.tokens.put(exc)
                self._rows = [None] * len(self._rows)
                self._waiting, self._state, self._pending = [], {}, None

    def _finish(self, request: Request, row: int | None) -> None:
        request.tokens.put(None)
        state = self._state.pop(request, None)
        if row is not None:
            self._rows[row] = None
            if state is not None and not request.background:  # the conversation so far, for its next question
                self._keep(row, request.adapter, (request.prompt + state["tokens"])[:-1])  # the last was never fed

    def _keep(self, row: int, adapter: str | None, tokens: list[int], pin: bool = False) -> None:
        n, model = len(tokens), self.model
        kv = model.keys[:, row, :, :n].clone(), model.values[:, row, :, :n].clone()
        self._cache.put(adapter, tokens, kv, kv[0].nbytes + kv[1].nbytes, pin)

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
        model = self.model
        requests = [r for _, r in admitted]
        starts = []
        for row, r in admitted:
            key, start = self._cache.longest(r.adapter, r.prompt)
            start = min(start, len(r.prompt) - 1)  # at least one token to run, for its logits
            if key is not None and start > 0:
                keys, values = self._cache.get(key)
                model.keys[:, row, :, :start] = keys[:, :, :start]
                model.values[:, row, :, :start] = values[:, :, :start]
            r.cached_tokens = start
            starts.append(start)
        batch, longest = self._prefill_shape(len(admitted), max(len(r.prompt) - s for r, s in zip(requests, starts)))
        tokens = torch.zeros(batch, longest, dtype=torch.long)
        rows = torch.full((batch,), model.scratch)
        for j, ((row, r), s) in enumerate(zip(admitted, starts)):
            tokens[j, :len(r.prompt) - s] = torch.tensor(r.prompt[s:])
            rows[j] = row
        pos0 = torch.tensor(starts + [0] * (batch - len(admitted)))
        last = torch.tensor([len(r.prompt) - s - 1 for r, s in zip(requests, starts)] + [0] * (batch - len(admitted)))
        placed = self._to_device(rows[:len(admitted)])
        model.penalty[placed] = self._to_device(torch.tensor([r.repetition_penalty for r in requests]))
        model.slot[placed] = self._to_device(torch.tensor([model.slots.get(r.adapter, 0) for r in requests]))
        model.sample[placed] = self._to_device(torch.tensor([r.do_sample for r in requests]))
        model.seen[placed] = False
        model.seen[self._to_device(torch.tensor([row for row, r in admitted for _ in r.prompt])),
                   self._to_device(torch.tensor([t for r in requests for t in r.prompt]))] = True
        mode, sampling = self._mode(requests), any(r.do_sample for r in requests)
        kv_len = min(round_up(max(len(r.prompt) for r in requests), LENGTH_BUCKET), model.max_len)
        chosen = self._prefill_step(*map(self._to_device, (tokens, pos0, rows, last)), kv_len, mode, sampling)
        for (row, r), s in zip(admitted, starts):
            if 0 < r.prefix_len < len(r.prompt) and s < r.prefix_len:
                self._keep(row, r.adapter, r.prompt[:r.prefix_len], pin=True)
        for (row, r), token in zip(admitted, chosen[:len(admitted)].tolist()):
            self._rows[row] = r
            self._state[r] = {"pos": len(r.prompt), "tokens": []}
            self._emit(row, r, token)

    def _to_device(self, cpu: torch.Tensor) -> torch.Tensor:
        """A copy on the model's device that does not wait for the steps already launched (a plain copy would)."""
        if self.device.type != "cuda":
            return cpu
        return cpu.pin_memory().to(self.device, non_blocking=True)

    def _mode(self, requests: list[Request | None]) -> str:
        """How a step of these requests applies adapters (a mode of _Model.weights)."""
        model = self.model
        adapters = {r.adapter for r in requests if r is not None}
        if not model.rank or adapters == {None}:
            return "base"
        if model.merge and len(adapters) == 1:
            (name,) = adapters
            if model.merged != name:
                model.merge_into(name)
            return "merged"
        return "stacked"

    def _emit(self, row: int, r: Request, token: int) -> None:
        tokens = self._state[r]["tokens"]
        tokens.append(token)
        if r.first_token is None:
            r.first_token = time.perf_counter()
        r.tokens.put(token)
        if token in self.eos or len(tokens) >= r.max_new_tokens or r.cancelled.is_set():
            self._finish(r, row)

    def _launch(self) -> tuple[list, torch.Tensor, torch.cuda.Event | None]:
        """Launch one decode step of every active row. Returns what _hand_out needs once it is done: the rows'
        requests, where their tokens land, and (on CUDA) the event that says they have landed."""
        top = max(i for i, r in enumerate(self._rows) if r is not None) + 1
        batch = _bucket(top, self.buckets)
        rows = self._rows[:batch] + [None] * (batch - len(self._rows[:batch]))
        active = [r for r in rows if r is not None]
        longest = max(self._state[r]["pos"] for r in active) + 1
        kv_len = min(round_up(longest, LENGTH_BUCKET), self.model.max_len)
        chosen = self._decode_step(batch, kv_len, self._mode(active), any(r.do_sample for r in active))
        for r in active:
            self._state[r]["pos"] += 1
        self._landing.reverse()
        landing = self._landing[0][:batch]
        landing.copy_(chosen, non_blocking=True)
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        return rows, landing, event

    def _hand_out(self, rows: list, landing: torch.Tensor, event) -> None:
        """Give each row's request its token from a launched step; a request that finished meanwhile (its row maybe
        refilled since) drops its own."""
        if event is not None:
            event.synchronize()
        for row, (r, token) in enumerate(zip(rows, landing.tolist())):
            if r is not None and r in self._state:
                self._emit(row, r, token)

    # --- compilation and CUDA graphs, each falling back to plain eager torch if it fails here ---------------------

    def _decode_step(self, batch: int, kv_len: int, mode: str, sampling: bool) -> torch.Tensor:
        """_Model.decode as this engine runs it: a CUDA graph, else compiled or eager."""
        args = (batch, kv_len, mode, sampling)
        if self.cuda_graphs:
            return self._replay(("decode", *args), "_decode", {}, *args)
        return self._compiled_or_eager("_decode", *args)

    def _prefill_shape(self, rows: int, tokens_per_row: int) -> tuple[int, int]:
        """The padded shape a prefill of this many rows and new tokens runs at: a few lengths, so that its shapes have
        been seen before (by cuBLAS, by the compiled layer); for a CUDA graph, also a batch bucket (filler entries run
        in the scratch row) and coarser lengths, so that few graphs serve every question."""
        if self.cuda_graphs and tokens_per_row <= PREFILL_GRAPH_TOKENS:
            return _bucket(rows, self.buckets), round_up(tokens_per_row, PREFILL_GRAPH_BUCKET)
        return rows, round_up(tokens_per_row, PREFILL_BUCKET)

    def _prefill_step(self, tokens, pos0, rows, last, kv_len: int, mode: str, sampling: bool) -> torch.Tensor:
        """_Model.prefill as this engine runs it: a CUDA graph for a question's few tokens, else compiled or eager."""
        if self.cuda_graphs and tokens.shape[1] <= PREFILL_GRAPH_TOKENS:
            # attention reads the whole cache (masked past each row's end: a question's few rows make that cheap), so
            # that the conversations' lengths add no graphs
            args = (self.model.max_len, mode, sampling)
            return self._replay(("prefill", *tokens.shape, *args), "_prefill",
                                {"tokens": tokens, "pos0": pos0, "rows": rows, "last": last}, *args)
        return self._compiled_or_eager("_prefill", tokens, pos0, rows, last, kv_len, mode, sampling)

    def _compiled_or_eager(self, name: str, *args):
        """Run self._decode or self._prefill; where the compiled version fails, switch to the eager one for good."""
        fn, eager = getattr(self, name), self._eager(name)
        try:
            return fn(*args)
        except Exception:
            if fn == eager:
                raise
            log.exception("torch.compile failed: %s runs eagerly", name)
            setattr(self, name, eager)
            return eager(*args)

    def _eager(self, name: str):
        """The plain torch method behind self._decode or self._prefill."""
        return getattr(self.model, name.removeprefix("_"))

    def _replay(self, key: tuple, name: str, inputs: dict[str, torch.Tensor], *args):
        """Run self._decode or self._prefill (name) on device tensor inputs (copied into the graph's own) and args as
        the CUDA graph of this key, captured on first use."""
        graph = self._graphs.get(key)
        if graph is None:
            try:
                graph = self._graphs[key] = self._capture(name, inputs, args)
            except Exception:
                eager = self._eager(name)
                if getattr(self, name) != eager:  # the compiled step would not capture: the eager one may
                    log.exception("CUDA graph capture of the compiled %s failed: capturing the eager one", name)
                    setattr(self, name, eager)
                    return self._replay(key, name, inputs, *args)
                log.exception("CUDA graph capture failed: running without graphs")
                self.cuda_graphs = False
                return eager(*inputs.values(), *args)
        for input_name, value in inputs.items():
            graph["inputs"][input_name].copy_(value)
        graph["graph"].replay()
        return graph["output"]

    def _capture(self, name: str, inputs: dict[str, torch.Tensor], args: tuple) -> dict:
        """Record self._decode or self._prefill as a CUDA graph. The warm-up runs are the real step (these inputs,
        these rows): they write the KV the step itself writes, and the rows' state is put back after them, so that
        capturing mid-serving is safe."""
        model = self.model
        static = {key: value.clone() for key, value in inputs.items()}
        saved = [t.clone() for t in model.state()]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._compiled_or_eager(name, *static.values(), *args)
        torch.cuda.current_stream().wait_stream(side)
        for t, before in zip(model.state(), saved):
            t.copy_(before)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._pool):
            output = getattr(self, name)(*static.values(), *args)
        return {"graph": graph, "inputs": static, "output": output}
