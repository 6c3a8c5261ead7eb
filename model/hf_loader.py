"""Hugging Face model directories: config.json + *.safetensors (single or sharded via index).

    args, state = read_hf_dir(path)     # ModelArgs + our-named float tensors (CPU)

Supported `model_type`s: llama, mistral, qwen2, qwen3 (-> family "llama"), gemma3_text / gemma3
(-> family "gemma3"). Both the old (`rope_theta`, `rope_scaling`) and the transformers >= 5
(`rope_parameters`) config layouts are read.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from model.config import ModelArgs, ModelLoadError

LLAMA_TYPES = ("llama", "mistral", "qwen2", "qwen3")
GEMMA3_TYPES = ("gemma3_text", "gemma3")

# HF name (after "model.") -> ours, per layer; {i} is the layer index
_LAYER_MAP = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "self_attn.q_norm": "attention.q_norm",
    "self_attn.k_norm": "attention.k_norm",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.up_proj": "feed_forward.w3",
    "mlp.down_proj": "feed_forward.w2",
    "input_layernorm": "attention_norm",
}
# the norm after attention is the FFN's pre-norm in Llama but a post-norm in Gemma 3
_LLAMA_EXTRA = {"post_attention_layernorm": "ffn_norm"}
_GEMMA_EXTRA = {
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffn_norm",
}
_TOP_MAP = {"model.embed_tokens": "tok_embeddings", "model.norm": "norm", "lm_head": "output"}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def hf_name_to_ours(name: str, family: str) -> str | None:
    """Our parameter name for an HF tensor name, or None if we do not know it."""
    name = name.removeprefix("language_model.")  # multimodal Gemma 3 checkpoints
    if m := _LAYER_RE.match(name):
        layer, part, kind = m.groups()
        table = {**_LAYER_MAP, **(_GEMMA_EXTRA if family == "gemma3" else _LLAMA_EXTRA)}
        return f"layers.{layer}.{table[part]}.{kind}" if part in table else None
    stem, _, kind = name.rpartition(".")
    return f"{_TOP_MAP[stem]}.{kind}" if stem in _TOP_MAP else None


def _rope_params(cfg: dict[str, Any], layer_type: str | None = None) -> dict[str, Any]:
    """One rope parameter dict (theta + scaling) from either config layout."""
    rp = cfg.get("rope_parameters")
    if isinstance(rp, dict) and layer_type is not None and layer_type in rp:
        rp = rp[layer_type]
    if isinstance(rp, dict) and "rope_type" in rp:
        return rp
    out = dict(cfg.get("rope_scaling") or {})
    out.setdefault("rope_type", out.get("type", "default"))
    if layer_type == "sliding_attention":
        return {"rope_type": "default", "rope_theta": cfg.get("rope_local_base_freq", 10000.0)}
    out["rope_theta"] = cfg.get("rope_theta", 1_000_000.0 if layer_type else 10000.0)
    return out


def _scaling_fields(rp: dict[str, Any], path: Path) -> dict[str, Any]:
    kind = rp.get("rope_type", "default")
    if kind == "default":
        return {}
    if kind == "linear":
        return {"rope_scaling": "linear", "rope_scaling_factor": float(rp["factor"])}
    if kind == "llama3":
        return {
            "rope_scaling": "llama3",
            "rope_scaling_factor": float(rp["factor"]),
            "rope_low_freq_factor": float(rp["low_freq_factor"]),
            "rope_high_freq_factor": float(rp["high_freq_factor"]),
            "rope_original_context": int(rp["original_max_position_embeddings"]),
        }
    raise ModelLoadError(f"{path}: rope scaling type {kind!r} is not supported (only linear and llama3)")


def args_from_hf_config(cfg: dict[str, Any], path: Path, max_seq_len: int | None = None) -> ModelArgs:
    mtype = cfg.get("model_type")
    if mtype == "gemma3" and "text_config" in cfg:
        cfg = {**cfg["text_config"], "model_type": "gemma3_text"}
    if mtype not in LLAMA_TYPES + GEMMA3_TYPES:
        raise ModelLoadError(
            f"{path}: unknown architecture model_type={mtype!r}; supported: {', '.join(LLAMA_TYPES + GEMMA3_TYPES)}"
        )
    family = "gemma3" if mtype in GEMMA3_TYPES else "llama"
    ctx = int(cfg.get("max_position_embeddings", 4096))
    common = dict(
        family=family,
        vocab_size=cfg["vocab_size"],
        dim=cfg["hidden_size"],
        n_layers=cfg["num_hidden_layers"],
        n_heads=cfg["num_attention_heads"],
        n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        head_dim=cfg.get("head_dim") or 0,
        hidden_dim=cfg["intermediate_size"],
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", family == "gemma3")),
        context_length=ctx,
        max_seq_len=max_seq_len or ctx,
    )
    if family == "llama":
        rp = _rope_params(cfg)
        window = cfg.get("sliding_window") if cfg.get("use_sliding_window", mtype == "mistral") else None
        bias = bool(cfg.get("attention_bias", False))
        return ModelArgs(
            **common, rope_theta=float(rp.get("rope_theta", 10000.0)), **_scaling_fields(rp, path),
            sliding_window=window, qkv_bias=bias or mtype == "qwen2", o_bias=bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)), qk_norm=mtype == "qwen3",
        )
    glob, local = _rope_params(cfg, "full_attention"), _rope_params(cfg, "sliding_attention")
    pattern = cfg.get("sliding_window_pattern", 6)
    types = cfg.get("layer_types") or [
        "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(cfg["num_hidden_layers"])
    ]
    return ModelArgs(
        **common, rope_theta=float(glob["rope_theta"]), rope_local_theta=float(local["rope_theta"]),
        **_scaling_fields(glob, path), sliding_window=cfg.get("sliding_window"),
        layer_types=tuple("sliding" if t == "sliding_attention" else "global" for t in types),
        query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar", 256)),
        final_logit_softcapping=cfg.get("final_logit_softcapping"),
    )


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise ModelLoadError(f"{index}: shard files missing: {', '.join(missing)}")
        return [path / s for s in shards]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path}: no *.safetensors weights found (need model.safetensors or shards)")
    return files


def read_hf_dir(path: str | Path, max_seq_len: int | None = None) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """ModelArgs and our-named tensors from an HF directory; raises ModelLoadError on problems."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"{cfg_file}: not found; an HF model directory needs config.json + safetensors")
    args = args_from_hf_config(json.loads(cfg_file.read_text()), cfg_file, max_seq_len)
    state: dict[str, torch.Tensor] = {}
    for file in _safetensors_files(path):
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    ours = hf_name_to_ours(name, args.family)
                    if ours is None:
                        raise ModelLoadError(f"{file}: unexpected tensor {name!r} (no mapping to our model)")
                    state[ours] = f.get_tensor(name)
        except ModelLoadError:
            raise
        except Exception as e:  # safetensors raises its own types on truncated/corrupt headers
            raise ModelLoadError(f"{file}: cannot read safetensors ({e}); the file may be truncated") from e
    return args, state
