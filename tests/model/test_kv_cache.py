"""KV-cached decoding == full recompute; chunked growth; clone/truncate; context shift."""

from __future__ import annotations

import pytest
import torch

from model.kv_cache import KVCache
from model.rope import apply_rope, rope_cos_sin
from tests.model.conftest import VOCAB, ours_from_hf_dir

PROMPT, STEPS = 30, 20


def _prompt(n=PROMPT, seed=3):
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def _greedy_full(model, tokens, steps):
    toks, logits = tokens.clone(), []
    for _ in range(steps):
        out = model(toks, torch.arange(toks.shape[1], device=toks.device), last_only=True)[0, -1]
        logits.append(out)
        toks = torch.cat([toks, out.argmax().view(1, 1)], dim=1)
    return toks[0, tokens.shape[1]:].tolist(), torch.stack(logits)


def _greedy_cached(model, tokens, steps, cache):
    T = tokens.shape[1]
    dev = tokens.device
    out = model(tokens, torch.arange(T, device=dev), cache, last_only=True)[0, -1]
    got, logits = [], []
    for i in range(steps):
        logits.append(out)
        nxt = out.argmax().view(1, 1)
        got.append(nxt.item())
        out = model(nxt, torch.tensor([T + i], device=dev), cache, last_only=True)[0, -1]
    return got, torch.stack(logits)


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
@pytest.mark.parametrize("static", [False, True])
def test_cached_decode_equals_full_recompute(hf_dir_factory, kind, static):
    _, path = hf_dir_factory(kind)
    model = ours_from_hf_dir(path)
    want_toks, want_logits = _greedy_full(model, _prompt(), STEPS)
    cache = model.new_cache(capacity=64 if static else 0, static=static, chunk=16)
    got_toks, got_logits = _greedy_cached(model, _prompt(), STEPS, cache)
    assert got_toks == want_toks
    assert (got_logits - want_logits).abs().max().item() < 1e-4
    assert cache.length == PROMPT + STEPS


def test_cache_grows_in_chunks_without_per_token_realloc(hf_dir_factory):
    _, path = hf_dir_factory("llama")
    model = ours_from_hf_dir(path)
    cache = model.new_cache(chunk=16)
    assert cache.capacity == 0
    model(_prompt(10), torch.arange(10), cache)
    assert cache.capacity == 16
    seen = {cache.capacity: cache.k[0].data_ptr()}
    for pos in range(10, 40):
        model(torch.tensor([[pos % VOCAB]]), torch.tensor([pos]), cache, last_only=True)
        ptr = seen.setdefault(cache.capacity, cache.k[0].data_ptr())
        assert ptr == cache.k[0].data_ptr(), "buffer reallocated without a capacity jump"
    assert sorted(seen) == [16, 32, 48] and cache.length == 40
    assert cache.nbytes == 2 * 2 * (1 * 2 * 48 * 16) * 4  # k+v, 2 layers, (1, n_kv, cap, hd) fp32


def test_cache_respects_max_seq_len(hf_dir_factory):
    _, path = hf_dir_factory("llama")
    model = ours_from_hf_dir(path, max_seq_len=40)
    cache = model.new_cache(chunk=32)
    model(_prompt(35), torch.arange(35), cache)
    assert cache.capacity == 40  # rounded up to the chunk but capped at max_seq_len
    with pytest.raises(ValueError, match="max_capacity 40"):
        model(_prompt(6), torch.arange(35, 41), cache)


