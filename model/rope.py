"""Rotary position embeddings (HF "rotate_half" layout) and re-rotation for context shift.

A head vector x at position p is rotated pairwise: dims (i, i + D/2) by angle p * inv_freq[i].
Rotations compose, so a cached key rotated for position p becomes the key for p + delta by one
more rotation of delta * inv_freq (used by `shift_cache` to move keys left after dropping tokens).
All angle math is float32.
"""

from __future__ import annotations

import math

import torch

from model.config import ModelArgs


def rope_inv_freq(args: ModelArgs, layer_type: str = "global") -> torch.Tensor:
    """(head_dim/2,) float32 inverse frequencies for a layer of this type, scaling applied."""
    dim = args.head_dim
    theta = args.rope_local_theta if layer_type == "sliding" and args.family == "gemma3" else args.rope_theta
    # same expression as transformers so float32 rounding matches exactly
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if layer_type == "sliding" and args.family == "gemma3":
        return inv_freq  # Gemma scales only the global layers
    if args.rope_freq_factors is not None:
        return inv_freq / torch.tensor(args.rope_freq_factors, dtype=torch.float32)
    if args.rope_scaling == "linear":
        return inv_freq / args.rope_scaling_factor
    if args.rope_scaling == "llama3":
        return _llama3_scale(inv_freq, args)
    return inv_freq


def _llama3_scale(inv_freq: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    """Llama 3.1 scaling: divide low frequencies by `factor`, keep high ones, blend in between."""
    factor, low, high = args.rope_scaling_factor, args.rope_low_freq_factor, args.rope_high_freq_factor
    old_ctx = args.rope_original_context
    low_freq_wavelen, high_freq_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (T, head_dim) float32 for integer positions (T,) (may be negative)."""
    freqs = positions.float()[:, None] * inv_freq.to(positions.device)[None, :]  # (T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, D)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, D) by cos/sin (T, D); computed in float32, returned in x's dtype."""
    xf = x.float()
    return (xf * cos + _rotate_half(xf) * sin).to(x.dtype)


def rerotate(k: torch.Tensor, inv_freq: torch.Tensor, delta: int) -> torch.Tensor:
    """Keys k (B, H, T, D) rotated for positions p become keys for positions p + delta."""
    cos, sin = rope_cos_sin(inv_freq, torch.tensor([delta], device=k.device))
    return apply_rope(k, cos, sin)
