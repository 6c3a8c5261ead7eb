"""Conversation quality per bundled persona: scripted chats on a built-in model, then a fact probe.

    python -m persona.measure_quality --model gemma-3-270m --personas daughter-ko --turns 15
    python -m persona.measure_quality --model smollm2-135m-instruct --personas assistant --turns 50
    python -m persona.measure_quality --modes off,remind,guard ...   # register_mode overridden per run
    python -m persona.measure_quality --raw ...                      # no stops, no post-check: the model alone

Each turn runs as the service runs it: the persona's prompt with the post-history note, `buffer`
memory (every earlier turn verbatim), the model's sampling preset (model/presets.py; `--set
key=value` overrides), the carrier stop strings, the RegisterGuard in guard mode, then
persona.quality.settle() (cut a leaked instruction, regenerate a degenerate reply) and the register
repair. Reported per persona and mode: register share (sentences in the persona's register among
those with a verbal ending), leaked instructions stored (and caught: replies that echoed before the
check), degenerate replies stored (and as generated), empty replies, mean reply length in
characters, the fact probe (questions the persona file answers: name, relation, a remembered
detail; share answered with the expected word) and seconds per turn.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from persona import quality, register_policy
from persona.korean import classify_sentences
from persona.measure_register import FATHER_LINES
from persona.prompt import build_prompt_parts, post_history_note
from persona.registry import PersonaRegistry

CUSTOMER_LINES = [
    "안녕하세요, 오늘 추천 메뉴 있어요?", "라테 한 잔 주세요.", "오늘 날씨가 꽤 춥네요.",
    "요즘 손님 많아요?", "디카페인도 있어요?", "케이크는 뭐가 맛있어요?", "여기 원두는 어디 거예요?",
    "집에서 드립 커피 내리는 법 좀 알려 주세요.", "시럽은 조금만 넣어 주세요.", "쿠폰 도장 찍어 주세요.",
    "주말에도 문 열어요?", "저번에 마신 커피 이름이 뭐였죠?", "오늘 좀 피곤하네요.", "아이스로 바꿔도 돼요?",
    "다음에 또 올게요.",
]
USER_LINES = [
    "Hi! How are you today?", "Can you help me plan a small dinner party?", "I think six people are coming.",
    "What should I cook that is easy?", "One friend is vegetarian.", "What about dessert?",
    "How early should I start cooking?", "Should I make a shopping list now?", "I also need a playlist.",
    "My oven is small, does that matter?", "What drinks go with that?", "Thanks, that helps a lot.",
    "Can you remind me what we decided for the main course?", "How long will all of this take?",
    "Great, see you later!",
]
SCRIPTS = {"daughter-ko": FATHER_LINES, "barista-ko": CUSTOMER_LINES, "assistant": USER_LINES}
# (question, words of which one must appear in the answer): what the persona file states
PROBES = {
    "daughter-ko": [("그런데 너 이름이 뭐였지?", ["지우"]), ("나는 너한테 누구야?", ["아빠"]),
                    ("우리 일요일마다 같이 뭐 먹었지?", ["김치찌개"]), ("어릴 때 아빠랑 같이 뭐 탔었지?", ["자전거"])],
    "barista-ko": [("이름이 어떻게 되세요?", ["민준"]), ("여기 카페 이름이 뭐예요?", ["모카"]),
                   ("무슨 일 하세요?", ["바리스타", "커피"])],
    "assistant": [("What is your name?", ["memento"]), ("What are you?", ["assistant"]),
                  ("Where was I planning to travel?", ["busan"])],
}


@dataclass
class ChatRun:
    persona: str
    mode: str
    replies: list[str] = field(default_factory=list)
    raw_leaks: int = 0  # replies that echoed an instruction as generated (before the check)
    raw_degenerate: int = 0
    stored_leaks: int = 0
    degenerate: int = 0
    register: list[str] = field(default_factory=list)  # sentence labels
    probe_hits: int = 0
    probes: int = 0
    seconds: list[float] = field(default_factory=list)
    examples: list[tuple[str, str, str]] = field(default_factory=list)  # (user, raw, stored)


def turn(engine, persona, history, line, params, checked: bool, placement: str = "user_suffix"
         ) -> tuple[str, str, list[str]]:
    """One user line -> (raw reply, stored reply, post-history note text). `placement`: the note as
    memory/context.py's post_history_mode puts it ("system" only for templates that allow it)."""
    tok = engine.lm.tokenizer
    parts = build_prompt_parts(persona, remind=register_policy.drifted(persona, _labels(history)))
    note = post_history_note(parts.post_history) if parts.post_history and placement != "system" else ""
    content = f"{note.strip()}\n\n{line}" if note and placement == "user_prefix" else line + note
    messages = parts.pinned + history + [{"role": "user", "content": content}]
    if parts.post_history and placement == "system":
        messages.append({"role": "system", "content": parts.post_history})
    ids = tok.apply_chat_template(messages)
    guard = register_policy.guard_for(persona, tok)
    procs = [guard] if guard is not None else []
    raw = engine.complete(ids, params, logits_processors=procs).text.strip()
    if not checked:
        return raw, raw, [parts.post_history or ""]
    earlier = [m["content"] for m in history if m["role"] == "assistant"]
    rules = quality.rules_for(persona, parts.post_history, earlier)

    def regenerate(attempt: int) -> str:
        # as the service: another seed, and at least 0.7 (greedy would only say it again)
        again = dataclasses.replace(params, seed=(params.seed or 0) + 7919 * attempt,
                                    temperature=max(params.temperature, 0.7))
        return engine.complete(ids, again, logits_processors=procs).text.strip()

    settled = quality.settle(raw, rules, regenerate)
    from persona.guard import engine_sentence_fn

    fix = engine_sentence_fn(engine, ids, tok, params, procs)
    stored = register_policy.check(persona, settled.text, fix).text
    return raw, stored, list(rules.instructions)


