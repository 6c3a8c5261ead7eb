"""`memento bench`: our engine against Hugging Face `transformers` on the same weights.

    result = run_bench("smollm2-135m-instruct")   # dict (json_out=True also prints it as JSON)
    print_table(result)

One process, same GGUF, same dtype, same prompts, greedy, batch 1:
- prefill tokens/s: a ~256-token prompt, time to the first token with nothing cached;
- decode tokens/s: 64 new tokens of a chat reply (end-of-turn tokens suppressed on both sides so
  lengths match);
  ours as configured by default (the batched engine with one sequence; on CPU a GGUF's weights stay
  packed int4, model/qlinear.py), and with the other weight mode ("ours (float32 weights)": the
  values transformers runs, so its greedy tokens must equal transformers');
- TTFT at turns 1, 10, 20, 30 of a scripted chat: ours with session reuse (the KV cache of the
  previous turns is kept), ours without, and transformers re-prefilling the whole history
  (its fair use: `generate` keeps no cache between calls).
- gpu (CUDA only): a random-weight ~1B Llama in bfloat16, decode tokens/s against the
  memory-bandwidth bound (every weight byte is read once per token).
Targets on a 2-core CPU: decode >= 2.0x transformers; TTFT(turn 30) / TTFT(turn 1) <= 1.3 with reuse.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch

from model.engine import Engine
from model.sampling import SamplingParams

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub while benchmarking

DECODE_TOKENS = 64
PREFILL_TOKENS = 256
REPLY_TOKENS = 16
REPEATS = 3  # timings are the median of this many runs

# peak memory bandwidth in GB/s, matched by substring of torch.cuda.get_device_name() (first hit wins)
GPU_BANDWIDTH_GBPS = {
    "H200": 4800.0,
    "H100 NVL": 3900.0,
    "H100 PCIe": 2000.0,
    "H100": 3350.0,  # SXM
    "A100-SXM4-80GB": 2039.0,
    "A100": 1555.0,
    "L40S": 864.0,
    "L4": 300.0,
    "A10": 600.0,
    "RTX 4090": 1008.0,
}

SYSTEM = (
    "You are Memento, a friendly assistant who remembers what the user said earlier in the "
    "conversation. Answer briefly, in plain sentences, and keep a warm, curious tone. When the "
    "user mentions a plan, a name or a preference, refer back to it later when it helps."
)
TOPICS = [
    "my cat Miso", "learning Korean", "a trip to Busan", "baking bread", "my sister's wedding",
    "running a 10k", "reading Dune", "fixing my bike", "a job interview", "growing tomatoes",
]


def user_message(turn: int) -> str:
    return f"Turn {turn}: let me tell you a bit more about {TOPICS[turn % len(TOPICS)]}. What do you think?"


# ---- timing helpers -----------------------------------------------------------------------------


def median_time(fn: Callable[[], object], repeats: int = REPEATS) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def ban(ids: Sequence[int]):
    """Logit processor suppressing `ids` (end-of-turn tokens) so every run decodes the full length."""
    idx = torch.tensor(sorted(ids), dtype=torch.long)

    def proc(generated, logits):
        return logits.index_fill_(0, idx.to(logits.device), float("-inf"))

    return proc


def ours_stream_times(eng: Engine, prompt: list[int], n: int, session_id=None, eos=()) -> tuple[float, float]:
    """(TTFT seconds, decode tokens/s) of one greedy generation of n tokens."""
    t0 = time.perf_counter()
    stamps = []
    params = SamplingParams(temperature=0.0, max_tokens=n)
    for ev in eng.generate(prompt, params, session_id=session_id, logits_processors=[ban(eos)] if eos else ()):
        if ev.token_id is not None:
            stamps.append(time.perf_counter())
    ttft = stamps[0] - t0
    rate = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
    return ttft, rate


def hf_generate(hf, prompt: list[int], n: int, eos=()) -> list[int]:
    ids = torch.tensor([prompt], device=hf.device)
    kwargs = dict(max_new_tokens=n, do_sample=False, attention_mask=torch.ones_like(ids))
    if eos:
        kwargs["suppress_tokens"] = sorted(eos)
    with torch.inference_mode():
        out = hf.generate(ids, pad_token_id=sorted(eos)[0] if eos else None, **kwargs)
    return out[0, len(prompt):].tolist()


def load_hf(lm):
    """transformers' model from the same file, float32; None when transformers is missing."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        return None
    path = lm.path
    if str(path).endswith(".gguf"):
        hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    else:
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return hf.to(lm.device).eval()


