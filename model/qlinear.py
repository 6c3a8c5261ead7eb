"""Quantized GGUF weights kept packed: 4-bit planes read by an int4 CPU kernel.

    qw = split_blocks(raw, GGMLQuantizationType.Q4_1, (N, K))   # QWeight: q int, d/m float32 per group
    pw = pack(qw)                 # PackedWeight: one or two 4-bit planes, or one int8 (frees q)
    lin = QLinear(pw)             # y = x @ w.T, one kernel call per plane
    emb = QEmbedding(pw)          # rows dequantized on lookup, from the same bytes (tied heads share)
    install_quantized(model, {"layers.0.attention.wq.weight": pw, ...})

Decode reads every weight once per token, so a float32 copy (4 bytes/weight) is bandwidth bound;
a 4-bit plane with its scales is 0.625-0.75 bytes/weight. Every supported ggml block type is
first written as w = d * q + m per group (m = 0 for symmetric types), with d and m computed by
the same float32 operations as model/dequant.py, so `QWeight.dequantized()` equals `dequantize()` bit for bit;
packing then maps that onto a kernel's format (below), exactly but for its scales' rounding.

Two kernels (`kernel()` picks one per machine): torch's `_weight_int4pack_mm_for_cpu` (bf16
activations; quick where torch built it for AVX-512/AMX) and model/q4dot.c (int8 activations per
group of 32, as llama.cpp; on AVX2-only CPUs, where torch's is 2x slower at one row; it reads
5-8 bit types as one int8 plane).
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass, fields
from functools import cache

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from torch import nn

from model import q4dot
from model.dequant import _f16, _k_nibbles, _k_scales, _nibbles, _q5_bits

Q = GGMLQuantizationType


@dataclass
class QWeight:
    """w = (q.view(N, K//G, G) * d[..., None] + m[..., None]).view(N, K); m None means 0."""

    q: torch.Tensor  # (N, K) uint8 or int8
    d: torch.Tensor  # (N, K // G) float32
    m: torch.Tensor | None  # (N, K // G) float32
    group: int  # G

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def dequantized(self) -> torch.Tensor:
        """Float32 weights, eager ops (no FMA contraction): identical to model/dequant.py."""
        *lead, k = self.q.shape
        g = self.group
        w = self.q.view(*lead, k // g, g).float() * self.d[..., None]
        if self.m is not None:
            w = w + self.m[..., None]
        return w.view(*lead, k)


# -- ggml blocks -> (q, d, m) per group ----------------------------------------------------------
# Each returns q (n_blocks, B) integers, d and m (n_blocks, B // G) float32, mirroring dequant.py.


def _q8_0(b):
    return b[:, 2:].view(np.int8), _f16(b, 0), None


def _q4_0(b):
    lo, hi = _nibbles(b[:, 2:])
    return np.concatenate([lo, hi], axis=1).view(np.int8) - np.int8(8), _f16(b, 0), None


def _q4_1(b):
    lo, hi = _nibbles(b[:, 4:])
    return np.concatenate([lo, hi], axis=1), _f16(b, 0), _f16(b, 2)


def _q5_0(b):
    lo, hi = _nibbles(b[:, 6:])
    q = np.concatenate([lo, hi], axis=1) | _q5_bits(b[:, 2:6])
    return q.view(np.int8) - np.int8(16), _f16(b, 0), None


def _q5_1(b):
    lo, hi = _nibbles(b[:, 8:])
    return np.concatenate([lo, hi], axis=1) | _q5_bits(b[:, 4:8]), _f16(b, 0), _f16(b, 2)


def _k_affine(b, q):
    """Q4_K/Q5_K: w = (d*sc) * q - (dmin*mn) per sub-block of 32; m = -(dmin*mn) adds the same."""
    sc, mn = _k_scales(b[:, 4:16])
    return q.reshape(-1, 256), _f16(b, 0) * sc, -(_f16(b, 2) * mn)


def _q4_k(b):
    return _k_affine(b, _k_nibbles(b[:, 16:144]))


def _q5_k(b):
    high = (b[:, 16:48][:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1
    return _k_affine(b, _k_nibbles(b[:, 48:176]) | (high << 4))


def _q6_k(b):
    ql, qh = b[:, 0:128].reshape(-1, 2, 2, 32), b[:, 128:192].reshape(-1, 2, 32)
    lo, hi = _nibbles(ql)
    parts = [lo[:, :, 0], lo[:, :, 1], hi[:, :, 0], hi[:, :, 1]]
    q = np.stack([p | (((qh >> (2 * i)) & 3) << 4) for i, p in enumerate(parts)], axis=2)
    q = q.reshape(-1, 256).view(np.int8) - np.int8(32)
    return q, _f16(b, 208) * b[:, 192:208].view(np.int8).astype(np.float32), None  # d per 16 values


_SPLITTERS = {Q.Q8_0: (_q8_0, 32), Q.Q4_0: (_q4_0, 32), Q.Q4_1: (_q4_1, 32), Q.Q5_0: (_q5_0, 32),
              Q.Q5_1: (_q5_1, 32), Q.Q4_K: (_q4_k, 32), Q.Q5_K: (_q5_k, 32), Q.Q6_K: (_q6_k, 16)}
QUANTIZED_TYPES = frozenset(_SPLITTERS)


def split_blocks(data, qtype: GGMLQuantizationType, shape: tuple[int, int]) -> QWeight:
    """Raw bytes of a 2-D ggml tensor (rows, cols) -> QWeight whose dequantized() == dequantize()."""
    if qtype not in _SPLITTERS:
        raise ValueError(f"ggml type {qtype.name} cannot stay quantized; supported: "
                         f"{', '.join(sorted(t.name for t in QUANTIZED_TYPES))}")
    fn, group = _SPLITTERS[qtype]
    block, size = GGML_QUANT_SIZES[qtype]
    n, k = shape
    raw = np.asarray(data).reshape(-1).view(np.uint8)
    blocks = raw[: n * k // block * size].reshape(-1, size)
    q, d, m = fn(blocks)
    q = torch.from_numpy(np.ascontiguousarray(q)).view(n, k)
    to_t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).view(n, k // group)  # noqa: E731
    return QWeight(q, to_t(d), None if m is None else to_t(m), group)


def permute_rows(qw: QWeight, fn) -> QWeight:
    """Apply a row permutation `fn` (e.g. gguf_loader._unpermute) to q, d and m alike."""
    m = None if qw.m is None else fn(qw.m).contiguous()
    return QWeight(fn(qw.q).contiguous(), fn(qw.d).contiguous(), m, qw.group)


# -- torch's packed int4 CPU kernel ---------------------------------------------------------------
# torch._weight_int4pack_mm_for_cpu(x bf16 (B, K), packed (N, K/2) uint8, 32, sz bf16 (K/32, N, 2))
# computes x @ w.T with w = (u - 8) * scale + zero for 4-bit u, groups of 32 along K, in one pass
# over the nibbles (AVX512/AMX where the CPU has them). Its float32 variant is a slow reference
# loop, so activations go through it as bfloat16 and come back float32: the only precision loss
# against the dequantized float32 weights (bf16 inputs, scales and outputs; see README).
#
# Any integer weight w = d * q + m maps onto it exactly: with u = q + o in [0, 255] split into
# nibbles u = 16h + l, w = 16d (h - 8) + d (l - 8) + ((136 - o) d + m); one plane (u = q - min(q),
# zero (8 - o) d + m) when q spans at most 16 values. Q4_* types take one plane (0.625
# bytes/weight with bf16 scales), Q5_*/Q8_0 two; Q6_K's 16-value scales are requantized to int8
# per 32 (error <= 1/254 of the group's largest weight, 8x finer than Q6_K's own step).
#
# model/q4dot.c takes the same planes as u with float16 d = scale and m = zero - 8 * scale, laid
# out row by row (no padding), and float32 activations that it rounds to int8 per group of 32.
# It also reads 8-bit integers directly, so for it the 5-8 bit types are one int8 plane
# (w = q * d + m, 1.06x a Q8_0 file) rather than two 4-bit ones: one pass over the weights.

GROUP = 32  # the kernel's smallest group size
ROW_PAD = 64  # planes pad N to a multiple of 64, which every layout's row block divides


KERNELS = ("torch", "q4dot")


def _torch_int4() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and row_block() is not None


@cache
def kernel() -> str | None:
    """The int4 matmul this machine runs: "q4dot" (model/q4dot.c) where torch's kernel is its AVX2
    variant (or missing) and ours builds; "torch" where torch's is the AVX-512/AMX one; None where
    neither runs (weights then load as float). $MEMENTO_INT4_KERNEL=torch|q4dot picks one."""
    choice = os.environ.get("MEMENTO_INT4_KERNEL", "auto").lower()
    if choice not in ("auto", *KERNELS):
        raise ValueError(f"MEMENTO_INT4_KERNEL={choice!r}: use auto, torch or q4dot")
    if choice == "torch":
        return "torch" if _torch_int4() else None
    if choice == "q4dot":
        return "q4dot" if q4dot.available() else None
    # measured on an AVX2-only host: q4dot 2.0x torch's kernel at one row, 1.6x at eight
    if (not _torch_int4() or row_block() == 32) and q4dot.available():
        return "q4dot"
    return "torch" if _torch_int4() else None


def int4_supported() -> bool:
    """Packed 4-bit weights can run here (see kernel())."""
    return kernel() is not None


@cache
def row_block() -> int | None:
    """Rows per interleaved block of torch's packed int4 layout on this CPU, or None if it is
    neither we know. The layout is K-major within blocks of R rows, row r of a block in byte
    r % (R/2), the low nibble for the first half: R = 64 where torch's kernel was built for
    AVX-512, 32 on AVX2 machines (the same torch wheel picks at run time). Embedding lookups read
    rows straight from the packed bytes, so check once which one this is."""
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return None
    u = torch.randint(0, 16, (2 * ROW_PAD, 2 * GROUP), generator=torch.Generator().manual_seed(0))
    packed = torch._convert_weight_to_int4pack_for_cpu(u.int(), 1)
    rows = torch.arange(u.shape[0])
    for rb in (64, 32):
        if torch.equal(_unpack_rows(packed, rows, u.shape[1], rb), u.to(torch.uint8)):
            return rb
    return None


def _unpack_rows(packed: torch.Tensor, rows: torch.Tensor, k: int, rb: int | None = None) -> torch.Tensor:
    """4-bit values u (len(rows), K) of the given rows, read from torch's packed CPU layout."""
    rb = rb or row_block()
    half = rb // 2
    blocks = packed.view(-1, k, half)  # (N / R, K, R / 2): byte (b, k, r % (R/2)) holds rows b*R + r
    byte = blocks[rows // rb, :, rows % half]  # (len(rows), K)
    shift = ((rows % rb) // half * 4).to(torch.uint8)[:, None]
    return (byte >> shift) & 15


def _pack_u4(u: torch.Tensor) -> torch.Tensor:
    """u (N, K) uint8 in [0, 15] -> torch's packed layout (the inverse of _unpack_rows), written
    directly in uint8: the library's converter wants int32 input, 4x the bytes, and is slower."""
    n, k = u.shape
    rb = row_block()
    blocks = u.view(n // rb, 2, rb // 2, k)  # (N/R, low/high half, R/2 rows, K)
    packed = blocks[:, 0] | (blocks[:, 1] << 4)  # (N/R, R/2, K)
    return packed.transpose(1, 2).contiguous().view(n, k // 2)


@dataclass
class Int4Plane:
    """One packed 4-bit plane: w_plane = (u - 8) * scale + zero per group of 32."""

    packed: torch.Tensor  # (N_pad, K / 2) uint8, torch's CPU layout
    sz: torch.Tensor  # (K / 32, N_pad, 2) bfloat16: scale, zero


@dataclass
class RowPlane:
    """One 4-bit plane in model/q4dot.c's layout: w_plane = u * d + m per group of 32 (float16 d, m)."""

    nib: torch.Tensor  # (N, K / 2) uint8: per group, byte i holds u[i] and u[i + 16]
    dm: torch.Tensor  # (N, 2, K / 32) float16: d, then m


@dataclass
class Int8RowPlane:
    """8-bit weights in model/q4dot.c's layout, read in one pass: w = q * d + m per group of 32."""

    q: torch.Tensor  # (N, K) int8
    dm: torch.Tensor  # (N, 2, K / 32) float16: d, then m


Plane = Int4Plane | RowPlane | Int8RowPlane


def _plane(u: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, kern: str) -> Int4Plane | RowPlane:
    """u (N, K) in [0, 15], scale/zero (N, K/32) float32 (w = (u - 8) * scale + zero) -> a plane for
    `kern`: torch's padded to 64 rows with bf16 scales, or q4dot's with float16 d and m."""
    if kern == "q4dot":
        return RowPlane(q4dot.pack_nibbles(u.to(torch.uint8).contiguous()), _row_scales(scale, zero - 8 * scale))
    pad = -u.shape[0] % ROW_PAD
    if pad:  # padded rows: u = 8, scale = zero = 0, so they compute 0 and are sliced off
        u = torch.cat([u, torch.full((pad, u.shape[1]), 8, dtype=u.dtype)])
        scale, zero = (torch.cat([t, t.new_zeros(pad, t.shape[1])]) for t in (scale, zero))
    packed = _pack_u4(u.to(torch.uint8))
    sz = torch.stack([scale.T, zero.T], dim=-1).to(torch.bfloat16).contiguous()
    return Int4Plane(packed, sz)


def _row_scales(d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """q4dot's dm (N, 2, K/32) float16 from d and m (N, K/32) float32."""
    dm = torch.stack([d, m], dim=1).to(torch.float16).contiguous()
    if not torch.isfinite(dm).all():  # GGUF's scales are float16 already; a converted one could exceed it
        raise ValueError("a weight scale is beyond float16's range; set MEMENTO_INT4_KERNEL=torch")
    return dm


def _regroup(qw: QWeight) -> QWeight:
    """Groups of 16 (Q6_K) -> int8 per 32 on the float32 values; others are returned as they are."""
    if qw.group == GROUP:
        return qw
    n, k = qw.shape
    w = qw.dequantized().view(n, k // GROUP, GROUP)
    d = w.abs().amax(-1) / 127
    d = torch.where(d > 0, d, torch.ones_like(d))
    q = torch.round(w / d[..., None]).clamp(-127, 127).to(torch.int8)
    return QWeight(q.view(n, k), d, None, GROUP)


def to_planes(qw: QWeight, kern: str | None = None) -> list[Plane]:
    """QWeight -> one or two int4 planes computing the same w (see the comment above), laid out
    for `kern` (default: this machine's kernel()); for q4dot, 5-8 bit types one int8 plane."""
    kern = kern or kernel() or "torch"
    qw = _regroup(qw)
    lo_q, hi_q = (int(v) for v in torch.aminmax(qw.q))
    m = qw.m if qw.m is not None else torch.zeros_like(qw.d)
    if hi_q - lo_q < 16:  # one plane: u = q - min(q)
        o = -lo_q
        return [_plane(_offset(qw.q, o), qw.d, (8 - o) * qw.d + m, kern)]
    if kern == "q4dot" and -128 <= lo_q and hi_q <= 127:
        return [Int8RowPlane(qw.q.to(torch.int8).contiguous(), _row_scales(qw.d, m))]
    # Two planes. Centre u on 128 so the high nibble sits near 8: its plane's values (h - 8) * 16d
    # stay as small as the weights themselves, and bf16 rounding of 16d costs no more than of d.
    o = 128 - (lo_q + hi_q + 1) // 2
    u = _offset(qw.q, o)
    return [_plane(u >> 4, 16 * qw.d, torch.zeros_like(qw.d), kern), _plane(u & 15, qw.d, (136 - o) * qw.d + m, kern)]


def _offset(q: torch.Tensor, o: int) -> torch.Tensor:
    """q + o as uint8 (the caller made sure it fits)."""
    if o == 0 and q.dtype == torch.uint8:
        return q
    return (q.to(torch.int16) + o).to(torch.uint8)


def _plane_matmul(x: torch.Tensor, p: Plane) -> torch.Tensor:
    """x (B, K) -> (B, N_pad) float32 through the plane's kernel."""
    if isinstance(p, (RowPlane, Int8RowPlane)):  # q4dot.run makes x float32 and contiguous if it is not
        w = p.nib if isinstance(p, RowPlane) else p.q
        if torch.compiler.is_compiling():  # the custom op: one node in the graph
            return q4dot.matmul(x, w, p.dm)
        return q4dot.run(x, w, p.dm)
    xb = x.to(torch.bfloat16).contiguous()
    return torch._weight_int4pack_mm_for_cpu(xb, p.packed, GROUP, p.sz).float()


def _plane_rows(p: Plane, rows: torch.Tensor) -> torch.Tensor:
    """Float32 weights of `rows` of one plane."""
    if isinstance(p, RowPlane):
        return q4dot.dequantize(q4dot.unpack_rows(p.nib, rows), p.dm[rows])
    if isinstance(p, Int8RowPlane):
        return q4dot.dequantize(p.q[rows], p.dm[rows])
    k = p.packed.shape[1] * 2
    u = _unpack_rows(p.packed, rows, k).float().view(len(rows), k // GROUP, GROUP)
    sz = p.sz[:, rows].float()  # (K/32, R, 2)
    scale, zero = sz[..., 0].T[..., None], sz[..., 1].T[..., None]
    return ((u - 8) * scale + zero).view(len(rows), k)


class PackedWeight(nn.Module):
    """Holds a weight's planes as buffers (so .to() and state_dict see them), shared when tied."""

    def __init__(self, planes: list[Plane], shape: tuple[int, int]) -> None:
        super().__init__()
        self.n_planes = len(planes)
        self.plane_type = type(planes[0])
        self.field_names = tuple(f.name for f in fields(self.plane_type))  # packed/sz, nib/dm or q/dm
        for i, p in enumerate(planes):
            for name in self.field_names:
                self.register_buffer(f"{name}{i}", getattr(p, name))
        self.out_features, self.in_features = shape
        self._planes = self._read_planes()  # built once: a decode step makes hundreds of matmul calls

    def _read_planes(self) -> list[Plane]:
        return [self.plane_type(*(getattr(self, f"{n}{i}") for n in self.field_names)) for i in range(self.n_planes)]

    def _apply(self, fn, recurse=True):  # .to() and friends replace the buffers
        super()._apply(fn, recurse)
        self._planes = self._read_planes()
        return self

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def planes(self) -> list[Plane]:
        return list(self._planes)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, K) float -> (B, N) float32."""
        planes = self._planes
        y = _plane_matmul(x, planes[0])
        for p in planes[1:]:
            y = y + _plane_matmul(x, p)
        return y if y.shape[1] == self.out_features else y[:, : self.out_features]

    def rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Float32 weight rows (an embedding lookup), summed over planes."""
        return sum(_plane_rows(p, rows) for p in self._planes)

    def rows_view(self, a: int, b: int) -> PackedWeight:
        """Rows [a, b) as a PackedWeight sharing these bytes (a fused projection's parts; torch's
        layout copies only its scales, and needs a and b on its 64-row pads)."""
        if self.plane_type is Int4Plane:
            if a % ROW_PAD or b % ROW_PAD:
                raise ValueError(f"rows [{a}, {b}) of torch's int4 layout must start and end on {ROW_PAD}-row pads")
            planes = [Int4Plane(p.packed[a:b], p.sz[:, a:b].contiguous()) for p in self._planes]
        else:
            planes = [self.plane_type(*(getattr(p, n)[a:b] for n in self.field_names)) for p in self._planes]
        return PackedWeight(planes, (b - a, self.in_features))

    def adopt(self, other: PackedWeight) -> None:
        """Hold `other`'s tensors (a view of a fused weight's rows) instead of our own, which are freed
        even where a caller still holds this PackedWeight (a loader's state dict)."""
        if (other.shape, other.plane_type, other.n_planes) != (self.shape, self.plane_type, self.n_planes):
            raise ValueError(f"cannot adopt a {other.shape} {other.plane_type.__name__} weight as {self.shape}")
        for name in self._buffers:
            setattr(self, name, getattr(other, name))
        self._planes = self._read_planes()


def fuse(parts: list[PackedWeight]) -> PackedWeight | None:
    """One weight whose rows are the parts' rows in order, so x @ [w1; w2; ...].T is one kernel call
    per plane instead of one per part; None where they cannot share planes (another layout, plane
    count or K, or in torch's layout a part that is not a whole number of 64-row pads)."""
    first = parts[0]
    same = all(p.plane_type is first.plane_type and p.n_planes == first.n_planes
               and p.in_features == first.in_features for p in parts)
    if not same or (first.plane_type is Int4Plane and any(p.out_features % ROW_PAD for p in parts)):
        return None
    planes = []
    for i in range(first.n_planes):
        ps = [p._planes[i] for p in parts]
        if first.plane_type is Int4Plane:  # sz is (K/32, N, 2): rows on dim 1
            planes.append(Int4Plane(torch.cat([p.packed for p in ps]), torch.cat([p.sz for p in ps], dim=1)))
        else:
            planes.append(first.plane_type(*(torch.cat([getattr(p, n) for p in ps]) for n in first.field_names)))
    return PackedWeight(planes, (sum(p.out_features for p in parts), first.in_features))


def pack(qw: QWeight, kern: str | None = None) -> PackedWeight:
    return PackedWeight(to_planes(qw, kern), qw.shape)


def _weights(qw: QWeight | PackedWeight) -> PackedWeight:
    return qw if isinstance(qw, PackedWeight) else pack(qw)


class QLinear(nn.Module):
    """nn.Linear replacement over packed int4 planes: y = x @ w.T + bias, one kernel per plane."""

    def __init__(self, qw: QWeight | PackedWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.w = _weights(qw)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.out_features, self.in_features = self.w.out_features, self.w.in_features

    def dequantized(self) -> torch.Tensor:
        """The float32 weights this module computes with (bf16 scales applied)."""
        return self.w.rows(torch.arange(self.out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.w.matmul(x.reshape(-1, self.in_features))
        if self.bias is not None:
            y = y + self.bias
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y.view(*x.shape[:-1], self.out_features)


class QEmbedding(nn.Module):
    """nn.Embedding replacement over the same planes: only the looked-up rows are dequantized."""

    def __init__(self, qw: QWeight | PackedWeight, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.w = _weights(qw)
        self.num_embeddings, self.embedding_dim = self.w.out_features, self.w.in_features
        self.dtype = dtype

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = self.w.rows(tokens.reshape(-1).to(torch.long))
        return rows.to(self.dtype).view(*tokens.shape, self.embedding_dim)


def install_quantized(model: nn.Module, weights: dict[str, PackedWeight | QWeight],
                      dtype: torch.dtype = torch.float32) -> None:
    """Swap the nn.Linear / nn.Embedding owning each `<module>.weight` in `weights` for QLinear /
    QEmbedding (bias kept). A tied output head shares the embedding's packed bytes. CPU only."""
    weights = {k: _weights(v) for k, v in weights.items()}
    for name, pw in weights.items():
        path = name.removesuffix(".weight")
        parent_name, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, attr)
        if isinstance(old, nn.Embedding):
            setattr(parent, attr, QEmbedding(pw, dtype))
        elif isinstance(old, nn.Linear):
            bias = None if old.bias is None else old.bias.detach()
            setattr(parent, attr, QLinear(pw, bias))
        else:
            raise TypeError(f"{name}: owner is {type(old).__name__}, expected nn.Linear or nn.Embedding")
    emb = weights.get("tok_embeddings.weight")
    if getattr(model.args, "tie_embeddings", False) and emb is not None:
        model.output = QLinear(emb)
    fuse_projections(model)


def _libc_trim():
    """glibc keeps freed heap memory mapped (RSS stays at the load's peak); malloc_trim gives it
    back. A no-op where there is no glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return lambda: libc.malloc_trim(0)
    except (OSError, AttributeError):
        return lambda: None


release_freed_memory = _libc_trim()


# fused attribute -> the linears it computes at once; a model opts in by declaring the attribute
# (None) and using it when set (model/llama.py: Attention.wqkv, FeedForward.w13)
FUSED = {"wqkv": ("wq", "wk", "wv"), "w13": ("w1", "w3")}


def fuse_projections(model: nn.Module) -> None:
    """Where a module's parallel projections (q/k/v, gate/up) are all QLinear, give it one QLinear
    over their rows (one kernel call instead of three or two: each call costs ~25 us of Python on
    a 2-core CPU, a fifth of SmolLM2's step) and turn the parts into views of its bytes, so the
    model holds each weight once."""
    for mod in list(model.modules()):
        for fused_name, names in FUSED.items():
            if fused_name not in mod.__dict__ or mod.__dict__[fused_name] is not None:
                continue  # the module does not use a fused projection, or has one
            lins = [getattr(mod, n, None) for n in names]
            if not all(isinstance(lin, QLinear) for lin in lins):
                continue
            biases = [lin.bias for lin in lins]
            if any(b is None for b in biases) != all(b is None for b in biases):
                continue  # some parts biased, some not
            fused = fuse([lin.w for lin in lins])
            if fused is None:
                continue
            bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
            setattr(mod, fused_name, QLinear(fused, bias))
            a = 0
            for lin in lins:  # the parts become views of the fused bytes, and their own are freed
                lin.w.adopt(fused.rows_view(a, a + lin.out_features))
                a += lin.out_features
            release_freed_memory()  # else glibc keeps them: a 1B model held 1.95x its file
