"""Decode rows of Llama-family and Gemma 3 models as one C call per layer (model/decode_layer.c).

    step = FusedDecode.for_model(model, pool)        # None where the model or machine does not fit
    logits = step(tokens, tables, positions)         # (rows, vocab) float32; writes the new keys/values

Once replies stream, nearly every step is a pure decode step. Through torch a SmolLM2-135M token
costs ~21 ms on 2 cores, compiled or eager, while its int4 matmuls take ~6 ms: the rest is the
dispatch of ~30 small ops a layer. The C layer does the same arithmetic as model/llama.py's Block
and model/gemma3.py's GemmaBlock with no dispatch between the matmuls; each row is computed on its
own, so a row's logits are the same bits alone or in any batch of decode rows. The scheduler
gives it the decode rows of every step, also of steps whose prompt chunks run through torch
(model/paged_attention.py). Models it does not cover stay wholly in torch: a projection that is
not one model/q4dot.c weight (float32 or bf16 weights, torch's int4 layout on AVX-512 machines),
biases, another block class, a non-float32 pool. `for_model` also runs every layer both ways on
the real model and keeps torch's path if they disagree. `$MEMENTO_DECODE_KERNEL=torch` turns it off.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import torch

from model import ckernels, decode_attention
from model.decode_step import decode_plan
from model.gemma3 import GemmaAttention, GemmaBlock, GemmaFeedForward, GemmaRMSNorm
from model.llama import Attention, Block, FeedForward, RMSNorm
from model.paged_attention import PagedBatch, Row
from model.qlinear import Int8RowPlane, QLinear, RowPlane
from model.rope import rope_cos_sin

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("decode_layer.c")
CHECK_TOLERANCE = 1e-2  # of a layer's largest output: float32 rounding, now and then an int8 step


class _Linear(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("dm", ctypes.c_void_p), ("bits", ctypes.c_int), ("n", ctypes.c_int)]


class LayerSpec(ctypes.Structure):
    """decode_layer.c's struct decoder_layer, field for field."""

    _fields_ = [("dim", ctypes.c_int), ("n_heads", ctypes.c_int), ("n_kv", ctypes.c_int),
                ("head_dim", ctypes.c_int), ("hidden", ctypes.c_int), ("gelu", ctypes.c_int),
                ("eps", ctypes.c_float), ("scale", ctypes.c_float),
                ("attn_norm", ctypes.c_void_p), ("ffn_norm", ctypes.c_void_p),
                ("q_norm", ctypes.c_void_p), ("k_norm", ctypes.c_void_p),
                ("post_attn_norm", ctypes.c_void_p), ("post_ffn_norm", ctypes.c_void_p),
                ("wqkv", _Linear), ("wo", _Linear), ("w13", _Linear), ("w2", _Linear)]


@cache
def library() -> ctypes.CDLL | None:
    """The built kernel, or None (no AVX2 or compiler, or $MEMENTO_DECODE_KERNEL=torch). Its numerics
    are checked per model by `FusedDecode.for_model` rather than once here."""
    if not ckernels.enabled("MEMENTO_DECODE_KERNEL"):
        return None
    p, i = ctypes.c_void_p, ctypes.c_int
    args = [p, p, i, p, p, p, p, p, p, p, i]
    return ckernels.load(SOURCE, "the AVX2 decode layer", {"decode_layer": (args, i)}, lambda _lib: True)


def _linear(lin, want_k: int) -> tuple[_Linear, list[torch.Tensor]] | str:
    """The C view of a QLinear with one q4dot plane, or why it has none."""
    if not isinstance(lin, QLinear) or lin.bias is not None or lin.in_features != want_k:
        return f"{type(lin).__name__} (want an unbiased QLinear over {want_k} inputs)"
    planes = lin.w.planes()
    if len(planes) != 1 or not isinstance(planes[0], (RowPlane, Int8RowPlane)):
        return f"a {len(planes)}-plane {lin.w.plane_type.__name__} weight (want one q4dot plane)"
    p = planes[0]
    w = p.nib if isinstance(p, RowPlane) else p.q
    if w.shape[0] != lin.out_features or not (w.is_contiguous() and p.dm.is_contiguous()):
        return "a padded or strided weight"
    bits = 4 if isinstance(p, RowPlane) else 8
    return _Linear(w.data_ptr(), p.dm.data_ptr(), bits, lin.out_features), [w, p.dm]


