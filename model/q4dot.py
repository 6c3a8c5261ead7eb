"""The AVX2 int4/int8 x int8 matmul (model/q4dot.c): built with the machine's C compiler at first use.

    if q4dot.available():
        y = q4dot.run(x, nib, dm)   # x (M, K) float32, nib (N, K/2) uint8, dm (N, 2, K/32) float16 -> (M, N)
        y = q4dot.run(x, q, dm)     # 8-bit weights: q (N, K) int8, one pass (GGUF's Q8_0)

torch's packed int4 CPU kernel is quick where it was built for AVX-512 but on AVX2-only CPUs it
dequantizes every group in float for every 4 rows: 114 us for a 1536x576 weight at one row, 480
us at eight, against 12 ms for llama.cpp's whole token on the same 2 cores. This kernel quantizes
the activations per group of 32 to int8 (as llama.cpp does) and lets vpmaddubsw do the
multiply-adds. 8-bit weights go through the same kernel in one pass rather than as two 4-bit
planes (half the work for SmolLM2's tied Q8_0 head, 35% of a step's weight reads that way).
model/ckernels.py builds it once per machine; without a compiler or AVX2 it is simply not
available and the callers keep torch's kernel.

`matmul` is the custom op `memento::q4dot`, so a compiled graph holds it as one opaque node; eager
callers use `run`, the same call without the op's dispatch.
"""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path

import torch

from model import ckernels

SOURCE = Path(__file__).with_name("q4dot.c")
GROUP = 32


@cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel, or None where it cannot run here (not x86 with AVX2, FMA and F16C, no compiler,
    a failed build, or a self-check that disagrees with float32): the reason is logged once."""
    p, i = ctypes.c_void_p, ctypes.c_int
    matmul_args = ([p, p, p, p, i, i, i], i)
    return ckernels.load(SOURCE, "the AVX2 int4 kernel", {"q4dot_matmul": matmul_args, "q8dot_matmul": matmul_args},
                         _self_check)


def available() -> bool:
    return library() is not None


_BITS = {torch.uint8: 4, torch.int8: 8}


def run(x: torch.Tensor, w: torch.Tensor, dm: torch.Tensor, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """The kernel called directly (eager callers: the custom op's dispatch costs more than a small
    matmul); `matmul` below is the same as an op a compiled graph can hold. w is 4-bit nibbles
    (N, K/2) uint8 or 8-bit weights (N, K) int8, K a multiple of 32. Every check here is cheap: a
    decode step makes a hundred or more of these calls, each ~10 us of Python on a 2-core CPU."""
    m, k = x.shape
    n, wk = w.shape
    bits = _BITS.get(w.dtype)
    if (bits is None or k % GROUP or wk * 8 != k * bits or dm.shape != (n, 2, k // GROUP)
            or dm.dtype != torch.float16):
        raise ValueError(f"q4dot.run: w {tuple(w.shape)} {w.dtype} and dm {tuple(dm.shape)} {dm.dtype} do not "
                         f"fit x {tuple(x.shape)}; want (N, K/2) uint8 or (N, K) int8, and (N, 2, K/32) float16, K % 32 == 0")
    if not (w.is_contiguous() and dm.is_contiguous()):
        raise ValueError("q4dot.run needs contiguous w and dm")
    if x.dtype != torch.float32 or not x.is_contiguous():
        x = x.to(torch.float32).contiguous()
    lib = lib or library()
    y = torch.empty(m, n, dtype=torch.float32)
    fn = lib.q4dot_matmul if bits == 4 else lib.q8dot_matmul
    if fn(w.data_ptr(), dm.data_ptr(), x.data_ptr(), y.data_ptr(), m, n, k):
        raise MemoryError(f"q4dot: no memory for the int8 copy of a ({m}, {k}) input")
    return y


def _self_check(lib: ctypes.CDLL) -> bool:
    g = torch.Generator().manual_seed(0)
    u = torch.randint(0, 16, (40, 96), generator=g, dtype=torch.uint8)
    dm = torch.stack([torch.rand(40, 3, generator=g) * 0.1, torch.rand(40, 3, generator=g) - 0.5], 1).half()
    x = torch.randn(9, 96, generator=g)
    q = (u.to(torch.int8) - 8) * 15  # [-120, 105]: both signs and large magnitudes
    ok = True
    for w, packed in ((dequantize(u, dm), pack_nibbles(u)), (dequantize(q, dm), q)):
        want = x @ w.T
        ok &= bool((run(x, packed, dm, lib) - want).abs().max() <= 0.02 * want.abs().max())
    return ok


def pack_nibbles(u: torch.Tensor) -> torch.Tensor:
    """u (N, K) uint8 in [0, 15] -> (N, K/2): per group of 32, byte i = u[i] | u[i + 16] << 4."""
    n, k = u.shape
    groups = u.view(n, k // GROUP, 2, GROUP // 2)
    return (groups[:, :, 0] | (groups[:, :, 1] << 4)).reshape(n, k // 2)


def unpack_rows(nib: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """u (len(rows), K) of the given rows: the inverse of pack_nibbles."""
    b = nib[rows].view(len(rows), -1, GROUP // 2)
    return torch.stack([b & 15, b >> 4], dim=2).reshape(len(rows), -1)


def dequantize(u: torch.Tensor, dm: torch.Tensor) -> torch.Tensor:
    """w = u * d + m per group of 32, float32 (u 4- or 8-bit values, one per weight; dm (N, 2, K/32)
    float16: d, then m)."""
    n, k = u.shape
    dm = dm.float()
    w = u.view(n, k // GROUP, GROUP).float() * dm[:, 0, :, None] + dm[:, 1, :, None]
    return w.view(n, k)


@torch.library.custom_op("memento::q4dot", mutates_args=())
def matmul(x: torch.Tensor, w: torch.Tensor, dm: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ w.T for w held as (nibbles or int8, dm): (M, N) float32. Needs available()."""
    return run(x, w, dm)


@matmul.register_fake
def _(x: torch.Tensor, w: torch.Tensor, dm: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[0], dtype=torch.float32)