# ---- sections -------------------------------------------------------------------------------------


def load_alternate(lm):
    """The same GGUF in the other weight mode: (label, model), or None where there is none (not a
    GGUF on CPU in float32). Quantized by default means the alternate is float32, and back."""
    from model.qlinear import QLinear
    from model.registry import load_model

    if not str(lm.path).endswith(".gguf") or lm.device.type != "cpu" or lm.dtype != torch.float32:
        return None
    quantized = any(isinstance(m, QLinear) for m in lm.model.modules())
    weights, label = ("float", "float32 weights") if quantized else ("quantized", "packed int4 weights")
    return label, load_model(lm.path, device=lm.device, dtype=lm.dtype, progress=False, weights=weights)


def throughput(lm, hf, eos, alt=None) -> dict:
    tok = lm.tokenizer
    text = " ".join(f"{user_message(i)} {SYSTEM}" for i in range(20))
    prompt = tok.encode(text)[:PREFILL_TOKENS]
    # decode from a chat turn, where replies rarely repeat the context (prompt-lookup drafts
    # seldom hit; on repetitive text they multiply the rate, which would flatter us)
    short = tok.apply_chat_template([{"role": "system", "content": SYSTEM},
                                     {"role": "user", "content": "Tell me a short story about a lighthouse keeper."}])
    out: dict = {"prefill_prompt_tokens": len(prompt), "decode_tokens": DECODE_TOKENS}
    eng = Engine(lm)
    la = alt[1] if alt else None
    qeng = Engine(la) if la is not None else None  # the other weight mode, same engine settings
    ceng = compiled_engine(lm)  # the serving default on CPU: decode steps compiled
    if alt:
        out["alt_label"] = alt[0]
    ours_stream_times(eng, short, 4, eos=eos)  # warm-up
    if ceng is not None:
        ours_stream_times(ceng, short, 4, eos=eos)
    if qeng is not None:
        ours_stream_times(qeng, short, 4, eos=eos)
    if hf is not None:
        hf_generate(hf, short, 4, eos)
    # interleaved rounds, so that both sides see the same machine load; medians at the end
    runs: dict[str, list[float]] = {}
    for _ in range(REPEATS):
        for key, fn in timed_runs(lm, hf, eng, prompt, short, eos, qeng, ceng).items():
            runs.setdefault(key, []).append(fn())
    for key, values in runs.items():
        out[key] = statistics.median(values)
    if hf is not None:
        out["prefill_ratio"] = out["ours_prefill_tok_s"] / out["hf_prefill_tok_s"]
        out["decode_ratio"] = out["ours_decode_tok_s"] / out["hf_decode_tok_s"]
        # same weights, same greedy decoding: the tokens must agree too
        ours_ids = Engine(lm).complete(short, SamplingParams(temperature=0, max_tokens=16),
                                       logits_processors=[ban(eos)]).token_ids
        hf_ids = hf_generate(hf, short, 16, eos)
        out["same_greedy_tokens"] = ours_ids == hf_ids
        if ceng is not None:
            out["compiled_decode_ratio"] = out["ours_compiled_decode_tok_s"] / out["hf_decode_tok_s"]
            c_ids = ceng.complete(short, SamplingParams(temperature=0, max_tokens=16),
                                  logits_processors=[ban(eos)]).token_ids
            out["compiled_same_greedy_tokens"] = c_ids == hf_ids
        if qeng is not None:
            out["alt_decode_ratio"] = out["ours_alt_decode_tok_s"] / out["hf_decode_tok_s"]
            q_ids = Engine(la).complete(short, SamplingParams(temperature=0, max_tokens=16),
                                        logits_processors=[ban(eos)]).token_ids
            out["alt_same_greedy_tokens"] = q_ids == hf_ids
    return out


