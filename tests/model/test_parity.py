"""Our transformer == transformers' on tiny random models loaded from real HF directories."""

from __future__ import annotations

import pytest
import torch

from tests.model.conftest import VOCAB, ours_from_hf_dir

T = 50


@pytest.mark.parametrize("kind", ["llama", "llama3", "qwen2", "qwen3", "gemma3"])
def test_logits_match_transformers(hf_dir_factory, kind):
    hf, path = hf_dir_factory(kind)
    ours = ours_from_hf_dir(path)
    tokens = torch.randint(0, VOCAB, (1, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(tokens).logits.float()
        got = ours(tokens, torch.arange(T))
    assert got.dtype == torch.float32 and got.shape == (1, T, VOCAB)
    diff = (got - want).abs().max().item()
    print(f"{kind}: max abs diff {diff:.2e} (logit scale {want.abs().max().item():.2f})")
    assert diff < 1e-4
    last = ours(tokens, torch.arange(T), last_only=True)
    assert last.shape == (1, 1, VOCAB) and torch.allclose(last[0, 0], got[0, -1], atol=1e-5)


def test_loaded_args_reflect_config(hf_dir_factory):
    _, path = hf_dir_factory("gemma3")
    args = ours_from_hf_dir(path).args
    assert args.family == "gemma3" and args.layer_types == ("sliding", "global", "sliding", "global")
    assert args.sliding_window == 8 and args.rope_scaling == "linear" and args.rope_scaling_factor == 4.0
    assert args.rope_theta == 1e6 and args.rope_local_theta == 10000.0 and args.tie_embeddings
    _, path = hf_dir_factory("qwen2")
    args = ours_from_hf_dir(path).args
    assert args.qkv_bias and not args.o_bias and args.n_kv_heads == 2


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_bfloat16_forward_is_close_to_float32(hf_dir_factory, kind):
    from model.hf_loader import read_hf_dir
    from model.registry import build_model

    _, path = hf_dir_factory(kind)
    args, state = read_hf_dir(path)
    f32 = build_model(args, dict(state), "cpu", torch.float32)
    bf16 = build_model(args, dict(state), "cpu", torch.bfloat16)
    tokens = torch.randint(0, VOCAB, (1, T), generator=torch.Generator().manual_seed(1))
    want = f32(tokens, torch.arange(T))
    cache = bf16.new_cache()
    got = bf16(tokens, torch.arange(T), cache)
    assert got.dtype == torch.float32 and cache.dtype == torch.bfloat16
    assert (got - want).abs().max() < 0.05 * want.abs().max()