def test_clone_truncate_and_to(hf_dir_factory):
    _, path = hf_dir_factory("gemma3")
    model = ours_from_hf_dir(path)
    prefix, tail_a, tail_b = _prompt(20, 1), _prompt(5, 2), _prompt(5, 4)
    shared = model.new_cache()
    model(prefix, torch.arange(20), shared)
    fork = shared.clone()
    out_a = model(tail_a, torch.arange(20, 25), fork, last_only=True)
    assert shared.length == 20 and fork.length == 25  # the original is untouched
    fork.truncate(20)  # back to the common prefix, then another continuation
    out_b = model(tail_b, torch.arange(20, 25), fork.to("cpu"), last_only=True)
    full_a = model(torch.cat([prefix, tail_a], 1), torch.arange(25), last_only=True)
    full_b = model(torch.cat([prefix, tail_b], 1), torch.arange(25), last_only=True)
    assert (out_a - full_a).abs().max() < 1e-4 and (out_b - full_b).abs().max() < 1e-4


def test_cache_rejects_gap_in_positions():
    cache = KVCache(1, 1, 4)
    with pytest.raises(ValueError, match="starts at 5"):
        cache.prepare(torch.tensor([5, 6]))


# -- context shift ------------------------------------------------------------------------------
# Exactness: re-rotation itself is exact up to float32 rounding of the angles (~1e-6 here). A
# shifted cache is NOT identical to a fresh prefill of the kept tokens in a multi-layer model:
# the moved tokens' deeper-layer keys/values were computed while the dropped tokens were in
# context (llama.cpp's context shift has the same property). With one layer, keys/values depend
# on their own token only, so shift == fresh prefill exactly; that is what we assert at 1e-5.
# Gemma sliding layers: positions are renumbered, so after a shift a sliding window also reaches
# tokens before the dropped span that were outside it before; a fresh prefill does the same.

KEEP, DROP, TOTAL = 6, 10, 40


@pytest.mark.parametrize("kind", ["llama3", "gemma3"])
def test_shift_rerotates_keys_with_each_layers_rope(hf_dir_factory, kind):
    _, path = hf_dir_factory(kind)
    model = ours_from_hf_dir(path)
    args = model.args
    cache = model.new_cache()
    cache.prepare(torch.arange(TOTAL))
    raw = torch.randn(args.n_layers, 1, args.n_kv_heads, TOTAL, args.head_dim)  # pre-RoPE keys
    for i in range(args.n_layers):
        cos, sin = rope_cos_sin(model.inv_freq(args.layer_type(i), "cpu"), torch.arange(TOTAL))
        cache.k[i][:, :, :TOTAL] = apply_rope(raw[i], cos, sin)
        cache.v[i][:, :, :TOTAL] = raw[i] * 2
    model.shift_cache(cache, KEEP, DROP)
    assert cache.length == TOTAL - DROP
    kept = torch.cat([torch.arange(KEEP), torch.arange(KEEP + DROP, TOTAL)])
    for i in range(args.n_layers):
        cos, sin = rope_cos_sin(model.inv_freq(args.layer_type(i), "cpu"), torch.arange(TOTAL - DROP))
        want = apply_rope(raw[i][:, :, kept], cos, sin)
        assert (cache.k[i][:, :, : TOTAL - DROP] - want).abs().max() < 1e-5
        assert torch.equal(cache.v[i][:, :, : TOTAL - DROP], raw[i][:, :, kept] * 2)
    if kind == "gemma3":  # the two RoPE bases really differ, so a wrong base would fail above
        assert not torch.allclose(model.inv_freq("sliding", "cpu"), model.inv_freq("global", "cpu"))


@pytest.mark.parametrize("kind,layer", [("llama3", None), ("gemma3", "sliding_attention"),
                                        ("gemma3", "full_attention")])
