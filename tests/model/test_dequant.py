"""Our dequantizers == gguf.quants.dequantize (the reference), on generated data and real files."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import quants
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as Q

from model.dequant import SUPPORTED_TYPES, dequantize, dequantize_numpy
from model.gguf_meta import read_header
from tests.model.conftest import SMOLLM2_GGUF

ALL = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K]
K_QUANTS = {Q.Q4_K, Q.Q5_K, Q.Q6_K}  # gguf.quants can only dequantize these


def _random_k_blocks(qtype: Q, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """Random bytes with finite float16 scales where the format keeps them."""
    _, size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
    scales = rng.uniform(1e-3, 0.1, (n_blocks, 2)).astype(np.float16).view(np.uint8)  # (n, 4)
    if qtype == Q.Q6_K:
        blocks[:, 208:210] = scales[:, :2]  # d sits at the end
    else:
        blocks[:, 0:4] = scales  # d, dmin first
    return blocks


@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
def test_matches_gguf_reference_on_generated_data(qtype):
    rng = np.random.default_rng(int(qtype))
    shape = (6, 768)  # 3 super-blocks / 24 blocks per row
    if qtype in K_QUANTS:
        block, _ = GGML_QUANT_SIZES[qtype]
        raw = _random_k_blocks(qtype, 6 * 768 // block, rng).reshape(6, -1)
    else:
        raw = quants.quantize(rng.standard_normal(shape).astype(np.float32) * 3, qtype)
    want = quants.dequantize(raw, qtype)
    got = dequantize_numpy(raw, qtype, shape)
    assert got.dtype == np.float32 and got.shape == shape
    np.testing.assert_array_equal(got, want)  # bit-exact: same float32 operations
    assert np.isfinite(got).all() and np.abs(got).max() > 0


def test_large_tensor_is_processed_in_chunks_identically():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4200, 1024)).astype(np.float32)  # > 4M values: several chunks
    raw = quants.quantize(x, Q.Q8_0)
    got = dequantize(raw, Q.Q8_0, x.shape)
    np.testing.assert_array_equal(got.numpy(), quants.dequantize(raw, Q.Q8_0))


def test_unsupported_type_is_named():
    with pytest.raises(ValueError, match="IQ2_XXS"):
        dequantize_numpy(np.zeros(66, np.uint8), Q.IQ2_XXS, (256,))


def _check_real_file(path, max_elems=30_000_000):
    """The smallest tensor of each type in the file, ours vs the reference; returns the types seen."""
    header = read_header(path)
    seen = set()
    for info in sorted(header.tensors, key=lambda t: t.n_bytes):
        n = int(np.prod(info.shape))
        if info.ggml_type in seen or n > max_elems:
            continue
        seen.add(info.ggml_type)
        raw = np.memmap(path, np.uint8, "r", offset=info.offset, shape=(info.n_bytes,))
        byte_shape = quants.quant_shape_to_byte_shape(info.shape, info.ggml_type)
        ref_in = raw.reshape(byte_shape) if info.ggml_type not in (Q.F32, Q.F16) else (
            raw.view(np.float32 if info.ggml_type == Q.F32 else np.float16).reshape(info.shape))
        want = quants.dequantize(ref_in, info.ggml_type).astype(np.float32)
        np.testing.assert_array_equal(dequantize(raw, info.ggml_type, info.shape).numpy(), want)
    assert seen <= SUPPORTED_TYPES
    return seen


@pytest.mark.slow
def test_real_smollm2_tensors():
    if not SMOLLM2_GGUF.is_file():
        pytest.skip("SmolLM2 GGUF not installed")
    assert _check_real_file(SMOLLM2_GGUF) == {Q.F32, Q.Q4_1, Q.Q8_0}  # Q8_0: the embedding


@pytest.mark.slow
def test_real_gemma_tensors(gemma_gguf):
    assert _check_real_file(gemma_gguf) == {Q.F32, Q.Q5_0, Q.Q4_K, Q.Q6_K, Q.Q8_0}