def compiled_engine(lm) -> Engine | None:
    """An engine whose decode steps run compiled (model/decode_step.py), as `memento serve` has on
    the CPU for models the C decode layer does not cover; artefacts in $MEMENTO_DATA_DIR/compile
    like the server's. None off the CPU."""
    if lm.device.type != "cpu":
        return None
    data_dir = os.environ.get("MEMENTO_DATA_DIR", "./data")
    return Engine(lm, compile=True, compile_dir=os.path.join(data_dir, "compile"), progress=True, fused_decode=False)


def timed_runs(lm, hf, eng, prompt, short, eos, qeng=None, ceng=None) -> dict[str, Callable[[], float]]:
    """One measurement each: name -> function returning tokens/s."""
    n = DECODE_TOKENS
    runs = {
        "ours_prefill_tok_s": lambda: len(prompt) / ours_stream_times(Engine(lm), prompt, 1)[0],
        "ours_decode_tok_s": lambda: ours_stream_times(eng, short, n, eos=eos)[1],
    }
    if ceng is not None:
        runs["ours_compiled_decode_tok_s"] = lambda: ours_stream_times(ceng, short, n, eos=eos)[1]
    if qeng is not None:
        runs["ours_alt_decode_tok_s"] = lambda: ours_stream_times(qeng, short, n, eos=eos)[1]
    if hf is not None:
        runs["hf_prefill_tok_s"] = lambda: len(prompt) / median_time(lambda: hf_generate(hf, prompt, 1, eos), 1)
        runs["hf_decode_tok_s"] = lambda: (n - 1) / (
            median_time(lambda: hf_generate(hf, short, n, eos), 1) - median_time(lambda: hf_generate(hf, short, 1, eos), 1)
        )
    return runs


def probe_reuse_ttft(eng: Engine, session_id: str, prompt: list[int], n: int) -> list[float]:
    """TTFT of `prompt` n times against the session's cached blocks (they are immutable, so a
    probe leaves the state before the turn as it was), for a median instead of one noisy sample."""
    return [ours_stream_times(eng, prompt, 1, session_id=session_id)[0] for _ in range(n)]


def conversation_ttft(lm, hf, turns: Sequence[int]) -> dict:
    """Play a scripted chat for max(turns) turns with session reuse; measure TTFT at `turns`."""
    tok = lm.tokenizer
    eng = Engine(lm)
    messages = [{"role": "system", "content": SYSTEM}]
    rows = []
    for turn in range(1, max(turns) + 1):
        messages.append({"role": "user", "content": user_message(turn)})
        prompt = tok.apply_chat_template(messages)
        probes = probe_reuse_ttft(eng, "bench", prompt, REPEATS - 1) if turn in turns else []
        t0 = time.perf_counter()
        first = None
        parts = []
        for ev in eng.generate(prompt, SamplingParams(temperature=0, max_tokens=REPLY_TOKENS), session_id="bench"):
            if first is None:
                first = time.perf_counter() - t0
            parts.append(ev.text)
            if ev.finished:
                cached = ev.usage.cached_tokens
        messages.append({"role": "assistant", "content": "".join(parts).strip()})
        if turn in turns:
            reuse = statistics.median([first] + probes)
            row = {"turn": turn, "prompt_tokens": len(prompt), "cached_tokens": cached, "ours_reuse_s": reuse}
            row["ours_no_reuse_s"] = median_time(lambda p=prompt: ours_stream_times(Engine(lm), p, 1), 1)
            if hf is not None:
                row["hf_s"] = median_time(lambda p=prompt: hf_generate(hf, p, 1), 1)
            rows.append(row)
    first_row, last_row = rows[0], rows[-1]
    return {
        "rows": rows,
        "reuse_growth": last_row["ours_reuse_s"] / first_row["ours_reuse_s"],
        "no_reuse_growth": last_row["ours_no_reuse_s"] / first_row["ours_no_reuse_s"],
        "hf_growth": (last_row["hf_s"] / first_row["hf_s"]) if hf is not None else None,
    }


