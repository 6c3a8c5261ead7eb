"""Llama-family decoder-only transformer: Llama 2/3, SmolLM2, Mistral, Qwen2 (q/k/v bias).

Pre-norm blocks with RMSNorm, grouped-query attention with RoPE (HF rotate_half layout,
optional Llama-3 / linear scaling), SwiGLU feed-forward, tied or untied output head.

    forward(tokens (1, T) long, input_pos (T,) long, cache: KVCache | None, last_only=False)
        -> logits float32 (1, T, vocab), or (1, 1, vocab) with last_only

With cache=None it is a full causal forward over positions input_pos (starting at 0). With a
cache, new keys/values are written at slots `input_pos` and attention spans the cached slots
(see model/kv_cache.py for the torch.compile-friendly static variant). With a
`model.paged_attention.PagedBatch` as the cache, the T tokens are many sequences packed together
and the logits are those of the rows the batch names (`logits_at`). `shift_cache` drops
cached positions and re-rotates the rest (llama.cpp-style context shift).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelArgs
from model.kv_cache import KVCache
from model.rope import apply_rope, rerotate, rope_cos_sin, rope_inv_freq


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def attention_mask(input_pos: torch.Tensor, kv_len: int, window: int | None) -> torch.Tensor:
    """Boolean (1, 1, T, kv_len): query at position p sees slots s <= p (and s > p - window)."""
    kv_pos = torch.arange(kv_len, device=input_pos.device)[None, :]  # (1, S)
    q_pos = input_pos[:, None]  # (T, 1)
    mask = kv_pos <= q_pos
    if window is not None:
        mask = mask & (kv_pos > q_pos - window)
    return mask[None, None]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int, scale: float | None = None) -> None:
        super().__init__()
        self.layer, self.scale = layer, scale  # scale None -> head_dim ** -0.5
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=args.o_bias)
        self.wqkv = None  # q, k and v in one matmul where model/qlinear.py can fuse them
        self.qkv_sizes = (args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim,
                          args.n_kv_heads * args.head_dim)
        if args.qk_norm and args.family == "llama":  # Qwen3 (Gemma's own norms: model/gemma3.py)
            self.q_norm = RMSNorm(args.head_dim, args.norm_eps)
            self.k_norm = RMSNorm(args.head_dim, args.norm_eps)

    def qk_norm(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if hasattr(self, "q_norm"):  # per head, over head_dim
            return self.q_norm(q), self.k_norm(k)
        return q, k

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor | None, cache: KVCache | None, kv_len: int) -> torch.Tensor:
        B, T, _ = x.shape
        if self.wqkv is not None:
            q, k, v = self.wqkv(x).split(self.qkv_sizes, dim=-1)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
        q, k = self.qk_norm(q, k)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if getattr(cache, "paged", False):  # many sequences in one forward (model/paged_attention.py)
            y = cache.attend(self.layer, q, k, v, self.scale)  # (1, H, N, hd)
            return self.wo(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
        if cache is not None:
            k_buf, v_buf = cache.update(self.layer, input_pos, k, v)  # (1, n_kv, capacity, hd)
            k, v = k_buf[:, :, :kv_len], v_buf[:, :, :kv_len]  # (1, n_kv, S, hd)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, scale=self.scale, enable_gqa=True
        )  # (B, H, T, hd)
        return self.wo(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=args.mlp_bias)  # gate
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=args.mlp_bias)  # up
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=args.mlp_bias)  # down
        self.w13 = None  # gate and up in one matmul where model/qlinear.py can fuse them

    def gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.w13 is not None:
            return self.w13(x).chunk(2, dim=-1)
        return self.w1(x), self.w3(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.attention = Attention(args, layer)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor | None, cache: KVCache | None, kv_len: int) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), input_pos, rope, mask, cache, kv_len)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    """Llama family. Gemma 3 (model/gemma3.py) subclasses it and swaps the parts that differ."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(self.make_block(i) for i in range(args.n_layers))
        self.norm = self.make_norm()
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.tie_weights()
        self._inv_freq: dict[tuple[str, torch.device], torch.Tensor] = {}  # float32, per device

    # -- parts a subclass replaces ------------------------------------------------------------
    def make_block(self, layer: int) -> nn.Module:
        return Block(self.args, layer)

    def make_norm(self) -> nn.Module:
        return RMSNorm(self.args.dim, self.args.norm_eps)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tok_embeddings(tokens)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.norm(x)).float()

    # -- shared machinery ---------------------------------------------------------------------
    def tie_weights(self) -> None:
        """Re-share the head with the embedding (needed again after load_state_dict(assign=True))."""
        if self.args.tie_embeddings and isinstance(self.tok_embeddings, nn.Embedding):  # not QEmbedding
            self.output.weight = self.tok_embeddings.weight

    def inv_freq(self, layer_type: str, device: torch.device) -> torch.Tensor:
        """RoPE inverse frequencies kept in float32 whatever the model dtype (not a buffer)."""
        key = (layer_type, torch.device(device))
        if key not in self._inv_freq:
            self._inv_freq[key] = rope_inv_freq(self.args, layer_type).to(device)
        return self._inv_freq[key]

    def new_cache(self, capacity: int = 0, static: bool = False, chunk: int = 256,
                  device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> KVCache:
        """An empty cache matching this model (device/dtype default to the weights')."""
        w = self.norm.weight  # float even when the embedding is quantized (model/qlinear.py)
        a = self.args
        return KVCache(a.n_layers, a.n_kv_heads, a.head_dim, dtype=dtype or w.dtype, device=device or w.device,
                       capacity=capacity, max_capacity=a.max_seq_len, chunk=chunk, static=static)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor, cache: KVCache | None = None,
                last_only: bool = False) -> torch.Tensor:
        T = tokens.shape[1]
        paged = getattr(cache, "paged", False)
        if cache is None or paged:
            kv_len = T
        else:
            if not torch.compiler.is_compiling():
                cache.prepare(input_pos)  # compiled callers do this eagerly (see kv_cache.py)
            kv_len = cache.capacity if cache.static else cache.length
        x = self.embed(tokens)  # (1, T, dim)
        ropes, masks = {}, {}
        for lt in set(self.args.layer_type(i) for i in range(self.args.n_layers)):
            ropes[lt] = rope_cos_sin(self.inv_freq(lt, input_pos.device), input_pos)  # (T, hd) x2
            window = self.args.sliding_window if lt == "sliding" else None
            # no explicit mask where SDPA can do without (flash-friendly): a fresh prefill from 0
            # (T == kv_len, is_causal) or one new token that sees every cached slot
            plain = window is None and (T == kv_len or (T == 1 and cache is not None and not cache.static))
            masks[lt] = None if plain or paged else attention_mask(input_pos, kv_len, window)
        for i, layer in enumerate(self.layers):
            lt = self.args.layer_type(i)
            x = layer(x, input_pos, ropes[lt], masks[lt], cache, kv_len)
        if paged:
            x = x[:, cache.logits_at]  # the rows that sample next
        elif last_only:
            x = x[:, -1:]
        return self.head(x)  # (1, T or 1, vocab) float32

    @torch.no_grad()
    def shift_cache(self, cache: KVCache, keep: int, drop: int) -> None:
        """Remove cached positions [keep, keep+drop); later ones move left by `drop`, keys re-rotated."""
        n = cache.length
        if not (0 <= keep and 0 <= drop and keep + drop <= n):
            raise ValueError(f"shift_cache: need 0 <= keep, 0 <= drop, keep+drop <= length={n}; got {keep}, {drop}")
        if drop == 0:
            return
        rest = n - keep - drop
        for i in range(self.args.n_layers):
            inv = self.inv_freq(self.args.layer_type(i), cache.device)
            moved_k = rerotate(cache.k[i][:, :, keep + drop : n], inv, -drop)  # new tensor, no overlap
            cache.k[i][:, :, keep : keep + rest] = moved_k
            cache.v[i][:, :, keep : keep + rest] = cache.v[i][:, :, keep + drop : n].clone()
        cache.length = n - drop
