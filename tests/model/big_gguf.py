"""Random-weight Llama-shaped GGUFs of about a billion parameters, written block by block.

    write_random_gguf(path, Q.Q4_0)   # ~0.6 GB: dim 2048, 16 layers, GQA 32/8, ffn 8192, vocab 32000

The blocks are random bytes with small float16 scales, so no float copy of the model is ever
made (quantizing a billion float32 values in numpy would take minutes and 4 GB).
"""

from __future__ import annotations

import numpy as np
from gguf import GGUFWriter
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as Q

SHAPE = dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, hidden=8192, vocab=32000)
SCALE_OFFSET = {Q.Q4_0: 0, Q.Q8_0: 0}  # byte offset of the float16 d in each block
WEIGHT_STD = {Q.Q4_0: 0.02 / 4.6, Q.Q8_0: 0.02 / 73.0}  # d so that weights have std ~0.02


def _blocks(rng: np.random.Generator, qtype: Q, rows: int, cols: int) -> np.ndarray:
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    d = np.full((raw.shape[0], 1), WEIGHT_STD[qtype], dtype=np.float16)
    off = SCALE_OFFSET[qtype]
    raw[:, off : off + 2] = d.view(np.uint8)
    return raw.reshape(rows, cols // block * size)


def write_random_gguf(path, qtype: Q, seed: int = 0, shape: dict | None = None) -> int:
    """Write the model; returns its parameter count. Norm weights are float32 ones."""
    s = {**SHAPE, **(shape or {})}
    rng = np.random.default_rng(seed)
    dim, hd = s["dim"], s["dim"] // s["n_heads"]
    w = GGUFWriter(str(path), "llama")
    w.add_context_length(2048)
    w.add_embedding_length(dim)
    w.add_block_count(s["n_layers"])
    w.add_feed_forward_length(s["hidden"])
    w.add_head_count(s["n_heads"])
    w.add_head_count_kv(s["n_kv_heads"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    count = 0

    def tensor(name: str, rows: int, cols: int) -> None:
        nonlocal count
        w.add_tensor(name, _blocks(rng, qtype, rows, cols), raw_dtype=qtype)  # shape: from the bytes
        count += rows * cols

    tensor("token_embd.weight", s["vocab"], dim)  # tied output head, as Llama 3.2 1B
    w.add_tensor("output_norm.weight", np.ones(dim, dtype=np.float32))
    for i in range(s["n_layers"]):
        b = f"blk.{i}"
        tensor(f"{b}.attn_q.weight", s["n_heads"] * hd, dim)
        tensor(f"{b}.attn_k.weight", s["n_kv_heads"] * hd, dim)
        tensor(f"{b}.attn_v.weight", s["n_kv_heads"] * hd, dim)
        tensor(f"{b}.attn_output.weight", dim, s["n_heads"] * hd)
        tensor(f"{b}.ffn_gate.weight", s["hidden"], dim)
        tensor(f"{b}.ffn_up.weight", s["hidden"], dim)
        tensor(f"{b}.ffn_down.weight", dim, s["hidden"])
        w.add_tensor(f"{b}.attn_norm.weight", np.ones(dim, dtype=np.float32))
        w.add_tensor(f"{b}.ffn_norm.weight", np.ones(dim, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return count


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


def _rss() -> int:
    return _status("VmRSS")


def measure(path: str, weights: str) -> dict:
    """Load in this process and report bytes resident for the model (RSS after the load minus
    RSS after the imports), the peak, the load time, and greedy argmaxes with their top-5 logits:
    over the prompt's positions, then 3 decoded tokens."""
    import time

    import torch

    import model.llama  # noqa: F401  (imports are paid before the baseline)
    import model.qlinear  # noqa: F401
    from model.registry import load_weights

    base, t0 = _rss(), time.perf_counter()
    _, m = load_weights(path, weights=weights, max_seq_len=64)
    load_s, resident = time.perf_counter() - t0, _rss() - base
    # VmHWM, not getrusage's ru_maxrss: that survives exec, so a child of a big pytest process
    # would report its parent's size as its own peak
    peak = _status("VmHWM") - base
    ids = torch.tensor([[1, 5, 900, 31, 2000, 7, 123, 4000]])
    with torch.inference_mode():
        cache = m.new_cache()
        logits = m(ids, torch.arange(ids.shape[1]), cache)
        rows = list(logits[0])
        for pos in range(ids.shape[1], ids.shape[1] + 3):
            logits = m(logits[:, -1:].argmax(-1), torch.tensor([pos]), cache)
            rows.append(logits[0, -1])
    # the argmax at each position and the 5 best {id: logit}, so a caller can tell a near-tie apart
    argmax = [int(r.argmax()) for r in rows]
    top = [{int(i): float(v) for v, i in zip(*r.topk(5), strict=True)} for r in rows]
    spread = max(float(r.max() - r.min()) for r in rows)
    return dict(resident=resident, peak=peak, load_s=load_s, argmax=argmax, top=top, spread=spread)


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(measure(sys.argv[1], sys.argv[2])))