def _labels(history: list[dict[str, str]]) -> list[str]:
    from persona.korean import classify_reply

    return [classify_reply(m["content"]) for m in history if m["role"] == "assistant"]


def converse(engine, persona, mode: str, turns: int, sampling: dict[str, Any], seed: int, max_tokens: int,
             checked: bool = True, probe: bool = True, verbose: bool = False,
             placement: str = "user_suffix") -> ChatRun:
    """The scripted chat (lines cycle past the script's end), then the persona's fact probes."""
    from model import SamplingParams

    persona = persona.model_copy(update={"register_mode": mode}) if mode != "file" else persona
    run = ChatRun(persona.name, mode)
    history: list[dict[str, str]] = []
    lines = SCRIPTS.get(persona.name, USER_LINES)
    probes = PROBES.get(persona.name, []) if probe else []
    script = [lines[i % len(lines)] for i in range(turns)] + [q for q, _ in probes]
    for i, line in enumerate(script):
        stops = (quality.carrier_stops(persona) if checked else []) + (sampling.get("stop") or [])
        params = SamplingParams(**{**sampling, "stop": stops}, max_tokens=max_tokens, seed=seed * 1000 + i)
        t0 = time.perf_counter()
        raw, stored, instructions = turn(engine, persona, history, line, params, checked, placement)
        run.seconds.append(time.perf_counter() - t0)
        earlier = [m["content"] for m in history if m["role"] == "assistant"]
        rules = quality.rules_for(persona, instructions[0] if instructions else None, earlier)
        if i >= turns:
            expected = PROBES[persona.name][i - turns][1]
            run.probes += 1
            run.probe_hits += any(w in stored.lower() for w in expected)
        else:
            score(run, rules, raw, stored)
            run.examples.append((line, raw, stored))
        if verbose:
            print(f"  [{i}] {run.seconds[-1]:.1f}s {line} -> {stored!r}" + ("" if raw == stored else f"  (raw {raw!r})"),
                  flush=True)
        history += [{"role": "user", "content": line}, {"role": "assistant", "content": stored or "..."}]
    return run


def score(run: ChatRun, rules: quality.ReplyRules, raw: str, stored: str) -> None:
    run.raw_leaks += quality.find_leak(raw, rules.instructions, rules.markers, rules.language) is not None
    run.stored_leaks += quality.find_leak(stored, rules.instructions, rules.markers, rules.language) is not None
    run.raw_degenerate += bool(quality.degeneration(raw, rules.earlier, rules.language, rules.names))
    run.degenerate += bool(quality.degeneration(stored, rules.earlier, rules.language, rules.names))
    run.register += [s.label for s in classify_sentences(stored)] if rules.language == "ko" else []
    run.replies.append(stored)


def register_share(run: ChatRun, target: str | None) -> str:
    labels = [lab for lab in run.register if lab in ("banmal", "polite")]
    if target is None or not labels:
        return "-"
    return f"{labels.count(target) / len(labels):.0%}"


def format_table(runs: list[ChatRun], targets: dict[str, str | None]) -> str:
    head = ("| persona | mode | turns | register share | leaked (caught) | degenerate (as generated) | empty | "
            "mean length (chars) | fact probe | s/turn |")
    lines = [head, "|" + "---|" * 10]
    for r in runs:
        n = len(r.replies)
        lines.append(
            f"| {r.persona} | {r.mode} | {n} | {register_share(r, targets[r.persona])} | "
            f"{r.stored_leaks} ({r.raw_leaks}) | {r.degenerate} ({r.raw_degenerate}) | "
            f"{sum(not x.strip() for x in r.replies)} | {statistics.mean(len(x) for x in r.replies):.0f} | "
            f"{r.probe_hits}/{r.probes} | {statistics.mean(r.seconds):.1f} |")
    return "\n".join(lines)


def parse_sets(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, _, value = item.partition("=")
        out[key] = float(value) if "." in value else int(value)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--personas", default="daughter-ko,barista-ko,assistant")
    ap.add_argument("--modes", default="file", help="file (the persona's own register_mode) or off,remind,guard")
    ap.add_argument("--turns", type=int, default=15)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--set", action="append", default=[], help="override a preset field, e.g. dry_multiplier=0")
    ap.add_argument("--raw", action="store_true", help="no carrier stops, no post-check")
    ap.add_argument("--no-probe", action="store_true", help="skip the fact probe")
    ap.add_argument("--placement", default="user_suffix", choices=["user_suffix", "user_prefix", "system"],
                    help="where the post-history note goes (memory/context.py's post_history_mode)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--show-replies", action="store_true")
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from model import Engine, load_model
    from model.presets import merge_sampling, preset_for

    engine = Engine(load_model(a.model, device=a.device, progress=True))
    sampling = merge_sampling(preset_for(a.model), parse_sets(a.set))
    if a.raw:
        sampling.pop("stop", None)
    print(f"model {a.model}, sampling {sampling}", flush=True)
    registry = PersonaRegistry.from_env()
    runs, targets = [], {}
    for name in a.personas.split(","):
        persona = registry.get(name)
        targets[name] = persona.register if persona.register != "any" else None
        for mode in a.modes.split(","):
            run = converse(engine, persona, mode, a.turns, sampling, a.seed, a.max_tokens, checked=not a.raw,
                           probe=not a.no_probe, verbose=a.show_replies, placement=a.placement)
            runs.append(run)
            print(format_table([run], targets).splitlines()[-1], flush=True)
    print(format_table(runs, targets))


if __name__ == "__main__":
    main()
