"""`memento bench --concurrency 1,4,8,16`: many streaming sessions against a real server, with peers.

    result = run_serving_bench([1, 4, 8, 16], model="smollm2-135m-instruct", llama_server="/path/llama-server")
    print_serving_table(result)

One run, one client, the same GGUF: Memento (`memento serve` in a subprocess on loopback) and,
when given, llama.cpp's `llama-server -np <max level> -t <threads>` get the same requests: at
each level c, c concurrent streamed `/v1/chat/completions` calls with distinct prompts, greedy,
`max_tokens` each. Per level: aggregate decode tok/s (completion tokens after the first, over the
span from the first first-token to the last token), per-session decode tok/s (median of each
stream's own rate), TTFT p50/p95, and KV bytes per token. When `llama_cpp` is importable (here, or in
the interpreter `.ci/run` builds for the remote-engine tests, or $MEMENTO_LLAMA_SERVER_PYTHON), its
single-stream decode (same GGUF, same threads) is measured too. Ratios are ours / theirs.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from service.loadgen import percentiles
from service.loopback import free_port

TOPICS = ["a lighthouse keeper", "a lost cat", "the first snow", "a night train", "an old violin", "a tiny robot",
          "a forest fire", "a letter from home", "a broken clock", "a summer storm", "a mountain village",
          "a chess match", "a quiet library", "a ship in a bottle", "a garden at dawn", "a paper kite"]


def _wait_ready(url: str, proc: subprocess.Popen, path: str, timeout: float = 600.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before it was ready")
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} was not ready within {timeout:.0f}s")


async def _stream_one(client, url: str, i: int, max_tokens: int, model: str) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": f"Tell me a long story about {TOPICS[i % 16]}."}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    times: list[float] = []
    usage = None
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for ch in chunk.get("choices") or []:
                if (ch.get("delta") or {}).get("content"):
                    times.append(time.perf_counter())
    n = usage["completion_tokens"] if usage else len(times)
    return {"start": t0, "first": times[0] if times else None, "last": times[-1] if times else None, "tokens": n}


async def _level(url: str, c: int, max_tokens: int, model: str) -> dict[str, Any]:
    import httpx

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=c + 4)) as client:
        await _stream_one(client, url, 99, 4, model)  # warm-up (first-call costs stay out of the figures)
        runs = await asyncio.gather(*(_stream_one(client, url, i, max_tokens, model) for i in range(c)))
    runs = [r for r in runs if r["first"] is not None]
    first, last = min(r["first"] for r in runs), max(r["last"] for r in runs)
    decoded = sum(r["tokens"] - 1 for r in runs)
    per = [(r["tokens"] - 1) / (r["last"] - r["first"]) for r in runs if r["last"] > r["first"]]
    ttft = percentiles([r["first"] - r["start"] for r in runs])
    return {"concurrency": c, "aggregate_tok_s": decoded / (last - first) if last > first else None,
            "per_session_tok_s": statistics.median(per) if per else None, "ttft_p50_s": ttft["p50"],
            "ttft_p95_s": ttft["p95"], "completion_tokens": sum(r["tokens"] for r in runs)}


def _measure(url: str, levels: list[int], max_tokens: int, model: str) -> list[dict[str, Any]]:
    return [asyncio.run(_level(url, c, max_tokens, model)) for c in levels]


def _start_memento(model: str, max_running: int, max_tokens: int, data_dir: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, MEMENTO_MODEL=model, MEMENTO_DATA_DIR=data_dir, MEMENTO_MAX_RUNNING=str(max_running),
               MEMENTO_QUEUE_SIZE=str(4 * max_running), MEMENTO_MAX_TOKENS=str(max_tokens),
               MEMENTO_OWNER_RUNNING=str(max_running), MEMENTO_OWNER_WAITING=str(4 * max_running))
    cli = Path(sys.executable).with_name("memento")
    proc = subprocess.Popen([str(cli), "serve", "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                            stderr=sys.stderr)
    url = f"http://127.0.0.1:{port}"
    _wait_ready(url, proc, "/readyz")
    return proc, url


def _start_llama_server(binary: str, gguf: str, slots: int, threads: int) -> tuple[subprocess.Popen, str, str]:
    """(process, url, its log's path) of a ready llama-server; the log stays when it fails."""
    port = free_port()
    args = [binary, "-m", gguf, "-np", str(slots), "-t", str(threads), "-c", str(2048 * slots),
            "--host", "127.0.0.1", "--port", str(port)]
    # its output goes to a log file, not /dev/null: with both streams on /dev/null this llama-server
    # build (0.3.36's vendor tree) dropped the bench's first streamed request without an answer
    log = tempfile.NamedTemporaryFile(prefix="llama-server-", suffix=".log", delete=False)  # noqa: SIM115
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc, "/health")
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}; its log: {log.name}") from exc
    return proc, url, log.name


def _kv_bytes_per_token(url: str) -> float | None:
    import httpx

    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("memento:kv_bytes_per_token "):
            return float(line.split()[1])
    return None


_SINGLE_STREAM = """
import sys, time, llama_cpp
gguf, threads, max_tokens, topic = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
llm = llama_cpp.Llama(model_path=gguf, n_threads=threads, n_ctx=2048, verbose=False)
msgs = [{"role": "user", "content": f"Tell me a long story about {topic}."}]
llm.create_chat_completion(msgs, max_tokens=4, temperature=0)
times = [time.perf_counter() for _ in llm.create_chat_completion(msgs, max_tokens=max_tokens, temperature=0,
                                                                   stream=True)]
print((len(times) - 2) / (times[-1] - times[1]) if len(times) > 3 else "none")
"""


