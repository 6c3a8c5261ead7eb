"""Dequantize GGUF tensor data (ggml block formats) to float32, vectorised with numpy.

    w = dequantize(raw_bytes, GGMLQuantizationType.Q4_K, shape)   # -> torch.float32 tensor

Block layouts (little endian, `d`/`m`/`dmin` are float16), values per block in brackets:
  Q8_0 [32]: d, int8 q[32]                                 x = d * q
  Q4_0 [32]: d, nibbles[16] (low nibbles = x[0:16])        x = d * (q - 8)
  Q4_1 [32]: d, m, nibbles[16]                             x = d * q + m
  Q5_0 [32]: d, u32 qh (bit j = 5th bit of value j), nibbles[16]    x = d * (q - 16)
  Q5_1 [32]: d, m, u32 qh, nibbles[16]                     x = d * q + m
  Q4_K [256]: d, dmin, 12 bytes of 6-bit scales/mins for 8 sub-blocks of 32, nibbles[128]
  Q5_K [256]: as Q4_K plus qh[32]: bit j of qh[l] is the 5th bit of value l of sub-block j
  Q6_K [256]: ql[128] (low 4 bits), qh[64] (high 2 bits), int8 scales[16] (one per 16), d
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

Q = GGMLQuantizationType


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """float16 field at byte `start` of each block, as float32 column (n, 1)."""
    return blocks[:, start : start + 2].copy().view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return qs & 0x0F, qs >> 4


def _q8_0(b: np.ndarray) -> np.ndarray:
    return _f16(b, 0) * b[:, 2:].view(np.int8).astype(np.float32)


def _q4_0(b: np.ndarray) -> np.ndarray:
    lo, hi = _nibbles(b[:, 2:])
    q = np.concatenate([lo, hi], axis=1).astype(np.float32) - 8.0  # (n, 32)
    return _f16(b, 0) * q


def _q4_1(b: np.ndarray) -> np.ndarray:
    lo, hi = _nibbles(b[:, 4:])
    q = np.concatenate([lo, hi], axis=1).astype(np.float32)  # (n, 32)
    return _f16(b, 0) * q + _f16(b, 2)


def _q5_bits(qh: np.ndarray) -> np.ndarray:
    """(n, 4) bytes = little-endian u32 -> (n, 32) fifth bits; bit j belongs to value j."""
    bits = qh.copy().view(np.uint32)  # (n, 1)
    return ((bits >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8) << 4


def _q5_0(b: np.ndarray) -> np.ndarray:
    lo, hi = _nibbles(b[:, 6:])
    q = (np.concatenate([lo, hi], axis=1) | _q5_bits(b[:, 2:6])).astype(np.float32) - 16.0
    return _f16(b, 0) * q


def _q5_1(b: np.ndarray) -> np.ndarray:
    lo, hi = _nibbles(b[:, 8:])
    q = (np.concatenate([lo, hi], axis=1) | _q5_bits(b[:, 4:8])).astype(np.float32)
    return _f16(b, 0) * q + _f16(b, 2)


def _k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unpack 12 bytes -> 8 six-bit scales and 8 six-bit mins per block, each (n, 8) float32."""
    sc = np.empty((s.shape[0], 8), dtype=np.uint8)
    mn = np.empty_like(sc)
    sc[:, :4] = s[:, 0:4] & 63
    mn[:, :4] = s[:, 4:8] & 63
    sc[:, 4:] = (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)
    mn[:, 4:] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return sc.astype(np.float32), mn.astype(np.float32)


