"""`ModelArgs`: every hyper-parameter our transformers need, one instance per checkpoint.

Loaders (GGUF metadata, HF config.json) fill it in; the model classes read only this.
"""

from __future__ import annotations

from dataclasses import dataclass

FAMILIES = ("llama", "gemma3")
LAYER_TYPES = ("global", "sliding")


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message names the file (or name) and the problem."""


@dataclass
class ModelArgs:
    family: str = "llama"  # "llama" (Llama 2/3, SmolLM2, Mistral, Qwen2/3) or "gemma3"
    vocab_size: int = 32000  # rows of the embedding / logits width
    dim: int = 4096  # residual stream width (hidden_size)
    n_layers: int = 32  # transformer blocks
    n_heads: int = 32  # query heads
    n_kv_heads: int = 32  # key/value heads (< n_heads: grouped-query attention)
    head_dim: int = 0  # per-head width; 0 -> dim // n_heads (Gemma sets it explicitly)
    hidden_dim: int = 11008  # feed-forward inner width (intermediate_size)
    norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_theta: float = 10000.0  # RoPE base (Gemma: global layers)
    rope_local_theta: float = 10000.0  # RoPE base of Gemma's sliding-window layers
    rope_scaling: str | None = None  # None, "llama3" or "linear" (Gemma: global layers only)
    rope_scaling_factor: float = 1.0  # position divisor ("linear") / low-frequency divisor ("llama3")
    rope_low_freq_factor: float = 1.0  # llama3 scaling: wavelengths above ctx/low are fully scaled
    rope_high_freq_factor: float = 4.0  # llama3 scaling: wavelengths below ctx/high are kept
    rope_original_context: int = 8192  # llama3 scaling: pre-training context length
    rope_freq_factors: tuple[float, ...] | None = None  # per-frequency divisors (GGUF rope_freqs)
    sliding_window: int | None = None  # tokens a sliding layer sees, itself included
    layer_types: tuple[str, ...] | None = None  # per layer "global"/"sliding"; None -> all global
    qkv_bias: bool = False  # q/k/v projections have a bias (Qwen2)
    o_bias: bool = False  # output projection has a bias (Llama attention_bias=True)
    mlp_bias: bool = False  # feed-forward projections have biases
    qk_norm: bool = False  # RMSNorm over each head's queries and keys before RoPE (Qwen3)
    tie_embeddings: bool = False  # output head shares the embedding matrix
    query_pre_attn_scalar: float | None = None  # Gemma: attention scale is this ** -0.5
    final_logit_softcapping: float | None = None  # logits = c * tanh(logits / c) when set
    context_length: int = 4096  # context the checkpoint was trained for
    max_seq_len: int = 4096  # usable context (KV cache limit); <= context_length unless told

    def __post_init__(self) -> None:
        assert self.family in FAMILIES, f"family must be one of {FAMILIES}, got {self.family!r}"
        if self.head_dim == 0:
            assert self.dim % self.n_heads == 0, f"dim {self.dim} not divisible by n_heads {self.n_heads}"
            self.head_dim = self.dim // self.n_heads
        assert self.n_heads % self.n_kv_heads == 0, "n_heads must be a multiple of n_kv_heads"
        assert self.head_dim % 2 == 0, "RoPE needs an even head_dim"
        assert self.rope_scaling in (None, "llama3", "linear"), f"bad rope_scaling {self.rope_scaling!r}"
        if self.layer_types is not None:
            self.layer_types = tuple(self.layer_types)
            assert len(self.layer_types) == self.n_layers, "layer_types needs one entry per layer"
            assert set(self.layer_types) <= set(LAYER_TYPES), f"layer types must be in {LAYER_TYPES}"
            if "sliding" in self.layer_types:
                assert self.sliding_window and self.sliding_window > 0, "sliding layers need sliding_window"
        if self.rope_freq_factors is not None:
            self.rope_freq_factors = tuple(float(f) for f in self.rope_freq_factors)
            assert len(self.rope_freq_factors) == self.head_dim // 2, "rope_freq_factors: head_dim/2 values"
        assert self.max_seq_len > 0 and self.context_length > 0

    def layer_type(self, layer: int) -> str:
        """"global" or "sliding" for this layer."""
        if self.layer_types is not None:
            return self.layer_types[layer]
        return "sliding" if self.sliding_window else "global"
