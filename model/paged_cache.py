"""Paged KV cache: one pool of fixed-size blocks for every sequence, a prefix index, LRU eviction.

    pool = BlockPool.for_model(model, budget_bytes=1 << 30, block_size=16)
    b = pool.allocate()                  # a free block id (evicting an unused cached one if needed)
    pool.publish(b, key)                 # a full block becomes findable by its chain key
    b2 = pool.lookup(key)                # later: the same tokens (same owner) map the same block
    pool.release(b)                      # refcount 0: it stays cached until an allocation needs it

Layout: per layer, `k[layer]` and `v[layer]` are (num_blocks * block_size, n_kv, head_dim); the
token at position p of a sequence with block table T lives in slot T[p // bs] * bs + p % bs.
Keys are stored after RoPE, so a block is valid wherever the same tokens sit at the same positions.

Reuse is by content: a full block's key hashes (parent key, its tokens, namespace), so a key names
the whole prefix up to that block. The namespace is the owner for every block except those wholly
inside the pinned persona prefix, which use the shared namespace "": across owners only the persona
prefix can ever be found (see `chain_keys`). Full blocks never change after publishing and a
sequence writes only its own last, partial block, so sequences that diverge never write a shared
block: copy-on-write reduces to "share only full blocks".

Block 0 is a zeroed null block that is never handed out: padded gathers point at it, so masked-out
slots hold zeros rather than uninitialised memory (0 * NaN would poison attention).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from collections.abc import Sequence

import torch

SHARED = ""  # namespace of blocks wholly inside the pinned persona prefix
MAX_BLOCKS = 1 << 16  # cap for tiny models, whose per-block bytes would give millions of blocks


def chain_keys(tokens: Sequence[int], block_size: int, owner: str, shared_len: int,
               first: int = 0, parent: bytes = b"") -> list[bytes]:
    """Keys of the full blocks of `tokens` from block `first` on (`parent`: the key of block
    first - 1); block i is shared when it ends within `shared_len`, else in the owner's namespace."""
    keys = []
    for i in range(first, len(tokens) // block_size):
        lo, hi = i * block_size, (i + 1) * block_size
        ns = SHARED if hi <= shared_len else f"owner:{owner}"
        h = hashlib.blake2b(parent, digest_size=16)
        h.update(ns.encode())
        h.update(b"\0")
        h.update(",".join(map(str, tokens[lo:hi])).encode())
        parent = h.digest()
        keys.append(parent)
    return keys


class BlockPool:
    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, num_blocks: int, block_size: int = 16,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        if num_blocks < 2:
            raise ValueError(f"the KV pool needs at least 2 blocks (one is the null block), got {num_blocks}: "
                             "raise kv_budget_bytes")
        self.block_size, self.num_blocks = block_size, num_blocks
        slots = num_blocks * block_size
        # empty, not zeros: pages are touched only as blocks are used, so RSS follows the use
        # one tensor per kind, (layers, slots, n_kv, head_dim), so the compiled decode step writes every
        # layer's new keys in one indexed copy (model/decode_step.py); k[i] / v[i] are its layer views
        self.k_all = torch.empty(n_layers, slots, n_kv_heads, head_dim, dtype=dtype, device=device)
        self.v_all = torch.empty_like(self.k_all)
        self.k, self.v = list(self.k_all.unbind(0)), list(self.v_all.unbind(0))
        for t in (self.k_all, self.v_all):
            t[:, :block_size].zero_()  # the null block
        self.block_bytes = 2 * n_layers * block_size * n_kv_heads * head_dim * self.k[0].element_size()
        self.ref = [0] * num_blocks
        self.free: deque[int] = deque(range(1, num_blocks))  # unused and not indexed
        self.cached: OrderedDict[int, None] = OrderedDict()  # refcount 0 but indexed; LRU, oldest first
        self.index: dict[bytes, int] = {}  # chain key -> block
        self.key_of: dict[int, bytes] = {}
        self.queries = 0  # prompt tokens looked up (vLLM's prefix_cache_queries)
        self.hits = 0  # of them found in the cache (prefix_cache_hits)

    @classmethod
    def for_model(cls, model, budget_bytes: int, block_size: int = 16,
                  device: torch.device | str | None = None) -> BlockPool:
        a, w = model.args, model.norm.weight
        per_block = 2 * a.n_layers * block_size * a.n_kv_heads * a.head_dim * w.element_size()
        n = max(2, min(MAX_BLOCKS, budget_bytes // per_block))
        return cls(a.n_layers, a.n_kv_heads, a.head_dim, n, block_size, w.dtype, device or w.device)

    # -- sizes ----------------------------------------------------------------------------------
    @property
    def blocks_used(self) -> int:
        """Blocks held by running sequences or cached for reuse (everything not free)."""
        return self.num_blocks - 1 - len(self.free)

    @property
    def blocks_free(self) -> int:
        """Blocks an allocation can take now: free ones plus unreferenced cached ones."""
        return len(self.free) + len(self.cached)

    @property
    def used_bytes(self) -> int:
        return self.blocks_used * self.block_bytes

    @property
    def nbytes(self) -> int:
        return (self.num_blocks) * self.block_bytes

    # -- blocks ---------------------------------------------------------------------------------
    def allocate(self) -> int | None:
        """A block with refcount 1, or None when every block is in use."""
        if self.free:
            b = self.free.popleft()
        elif self.cached:
            b, _ = self.cached.popitem(last=False)  # least recently used cached block
            del self.index[self.key_of.pop(b)]
        else:
            return None
        self.ref[b] = 1
        return b

    def acquire(self, b: int) -> None:
        if self.ref[b] == 0:
            self.cached.pop(b, None)
        self.ref[b] += 1

    def release(self, b: int) -> None:
        self.ref[b] -= 1
        assert self.ref[b] >= 0, f"block {b} released more often than acquired"
        if self.ref[b] == 0:
            if b in self.key_of:
                self.cached[b] = None  # newest at the end
            else:
                self.free.append(b)

    def publish(self, b: int, key: bytes) -> None:
        """Make full block `b` findable by `key` (a block already indexed under it wins)."""
        if key not in self.index and b not in self.key_of:
            self.index[key] = b
            self.key_of[b] = key

    def lookup(self, key: bytes) -> int | None:
        return self.index.get(key)

    def forget(self, key: bytes) -> None:
        """Drop `key` from the index (a deleted session); its block is freed once unreferenced."""
        b = self.index.pop(key, None)
        if b is None:
            return
        del self.key_of[b]
        if self.ref[b] == 0:
            self.cached.pop(b, None)
            self.free.append(b)

    def match(self, keys: Sequence[bytes]) -> list[int]:
        """Blocks of the longest indexed prefix of `keys`, acquired for the caller."""
        out = []
        for key in keys:
            b = self.index.get(key)
            if b is None:
                break
            self.acquire(b)
            out.append(b)
        return out

    def clear(self) -> None:
        """Forget every cached block (running sequences keep theirs)."""
        for key in list(self.index):
            self.forget(key)
