"""`PagedBatch`: one forward over many sequences whose keys/values live in a `BlockPool`.

The scheduler packs every row's new tokens into one (1, N) input: decode rows feed one token,
prefill rows a chunk. Every linear layer then runs once over all N tokens (one GEMM per weight
per step). Attention is the only per-sequence part; `attend` does it in two groups:

- decode rows (one query each) together: on AVX2 CPUs with a float32 pool model/decode_attention.c
  reads each row's slots in place; elsewhere their visible slots are gathered into a padded
  (B, n_kv, S, head_dim) tensor and one masked SDPA call covers them all;
- each prefill chunk on its own: causal over the slots of positions [lo, end).

Sliding-window layers gather only the window's positions, so their cost does not grow with the
conversation. Positions are absolute, as in the contiguous cache: RoPE needs nothing special.

    batch = PagedBatch(pool, rows, args)      # rows: [(block_table, start, n_tokens, wants_logits)]
    logits = model(batch.tokens_for(ids), batch.positions, batch)   # (1, rows wanting logits, vocab)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model import decode_attention
from model.paged_cache import BlockPool


@dataclass
class Row:
    table: Sequence[int]  # block ids covering positions [0, start + n)
    start: int  # first position fed this step (== tokens already cached)
    n: int  # tokens fed this step
    wants_logits: bool  # the row's last fed token is the end of its known tokens


class PagedBatch:
    paged = True  # the model's forward checks this instead of importing the class

    def __init__(self, pool: BlockPool, rows: Sequence[Row], args) -> None:
        self.pool, self.rows, self.args = pool, list(rows), args
        dev = pool.k[0].device
        bs = pool.block_size
        pos, slots, logits_at = [], [], []
        for r in self.rows:
            for p in range(r.start, r.start + r.n):
                pos.append(p)
                slots.append(r.table[p // bs] * bs + p % bs)
            if r.wants_logits:
                logits_at.append(len(pos) - 1)
        self.positions = torch.tensor(pos, dtype=torch.long, device=dev)  # (N,)
        self.slots = torch.tensor(slots, dtype=torch.long, device=dev)  # (N,)
        self.logits_at = torch.tensor(logits_at, dtype=torch.long, device=dev)
        self._groups: dict[int | None, tuple] = {}  # window -> gather plan, built once per step

    # -- plans: which slots each query sees ------------------------------------------------------
    def _slot_ids(self, r: Row, lo: int, hi: int) -> list[int]:
        bs = self.pool.block_size
        return [r.table[p // bs] * bs + p % bs for p in range(lo, hi)]

    def _plan(self, window: int | None) -> tuple:
        """(decode token indices, decode gather index (B, S), decode mask (B, 1, 1, S), decode
        lengths (B,), [(token range, gather index, mask) per prefill row]) for layers with this window."""
        if window in self._groups:
            return self._groups[window]
        dev = self.slots.device
        dec_tok, dec_idx, dec_len, pre = [], [], [], []
        offset = 0
        for r in self.rows:
            end = r.start + r.n
            lo = 0 if window is None else max(0, end - r.n - window + 1)
            ids = self._slot_ids(r, lo, end)
            if r.n == 1:
                dec_tok.append(offset)
                dec_idx.append(ids)
                dec_len.append(len(ids))
            else:
                q_pos = torch.arange(r.start, end, device=dev)[:, None]  # (T, 1)
                kv_pos = torch.arange(lo, end, device=dev)[None, :]  # (1, S)
                mask = kv_pos <= q_pos
                if window is not None:
                    mask &= kv_pos > q_pos - window
                pre.append((offset, offset + r.n, torch.tensor(ids, device=dev), mask[None, None]))
            offset += r.n
        plan = (None, None, None, None, pre)
        if dec_tok:
            width = max(dec_len)
            idx = torch.zeros(len(dec_idx), width, dtype=torch.long, device=dev)  # 0: the null block
            for i, ids in enumerate(dec_idx):
                idx[i, : len(ids)] = torch.tensor(ids, device=dev)
            lens = torch.tensor(dec_len, device=dev)
            if dev.type == "cpu" and int(idx.max()) >= self.pool.k[0].shape[0]:  # the CPU kernel reads them unchecked
                raise RuntimeError(f"a block table points past the pool's {self.pool.k[0].shape[0]} slots")
            mask = torch.arange(width, device=dev)[None, :] < lens[:, None]
            plan = (torch.tensor(dec_tok, device=dev), idx, mask[:, None, None, :], lens, pre)
        self._groups[window] = plan
        return plan

    # -- the model's side ------------------------------------------------------------------------
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               scale: float | None) -> torch.Tensor:
        """q (1, H, N, hd), k/v (1, n_kv, N, hd) for the packed tokens -> (1, H, N, hd)."""
        kp, vp = self.pool.k[layer], self.pool.v[layer]  # (slots, n_kv, hd)
        kp.index_copy_(0, self.slots, k[0].transpose(0, 1).to(kp.dtype))
        vp.index_copy_(0, self.slots, v[0].transpose(0, 1).to(vp.dtype))
        window = self.args.sliding_window if self.args.layer_type(layer) == "sliding" else None
        dec_tok, dec_idx, dec_mask, dec_lens, pre = self._plan(window)
        y = torch.empty_like(q)
        if dec_tok is not None and decode_attention.supports(kp, q.shape[-1]):  # in place, no gathered copy
            qd = q[0][:, dec_tok].transpose(0, 1)  # (B, H, hd)
            scale = q.shape[-1] ** -0.5 if scale is None else scale
            yd = decode_attention.attend(qd, kp, vp, dec_idx, dec_lens, scale)  # (B, H, hd)
            y[0][:, dec_tok] = yd.transpose(0, 1).to(y.dtype)
        elif dec_tok is not None:
            B, S = dec_idx.shape
            flat = dec_idx.reshape(-1)  # index_select, not kp[flat]: the same copy, 2-4x quicker on CPU
            kk = kp.index_select(0, flat).view(B, S, *kp.shape[1:]).transpose(1, 2)  # (B, n_kv, S, hd)
            vv = vp.index_select(0, flat).view(B, S, *vp.shape[1:]).transpose(1, 2)
            qd = q[0][:, dec_tok].transpose(0, 1)[:, :, None]  # (B, H, 1, hd)
            yd = F.scaled_dot_product_attention(qd.to(kk.dtype), kk, vv, attn_mask=dec_mask, scale=scale,
                                                enable_gqa=True)  # (B, H, 1, hd)
            y[0][:, dec_tok] = yd[:, :, 0].transpose(0, 1).to(y.dtype)
        for a, b, ids, mask in pre:
            kk = kp.index_select(0, ids).transpose(0, 1)[None]  # (1, n_kv, S, hd)
            vv = vp.index_select(0, ids).transpose(0, 1)[None]
            yr = F.scaled_dot_product_attention(q[:, :, a:b].to(kk.dtype), kk, vv, attn_mask=mask, scale=scale,
                                                enable_gqa=True)  # (1, H, T, hd)
            y[:, :, a:b] = yr.to(y.dtype)
        return y
