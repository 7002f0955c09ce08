"""The files llama.cpp reads, made once into the cache from the game's own: the base's weights in BF16, a PEFT adapter
as a GGUF LoRA, and an adapter merged into a BF16 copy of the base.

Each is named for what it was made from (the base's hash, the adapter's digest), written beside its place and moved
onto it whole, so a reader never sees half a file and a changed adapter gets a new file.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import gguf
import numpy as np

from game.base import cache_dir, file_sha256
from game.stacked_lora import GROUP_OF, read_lora

LORA_FORMAT = "v1"  # bump when to_gguf_lora changes what it writes
MERGED_FORMAT = "v1"  # bump when merged_gguf changes what it writes
MERGED_KEPT = 10  # merged copies kept in the cache, the least recently used going first (270 MB each on the 135M base)
# transformers' projection names -> llama.cpp's tensor names
GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
assert set(GGUF_NAMES) == set(GROUP_OF)


def bf16_gguf(gguf: Path) -> Path:
    """The GGUF with its weights in BF16, made once into the cache (llama.cpp's own llama_model_quantize). These are
    the values the adapters were trained against: the training base is this GGUF dequantized, run in bf16."""
    import llama_cpp

    out = cache_dir() / f"{gguf.stem}-{file_sha256(gguf)[:16]}-bf16.gguf"
    if out.is_file():
        return out
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize = llama_cpp.LLAMA_FTYPE_MOSTLY_BF16, True
    params.nthread = os.cpu_count() or 1
    with _written_whole(out) as tmp:
        if llama_cpp.llama_model_quantize(str(gguf).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
            raise RuntimeError(f"llama.cpp could not write {gguf.name} in BF16")
    return out


@contextlib.contextmanager
def _written_whole(out: Path):
    """A path to write `out` at, beside it, moved onto it once the block ends without error: a reader of the cache
    never sees half a file, and a failed write leaves nothing."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent)) / out.name
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def _permute(w, n_head: int):
    # llama.cpp stores q and k with the rotary halves interleaved (convert_hf_to_gguf's LlamaModel.permute); a
    # LoRA's B writes those rows, so its rows move the same way.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def to_gguf_lora(folder: Path, out: Path, config) -> None:
    """Write a PEFT LoRA folder as a llama.cpp GGUF LoRA (fp32, scaling folded into B), atomically."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    i, h = config.intermediate_size, config.hidden_size
    shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
              "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    weights = read_lora(folder, config.num_hidden_layers, shapes)
    with _written_whole(out) as tmp:
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


def merged_gguf(bf16_base: Path, lora: Path) -> Path:
    """The BF16 base with a GGUF LoRA (gguf_lora) added into its weights, made once into the cache: W + B A, summed in
    fp32 and rounded once to bf16 (the rounding moves a weight by at most half a bf16 step, ~0.2% of it; a rank-4
    adapter's delta is ~6% of the weights it changes). llama.cpp then runs the case as a plain model: on a 2-core CPU
    an adapter beside the base costs 15-25% of every pass (two thin products for each of 210 matrices; docs/speed.md).
    """
    import torch

    out = cache_dir() / "merged-gguf" / f"{bf16_base.stem}+{lora.stem}-{MERGED_FORMAT}.gguf"
    if out.is_file():
        with contextlib.suppress(FileNotFoundError):  # else another process has just trimmed it: made again
            os.utime(out)  # recently used: kept when the cache is trimmed
            return out
    lora_tensors = {t.name: np.array(t.data, np.float32) for t in gguf.GGUFReader(lora).tensors}
    changed = {name.removesuffix(".lora_a") for name in lora_tensors if name.endswith(".lora_a")}
    layout = _bf16_layout(bf16_base)
    if not changed <= layout.keys():
        raise ValueError(f"{lora.name} changes weights that are not BF16 in {bf16_base.name}: "
                         f"{sorted(changed - layout.keys())[:3]}")
    with _written_whole(out) as tmp:
        shutil.copyfile(bf16_base, tmp)  # every byte as the base's, then the changed weights written over theirs
        copy = np.memmap(tmp, mode="r+")
        for name in changed:
            offset, size = layout[name]
            bits = copy[offset:offset + size].view(np.int16)
            a, b = torch.from_numpy(lora_tensors[name + ".lora_a"]), torch.from_numpy(lora_tensors[name + ".lora_b"])
            w = torch.from_numpy(bits).view(torch.bfloat16).float().reshape(b.shape[0], a.shape[1]).addmm_(b, a)
            bits[...] = w.to(torch.bfloat16).view(torch.int16).reshape(-1).numpy()
        copy.flush()
        del copy
    _trim(out.parent, MERGED_KEPT)
    return out


@functools.lru_cache(maxsize=4)
def _bf16_layout(path: Path) -> dict[str, tuple[int, int]]:
    """Where each BF16 tensor's data lies in the file: name -> (offset, bytes). Read once per file (reading a GGUF's
    metadata, its 49,152-token vocabulary, takes seconds)."""
    return {t.name: (t.data_offset, t.n_bytes) for t in gguf.GGUFReader(path).tensors
            if t.tensor_type == gguf.GGMLQuantizationType.BF16}


def _trim(folder: Path, kept: int) -> None:
    """Remove all but the `kept` most recently used files of the folder. A process that has one open keeps using it;
    one that cannot go now (open elsewhere, on Windows) goes another time."""
    def used(path: Path) -> float:
        try:
            return path.stat().st_mtime
        except OSError:  # removed meanwhile by another process trimming
            return 0.0

    for stale in sorted(folder.glob("*.gguf"), key=used, reverse=True)[kept:]:
        with contextlib.suppress(OSError):
            stale.unlink()
