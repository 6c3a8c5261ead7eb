"""`KVCache`: per-layer key/value buffers, preallocated and grown in chunks.

Slot p of every buffer holds the key/value of the token at absolute position p (keys stored
after RoPE), so `length` == number of cached positions == next position to fill.

Eager use (what `model.forward` does for you):

    cache = model.new_cache()                       # empty; grows by `chunk` slots when needed
    logits = model(tokens, torch.arange(0, T), cache)           # prefill: cache.length == T
    logits = model(next_tok, torch.tensor([T]), cache, True)    # decode one token

torch.compile-friendly decode (static shapes, no data-dependent Python branches):

    cache = model.new_cache(capacity=args.max_seq_len, static=True)  # buffers never move
    step = torch.compile(model.forward)            # or mode="reduce-overhead"
    cache.prepare(pos)                              # eager, before each compiled call: bookkeeping
    logits = step(tok, pos, cache, True)           # tok (1,1), pos (1,) tensors

A static cache attends over all `capacity` slots; the mask (built from `input_pos` by tensor
arithmetic) hides slots after the query position, so stale data there is harmless. Inside
`torch.compile` tracing the model skips `prepare`, hence the explicit call above.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        capacity: int = 0,
        max_capacity: int | None = None,
        chunk: int = 256,
        static: bool = False,
    ) -> None:
        assert chunk > 0 and capacity >= 0
        self.n_layers, self.n_kv_heads, self.head_dim = n_layers, n_kv_heads, head_dim
        self.chunk, self.max_capacity, self.static = chunk, max_capacity, static
        self.length = 0  # cached positions [0, length)
        shape = (1, n_kv_heads, self._rounded(capacity), head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self._mark_static()

    def _mark_static(self) -> None:
        """Tell torch.compile the buffers never move, so CUDA graphs may update them in place."""
        if self.static:
            for t in self.k + self.v:
                torch._dynamo.mark_static_address(t)

    # -- sizes --------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self.k[0].shape[2] if self.k else 0

    @property
    def device(self) -> torch.device:
        return self.k[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.k[0].dtype

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def _rounded(self, n: int) -> int:
        n = -(-n // self.chunk) * self.chunk  # round up to whole chunks
        return min(n, self.max_capacity) if self.max_capacity else n

    def reserve(self, n: int) -> None:
        """Make room for positions [0, n), copying into bigger buffers at most once per call."""
        if n <= self.capacity:
            return
        if self.max_capacity is not None and n > self.max_capacity:
            raise ValueError(
                f"KV cache full: position {n - 1} is past max_capacity {self.max_capacity}; "
                f"shift the context (model.shift_cache) or start a new cache"
            )
        if self.static:
            raise ValueError(f"static KV cache of capacity {self.capacity} cannot grow to {n} positions")
        new_cap, old = self._rounded(n), self.length
        for bufs in (self.k, self.v):
            for i, buf in enumerate(bufs):
                grown = buf.new_zeros((1, self.n_kv_heads, new_cap, self.head_dim))
                grown[:, :, :old] = buf[:, :, :old]
                bufs[i] = grown

    # -- the model's side ---------------------------------------------------------------------
    def prepare(self, input_pos: torch.Tensor) -> None:
        """Bookkeeping before a forward over `input_pos` (T,): grow, then set `length`.

        Positions must continue the cache (first <= length) so no slot is left unwritten.
        """
        first, end = int(input_pos[0]), int(input_pos[-1]) + 1
        if first > self.length:
            raise ValueError(f"input_pos starts at {first} but the cache holds only {self.length} positions")
        self.reserve(end)
        self.length = end

    def update(
        self, layer: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (1, n_kv, T, head_dim) at slots `input_pos`; return this layer's full buffers."""
        kb, vb = self.k[layer], self.v[layer]
        kb.index_copy_(2, input_pos, k.to(kb.dtype))
        vb.index_copy_(2, input_pos, v.to(vb.dtype))
        return kb, vb

    # -- the engine's side --------------------------------------------------------------------
    def clone(self) -> KVCache:
        """Independent copy (e.g. of a shared persona prefix); only the used slots are copied."""
        out = KVCache.__new__(KVCache)
        out.__dict__.update(self.__dict__)
        cap = self.capacity if self.static else self._rounded(self.length)
        out.k = [self._copy_prefix(t, cap) for t in self.k]
        out.v = [self._copy_prefix(t, cap) for t in self.v]
        out._mark_static()
        return out

    def _copy_prefix(self, t: torch.Tensor, cap: int) -> torch.Tensor:
        out = t.new_zeros((1, self.n_kv_heads, cap, self.head_dim))
        out[:, :, : self.length] = t[:, :, : self.length]
        return out

    def truncate(self, n: int) -> None:
        """Keep positions [0, n) (e.g. the prefix shared with a new prompt); buffers stay allocated."""
        assert 0 <= n, "truncate needs n >= 0"
        self.length = min(self.length, n)

    def to(self, device: torch.device | str) -> KVCache:
        """Move the buffers (e.g. evict to host RAM and back); returns self."""
        self.k = [t.to(device) for t in self.k]
        self.v = [t.to(device) for t in self.v]
        self._mark_static()
        return self

    def __repr__(self) -> str:
        return (
            f"KVCache(layers={self.n_layers}, length={self.length}, capacity={self.capacity}, "
            f"dtype={self.dtype}, device={self.device}, nbytes={self.nbytes})"
        )