def _k_nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 128) bytes -> (n, 8, 32): each 32-byte group gives sub-block 2j (low) and 2j+1 (high)."""
    lo, hi = _nibbles(qs.reshape(-1, 4, 32))
    return np.stack([lo, hi], axis=2).reshape(-1, 8, 32)


def _q4_k(b: np.ndarray) -> np.ndarray:
    d, dmin = _f16(b, 0)[:, :, None], _f16(b, 2)[:, :, None]  # (n, 1, 1)
    sc, mn = _k_scales(b[:, 4:16])
    q = _k_nibbles(b[:, 16:144]).astype(np.float32)  # (n, 8, 32)
    return (d * sc[:, :, None]) * q - (dmin * mn[:, :, None])


def _q5_k(b: np.ndarray) -> np.ndarray:
    d, dmin = _f16(b, 0)[:, :, None], _f16(b, 2)[:, :, None]
    sc, mn = _k_scales(b[:, 4:16])
    qh = b[:, 16:48]  # (n, 32)
    high = (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1  # (n, 8, 32)
    q = (_k_nibbles(b[:, 48:176]) | (high << 4)).astype(np.float32)
    return (d * sc[:, :, None]) * q - (dmin * mn[:, :, None])


def _q6_k(b: np.ndarray) -> np.ndarray:
    ql = b[:, 0:128].reshape(-1, 2, 2, 32)  # (n, half, first/second 32 bytes, 32)
    qh = b[:, 128:192].reshape(-1, 2, 32)  # (n, half, 32)
    scales = b[:, 192:208].view(np.int8).astype(np.float32)  # (n, 16): one per 16 outputs
    d = _f16(b, 208)  # (n, 1)
    lo, hi = _nibbles(ql)
    parts = [lo[:, :, 0], lo[:, :, 1], hi[:, :, 0], hi[:, :, 1]]  # output order within a half
    q = np.stack([p | (((qh >> (2 * i)) & 3) << 4) for i, p in enumerate(parts)], axis=2)  # (n, 2, 4, 32)
    q = q.reshape(-1, 16, 16).astype(np.float32) - 32.0
    return ((d * scales)[:, :, None] * q).reshape(-1, 256)


_BLOCK_FNS = {Q.Q8_0: _q8_0, Q.Q4_0: _q4_0, Q.Q4_1: _q4_1, Q.Q5_0: _q5_0, Q.Q5_1: _q5_1, Q.Q4_K: _q4_k, Q.Q5_K: _q5_k, Q.Q6_K: _q6_k}
_CHUNK_VALUES = 1 << 22
SUPPORTED_TYPES = frozenset({Q.F32, Q.F16, Q.BF16, *_BLOCK_FNS})


def dequantize_numpy(data: Any, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> np.ndarray:
    """Raw bytes (bytes / uint8 array / memmap) of one tensor -> float32 array of `shape`."""
    raw = np.frombuffer(data, dtype=np.uint8) if isinstance(data, bytes | bytearray | memoryview) else data
    raw = raw.reshape(-1).view(np.uint8)
    n = int(np.prod(shape)) if shape else 1
    if qtype == Q.F32:
        return raw.view(np.float32)[:n].reshape(shape).copy()
    if qtype == Q.F16:
        return raw.view(np.float16)[:n].astype(np.float32).reshape(shape)
    if qtype == Q.BF16:  # bfloat16 is the top half of a float32
        return (raw.view(np.uint16)[:n].astype(np.uint32) << 16).view(np.float32).reshape(shape)
    if qtype not in _BLOCK_FNS:
        names = ", ".join(sorted(t.name for t in SUPPORTED_TYPES))
        raise ValueError(f"unsupported ggml quantization type {qtype.name}; supported: {names}")
    block, type_size = GGML_QUANT_SIZES[qtype]
    assert n % block == 0, f"{n} values is not a whole number of {qtype.name} blocks of {block}"
    blocks = raw[: n // block * type_size].reshape(-1, type_size)
    out = np.empty((blocks.shape[0], block), dtype=np.float32)
    step = max(1, _CHUNK_VALUES // block)  # bounded temporaries for big tensors (embeddings)
    for i in range(0, blocks.shape[0], step):
        out[i : i + step] = _BLOCK_FNS[qtype](blocks[i : i + step]).reshape(-1, block)
    return out.reshape(shape)


def dequantize(data: Any, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> torch.Tensor:
    """As `dequantize_numpy`, returned as a torch float32 tensor (CPU)."""
    return torch.from_numpy(np.ascontiguousarray(dequantize_numpy(data, qtype, shape)))
