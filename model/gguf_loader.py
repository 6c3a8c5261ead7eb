"""GGUF files -> (ModelArgs, our-named float32 tensors).

    args, state = read_gguf(path, max_seq_len=None, progress=False)

Architectures: `llama` (Llama 2/3, SmolLM2, Mistral), `qwen2`, `gemma3`. Two conversions undo
what llama.cpp's converter did so our HF-layout model reproduces transformers' logits:
- llama: Q/K projection rows were permuted for llama.cpp's interleaved RoPE; we permute back to
  the rotate_half layout (qwen2/gemma3 use rotate_half in llama.cpp already: no permutation);
- gemma3: every `*norm.weight` was stored as (1 + w); our Gemma RMSNorm adds the 1 itself.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from model.config import ModelArgs, ModelLoadError
from model.dequant import SUPPORTED_TYPES, dequantize
from model.gguf_meta import GGUFHeader, read_header
from model.qlinear import QUANTIZED_TYPES, QWeight, pack, permute_rows, release_freed_memory, split_blocks

ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3")

_TOP_MAP = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output"}
_LAYER_MAP = {
    "attn_norm": "attention_norm",
    "attn_q": "attention.wq",
    "attn_k": "attention.wk",
    "attn_v": "attention.wv",
    "attn_output": "attention.wo",
    "attn_q_norm": "attention.q_norm",
    "attn_k_norm": "attention.k_norm",
    "ffn_gate": "feed_forward.w1",
    "ffn_up": "feed_forward.w3",
    "ffn_down": "feed_forward.w2",
    "ffn_norm": "ffn_norm",
    "post_attention_norm": "post_attention_norm",
    "post_ffw_norm": "post_ffn_norm",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


def gguf_name_to_ours(name: str) -> str | None:
    """Our parameter name for a GGUF tensor name, or None if unknown."""
    if m := _LAYER_RE.match(name):
        layer, part, kind = m.groups()
        return f"layers.{layer}.{_LAYER_MAP[part]}.{kind}" if part in _LAYER_MAP else None
    stem, _, kind = name.rpartition(".")
    return f"{_TOP_MAP[stem]}.{kind}" if stem in _TOP_MAP else None


def _get(meta: dict[str, Any], key: str, path: Path, default: Any = ...) -> Any:
    if key in meta:
        return meta[key]
    if default is ...:
        raise ModelLoadError(f"{path}: GGUF metadata key {key!r} is missing; the file is not a complete model")
    return default


def args_from_gguf(header: GGUFHeader, max_seq_len: int | None = None) -> ModelArgs:
    meta, path = header.metadata, header.path
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ModelLoadError(
            f"{path}: unknown architecture {arch!r} (general.architecture); supported: {', '.join(ARCHITECTURES)}"
        )
    names = {t.name: t for t in header.tensors}
    if "token_embd.weight" not in names:
        raise ModelLoadError(f"{path}: tensor 'token_embd.weight' is missing; the file is not a complete model")

    def g(key: str, default: Any = ...) -> Any:
        return _get(meta, f"{arch}.{key}", path, default)

    n_heads, dim = int(g("attention.head_count")), int(g("embedding_length"))
    ctx = int(g("context_length", 4096))
    common = dict(
        vocab_size=names["token_embd.weight"].shape[0],
        dim=dim,
        n_layers=int(g("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(g("attention.head_count_kv", n_heads)),
        head_dim=int(g("attention.key_length", g("rope.dimension_count", dim // n_heads))),
        hidden_dim=int(g("feed_forward_length")),
        norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(g("rope.freq_base", 10000.0)),
        tie_embeddings="output.weight" not in names,
        context_length=ctx,
        max_seq_len=max_seq_len or ctx,
        **_rope_scaling(meta, arch, path),
    )
    if arch == "gemma3":
        n_layers, pattern = common["n_layers"], g("attention.sliding_window_pattern", 6)
        if isinstance(pattern, list):  # newer converters: one bool per layer, True = sliding
            types = tuple("sliding" if p else "global" for p in pattern)
        else:  # every `pattern`-th layer is global (llama.cpp's default for Gemma 3 is 6)
            types = tuple("sliding" if (i + 1) % int(pattern) else "global" for i in range(n_layers))
        # llama.cpp: 27B scales queries by (dim / n_heads) ** -0.5, the others by head_dim ** -0.5
        scalar = dim / n_heads if n_layers == 62 else common["head_dim"]
        return ModelArgs(
            family="gemma3", **common, rope_local_theta=10000.0,
            sliding_window=int(g("attention.sliding_window")),
            layer_types=types,
            query_pre_attn_scalar=float(scalar),
            final_logit_softcapping=g("final_logit_softcapping", None),
        )
    if "rope_freqs.weight" in names:  # Llama 3.1 scaling shipped as per-frequency divisors
        common["rope_freq_factors"] = tuple(_read_tensor(header, names["rope_freqs.weight"]).tolist())
    return ModelArgs(
        family="llama", **common, qkv_bias="blk.0.attn_q.bias" in names,
        o_bias="blk.0.attn_output.bias" in names, mlp_bias="blk.0.ffn_up.bias" in names,
        qk_norm="blk.0.attn_q_norm.weight" in names,
        sliding_window=g("attention.sliding_window", None),
    )


def _rope_scaling(meta: dict[str, Any], arch: str, path: Path) -> dict[str, Any]:
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if kind == "none":
        return {}
    if kind == "linear":
        return {"rope_scaling": "linear", "rope_scaling_factor": float(meta[f"{arch}.rope.scaling.factor"])}
    raise ModelLoadError(f"{path}: rope scaling type {kind!r} is not supported (only linear and llama3)")


def _read_tensor(header: GGUFHeader, info: Any) -> torch.Tensor:
    raw = np.memmap(header.path, dtype=np.uint8, mode="r", offset=info.offset, shape=(info.n_bytes,))
    return dequantize(raw, info.ggml_type, info.shape)


def _read_quantized(header: GGUFHeader, info: Any, ours: str, args: ModelArgs, arch: str) -> QWeight:
    """A quantized 2-D tensor as QWeight, with the same Q/K row un-permutation as the float path."""
    raw = np.memmap(header.path, dtype=np.uint8, mode="r", offset=info.offset, shape=(info.n_bytes,))
    qw = split_blocks(raw, info.ggml_type, tuple(info.shape))
    if arch == "llama" and ours.split(".")[-2] in ("wq", "wk"):
        n_heads = args.n_heads if ".wq." in ours else args.n_kv_heads
        qw = permute_rows(qw, lambda t: _unpermute(t, n_heads))
    return qw


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (interleaved pairs -> rotate_half halves) per head."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


T = TypeVar("T")


def progress_iter(items: Iterable[T], total: int, description: str, enabled: bool) -> Iterator[T]:
    """Wrap `items` with a rich progress bar on stderr when enabled."""
    if not enabled:
        yield from items
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)


def read_gguf(path: str | Path, max_seq_len: int | None = None, progress: bool = False,
              dtype: torch.dtype = torch.float32,
              header: GGUFHeader | None = None, weights: str = "float") -> tuple[ModelArgs, dict[str, Any]]:
    """ModelArgs and our-named CPU tensors (cast to `dtype` one by one to bound peak memory).

    weights="quantized": 2-D tensors of a type model/qlinear.py handles stay quantized, packed into
    int4 planes as each is read (`PackedWeight`, see QLinear), so no float copy of the whole model
    ever exists; the rest (norms, biases) are dequantized as usual.

    Raises ModelLoadError for a missing/truncated file, unknown architecture or quant type.
    """
    header = header or read_header(path)
    args = args_from_gguf(header, max_seq_len)
    path = header.path
    for info in header.tensors:
        if info.ggml_type not in SUPPORTED_TYPES:
            names = ", ".join(sorted(t.name for t in SUPPORTED_TYPES))
            raise ModelLoadError(
                f"{path}: tensor {info.name!r} uses quantization type {info.ggml_type.name}, which we cannot "
                f"dequantize (supported: {names}); use a file quantized with a supported type"
            )
    if weights not in ("float", "quantized"):
        raise ValueError(f"read_gguf: weights must be 'float' or 'quantized', got {weights!r}")
    state: dict[str, Any] = {}
    tensors = [t for t in header.tensors if t.name != "rope_freqs.weight"]
    arch = header.metadata["general.architecture"]
    for info in progress_iter(tensors, len(tensors), f"loading {path.name}", progress):
        ours = gguf_name_to_ours(info.name)
        if ours is None:
            raise ModelLoadError(f"{path}: unexpected tensor {info.name!r} for architecture {arch!r}")
        if weights == "quantized" and info.ggml_type in QUANTIZED_TYPES and len(info.shape) == 2:
            state[ours] = pack(_read_quantized(header, info, ours, args, arch))  # QLinear's planes
            release_freed_memory()  # the unpacked integers are gone: keep the peak near the result
            continue
        w = _read_tensor(header, info)
        if arch == "llama" and ours.split(".")[-2] in ("wq", "wk"):
            w = _unpermute(w, args.n_heads if ".wq." in ours else args.n_kv_heads)
        if arch == "gemma3" and ours.endswith("norm.weight"):
            w = w - 1.0
        state[ours] = w.to(dtype)
    return args, state