def gpu_bandwidth_gbps(name: str) -> float | None:
    for key, bw in GPU_BANDWIDTH_GBPS.items():
        if key in name:
            return bw
    return None


def gpu_section(tokenizer, bandwidth_gbps: float | None = None, n_tokens: int = 128, device: str = "cuda",
                dtype: torch.dtype = torch.bfloat16, shape: dict | None = None,
                modes: Sequence[str] = ("eager",)) -> dict:
    """Random-weight ~1B Llama (Llama-3.2-1B shape) in bfloat16: decode tok/s vs the bandwidth bound.
    `device`, `dtype`, `shape` exist so the section can be smoke-tested small on CPU."""
    from model.config import ModelArgs
    from model.llama import Transformer
    from model.registry import LoadedModel

    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
    bw = bandwidth_gbps or gpu_bandwidth_gbps(name)
    dims = dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, hidden_dim=8192)
    dims.update(shape or {})
    args = ModelArgs(family="llama", vocab_size=tokenizer.vocab_size, tie_embeddings=True, rope_theta=500000.0,
                     context_length=4096, max_seq_len=4096, **dims)
    torch.manual_seed(0)
    with torch.device(dev):
        model = Transformer(args).to(dtype).eval().requires_grad_(False)
    for p in model.parameters():
        p.data.normal_(0.0, 0.02)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    lm = LoadedModel("random-llama-1b", args, model, tokenizer, args.max_seq_len, dev, dtype, None)
    prompt = list(range(100, 164))
    out = {"device_name": name, "params": sum(p.numel() for p in model.parameters()),
           "weight_bytes": weight_bytes, "bandwidth_gbps": bw}
    bound = bw * 1e9 / weight_bytes if bw else None
    out["bound_tok_s"] = bound
    for label in modes:
        eng = Engine(lm)
        for _ in range(2):  # warm-up (compilation, CUDA graph capture)
            ours_stream_times(eng, prompt, 16, session_id="g", eos=tokenizer.eos_ids)
            eng.drop_session("g")
        rate = statistics.median(
            ours_stream_times(eng, prompt, n_tokens, eos=tokenizer.eos_ids)[1] for _ in range(REPEATS)
        )
        out[f"{label}_decode_tok_s"] = rate
        out[f"{label}_fraction_of_bound"] = rate / bound if bound else None
    return out


# ---- entry points -----------------------------------------------------------------------------------


