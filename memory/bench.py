"""Memory benchmark: recall@context per strategy and per-turn overhead on SQLite and Redis.

    results = run_memory_bench(["sqlite:///tmp/b.db", "redis://127.0.0.1:6379/15"], turns=(10, 50, 200))
    print_table(results)          # or: python -m memory.bench

recall@context: facts are planted in user turns spread over the conversation (the last one at
least 5 turns before the probe); at turn N each fact is probed with a question sharing words
with it, and it counts as recalled when its key word is in the assembled context
(`build_context`, SmolLM2 tokenizer, 2048-token window, 256 reserved for the reply).
Overhead: wall time per turn of everything but generation (append user message, read transcript,
`view`, `build_context`, append reply, `after_turn`), p50/p95 over all turns of all runs; the
critical path (`view` + `build_context`, before the first token) is reported too. Summary
strategies use the cheap `ExtractiveSummarizer` here, not the model (the table says so).
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from memory.context import build_context
from memory.store import open_store
from memory.strategies import StrategyDeps, build_strategy
from memory.summarizer import ExtractiveSummarizer

STRATEGY_CONFIGS: list[dict[str, Any]] = [
    {"strategy": "buffer"},
    {"strategy": "window", "turns": 8},
    {"strategy": "token_buffer", "max_tokens": 1024},
    {"strategy": "summary"},
    {"strategy": "summary_buffer", "max_tokens": 512},
    {"strategy": "vector", "k": 4, "turns": 4, "scope": "session"},
    {"strategy": "long_term", "k": 4, "turns": 4, "scope": "session"},
]
FACTS = [  # (planted user message, probe question sharing words with it, key word)
    ("My sister Alice lives in Lisbon now.", "Where does my sister Alice live?", "Lisbon"),
    ("My dog is called Biscuit.", "What is my dog called?", "Biscuit"),
    ("My favourite colour is turquoise.", "What is my favourite colour?", "turquoise"),
    ("I was born in the city of Tampere.", "Which city was I born in?", "Tampere"),
    ("My car is a green Skoda.", "What car do I have?", "Skoda"),
]
FILLER = [
    "I went for a run this morning around the park.",
    "Can you recommend a good book about history?",
    "The weather has been rainy all week.",
    "I need to fix the rear brake on my bike.",
    "What is a quick recipe for dinner tonight?",
    "Work was busy; we shipped a new release.",
    "I'm thinking about learning to play the piano.",
    "The train was late again today.",
    "Explain how compound interest works.",
    "I watched a documentary about the ocean.",
    "Should I repaint the kitchen or the hallway first?",
    "My neighbour is renovating and it's noisy.",
]
PERSONA = [{"role": "system", "content": "You are Memo, a friendly assistant who remembers what the user says."}]
CONTEXT_WINDOW, RESERVED = 2048, 256
TARGETS = {"vector_recall_200": 0.9, "p95_ms": {"window": 20, "token_buffer": 20, "vector": 60, "long_term": 60}}


def _percentile(values: list[float], q: float) -> float:
    if len(values) < 2:
        return values[0] if values else 0.0
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def _fact_turns(n: int) -> list[int]:
    """Distinct turns for the facts, spread over all but the last 5 turns when there is room."""
    if n < len(FACTS):
        raise ValueError(f"turns={n}: the memory bench needs at least {len(FACTS)} turns (one per fact)")
    span = max(len(FACTS), n - 5)
    return [i * span // len(FACTS) for i in range(len(FACTS))]


def _run_one(store, deps: StrategyDeps, config: dict[str, Any], n: int) -> tuple[float, dict[str, list[float]]]:
    """One conversation of n turns; returns (recall, per-turn ms lists: total, critical, critical CPU)."""
    session = store.create_session(f"bench-{uuid.uuid4().hex[:8]}", "assistant", config)
    strategy = build_strategy(config, deps)
    planted = dict(zip(_fact_turns(n), FACTS, strict=True))
    times: dict[str, list[float]] = {"total": [], "critical": [], "critical_cpu": []}
    for t in range(n):
        text = planted[t][0] if t in planted else f"{FILLER[t % len(FILLER)]} (turn {t})"
        t0 = time.perf_counter()
        store.append_message(session.id, "user", text)
        messages = store.list_messages(session.id)
        t1, cpu1 = time.perf_counter(), time.thread_time()
        view = strategy.view(session, messages, text)
        build_context(PERSONA, None, view, text, deps.counter, CONTEXT_WINDOW, RESERVED, config["strategy"])
        t2, cpu2 = time.perf_counter(), time.thread_time()
        store.append_message(session.id, "assistant", f"Okay, noted. (turn {t})")  # generation excluded
        strategy.after_turn(session, store.list_messages(session.id))
        t3 = time.perf_counter()
        times["total"].append((t3 - t0) * 1000)
        times["critical"].append((t2 - t1) * 1000)
        times["critical_cpu"].append((cpu2 - cpu1) * 1000)
    messages = store.list_messages(session.id)
    hits = 0
    for _, probe, key in FACTS:
        view = strategy.view(session, messages, probe)
        ctx = build_context(PERSONA, None, view, probe, deps.counter, CONTEXT_WINDOW, RESERVED, config["strategy"])
        hits += any(key in m["content"] for m in ctx.messages)
    store.delete_session(session.id)
    return hits / len(FACTS), times


def _counter():
    from model.registry import smollm2_path
    from model.tokenizer import Tokenizer

    return Tokenizer.from_gguf(smollm2_path())


def run_memory_bench(
    store_urls: list[str] | None = None,
    turns: tuple[int, ...] = (10, 50, 200),
    embeddings: str = "use-multilingual-v3",
    strategies: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    from memory.vector_store import open_vector_memory

    tmp = Path(tempfile.mkdtemp(prefix="memento-bench-"))
    store_urls = store_urls or [f"sqlite:///{tmp / 'bench.db'}", "redis://127.0.0.1:6379/15"]
    counter = _counter()
    vector = open_vector_memory(tmp, None, embeddings)
    try:
        rows = _run_all(store_urls, turns, strategies or STRATEGY_CONFIGS, counter, vector)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "turns": list(turns),
        "embeddings": embeddings,
        "context_window": CONTEXT_WINDOW,
        "reserved_for_reply": RESERVED,
        "summarizer": "extractive (ExtractiveSummarizer, no model) for summary / summary_buffer",
        "targets": TARGETS,
        "rows": rows,
    }


def _run_all(store_urls, turns, strategies, counter, vector) -> list[dict[str, Any]]:
    rows = []
    for url in store_urls:
        prefix = f"memento-bench-{uuid.uuid4().hex[:8]}"
        store = open_store(url, prefix=prefix)
        deps = StrategyDeps(store, counter, ExtractiveSummarizer(), vector)
        try:
            for config in strategies:
                recall: dict[int, float] = {}
                times: dict[str, list[float]] = {"total": [], "critical": [], "critical_cpu": []}
                for n in turns:
                    recall[n], run_times = _run_one(store, deps, config, n)
                    for key, values in run_times.items():
                        times[key] += values
                rows.append({
                    "store": url.split(":", 1)[0],
                    "strategy": config["strategy"],
                    "config": config,
                    "recall": recall,
                    **{
                        f"{key}_ms": {"p50": _percentile(values, 50), "p95": _percentile(values, 95)}
                        for key, values in times.items()
                    },
                })
        finally:
            store.close()
    return rows


def print_table(results: dict[str, Any]) -> None:
    turns = results["turns"]
    head = ["store", "strategy"] + [f"recall@{n}" for n in turns] + ["turn p50 ms", "turn p95 ms", "crit p50 ms", "crit p95 ms", "crit CPU p95 ms"]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in results["rows"]:
        name = r["strategy"] + (" (extractive)" if r["strategy"].startswith("summary") else "")
        cells = [r["store"], name] + [f"{r['recall'][n]:.2f}" for n in turns]
        cells += [f"{r[key][q]:.1f}" for key, q in (("total_ms", "p50"), ("total_ms", "p95"), ("critical_ms", "p50"),
                                                    ("critical_ms", "p95"), ("critical_cpu_ms", "p95"))]
        lines.append(" | ".join(cells))
    print("\n".join(lines))
    print(
        f"\ncontext {results['context_window']} tokens (SmolLM2 tokenizer), {results['reserved_for_reply']} reserved; "
        f"embeddings {results['embeddings']}; summaries: {results['summarizer']}.\n"
        "turn = all per-turn work except generation (store + view + build_context + after_turn); "
        "crit = view + build_context only (before the first token); crit CPU = its thread CPU time, "
        "which a busy shared machine inflates less than wall time.\n"
        f"targets: vector recall@200 >= {TARGETS['vector_recall_200']}; turn p95 < 20 ms window/token_buffer, "
        "< 60 ms vector and long_term"
    )


def run_tracks(tracks: set[str], store_url: str | None = None, embeddings: str = "use-multilingual-v3",
               summary_styles: tuple[str, ...] = ("facts",)) -> None:
    """The long-term memory tracks (memory/bench_tracks.py) on one store."""
    from memory import bench_tracks
    from memory.vector_store import open_vector_memory

    tmp = Path(tempfile.mkdtemp(prefix="memento-tracks-"))
    store = open_store(store_url or f"sqlite:///{tmp / 'tracks.db'}", prefix=f"memento-bench-{uuid.uuid4().hex[:8]}")
    deps = StrategyDeps(store, _counter(), ExtractiveSummarizer(), open_vector_memory(tmp, None, embeddings))
    try:
        rows = []
        if "current" in tracks:
            rows += bench_tracks.current_fact_track(store, deps)
        if "paraphrase" in tracks:
            rows += bench_tracks.paraphrase_track(store, deps)
        blocks = bench_tracks.core_blocks_track(store, deps) if "blocks" in tracks else None
        if rows or blocks:
            bench_tracks.print_tracks(rows, blocks)
        if "model-blocks" in tracks:  # the core-blocks track with the model's editor: ~1 s a turn on a CPU
            for row in bench_tracks.model_blocks_runs(store, deps):
                bench_tracks.print_blocks(row)
        if "summaries" in tracks:  # real model summaries: minutes on a CPU, so not in the default set
            print()
            bench_tracks.print_summaries(bench_tracks.summary_track(store, deps.counter, styles=summary_styles))
    finally:
        store.close()
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    import argparse
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(prog="python -m memory.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--tracks", default="table,current,paraphrase,blocks",
                        help="comma-separated: table (strategies x stores), current, paraphrase, blocks, "
                        "summaries (summary_buffer with real model-written summaries; minutes on a CPU), "
                        "model-blocks (the core-blocks track with the model's grammar-constrained block editor, with and "
                        "without the facts proposer)")
    parser.add_argument("--strategies", default="", help="table only: comma-separated strategy names")
    parser.add_argument("--summary-styles", default="facts",
                        help="summaries only: comma-separated ModelSummarizer styles (facts, prose)")
    args = parser.parse_args(argv)
    tracks = {t.strip() for t in args.tracks.split(",") if t.strip()}
    if "table" in tracks:
        names = {n.strip() for n in args.strategies.split(",") if n.strip()}
        configs = [c for c in STRATEGY_CONFIGS if not names or c["strategy"] in names]
        print_table(run_memory_bench(strategies=configs))
        print()
    if tracks - {"table"}:
        run_tracks(tracks, summary_styles=tuple(x.strip() for x in args.summary_styles.split(",") if x.strip()))


if __name__ == "__main__":
    main()
