"""The compiled decode step: one `torch.compile`d layer graph for steps where every row decodes one token.

Once a reply streams, nearly every step is a pure decode step: each running sequence feeds its
last sampled token. (Where model/fused_decode.py covers the model, a Llama-family or Gemma 3
GGUF in q4dot's layout, its C layer runs those steps instead and nothing is compiled.) Eager
PyTorch spends most of such a step launching ~900 small ops (norms, RoPE, reshapes, the paged
gather); compiled, inductor fuses each layer's into a few C++ kernels around its int4 matmuls. Steps that carry prompt chunks stay eager (`model/paged_attention.py`).

One graph serves every layer (the layer's weights and its slice of the pool are inputs), so the
compile is small: a whole-model graph repeats the same code once per layer, and took the C++
compiler minutes on two cores. The graph is pure: it reads the pool (keys/values of earlier
positions, gathered by slot index), attends to the current token's own key/value directly, and
returns them; the caller writes every layer's new keys/values into the pool in one indexed copy.

    step = CompiledDecode(model, pool, cache_dir=data_dir / "compile")
    step.warm_up()                                   # compiles (or reads the cache); progress on stderr
    logits = step(tokens, tables, positions)         # (rows, vocab) float32

Only single-row steps run compiled (`MAX_ROWS`): one row gains (62.3 against 52.0 tok/s
in-process), while the graph for 2+ rows, compiled before traffic, decodes 8 rows no faster than
eager (204.3 against 204.0 tok/s aggregate): their step is the int4 kernel's, which costs M times
its one-row cost. (An earlier 37.6 against 142.0 through the bench had that compile inside the
run.) The graph is dynamic in the context length. Inductor's artefacts live in `cache_dir`, so
only a machine's first start compiles; later starts read them back.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from model.rope import rope_cos_sin

log = logging.getLogger(__name__)

MAX_ROWS = 1  # steps with more decoding rows run eagerly (see above)


class LayerBatch:
    """The cache object one layer's forward sees during a compiled decode step (one token per row)."""

    paged = True  # the model's forward checks this instead of importing the class

    def __init__(self, k_pool: torch.Tensor, v_pool: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor) -> None:
        self.k_pool, self.v_pool = k_pool, v_pool  # this layer's (slots, n_kv, hd)
        self.idx, self.valid = idx, valid  # earlier positions' slots (B, S), and which are real
        self.k = self.v = None  # the current tokens' keys/values, for the caller to store

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               scale: float | None) -> torch.Tensor:
        """q (1, H, B, hd), k/v (1, n_kv, B, hd) of the current tokens -> (1, H, B, hd): softmax over
        the row's earlier positions (gathered from the pool) and the current token itself."""
        self.k, self.v = k, v
        past_k, past_v = self.k_pool[self.idx], self.v_pool[self.idx]  # (B, S, n_kv, hd)
        B, H, hd, n_kv = q.shape[2], q.shape[1], q.shape[3], k.shape[1]
        qg = q[0].transpose(0, 1).reshape(B, n_kv, H // n_kv, hd).to(past_k.dtype)  # (B, n_kv, group, hd)
        kc, vc = k[0].transpose(0, 1).to(past_k.dtype), v[0].transpose(0, 1).to(past_v.dtype)  # (B, n_kv, hd)
        scale = hd**-0.5 if scale is None else scale
        s_past = torch.einsum("bkgd,bskd->bkgs", qg, past_k) * scale
        s_past = s_past.masked_fill(~self.valid[:, None, None, :], float("-inf"))
        s_cur = (qg * kc[:, :, None, :]).sum(-1, keepdim=True) * scale  # (B, n_kv, group, 1)
        p = torch.cat([s_past, s_cur], dim=-1).softmax(dim=-1)
        y = torch.einsum("bkgs,bskd->bkgd", p[..., :-1], past_v) + p[..., -1:] * vc[:, :, None, :]
        return y.reshape(B, H, hd).transpose(0, 1)[None].to(q.dtype)


def decode_plan(tables: Sequence[Sequence[int]], positions: Sequence[int], block_size: int,
                window: int | None, include_current: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots of each row's earlier positions [lo, p) (lo = p - window + 1 for sliding layers), or
    [lo, p] with `include_current`, padded to the longest row with slot 0 (the null block) and
    marked invalid: (idx (B, S), valid (B, S))."""
    pos = torch.tensor(positions, dtype=torch.long)
    lo = torch.zeros_like(pos) if window is None else (pos - window + 1).clamp(min=0)
    lens = pos + int(include_current) - lo
    width = max(2, int(lens.max()))  # torch specialises sizes 0 and 1: keep every step on one graph
    want = lo[:, None] + torch.arange(width)[None, :]  # (B, S) positions
    valid = torch.arange(width)[None, :] < lens[:, None]
    n_blocks = max(len(t) for t in tables)
    table = torch.zeros(len(tables), n_blocks, dtype=torch.long)
    for i, t in enumerate(tables):
        table[i, : len(t)] = torch.as_tensor(t, dtype=torch.long)
    block = torch.where(valid, want // block_size, 0).clamp(max=n_blocks - 1)
    idx = torch.where(valid, table.gather(1, block) * block_size + want % block_size, 0)
    return idx, valid


def _layer_step(block, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_pool: torch.Tensor,
                v_pool: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor):
    """One block over the rows' current tokens x (1, B, dim) -> (x, k, v), through the block's own
    forward (so each model family's layer code is the one that runs)."""
    batch = LayerBatch(k_pool, v_pool, idx, valid)
    x = block(x, None, (cos, sin), None, batch, 0)
    return x, batch.k, batch.v


class CompiledDecode:
    max_rows = MAX_ROWS
    takes_mixed_steps = False  # a step with prompt chunks runs wholly eager

    def __init__(self, model, pool, cache_dir: str | Path | None = None, progress: bool = False) -> None:
        self.model, self.pool, self.progress = model, pool, progress
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        if self.cache_dir is not None:
            # inductor reads it at each use; set even when inherited (inductor exports its default
            # there, so a parent process that compiled anything would otherwise choose for us)
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(self.cache_dir.resolve())
        args = model.args
        self.layer_type = [args.layer_type(i) for i in range(args.n_layers)]
        self._fn = torch.compile(_layer_step, dynamic=True, fullgraph=True)
        self.failed: BaseException | None = None  # set once compiling failed: callers go eager
        self.calls = 0  # decode steps run compiled

    @torch.inference_mode()
    def __call__(self, tokens: Sequence[int], tables: Sequence[Sequence[int]],
                 positions: Sequence[int]) -> torch.Tensor:
        """Logits (B, vocab) for B rows, row i feeding tokens[i] at positions[i] with block table
        tables[i] (which already holds the slot for that position); writes the new keys/values."""
        model, pool, bs = self.model, self.pool, self.pool.block_size
        self.calls += 1
        pos = torch.tensor(positions, dtype=torch.long)
        plans, ropes = {}, {}
        for lt in set(self.layer_type):
            window = model.args.sliding_window if lt == "sliding" else None
            plans[lt] = decode_plan(tables, positions, bs, window)
            ropes[lt] = rope_cos_sin(model.inv_freq(lt, pos.device), pos)
        x = model.embed(torch.tensor([list(tokens)], dtype=torch.long))  # (1, B, dim)
        ks, vs = [], []
        for i, (block, lt) in enumerate(zip(model.layers, self.layer_type, strict=True)):
            x, k, v = self._fn(block, x, *ropes[lt], pool.k[i], pool.v[i], *plans[lt])
            ks.append(k[0])
            vs.append(v[0])
        slots = torch.tensor([t[p // bs] * bs + p % bs for t, p in zip(tables, positions, strict=True)])
        pool.k_all[:, slots] = torch.stack(ks).transpose(1, 2).to(pool.k_all.dtype)  # (layers, B, n_kv, hd)
        pool.v_all[:, slots] = torch.stack(vs).transpose(1, 2).to(pool.v_all.dtype)
        return model.head(x)[0]
    def warm_up(self, sizes: Sequence[int] = (1,)) -> dict[str, float]:
        """Compile (or read from the cache) the graphs for these batch sizes before traffic arrives,
        so no request waits for a compile: {"seconds", "compiled", "from_cache"} (graph counts)."""
        from torch._dynamo.utils import counters

        t0 = time.perf_counter()
        hits, misses = counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]
        if self.progress:
            where = f" (artefacts in {os.environ.get('TORCHINDUCTOR_CACHE_DIR')})"
            print(f"preparing the compiled decode step{where}: compiling takes a minute or two on a "
                  "machine's first start, reading the cache a few seconds", file=sys.stderr, flush=True)
        bs = self.pool.block_size
        for b in sizes:  # null-block slots only: nothing real is overwritten
            try:
                self(tokens=[0] * b, tables=[[0]] * b, positions=[bs - 1] * b)
            except Exception as exc:  # no C++ compiler, an unsupported op...: the eager path still works
                self.failed = exc
                log.warning("cannot compile the decode step (%s); decoding eagerly", exc)
                break
            if self.progress:
                print(f"  decode step for {b} row{'s' if b > 1 else ''} ready ({time.perf_counter() - t0:.0f}s)",
                      file=sys.stderr, flush=True)
        self.pool.k_all[:, :bs].zero_()  # the null block must read as zeros again
        self.pool.v_all[:, :bs].zero_()
        self.calls = 0
        report = {"seconds": time.perf_counter() - t0,
                  "compiled": counters["inductor"]["fxgraph_cache_miss"] - misses,
                  "from_cache": counters["inductor"]["fxgraph_cache_hit"] - hits}
        if self.progress and self.failed is None:
            print(f"compiled decode step ready in {report['seconds']:.0f}s: {report['compiled']} graphs compiled, "
                  f"{report['from_cache']} read from the cache", file=sys.stderr, flush=True)
        return report
