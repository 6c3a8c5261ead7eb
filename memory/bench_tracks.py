"""The long-term memory tracks of `python -m memory.bench`: current facts, paraphrases, core blocks.

- current-fact: a 320-turn transcript (English, and Korean) with 9 facts planted in the first half and
  3 of them (a third) changed in the second half. For each question: does the assembled context hold
  the current answer, and is the stale one shown without the current one ("stale only")?
  Target: current-answer recall >= 0.9 with `long_term`, 0 stale-only.
- paraphrase: 10 lines per language asked about with questions that share no content term with them
  (`memory.hybrid.terms`: Kiwi morphemes / stemmed words; a test checks it);
  recall@context (target >= 0.9), with each retrieval part switched off in turn (dense, BM25,
  recency) and facts off, so the table shows what each part contributes.
- core blocks: a 100-turn scripted chat (name, family and a city that changes); the `user` block must
  stay within its limit, every applied edit must have validated, and name, family and the current
  city must be in it at the end.
Context: 2048 tokens counted by the SmolLM2 tokenizer, 256 reserved, as in the main table.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from memory.blocks import CoreMemory
from memory.context import build_context
from memory.strategies import StrategyDeps, build_strategy

CONTEXT_WINDOW, RESERVED = 2048, 256
PERSONA = [{"role": "system", "content": "You are Memo, a friendly assistant who remembers what the user says."}]
TURNS = 320
TARGETS = {"current_recall": 0.9, "stale_only": 0, "paraphrase_recall": 0.9}

# (first statement, changed statement or None, question, current key, stale key or None)
CURRENT_EN = [
    ("I live in Busan.", "We moved to Daejeon last month.", "Where do I live now?", "Daejeon", "Busan"),
    ("My dog is called Biscuit.", None, "What is my dog called?", "Biscuit", None),
    ("I work at a bakery called Crumbs.", "I work at the city library now.", "Where do I work?", "library", "Crumbs"),
    ("My favourite colour is turquoise.", None, "What is my favourite colour?", "turquoise", None),
    ("My car is a green Skoda.", "My car is a red Volvo now.", "What car do I drive?", "Volvo", "Skoda"),
    ("My sister Alice lives in Lisbon.", None, "Where does my sister Alice live?", "Lisbon", None),
    ("My wife is called Sora.", None, "What is my wife's name?", "Sora", None),
    ("My phone is an old Nokia.", None, "What phone do I have?", "Nokia", None),
    ("I was born in Tampere.", None, "Where was I born?", "Tampere", None),
]
CURRENT_KO = [
    ("나는 부산에 살아.", "우리 가족은 지난달에 대전으로 이사했어.", "나 요즘 어디 살지?", "대전", "부산"),
    ("우리 강아지 이름은 콩이야.", None, "우리 강아지 이름이 뭐였지?", "콩이", None),
    ("나는 빵집에서 일해.", "요즘은 시립 도서관에서 일해.", "내가 어디서 일하지?", "도서관", "빵집"),
    ("내 최애 색은 청록색이야.", None, "내가 제일 좋아하는 색이 뭐지?", "청록색", None),
    ("내 차는 초록색 스코다야.", "내 차는 이제 빨간 볼보야.", "내 차가 뭐지?", "볼보", "스코다"),
    ("우리 언니는 리스본에 살아.", None, "우리 언니는 어디 살아?", "리스본", None),
    ("내 아내 이름은 소라야.", None, "내 아내 이름이 뭐지?", "소라", None),
    ("내 휴대폰은 옛날 노키아야.", None, "내 휴대폰이 뭐였지?", "노키아", None),
    ("나는 탐페레에서 태어났어.", None, "내가 어디서 태어났지?", "탐페레", None),
]
# (planted line, a question sharing no content word with it, key)
PARAPHRASE_EN = [
    ("The vet said Biscuit needs surgery on his paw.", "What did the animal doctor tell me about my pet's foot?",
     "surgery"),
    ("I'm allergic to peanuts.", "Which food makes me sick?", "peanut"),
    ("My grandmother taught me to bake sourdough.", "Who showed me how to make bread?", "sourdough"),
    ("We're flying to Reykjavik in March for our anniversary.", "Where is the trip for our wedding celebration?",
     "Reykjavik"),
    ("My brother just became a firefighter.", "What does my sibling do for a living now?", "firefighter"),
    ("My daughter Mina started violin lessons last week.", "What instrument is my child learning?", "violin"),
    ("I had my appendix removed when I was twelve.", "What operation did I have as a kid?", "appendix"),
    ("Our landlord is raising the rent by ten percent.", "Is the apartment going to cost more?", "landlord"),
    ("I can't stand horror movies, they give me nightmares.", "Which films should you never suggest to me?", "horror"),
    ("My husband snores so loudly that I sleep on the sofa.", "Why do I spend nights on the couch?", "snores"),
]
PARAPHRASE_KO = [
    ("수의사가 콩이 다리 수술해야 한대.", "동물병원 선생님이 우리 강아지 발에 대해 뭐라고 했지?", "수술"),
    ("나 땅콩 알레르기 있어.", "내가 못 먹는 음식이 뭐였지?", "땅콩"),
    ("할머니가 나한테 김치 담그는 법 가르쳐 주셨어.", "누가 나한테 반찬 만드는 걸 알려줬지?", "할머니"),
    ("삼월에 결혼기념일 여행으로 제주도 가.", "봄에 우리 부부가 떠나는 곳이 어디였지?", "제주"),
    ("형이 소방관이 됐어.", "우리 형제 직업이 뭐로 바뀌었지?", "소방관"),
    ("딸 미나가 지난주부터 바이올린을 배우기 시작했어.", "우리 아이가 요즘 무슨 악기 연습하지?", "바이올린"),
    ("열두 살 때 맹장 수술을 받았어.", "어릴 적에 병원에서 뭘 떼어냈지?", "맹장"),
    ("집주인이 월세를 십 퍼센트 올린대.", "내가 내는 방값이 비싸지는 거야?", "월세"),
    ("공포 영화는 악몽을 꾸게 해서 절대 못 봐.", "나한테 추천하면 안 되는 작품 장르가 뭐야?", "공포"),
    ("남편이 코를 너무 심하게 골아서 나는 소파에서 자.", "내가 밤마다 거실 의자에서 눕는 이유가 뭐지?", "소파"),
]
FILLER = {
    "en": [
        "I went for a run this morning around the park.", "Can you recommend a good book about history?",
        "The weather has been rainy all week.", "I need to fix the rear brake on my bike.",
        "What is a quick recipe for dinner tonight?", "Work was busy; we shipped a new release.",
        "I'm thinking about learning to play the piano.", "The train was late again today.",
        "Explain how compound interest works.", "I watched a documentary about the ocean.",
        "Should I repaint the kitchen or the hallway first?", "My neighbour is renovating and it's noisy.",
    ],
    "ko": [
        "오늘 아침에 공원에서 달리기를 했어.", "역사에 관한 좋은 책 추천해 줄래?", "이번 주 내내 비가 왔어.",
        "자전거 뒷브레이크를 고쳐야 해.", "오늘 저녁에 간단하게 뭐 해 먹지?", "회사가 바빴어, 새 버전을 출시했거든.",
        "피아노를 배워 볼까 생각 중이야.", "오늘도 기차가 늦게 왔어.", "복리가 어떻게 계산되는지 설명해 줘.",
        "바다에 관한 다큐멘터리를 봤어.", "부엌 벽을 먼저 칠할까 복도를 먼저 칠할까?", "옆집이 공사 중이라 시끄러워.",
    ],
}
REPLY = {"en": "Okay, noted.", "ko": "응, 알겠어."}
BLOCK_SCRIPT = {  # turn -> what the user says in the 100-turn core-blocks chat
    2: "My name is Ada.", 9: "My wife is called Sora.", 15: "I live in Busan.",
    31: "My son Jun is seven.", 55: "My daughter is called Mina.", 70: "We moved to Daejeon last month.",
}
BLOCK_KEYS = ("Ada", "Sora", "Jun", "Mina", "Daejeon")

LONG_TERM = {"strategy": "long_term", "k": 4, "turns": 4, "scope": "session"}  # the default config
FACTS_OFF = {**LONG_TERM, "max_facts": 0}
# (row name, config, fusion weights, other parts switched: near_duplicates, views, dense_depth)
VARIANTS: list[tuple[str, dict[str, Any], dict[str, float] | None, dict[str, Any]]] = [
    ("vector (dense only, baseline)", {"strategy": "vector", "k": 4, "turns": 4, "scope": "session"}, None, {}),
    ("long_term", LONG_TERM, None, {}),
    ("long_term, facts off", FACTS_OFF, None, {}),
    ("long_term, facts off, no dense", FACTS_OFF, {"dense": 0, "bm25": 1, "recency": 0.1}, {}),
    ("long_term, facts off, no BM25", FACTS_OFF, {"dense": 1, "bm25": 0, "recency": 0.1}, {}),
    ("long_term, facts off, no recency", FACTS_OFF, {"dense": 1, "bm25": 1, "recency": 0}, {}),
    ("long_term, facts off, no near-duplicate collapse", FACTS_OFF, None, {"near_duplicates": False}),
    ("long_term, facts off, no message/sentence views", FACTS_OFF, None, {"views": False}),
    ("long_term, facts off, dense depth 20 (32 now)", FACTS_OFF, None, {"dense_depth": 20}),
    ("long_term, k=6", {**LONG_TERM, "k": 6}, None, {}),
    ("long_term, k=8", {**LONG_TERM, "k": 8}, None, {}),
    ("long_term, k=16", {**LONG_TERM, "k": 16}, None, {}),
]


def _strategy(config: dict[str, Any], weights: dict[str, float] | None, deps: StrategyDeps,
              parts: dict[str, Any] | None = None) -> Any:
    """The strategy with the named parts switched (views: on the shared vector memory, so set every time)."""
    parts = parts or {}
    if deps.vector is not None:
        deps.vector.views = parts.get("views", True)
    strategy: Any = build_strategy(config, deps)
    if weights is not None:
        strategy.weights = dict(weights)
    if "near_duplicates" in parts:
        strategy.near_duplicates = parts["near_duplicates"]
    if "dense_depth" in parts:
        strategy.dense.k = parts["dense_depth"]
    return strategy


def _context(strategy: Any, store: Any, session: Any, question: str, counter: Any) -> tuple[str, int]:
    """(the context's text, its memory tokens) for `question` as the next user message."""
    view = strategy.view(session, store.list_messages(session.id), question)
    ctx = build_context(PERSONA, None, view, question, counter, CONTEXT_WINDOW, RESERVED, strategy.name)
    return "\n".join(m["content"] for m in ctx.messages), ctx.budget["parts"]["memory"]


def _play(store: Any, strategy: Any, config: dict[str, Any], script: dict[int, str], lang: str,
          turns: int) -> tuple[Any, list[float]]:
    """A conversation of `turns` exchanges with `script` planted; after_turn each turn (its ms returned)."""
    session = store.create_session(f"track-{uuid.uuid4().hex[:8]}", "assistant", config)
    filler, spent = FILLER[lang], []
    for t in range(turns):
        store.append_message(session.id, "user", script.get(t, f"{filler[t % len(filler)]} ({t})"))
        store.append_message(session.id, "assistant", f"{REPLY[lang]} ({t})")
        t0 = time.perf_counter()
        strategy.after_turn(session, store.list_messages(session.id))
        spent.append((time.perf_counter() - t0) * 1000)
    return session, spent


def current_script(facts: list[tuple[Any, ...]], turns: int) -> dict[int, str]:
    """First statements spread over the first half, changes over the second (>= 5 turns before the end)."""
    script = {1 + i * (turns // 2 - 2) // len(facts): f[0] for i, f in enumerate(facts)}
    changed = [f for f in facts if f[1]]
    for i, f in enumerate(changed):
        script[turns // 2 + 3 + i * (turns // 2 - 10) // len(changed)] = f[1]
    return script


def current_fact_track(store: Any, deps: StrategyDeps, turns: int = TURNS) -> list[dict[str, Any]]:
    rows = []
    for lang, facts in (("en", CURRENT_EN), ("ko", CURRENT_KO)):
        for name, config, weights, parts in VARIANTS[:3]:
            strategy = _strategy(config, weights, deps, parts)
            session, _ = _play(store, strategy, config, current_script(facts, turns), lang, turns)
            hits = stale_only = tokens = 0
            for _, _, question, key, stale in facts:
                text, used = _context(strategy, store, session, question, deps.counter)
                tokens += used
                hits += key in text
                stale_only += bool(stale and stale in text and key not in text)
            rows.append({"track": "current-fact", "lang": lang, "variant": name, "questions": len(facts),
                         "recall": hits / len(facts), "stale_only": stale_only,
                         "memory_tokens": tokens / len(facts)})
            store.delete_session(session.id)
    return rows


def paraphrase_track(store: Any, deps: StrategyDeps, turns: int = 200) -> list[dict[str, Any]]:
    rows = []
    for lang, lines in (("en", PARAPHRASE_EN), ("ko", PARAPHRASE_KO)):
        script = {5 + i * (turns - 20) // len(lines): line for i, (line, _, _) in enumerate(lines)}
        for name, config, weights, parts in VARIANTS:
            strategy = _strategy(config, weights, deps, parts)
            session, _ = _play(store, strategy, config, script, lang, turns)
            seen = [_context(strategy, store, session, q, deps.counter) for _, q, _ in lines]
            hits = sum(key in text for (text, _), (_, _, key) in zip(seen, lines, strict=True))
            rows.append({"track": "paraphrase", "lang": lang, "variant": name, "questions": len(lines),
                         "recall": hits / len(lines), "stale_only": 0,
                         "memory_tokens": sum(used for _, used in seen) / len(lines)})
            store.delete_session(session.id)
    return rows


def core_blocks_track(store: Any, deps: StrategyDeps, turns: int = 100, fact_proposer: bool = True) -> dict[str, Any]:
    """The 100-turn scripted chat; `deps.block_editor` (the model's) proposes too when set, and
    fact_proposer=False leaves the blocks to it alone. Every proposal, applied or rejected, is counted."""
    strategy = build_strategy(LONG_TERM, deps)
    strategy.fact_proposer = fact_proposer
    t0 = time.perf_counter()
    session, spent = _play(store, strategy, LONG_TERM, BLOCK_SCRIPT, "en", turns)
    core = CoreMemory(store, deps.counter)
    user = core.get(session.id, "user")
    value = user.value if user is not None else ""
    history = core.history(session.id)
    result = {
        "turns": turns,
        "proposers": " + ".join(n for n, on in (("facts", fact_proposer), ("model", deps.block_editor)) if on),
        "user_block": value,
        "tokens": deps.counter.count(value),
        "limit_tokens": user.limit_tokens if user is not None else 0,
        "within_limit": all(deps.counter.count(b.value) <= b.limit_tokens for b in core.blocks(session.id).values()),
        "applied_edits": len(history),
        "applied_edits_valid": all(h["message_id"] for h in history),
        "stats": core.stats(session.id)["by_source"],
        "rejections": core.stats(session.id)["recent_rejections"][-4:],
        "blocks": core.texts(session.id),
        "keys_present": {k: k in value for k in BLOCK_KEYS},
        "stale_city_gone": "Busan" not in value,
        "after_turn_p95_ms": sorted(spent)[int(0.95 * (len(spent) - 1))],
        "seconds": time.perf_counter() - t0,
    }
    store.delete_session(session.id)
    return result


def model_blocks_runs(store: Any, deps: StrategyDeps, model: str = "smollm2-135m-instruct") -> list[dict[str, Any]]:
    """The core-blocks track with the model's grammar-constrained editor (memory/blocks.py), with the
    facts proposer and without it (~1 s a turn on a CPU for SmolLM2)."""
    from dataclasses import replace

    from memory.blocks import ModelBlockEditor
    from model import Engine, load_model

    lm = load_model(model, device="cpu", dtype="float32", progress=False)
    rows = []
    for fact_proposer in (True, False):
        editor = ModelBlockEditor(Engine(lm), lm.tokenizer)
        row = core_blocks_track(store, replace(deps, block_editor=editor), fact_proposer=fact_proposer)
        rows.append({**row, "model": model, "calls": editor.calls, "cut_by_max_tokens": editor.unparsed})
    return rows


def print_tracks(rows: list[dict[str, Any]], blocks: dict[str, Any] | None) -> None:
    lines = ["track | lang | variant | questions | recall | stale only | memory tokens",
             "---|---|---|---|---|---|---"]
    for r in rows:
        lines.append(f"{r['track']} | {r['lang']} | {r['variant']} | {r['questions']} | {r['recall']:.2f} | "
                     f"{r['stale_only'] if r['track'] == 'current-fact' else '-'} | {r['memory_tokens']:.0f}")
    print("\n".join(lines))
    print(f"\ntargets: current-fact recall >= {TARGETS['current_recall']} with long_term and 0 stale-only; "
          f"paraphrase recall >= {TARGETS['paraphrase_recall']}")
    if blocks:
        print_blocks(blocks)


def print_blocks(blocks: dict[str, Any]) -> None:
    keys = ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in blocks["keys_present"].items())
    print(f"\ncore blocks ({blocks['turns']} turns, proposers: {blocks['proposers']}): "
          f"user block {blocks['tokens']}/{blocks['limit_tokens']} tokens, "
          f"within limit: {blocks['within_limit']}; {blocks['applied_edits']} edits applied, all validated: "
          f"{blocks['applied_edits_valid']} (by source: {blocks['stats']}); in the block: {keys}; "
          f"old city gone: {blocks['stale_city_gone']}; after_turn p95 {blocks['after_turn_p95_ms']:.1f} ms")
    print("user block at the end:\n  " + blocks["user_block"].replace("\n", "\n  "))
    if "calls" in blocks:
        print(f"model editor: {blocks['calls']} calls, {blocks['cut_by_max_tokens']} cut by max_tokens, "
              f"{blocks['seconds']:.0f} s; blocks: {blocks['blocks']}; last rejections: {blocks['rejections']}")


SUMMARY_MODELS = ("smollm2-135m-instruct", "gemma-3-270m")


def summary_track(store: Any, counter: Any, turns: tuple[int, ...] = (50, 200), fold_every: int = 25,
                  models: tuple[str, ...] = SUMMARY_MODELS, styles: tuple[str, ...] = ("facts",)) -> list[dict[str, Any]]:
    """summary_buffer recall with the extractive stand-in and with real summaries written by each model
    in each style (memory/summarizer.py: "facts" = the model keeps user sentences by a constrained
    yes/no, "prose" = the model rewrites a running summary).

    The model folds every `fold_every` turns (after_turn's cadence when a background queue batches
    turns; per-turn folding costs turns x a generation on a CPU). English: the main table's five
    facts and probes; Korean: the current-fact script (9 facts, 3 changed), the current answer counts.
    """
    from memory.summarizer import ExtractiveSummarizer, ModelSummarizer
    from model import Engine, load_model

    rows = _summary_runs(store, counter, "extractive", ExtractiveSummarizer(), turns, fold_every)
    for model in models:
        lm = load_model(model, device="cpu", dtype="float32", progress=False)
        for style in styles:
            summarizer = ModelSummarizer(Engine(lm), lm.tokenizer, style=style)
            rows += _summary_runs(store, counter, f"model {style} ({model})", summarizer, turns, fold_every)
        del lm
    return rows


def _summary_script(lang: str, turns: int) -> tuple[dict[int, str], list[tuple[str, str]]]:
    """(turn -> planted line, [(question, key)]) for one summaries run."""
    from memory.bench import FACTS, _fact_turns

    if lang == "en":
        return {t: f[0] for t, f in zip(_fact_turns(turns), FACTS, strict=True)}, [(q, k) for _, q, k in FACTS]
    return current_script(CURRENT_KO, turns), [(f[2], f[3]) for f in CURRENT_KO]


def _summary_runs(store: Any, counter: Any, name: str, summarizer: Any, turns: tuple[int, ...],
                  fold_every: int) -> list[dict[str, Any]]:
    from memory.summarizer import conversation_language

    deps = StrategyDeps(store, counter, summarizer, None)
    config = {"strategy": "summary_buffer", "max_tokens": 512}
    rows = []
    for lang in ("en", "ko"):
        for n in turns:
            script, probes = _summary_script(lang, n)
            strategy = build_strategy(config, deps)
            session, spent = _play_every(store, strategy, config, script, lang, n, fold_every)
            hits = sum(key in _context(strategy, store, session, q, counter)[0] for q, key in probes)
            summary = (store.get_state(session.id, "summary_buffer") or {}).get("text", "")
            rows.append({"summarizer": name, "lang": lang, "turns": n, "recall": hits / len(probes),
                         "summary_tokens": counter.count(summary), "fold_s": sum(spent) / 1000,
                         "summary_lang": conversation_language([summary]) if summary else "-", "summary": summary})
            store.delete_session(session.id)
    return rows


def _play_every(store: Any, strategy: Any, config: dict[str, Any], script: dict[int, str], lang: str, turns: int,
                every: int) -> tuple[Any, list[float]]:
    """Like _play, with after_turn every `every` turns and at the end."""
    session = store.create_session(f"track-{uuid.uuid4().hex[:8]}", "assistant", config)
    filler, spent = FILLER[lang], []
    for t in range(turns):
        store.append_message(session.id, "user", script.get(t, f"{filler[t % len(filler)]} ({t})"))
        store.append_message(session.id, "assistant", f"{REPLY[lang]} ({t})")
        if (t + 1) % every == 0 or t == turns - 1:
            t0 = time.perf_counter()
            strategy.after_turn(session, store.list_messages(session.id))
            spent.append((time.perf_counter() - t0) * 1000)
    return session, spent


def print_summaries(rows: list[dict[str, Any]]) -> None:
    lines = ["summarizer | lang | turns | recall | summary tokens | summary language | folding s",
             "---|---|---|---|---|---|---"]
    for r in rows:
        lines.append(f"{r['summarizer']} | {r['lang']} | {r['turns']} | {r['recall']:.2f} | {r['summary_tokens']} | "
                     f"{r['summary_lang']} | {r['fold_s']:.1f}")
    print("\n".join(lines))
    for r in rows:
        if r["summarizer"] != "extractive":
            print(f"\n{r['summarizer']}, {r['lang']}, {r['turns']} turns, summary:\n  "
                  + (r["summary"][:600] or "(empty)").replace("\n", "\n  "))