def run_bench(
    model_spec: str = "smollm2-135m-instruct",
    device: str = "auto",
    dtype: str = "auto",
    turns: Sequence[int] = (1, 10, 20, 30),
    json_out: bool = False,
    compare_hf: bool = True,
    gpu: bool = True,
    alternate: bool = True,
) -> dict:
    """Run every section and return the numbers; with json_out, also print them as JSON on stdout.
    Progress goes to stderr."""
    from model.registry import load_model

    turns = sorted(set(turns))
    lm = load_model(model_spec, device=device, dtype=dtype)
    say = lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    result: dict = {
        "model": lm.name, "device": str(lm.device), "dtype": str(lm.dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine(),
    }
    hf = None
    if compare_hf and lm.dtype == torch.float32:
        say("loading transformers' model from the same file")
        hf = load_hf(lm)
    result["transformers"] = "compared" if hf is not None else "skipped (not importable, or dtype is not float32)"
    eos = set(lm.tokenizer.eos_ids)
    say("prefill / decode throughput")
    alt = load_alternate(lm) if alternate else None
    if alt is not None:
        say(f"also loaded with {alt[0]}")
    result["throughput"] = throughput(lm, hf, eos, alt)
    say(f"scripted conversation, TTFT at turns {turns}")
    result["ttft"] = conversation_ttft(lm, hf, turns)
    t, c = result["throughput"], result["ttft"]
    result["targets"] = {
        "decode_ratio>=2.0": (t["decode_ratio"] >= 2.0) if "decode_ratio" in t else None,
        "ttft_growth_with_reuse<=1.3": c["reuse_growth"] <= 1.3,
    }
    if gpu and torch.cuda.is_available():
        say("gpu: random 1B Llama, bfloat16")
        result["gpu"] = gpu_section(lm.tokenizer)
    if json_out:
        print(json.dumps(result, indent=2))
    return result


def _fmt(x, spec=".1f") -> str:
    return "-" if x is None else format(x, spec)


def print_table(result: dict, file=None) -> None:
    """Human-readable summary of run_bench()'s result."""
    file = file or sys.stdout
    p = lambda *a: print(*a, file=file)  # noqa: E731
    t = result["throughput"]
    p(f"model {result['model']}  device {result['device']}  dtype {result['dtype']}  threads {result['threads']}")
    p(f"{'':40}{'ours':>10}{'transformers':>14}{'ratio':>8}")
    p(f"{'prefill tok/s':40}{_fmt(t['ours_prefill_tok_s']):>10}{_fmt(t.get('hf_prefill_tok_s')):>14}"
      f"{_fmt(t.get('prefill_ratio'), '.2f'):>8}")
    p(f"{'decode tok/s':40}{_fmt(t['ours_decode_tok_s']):>10}{_fmt(t.get('hf_decode_tok_s')):>14}"
      f"{_fmt(t.get('decode_ratio'), '.2f'):>8}")
    if "ours_compiled_decode_tok_s" in t:
        p(f"{'ours (compiled decode step)':40}{_fmt(t['ours_compiled_decode_tok_s']):>10}{'':>14}"
          f"{_fmt(t.get('compiled_decode_ratio'), '.2f'):>8}")
    if "ours_alt_decode_tok_s" in t:
        p(f"{'ours (' + t['alt_label'] + ')':40}{_fmt(t['ours_alt_decode_tok_s']):>10}{'':>14}"
          f"{_fmt(t.get('alt_decode_ratio'), '.2f'):>8}")
    if "same_greedy_tokens" in t:
        p(f"same greedy tokens as transformers: {t['same_greedy_tokens']}"
          + (f"  (compiled: {t['compiled_same_greedy_tokens']})" if "compiled_same_greedy_tokens" in t else "")
          + (f"  ({t['alt_label']}: {t['alt_same_greedy_tokens']})"
             if "alt_same_greedy_tokens" in t else ""))
    c = result["ttft"]
    p("")
    p(f"{'TTFT (ms)':10}{'prompt':>8}{'cached':>8}{'ours reuse':>12}{'ours fresh':>12}{'transformers':>14}")
    for r in c["rows"]:
        hf_ms = r["hf_s"] * 1000 if "hf_s" in r else None
        p(f"{'turn ' + str(r['turn']):10}{r['prompt_tokens']:>8}{r['cached_tokens']:>8}"
          f"{r['ours_reuse_s'] * 1000:>12.1f}{r['ours_no_reuse_s'] * 1000:>12.1f}{_fmt(hf_ms):>14}")
    p(f"TTFT last/first turn: reuse {c['reuse_growth']:.2f}  fresh {c['no_reuse_growth']:.2f}  "
      f"transformers {_fmt(c['hf_growth'], '.2f')}")
    p(f"targets: {result['targets']}")
    if "gpu" in result:
        g = result["gpu"]
        p("")
        p(f"gpu {g['device_name']}: {g['params'] / 1e9:.2f}B params bf16, bound {_fmt(g['bound_tok_s'])} tok/s "
          f"({_fmt(g['bandwidth_gbps'], '.0f')} GB/s)")
        for label in ("eager",):
            if f"{label}_decode_tok_s" not in g:
                continue
            frac = g.get(f"{label}_fraction_of_bound")
            p(f"  {label:9} {_fmt(g[f'{label}_decode_tok_s'])} tok/s = {_fmt(frac and frac * 100)}% of bound")