def test_shift_equals_fresh_prefill_for_one_layer(hf_dir_factory, kind, layer):
    extra = {"num_hidden_layers": 1} | ({"layer_types": [layer]} if layer else {})
    _, path = hf_dir_factory(kind, **extra)
    model = ours_from_hf_dir(path)
    tokens = _prompt(TOTAL, 7)
    cache = model.new_cache()
    model(tokens, torch.arange(TOTAL), cache)
    model.shift_cache(cache, KEEP, DROP)
    nxt = torch.tensor([[5]])
    got = model(nxt, torch.tensor([TOTAL - DROP]), cache, last_only=True)
    kept = torch.cat([tokens[:, :KEEP], tokens[:, KEEP + DROP :], nxt], dim=1)
    want = model(kept, torch.arange(kept.shape[1]), last_only=True)
    diff = (got - want).abs().max().item()
    print(f"shift vs fresh prefill ({kind}, {layer}): max abs diff {diff:.2e}")
    assert diff < 1e-5


def test_shift_on_deep_model_stays_close(hf_dir_factory):
    """Multi-layer: not exact by construction (see above); measured, loosely bounded."""
    _, path = hf_dir_factory("gemma3")
    model = ours_from_hf_dir(path)
    tokens = _prompt(TOTAL, 7)
    cache = model.new_cache()
    model(tokens, torch.arange(TOTAL), cache)
    model.shift_cache(cache, KEEP, DROP)
    got = model(torch.tensor([[5]]), torch.tensor([TOTAL - DROP]), cache, last_only=True)
    kept = torch.cat([tokens[:, :KEEP], tokens[:, KEEP + DROP :], torch.tensor([[5]])], dim=1)
    want = model(kept, torch.arange(kept.shape[1]), last_only=True)
    print(f"shift vs fresh prefill (4-layer gemma3): max abs diff {(got - want).abs().max().item():.2e}, "
          f"logit scale {want.abs().max().item():.2f}")
    assert torch.isfinite(got).all() and cache.length == TOTAL - DROP + 1


def test_shift_rejects_bad_ranges(hf_dir_factory):
    _, path = hf_dir_factory("llama")
    model = ours_from_hf_dir(path)
    cache = model.new_cache()
    model(_prompt(10), torch.arange(10), cache)
    with pytest.raises(ValueError, match="keep"):
        model.shift_cache(cache, 5, 6)


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_static_decode_step_compiles_without_graph_breaks(hf_dir_factory, kind):
    """The documented torch.compile recipe: one graph (fullgraph), no recompiles across steps."""
    import torch._dynamo

    _, path = hf_dir_factory(kind)
    model = ours_from_hf_dir(path)
    cache = model.new_cache(capacity=64, static=True)
    prompt = _prompt(12)
    out = model(prompt, torch.arange(12), cache, last_only=True)
    torch._dynamo.reset()
    step = torch.compile(model.forward, backend="eager", fullgraph=True, dynamic=False)
    want_cache = cache.clone()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for pos in range(12, 18):
            tok = out[0, -1].argmax().view(1, 1)
            ipos = torch.tensor([pos])
            want = model(tok, ipos, want_cache, True)  # eager reference on its own cache copy
            cache.prepare(ipos)
            out = step(tok, ipos, cache, True)
            assert (out - want).abs().max() < 1e-5
    assert cache.length == 18


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_cached_and_compiled_decode_match_eager(hf_dir_factory):
    from model.hf_loader import read_hf_dir
    from model.registry import build_model

    _, path = hf_dir_factory("gemma3")
    model = build_model(*read_hf_dir(path), device="cuda", dtype=torch.float32)
    prompt = _prompt().cuda()
    want_toks, want_logits = _greedy_full(model, prompt, 8)
    got_toks, got_logits = _greedy_cached(model, prompt, 8, model.new_cache())
    assert got_toks == want_toks and (got_logits - want_logits).abs().max() < 1e-3
    cache = model.new_cache(capacity=64, static=True)
    out = model(prompt, torch.arange(PROMPT, device="cuda"), cache, last_only=True)
    step = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    for i in range(8):
        assert int(out[0, -1].argmax()) == want_toks[i]
        pos = torch.tensor([PROMPT + i], device="cuda")
        cache.prepare(pos)
        out = step(torch.tensor([[want_toks[i]]], device="cuda"), pos, cache, True).clone()
