"""The model the torch engine runs (game.engine): one base, every case's LoRA stacked beside it.

Every adapter's A rows sit below the base's in each fused weight and each row of a batch keeps its own adapter's part
(the batched-LoRA idea of S-LoRA and punica), so a batch mixes cases without splitting it; a step serving one case
alone runs that case's adapter merged into the base. The KV cache and each row's state (its next token, position and
the tokens it has seen) live here too, on the device, where a step updates them.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F

# Projections that carry a LoRA, fused into one matrix per group: one matmul reads q, k and v (gate and up) at once.
GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"),
          "down": ("down_proj",)}
GROUP_OF = {name: (group, i) for group, names in GROUPS.items() for i, name in enumerate(names)}
_LORA_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


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


class StackedModel(torch.nn.Module):
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
    """A fused projection: weights (W, bias, B) from StackedModel.weights. With a mask [B, 1, adapter columns] (mode
    "stacked"), W's rows past B's output width are every adapter's A, and each row keeps its own adapter's part."""
    weight, bias, lora_b = weights
    y = F.linear(x, weight, bias)
    if mask is None:
        return y
    width = lora_b.shape[0]
    return y[..., :width] + F.linear(y[..., width:] * mask, lora_b)
