"""Measure how well daughter-ko stays in 반말: a scripted 50-turn talk with her father, per mode.

    python -m persona.measure_register                          # 3 modes x 3 seeds x 50 turns, gemma-3-270m
    python -m persona.measure_register --turns 10 --seeds 1     # a quick look

Modes: "off" (persona prompt only: system + 반말 example dialogues), "remind" (adds the register
reminder to the post-history note after a drifted reply, as the service does), "guard" (the
RegisterGuard logits processor; no post-repair, so the number is the guard's own). Reports per
mode the share of 반말 among reply sentences that have a verbal ending, the share of replies with
no polite sentence, and the mean reply latency.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass, field

from persona.guard import RegisterGuard, needs_reminder
from persona.korean import classify_reply, classify_sentences
from persona.prompt import build_prompt_parts, post_history_note
from persona.registry import PersonaRegistry

# The father's side: 50 lines, 반말 as a father talks to his grown daughter.
FATHER_LINES = [
    "지우야, 잘 지내고 있니?",
    "밥은 챙겨 먹고 다니는 거지?",
    "요즘 학교 생활은 어때?",
    "아빠는 오늘 회사에서 좀 바빴어.",
    "날씨가 많이 추워졌더라. 옷 따뜻하게 입고 다녀.",
    "이번 주말에 집에 올 수 있어?",
    "엄마가 네가 좋아하는 갈비 해 준다더라.",
    "시험은 언제부터야?",
    "공부하느라 너무 무리하지 마라.",
    "아빠 허리가 요즘 좀 아프네.",
    "병원은 다음 주에 가 보려고.",
    "너 어릴 때 자전거 가르쳐 주던 거 기억나?",
    "그때 넘어져서 엄청 울었잖아.",
    "요즘 친구들이랑은 잘 지내?",
    "용돈은 모자라지 않아?",
    "아빠가 이번에 새 휴대폰 샀어.",
    "사진 보내는 법 좀 알려 줄래?",
    "어제 할머니한테 전화 왔었어.",
    "할머니가 너 보고 싶다고 하시더라.",
    "다음 달에 할머니 댁에 같이 가자.",
    "요리는 좀 해 먹니?",
    "라면만 먹으면 안 된다.",
    "아빠는 오늘 저녁에 김치찌개 끓여 먹었어.",
    "네가 끓여 준 찌개가 생각나더라.",
    "졸업하면 뭐 하고 싶어?",
    "아빠는 네가 하고 싶은 거 했으면 좋겠어.",
    "돈 걱정은 하지 말고.",
    "요즘 잠은 잘 자?",
    "늦게까지 핸드폰 보지 말고 일찍 자.",
    "아빠 요즘 운동 시작했다.",
    "아침마다 공원 한 바퀴 걸어.",
    "너도 같이 걸으면 좋을 텐데.",
    "강아지 산책시키는 것도 이제 아빠 담당이야.",
    "초코가 너 많이 기다려.",
    "이번 명절엔 몇 시에 출발할 거야?",
    "기차표는 예매했어?",
    "아빠가 역으로 데리러 갈게.",
    "혹시 남자 친구는 생겼니?",
    "하하, 농담이야. 천천히 해.",
    "아빠가 요즘 옛날 노래를 자주 들어.",
    "네가 좋아하던 그 노래 제목이 뭐였지?",
    "오늘 비 온대. 우산 챙겨.",
    "감기 걸리지 않게 조심하고.",
    "아빠 생일에 뭐 해 줄 거야?",
    "선물은 필요 없고 얼굴만 보여 줘.",
    "요즘 아빠가 좀 외롭네.",
    "그래도 네 목소리 들으니까 좋다.",
    "사랑한다, 우리 딸.",
    "이제 늦었으니 자야지.",
    "잘 자라, 지우야.",
]


# gemma-3-270m is a base model: it rarely ends its turn, and echoes the note; a blank line ends a reply
STOP = ["[System note", "\n\n", "<start_of_turn>"]


@dataclass
class RunResult:
    mode: str
    seed: int
    replies: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    reminders: int = 0

    def sentence_labels(self) -> list[str]:
        return [s.label for r in self.replies for s in classify_sentences(r)]

    def banmal_share(self) -> float:
        labels = [lab for lab in self.sentence_labels() if lab in ("banmal", "polite")]
        return labels.count("banmal") / len(labels) if labels else 1.0

    def clean_reply_share(self) -> float:
        return sum(classify_reply(r) in ("banmal", "none") for r in self.replies) / max(1, len(self.replies))


def converse(
    engine,
    persona,
    mode: str,
    turns: int,
    seed: int,
    max_tokens: int = 48,
    temperature: float = 0.7,
    top_p: float = 0.95,
    repetition_penalty: float = 1.0,
) -> RunResult:
    """One scripted conversation; replies go into the history unrepaired (we measure the raw drift)."""
    from model import SamplingParams

    tok = engine.lm.tokenizer
    guard = [RegisterGuard(tok, persona.register)] if mode == "guard" else []
    history: list[dict[str, str]] = []
    result = RunResult(mode, seed)
    labels: list[str] = []
    for turn in range(turns):
        remind = mode == "remind" and needs_reminder(labels, persona.register)
        result.reminders += remind
        parts = build_prompt_parts(persona, remind=remind)
        father = FATHER_LINES[turn % len(FATHER_LINES)]
        note = post_history_note(parts.post_history) if parts.post_history else ""
        messages = parts.pinned + history + [{"role": "user", "content": father + note}]
        prompt = tok.apply_chat_template(messages)
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            seed=seed * 1000 + turn,
            stop=STOP,
        )
        t0 = time.perf_counter()
        events = engine.generate(prompt, params, session_id=f"measure-{mode}-{seed}", logits_processors=guard)
        text = "".join(ev.text for ev in events)
        result.latencies.append(time.perf_counter() - t0)
        reply = text.strip() or "..."
        result.replies.append(reply)
        labels.append(classify_reply(reply))
        history += [{"role": "user", "content": father}, {"role": "assistant", "content": reply}]
    engine.drop_session(f"measure-{mode}-{seed}")
    return result


def summarise(results: list[RunResult]) -> list[dict]:
    """One row per mode: mean over seeds."""
    rows = []
    for mode in dict.fromkeys(r.mode for r in results):
        runs = [r for r in results if r.mode == mode]
        rows.append(
            {
                "mode": mode,
                "runs": len(runs),
                "replies": sum(len(r.replies) for r in runs),
                "banmal_sentence_share": statistics.mean(r.banmal_share() for r in runs),
                "clean_reply_share": statistics.mean(r.clean_reply_share() for r in runs),
                "mean_latency_s": statistics.mean(x for r in runs for x in r.latencies),
                "reminders": sum(r.reminders for r in runs),
            }
        )
    return rows


def format_table(rows: list[dict]) -> str:
    head = "| mode | runs | replies | 반말 share of sentences | replies without 존댓말 | mean latency (s) | reminders |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['runs']} | {r['replies']} | {r['banmal_sentence_share']:.1%} | "
            f"{r['clean_reply_share']:.1%} | {r['mean_latency_s']:.2f} | {r['reminders']} |"
        )
    return "\n".join(lines)


def run(
    modes=("off", "remind", "guard"),
    turns: int = 50,
    seeds=(1, 2, 3),
    model: str = "gemma-3-270m",
    persona: str = "daughter-ko",
    device: str = "auto",
    show_replies: bool = False,
    max_tokens: int = 48,
    repetition_penalty: float = 1.0,
    temperature: float = 0.7,
) -> list[dict]:
    """Run every mode x seed, print the table (and replies if asked), return its rows."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from model import Engine, load_model

    lm = load_model(model, device=device, progress=True)
    engine = Engine(lm)
    who = PersonaRegistry.from_env().get(persona)
    results = []
    for mode in modes:
        for seed in seeds:
            res = converse(
                engine, who, mode, turns, seed, max_tokens, temperature, repetition_penalty=repetition_penalty
            )
            results.append(res)
            print(
                f"{mode} seed {seed}: 반말 {res.banmal_share():.1%}, {statistics.mean(res.latencies):.2f}s/reply",
                flush=True,
            )
            if show_replies:
                for i, reply in enumerate(res.replies):
                    print(
                        f"  [{i}] {FATHER_LINES[i % len(FATHER_LINES)]} -> {reply}  ({classify_reply(reply)})"
                    )
    rows = summarise(results)
    print(format_table(rows))
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", default="off,remind,guard")
    ap.add_argument("--turns", type=int, default=50)
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--repetition-penalty", type=float, default=1.0)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--show-replies", action="store_true")
    a = ap.parse_args(argv)
    run(
        tuple(a.modes.split(",")),
        a.turns,
        tuple(int(s) for s in a.seeds.split(",")),
        a.model,
        device=a.device,
        show_replies=a.show_replies,
        max_tokens=a.max_tokens,
        repetition_penalty=a.repetition_penalty,
        temperature=a.temperature,
    )


if __name__ == "__main__":
    main()