def _norm_scale(norm) -> torch.Tensor | str:
    """The float32 scale a norm multiplies by: Llama's w, Gemma's 1 + w (as GemmaRMSNorm computes it)."""
    w = norm.weight
    if type(norm) is RMSNorm and w.dtype == torch.float32:
        return w.contiguous()
    if type(norm) is GemmaRMSNorm:
        return (1.0 + w.float()).contiguous()
    return f"{type(norm).__name__} (want a float32 RMSNorm or a GemmaRMSNorm)"


# block class -> (attention, feed-forward classes, gate: 1 GELU-tanh / 0 SiLU, its post-norms)
_BLOCKS = {Block: (Attention, FeedForward, 0, False), GemmaBlock: (GemmaAttention, GemmaFeedForward, 1, True)}


def layer_spec(block, args) -> tuple[LayerSpec, list[torch.Tensor]] | str:
    """decode_layer.c's description of one block (and the tensors it points into), or why it cannot run it."""
    kinds = _BLOCKS.get(type(block))
    att, ff = getattr(block, "attention", None), getattr(block, "feed_forward", None)
    if kinds is None or type(att) is not kinds[0] or type(ff) is not kinds[1]:
        return f"{type(block).__name__} is neither model.llama's Block nor model.gemma3's GemmaBlock"
    _att, _ff, gelu, post = kinds
    if args.head_dim % 8:
        return f"head_dim {args.head_dim} is not a multiple of 8"
    parts = {"wqkv": _linear(att.wqkv, args.dim), "wo": _linear(att.wo, args.n_heads * args.head_dim),
             "w13": _linear(ff.w13, args.dim), "w2": _linear(ff.w2, args.hidden_dim)}
    norms = {"attn_norm": block.attention_norm, "ffn_norm": block.ffn_norm,
             "q_norm": getattr(att, "q_norm", None), "k_norm": getattr(att, "k_norm", None),
             "post_attn_norm": block.post_attention_norm if post else None,
             "post_ffn_norm": block.post_ffn_norm if post else None}
    scales = {name: None if n is None else _norm_scale(n) for name, n in norms.items()}
    for name, got in {**parts, **scales}.items():
        if isinstance(got, str):
            return f"{name}: {got}"
    scale = att.scale if att.scale is not None else args.head_dim**-0.5
    ptr = {name: None if t is None else t.data_ptr() for name, t in scales.items()}
    spec = LayerSpec(args.dim, args.n_heads, args.n_kv_heads, args.head_dim, args.hidden_dim, gelu, args.norm_eps,
                     scale, ptr["attn_norm"], ptr["ffn_norm"], ptr["q_norm"], ptr["k_norm"], ptr["post_attn_norm"],
                     ptr["post_ffn_norm"], *(parts[n][0] for n in ("wqkv", "wo", "w13", "w2")))
    keep = [t for _spec, ts in parts.values() for t in ts] + [t for t in scales.values() if t is not None]
    return spec, keep


