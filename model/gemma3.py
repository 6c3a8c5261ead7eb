"""Gemma 3 text transformer (e.g. gemma-3-270m), built on the Llama machinery in model/llama.py.

What differs from Llama:
- RMSNorm scales by (1 + w) and computes everything in float32;
- layers alternate sliding-window (local RoPE base 10k) and global attention (base 1M, optional
  linear scaling), following `args.layer_types` (5 sliding : 1 global in released models);
- queries and keys get their own RMSNorm per head before RoPE; scores scale by
  query_pre_attn_scalar ** -0.5;
- each block has pre- and post-norms around both attention and the feed-forward;
- GeGLU feed-forward (gelu, tanh approximation); embeddings scaled by sqrt(dim);
- optional final logit soft-capping.
Same forward contract, cache and `shift_cache` as `model.llama.Transformer`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelArgs
from model.kv_cache import KVCache
from model.llama import Attention, FeedForward, Transformer


class GemmaRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))  # stored as w; the scale is (1 + w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).to(x.dtype)


class GemmaAttention(Attention):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__(args, layer, scale=args.query_pre_attn_scalar**-0.5)
        self.q_norm = GemmaRMSNorm(args.head_dim, args.norm_eps)
        self.k_norm = GemmaRMSNorm(args.head_dim, args.norm_eps)

    def qk_norm(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.q_norm(q), self.k_norm(k)  # per head, over head_dim


class GemmaFeedForward(FeedForward):
    """GeGLU: w2(gelu_tanh(w1 x) * w3 x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x)
        return self.w2(F.gelu(gate, approximate="tanh") * up)


class GemmaBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.attention = GemmaAttention(args, layer)
        self.feed_forward = GemmaFeedForward(args)
        self.attention_norm = GemmaRMSNorm(args.dim, args.norm_eps)  # pre-attention
        self.post_attention_norm = GemmaRMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = GemmaRMSNorm(args.dim, args.norm_eps)  # pre-feed-forward
        self.post_ffn_norm = GemmaRMSNorm(args.dim, args.norm_eps)

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor | None, cache: KVCache | None, kv_len: int) -> torch.Tensor:
        h = self.attention(self.attention_norm(x), input_pos, rope, mask, cache, kv_len)
        x = x + self.post_attention_norm(h)
        return x + self.post_ffn_norm(self.feed_forward(self.ffn_norm(x)))


class Gemma3Transformer(Transformer):
    def make_block(self, layer: int) -> nn.Module:
        return GemmaBlock(self.args, layer)

    def make_norm(self) -> nn.Module:
        return GemmaRMSNorm(self.args.dim, self.args.norm_eps)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tok_embeddings(tokens)  # (1, T, dim)
        # the scale is rounded to the weight dtype first, as in the reference implementation
        return x * torch.tensor(self.args.dim**0.5, dtype=x.dtype, device=x.device)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.output(self.norm(x)).float()
        cap = self.args.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap
