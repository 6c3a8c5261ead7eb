"""Decode rows' attention straight from the paged KV pool (model/decode_attention.c), on AVX2 CPUs.

    if decode_attention.available():
        y = decode_attention.attend(q, k_pool, v_pool, idx, lens, scale)
        # q (B, H, D) float32; pools (slots, n_kv, D) float32; idx (B, W) int64 slots, lens (B,) -> (B, H, D)

Eager 8-row steps spent a fifth of their time gathering every row's keys and values into a padded
copy and running SDPA over it (84 us a gather and 240-290 us an SDPA call a layer, 8 rows of ~200
positions, SmolLM2 on 2 cores). The kernel reads each row's slots once, in place, and computes a
row the same way whatever the batch. `$MEMENTO_ATTENTION_KERNEL=torch` keeps torch's path (the
default `auto` uses the kernel wherever it builds and passes its self-check).
"""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F

from model import ckernels

SOURCE = Path(__file__).with_suffix(".c")


@cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel, or None where it cannot run (see ckernels.load) or its self-check against
    SDPA disagrees; None too when $MEMENTO_ATTENTION_KERNEL=torch."""
    if not ckernels.enabled("MEMENTO_ATTENTION_KERNEL"):
        return None
    p, i = ctypes.c_void_p, ctypes.c_int
    args = [p, p, p, p, p, i, i, i, i, i, ctypes.c_float, p]
    return ckernels.load(SOURCE, "the AVX2 decode attention", {"decode_attention": (args, i)}, _self_check)


def available() -> bool:
    return library() is not None


def supports(pool: torch.Tensor, head_dim: int) -> bool:
    """The kernel can attend over this pool: float32 on the CPU, contiguous, head_dim a multiple of 8."""
    return (pool.device.type == "cpu" and pool.dtype == torch.float32 and pool.is_contiguous()
            and head_dim % 8 == 0 and available())


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, lens: torch.Tensor,
           scale: float, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """Row b attends over slots idx[b, :lens[b]], 1 <= lens[b] <= W, each slot in [0, slots): the
    caller's plan guarantees both (paged_attention checks the slots once a step), and the kernel
    does not check. Shapes as in the module docstring."""
    B, H, D = q.shape
    n_kv = k.shape[1]
    if (k.shape != v.shape or k.shape[2] != D or H % n_kv or D % 8 or idx.shape[0] != B or lens.shape != (B,)
            or idx.dtype != torch.int64 or lens.dtype != torch.int64):
        raise ValueError(f"decode_attention.attend: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
                         f"idx {tuple(idx.shape)} {idx.dtype}, lens {tuple(lens.shape)} {lens.dtype} do not fit")
    if not all(t.dtype == torch.float32 and t.is_contiguous() for t in (k, v)) or not idx.is_contiguous():
        raise ValueError("decode_attention.attend needs contiguous float32 pools and a contiguous idx")
    q = q.to(torch.float32).contiguous()
    lib = lib or library()
    y = torch.empty_like(q)
    if lib.decode_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), idx.data_ptr(), lens.data_ptr(), B,
                            idx.shape[1], H, n_kv, D, scale, y.data_ptr()):
        raise MemoryError("decode_attention: no memory for the scores")
    return y


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, lens: torch.Tensor,
              scale: float) -> torch.Tensor:
    """The same attention through torch: a padded gather and one masked SDPA (paged_attention's path)."""
    B, W = idx.shape
    kk = k[idx].transpose(1, 2)  # (B, n_kv, W, D)
    vv = v[idx].transpose(1, 2)
    mask = (torch.arange(W)[None, :] < lens[:, None])[:, None, None, :]
    y = F.scaled_dot_product_attention(q[:, :, None], kk, vv, attn_mask=mask, scale=scale, enable_gqa=True)
    return y[:, :, 0]


def _self_check(lib: ctypes.CDLL) -> bool:
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(50, 2, 16, generator=g), torch.randn(50, 2, 16, generator=g)
    q = torch.randn(3, 6, 16, generator=g) * 2
    idx = torch.randint(0, 50, (3, 20), generator=g)
    lens = torch.tensor([20, 1, 13])
    got, want = attend(q, k, v, idx, lens, 0.25, lib), reference(q, k, v, idx, lens, 0.25)
    return bool((got - want).abs().max() <= 1e-4)
