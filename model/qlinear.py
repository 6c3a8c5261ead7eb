"""Quantized GGUF weights kept as integers: fused dequantize + matmul for memory-bound CPU decode.

    qw = split_blocks(raw, GGMLQuantizationType.Q4_1, (N, K))   # QWeight: q int, d/m float32 per group
    lin = QLinear(qw)            # y = x @ w.T with w = d*q + m rebuilt on the fly
    emb = QEmbedding(qw)         # rows dequantized on lookup
    install_quantized(model, {"layers.0.attention.wq.weight": qw, ...})

Decode reads every weight once per token, so a float32 copy (4 bytes/weight) is bandwidth bound;
int8/uint8 plus one float32 (d, m) pair per group of 32 is ~1.25 bytes/weight. Every supported
ggml block type is written as w = d * q + m per group of G values (m = 0 for symmetric types),
with d and m computed by the same float32 operations as model/dequant.py, so `dequantized()`
equals `dequantize()` bit for bit. The fused kernels are torch.compile'd (Inductor) once per shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from torch import nn

from model.dequant import _f16, _k_nibbles, _k_scales, _nibbles, _q5_bits

Q = GGMLQuantizationType
DEQUANT_CHUNK = 1 << 21  # float32 values dequantized at once for multi-token inputs (8 MB)
GEMV_ROWS = 2  # up to this many input rows, one fused GEMV each beats dequantize + matmul (measured)
RECOMPILE_LIMIT = 64  # one compiled kernel per weight shape; a model has ~5-10 shapes


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

    def rows(self, index: torch.Tensor) -> QWeight:
        m = None if self.m is None else self.m[index]
        return QWeight(self.q[index], self.d[index], m, self.group)

    def to(self, device: torch.device | str) -> QWeight:
        m = None if self.m is None else self.m.to(device)
        return QWeight(self.q.to(device), self.d.to(device), m, self.group)

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


# -- fused kernels ------------------------------------------------------------------------------


def _gemv(x: torch.Tensor, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
    """x (K,) -> (N,): sum over groups of x_g . (d_g * q_g + m_g), dequantized inside the reduction."""
    n, kg = d.shape
    w = q.view(n, kg, -1).float() * d[..., None]
    if m is not None:
        w = w + m[..., None]
    return (x[None] * w.view(n, -1)).sum(-1)  # one flat reduction over K: Inductor's fastest form


def _dequant(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
    n, kg = d.shape
    w = q.view(n, kg, -1).float() * d[..., None]
    if m is not None:
        w = w + m[..., None]
    return w.view(n, -1)


_compiled: dict[str, object] = {}


def _kernel(name: str):
    """torch.compile'd kernel, created lazily; one graph per weight shape (no per-token recompiles)."""
    if name not in _compiled:
        cfg = torch._dynamo.config
        cfg.recompile_limit = max(cfg.recompile_limit, RECOMPILE_LIMIT)  # shapes, not tokens, recompile
        fn = {"gemv": _gemv, "dequant": _dequant}[name]
        _compiled[name] = torch.compile(fn, fullgraph=True, dynamic=False)
    return _compiled[name]


def _register(module: nn.Module, qw: QWeight) -> None:
    module.register_buffer("q", qw.q)
    module.register_buffer("d", qw.d)
    module.register_buffer("m", qw.m)  # None is allowed: symmetric types
    module.group = qw.group


class QLinear(nn.Module):
    """nn.Linear replacement over a QWeight: y = x @ w.T + bias with w rebuilt from q, d, m."""

    def __init__(self, qw: QWeight, bias: torch.Tensor | None = None, compile: bool = True) -> None:
        super().__init__()
        _register(self, qw)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.out_features, self.in_features = qw.shape
        self.compile = compile

    def qweight(self) -> QWeight:
        return QWeight(self.q, self.d, self.m, self.group)

    def dequantized(self) -> torch.Tensor:
        return self.qweight().dequantized()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).float()
        if x2.shape[0] <= GEMV_ROWS:  # decode (+ a short draft): fused passes over the integers
            gemv = _kernel("gemv") if self.compile else _gemv
            y = torch.stack([gemv(row, self.q, self.d, self.m) for row in x2])
        else:  # prefill / draft verification: dequantize a chunk of rows at a time, then matmul
            y = torch.cat([x2 @ w.T for w in self._weight_chunks()], dim=-1)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).view(*lead, self.out_features)

    def _weight_chunks(self):
        deq = _kernel("dequant") if self.compile else _dequant
        rows = max(1, DEQUANT_CHUNK // self.in_features)
        for i in range(0, self.out_features, rows):
            m = None if self.m is None else self.m[i : i + rows]
            yield deq(self.q[i : i + rows], self.d[i : i + rows], m)


@torch.inference_mode()
def warm_up(model: nn.Module) -> int:
    """Compile every QLinear's kernels now (one-token and multi-token paths), so that no compile
    lands inside a timed or user-facing call. Returns the number of QLinear modules."""
    mods = [m for m in model.modules() if isinstance(m, QLinear)]
    for mod in mods:
        for rows in (1, GEMV_ROWS + 1):
            mod(torch.zeros(rows, mod.in_features, device=mod.q.device))
    return len(mods)


class QEmbedding(nn.Module):
    """nn.Embedding replacement over a QWeight: dequantizes only the looked-up rows (exactly)."""

    def __init__(self, qw: QWeight, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        _register(self, qw)
        self.num_embeddings, self.embedding_dim = qw.shape
        self.dtype = dtype

    def qweight(self) -> QWeight:
        return QWeight(self.q, self.d, self.m, self.group)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        flat = tokens.reshape(-1)
        rows = self.qweight().rows(flat).dequantized()
        return rows.to(self.dtype).view(*tokens.shape, self.embedding_dim)


def install_quantized(model: nn.Module, weights: dict[str, QWeight], device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.float32) -> None:
    """Swap the nn.Linear / nn.Embedding owning each `<module>.weight` in `weights` for QLinear /
    QEmbedding (bias kept). A tied output head shares the embedding's integers."""
    weights = {k: v.to(device) for k, v in weights.items()}
    for name, qw in weights.items():
        path = name.removesuffix(".weight")
        parent_name, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, attr)
        if isinstance(old, nn.Embedding):
            setattr(parent, attr, QEmbedding(qw, dtype))
        elif isinstance(old, nn.Linear):
            bias = None if old.bias is None else old.bias.detach()
            setattr(parent, attr, QLinear(qw, bias))
        else:
            raise TypeError(f"{name}: owner is {type(old).__name__}, expected nn.Linear or nn.Embedding")
    emb = weights.get("tok_embeddings.weight")
    if getattr(model.args, "tie_embeddings", False) and emb is not None:
        model.output = QLinear(emb)