class FusedDecode:
    max_rows = 1 << 30  # any number of decode rows (the scheduler's max_batch bounds them)
    takes_mixed_steps = True  # decode rows stay here when prompt chunks run beside them (in torch)

    def __init__(self, model, pool, lib: ctypes.CDLL, specs: list[LayerSpec], keep: list[torch.Tensor]) -> None:
        self.model, self.pool, self.lib, self.specs = model, pool, lib, specs
        self._keep = keep  # the tensors the specs point into
        args = model.args
        self.layer_type = [args.layer_type(i) for i in range(args.n_layers)]
        self.failed: BaseException | None = None  # set by the scheduler when a step raised: torch's path from then
        self.calls = 0

    @classmethod
    def for_model(cls, model, pool) -> FusedDecode | None:
        """The fused step for this model and pool, or None (the reason is logged) where it does not
        apply or one of its layers disagrees with the block's torch forward (`check`)."""
        why = cls.why_not(model, pool)
        if why is not None:
            log.info("decode steps run through torch: %s", why)
            return None
        specs, keep = [], []
        for block in model.layers:
            spec, ts = layer_spec(block, model.args)
            specs.append(spec)
            keep += ts
        step = cls(model, pool, library(), specs, keep)
        return step if step.check() else None

    @staticmethod
    def why_not(model, pool) -> str | None:
        if not ckernels.enabled("MEMENTO_DECODE_KERNEL"):
            return "MEMENTO_DECODE_KERNEL=torch"
        if library() is None or not decode_attention.available():
            return "the C decode layer is not available here (it needs AVX2, FMA, F16C and a C compiler)"
        if not decode_attention.supports(pool.k[0], model.args.head_dim):
            return "the KV pool is not float32 on the CPU"
        for i, block in enumerate(model.layers):
            got = layer_spec(block, model.args)
            if isinstance(got, str):
                return f"layer {i}: {got}"
        return None

    @torch.inference_mode()
    def __call__(self, tokens: Sequence[int], tables: Sequence[Sequence[int]],
                 positions: Sequence[int]) -> torch.Tensor:
        """Logits (B, vocab) for B rows, row i feeding tokens[i] at positions[i] with block table
        tables[i] (which already holds that position's slot); writes the new keys/values."""
        self.calls += 1
        plans, slots = self._plans(tables, positions)
        x = self.model.embed(torch.tensor([list(tokens)], dtype=torch.long))[0].float().contiguous()  # (B, dim)
        for i, lt in enumerate(self.layer_type):
            self._layer(i, x, plans[lt], slots)
        return self.model.head(x[None])[0]

    def _plans(self, tables: Sequence[Sequence[int]], positions: Sequence[int]) -> tuple[dict, torch.Tensor]:
        """Per layer type (idx, lens, cos, sin) of the rows, and each row's slot for its new key/value."""
        model, pool, bs = self.model, self.pool, self.pool.block_size
        pos = torch.tensor(positions, dtype=torch.long)
        plans = {}
        for lt in set(self.layer_type):
            window = model.args.sliding_window if lt == "sliding" else None
            idx, valid = decode_plan(tables, positions, bs, window, include_current=True)
            if int(idx.max()) >= pool.k[0].shape[0]:  # the kernel reads slots unchecked
                raise RuntimeError(f"a block table points past the pool's {pool.k[0].shape[0]} slots")
            cos, sin = rope_cos_sin(model.inv_freq(lt, pos.device), pos)
            plans[lt] = (idx, valid.sum(1), cos.contiguous(), sin.contiguous())
        slots = torch.tensor([t[p // bs] * bs + p % bs for t, p in zip(tables, positions, strict=True)])
        return plans, slots

    def _layer(self, i: int, x: torch.Tensor, plan: tuple, slots: torch.Tensor) -> None:
        """Layer i over x (B, dim) float32, in place; plan = (idx, lens, cos, sin) of its layer type."""
        idx, lens, cos, sin = plan
        if self.lib.decode_layer(ctypes.addressof(self.specs[i]), x.data_ptr(), x.shape[0], cos.data_ptr(),
                                       sin.data_ptr(), self.pool.k[i].data_ptr(), self.pool.v[i].data_ptr(),
                                       slots.data_ptr(), idx.data_ptr(), lens.data_ptr(), idx.shape[1]):
            raise MemoryError("decode_layer: no memory for a layer's scratch")

    @torch.inference_mode()
    def check(self) -> bool:
        """Every layer once both ways (this and the block's own forward over a PagedBatch) on the same
        input, two rows on the null block: the same output but for rounding, or this step is not
        used. Layer by layer, since through a whole quantized model float32 noise is amplified (an
        int8 activation rounding the other way in a group holding one of SmolLM2's ~10^4 outliers
        moves a logit by ~1). The null block reads as zeros again after."""
        model, pool, bs = self.model, self.pool, self.pool.block_size
        tokens, tables, positions = [1, 2], [[0], [0]], [bs - 2, bs - 1]
        plans, slots = self._plans(tables, positions)
        x = model.embed(torch.tensor([tokens]))
        worst = 0.0
        try:
            for i, block in enumerate(model.layers):
                batch = PagedBatch(pool, [Row([0], p, 1, True) for p in positions], model.args)
                idx, lens, cos, sin = plans[self.layer_type[i]]
                want = block(x, batch.positions, (cos, sin), None, batch, 0)[0]
                got = x[0].float().contiguous().clone()
                self._layer(i, got, plans[self.layer_type[i]], slots)
                worst = max(worst, float((got - want).abs().max()) / max(float(want.abs().max()), 1e-6))
        finally:
            pool.k_all[:, :bs].zero_()
            pool.v_all[:, :bs].zero_()
        if not worst <= CHECK_TOLERANCE:
            log.warning("the C decode layer disagrees with torch's on this model (relative error %.3g); decode "
                        "steps run through torch", worst)
            return False
        return True