def _llama_cpp_python() -> str | None:
    """An interpreter with llama_cpp: ours, $MEMENTO_LLAMA_SERVER_PYTHON, or the venv .ci/run builds."""
    if importlib.util.find_spec("llama_cpp") is not None:
        return sys.executable
    default = Path.home() / ".cache" / "memento" / "llama-server-venv" / "bin" / "python"
    candidate = os.environ.get("MEMENTO_LLAMA_SERVER_PYTHON") or str(default)
    return candidate if Path(candidate).is_file() else None


def llama_cpp_single_stream(gguf: str, threads: int, max_tokens: int) -> float | None:
    """llama-cpp-python's own decode rate on the same GGUF, in its own process (None when no
    interpreter has it, or it fails)."""
    python = _llama_cpp_python()
    if python is None:
        return None
    print(f"bench: llama-cpp-python single stream ({python})", file=sys.stderr)
    run = subprocess.run([python, "-c", _SINGLE_STREAM, gguf, str(threads), str(max_tokens), TOPICS[0]],
                         capture_output=True, text=True, timeout=600)
    out = run.stdout.strip().splitlines()
    try:
        return float(out[-1]) if run.returncode == 0 and out else None
    except ValueError:
        return None


def run_serving_bench(levels: list[int], model: str = "smollm2-135m-instruct", llama_server: str | None = None,
                      max_tokens: int = 64, threads: int | None = None) -> dict[str, Any]:
    from model.registry import resolve_spec

    threads = threads or os.cpu_count() or 1
    gguf = str(resolve_spec(model, os.environ.get("MEMENTO_DATA_DIR", "./data"), progress=True)[1])
    out: dict[str, Any] = {"model": model, "gguf": gguf, "levels": levels, "max_tokens": max_tokens,
                           "threads": threads}
    with tempfile.TemporaryDirectory(prefix="memento-bench-") as data_dir:
        print(f"bench: starting memento serve ({model})", file=sys.stderr)
        proc, url = _start_memento(model, max(levels), max_tokens, data_dir)
        try:
            out["ours"] = _measure(url, levels, max_tokens, model)
            out["ours_kv_bytes_per_token"] = _kv_bytes_per_token(url)
        finally:
            proc.terminate()
            proc.wait(30)
    if llama_server:
        _peer(out, llama_server, gguf, levels, max_tokens, model, threads)
    rate = llama_cpp_single_stream(gguf, threads, max_tokens)
    if rate is not None:
        out["llama_cpp_single_stream_tok_s"] = rate
        out["single_stream_ratio"] = out["ours"][0]["per_session_tok_s"] / rate if levels[0] == 1 else None
    return out


def _peer(out: dict[str, Any], binary: str, gguf: str, levels: list[int], max_tokens: int, model: str,
          threads: int) -> None:
    """llama-server's figures and our ratios into `out`; a peer that fails is reported, not fatal."""
    print(f"bench: starting {binary} -np {max(levels)} -t {threads}", file=sys.stderr)
    try:
        proc, url, log = _start_llama_server(binary, gguf, max(levels), threads)
    except RuntimeError as exc:
        out["llama_server_error"] = str(exc)
        print(f"bench: {exc}", file=sys.stderr)
        return
    try:
        out["llama_server"] = _measure(url, levels, max_tokens, model)
    finally:
        proc.terminate()
        proc.wait(30)
    os.unlink(log)  # measured: nothing in it to read (a failure above leaves it, for the traceback)
    for ours, theirs in zip(out["ours"], out["llama_server"], strict=True):
            for key in ("aggregate_tok_s", "per_session_tok_s", "ttft_p95_s"):
                if ours[key] and theirs[key]:
                    ours[f"{key}_ratio"] = ours[key] / theirs[key]


def _f(v, spec=".1f") -> str:
    return "-" if v is None else format(v, spec)


def print_serving_table(r: dict[str, Any], file=None) -> None:
    p = lambda *a: print(*a, file=file or sys.stdout)  # noqa: E731
    p(f"model {r['model']}  max_tokens {r['max_tokens']}  threads {r['threads']}  "
      f"KV bytes/token (ours) {_f(r.get('ours_kv_bytes_per_token'), '.0f')}")
    theirs = r.get("llama_server") or [{} for _ in r["ours"]]
    p(f"{'conc':>5} {'agg tok/s':>10} {'llama-srv':>10} {'ratio':>6} {'per-sess':>9} {'llama-srv':>10} "
      f"{'TTFT p50':>9} {'p95':>7} {'llama p95':>10} {'ratio':>6}")
    for o, t in zip(r["ours"], theirs, strict=True):
        p(f"{o['concurrency']:>5} {_f(o['aggregate_tok_s']):>10} {_f(t.get('aggregate_tok_s')):>10} "
          f"{_f(o.get('aggregate_tok_s_ratio'), '.2f'):>6} {_f(o['per_session_tok_s']):>9} "
          f"{_f(t.get('per_session_tok_s')):>10} {_f(o['ttft_p50_s'], '.2f'):>9} {_f(o['ttft_p95_s'], '.2f'):>7} "
          f"{_f(t.get('ttft_p95_s'), '.2f'):>10} {_f(o.get('ttft_p95_s_ratio'), '.2f'):>6}")
    if "llama_server_error" in r:
        p(f"llama-server: {r['llama_server_error']}")
    if "llama_cpp_single_stream_tok_s" in r:
        p(f"llama-cpp-python single stream {_f(r['llama_cpp_single_stream_tok_s'])} tok/s; "
          f"ours/llama.cpp {_f(r.get('single_stream_ratio'), '.2f')}")
