"""Summarizers: the extractive one, and ModelSummarizer on the real SmolLM2-135M (slow)."""

from __future__ import annotations

import pytest

from memory.summarizer import ExtractiveSummarizer, ModelSummarizer, user_sentences
from tests.memory.strategy_helpers import msg, smollm2_counter, transcript


def test_extractive_keeps_user_lines_newest_last_within_cap():
    s = ExtractiveSummarizer(max_chars=60)
    out = s("", [msg(0, "user", "my dog is Kong"), msg(1, "assistant", "nice"), msg(2, "user", "I live in Seoul")])
    assert out == "User said: my dog is Kong\nUser said: I live in Seoul"
    out = s(out, [msg(3, "user", "I like tea")])
    assert out.endswith("User said: I like tea") and "Kong" not in out and len(out) <= 60


class _NoEngine:
    context_window = 300


def test_model_summarizer_chunks_long_input_to_fit_its_window():
    tok = smollm2_counter()
    summ = ModelSummarizer(_NoEngine(), tok, max_tokens=64)
    lines = [f"User: {m.content}" for m in transcript(40, words=12)] + ["User: " + "huge " * 2000]
    chunks = summ._chunks("previous summary", lines)
    assert sum(len(c) for c in chunks) == len(lines) and len(chunks) > 1
    for chunk in chunks:
        # the prompt, with a previous summary as long as a reply can be, leaves room for the reply
        prompt = summ.prompt("word " * 64, chunk)
        assert tok.count_messages(prompt) + 64 <= 300 + 16
    assert chunks[-1][-1].endswith("…[truncated]")


@pytest.fixture(scope="module")
def smollm2():
    registry = pytest.importorskip("model.registry")
    if not hasattr(registry, "load_model"):
        pytest.skip("model.registry.load_model is not available yet")
    from model import Engine

    lm = registry.load_model("smollm2-135m-instruct", device="cpu", progress=False)
    return lm, Engine(lm)


@pytest.mark.slow
def test_model_summarizer_with_real_smollm2_is_greedy_and_deterministic(smollm2):
    lm, engine = smollm2
    summ = ModelSummarizer(engine, lm.tokenizer, max_tokens=32)
    messages = [msg(0, "user", "Hi, my name is Jisoo and my dog is called Kong."),
                msg(1, "assistant", "Nice to meet you, Jisoo! Kong is a lovely name.")]
    first = summ("", messages)
    assert first.strip() and first == summ("", messages)  # greedy decoding: same text every time
    assert lm.tokenizer.count(first) <= 32 + 2


def test_model_summarizer_prompt_carries_previous_summary_and_new_lines():
    summ = ModelSummarizer(_NoEngine(), smollm2_counter())
    prompt = summ.prompt("Jisoo has a dog, Kong.", ["User: I moved to Busan.", "Assistant: Great!"])
    assert prompt[0]["role"] == "system" and "summary" in prompt[0]["content"]
    body = prompt[1]["content"]
    assert "Current summary:\nJisoo has a dog, Kong." in body and body.index("Kong") < body.index("Busan")


def test_the_prompt_names_the_conversation_language():
    from memory.summarizer import conversation_language

    summ = ModelSummarizer(_NoEngine(), smollm2_counter())
    ko = summ.prompt("", ["User: 우리 강아지 이름은 콩이야.", "Assistant: 귀엽다!"])
    assert "write the summary in Korean" in ko[0]["content"] and ko[1]["content"].endswith("한국어로 써.")
    en = summ.prompt("", ["User: My dog is Kong.", "Assistant: Cute!"])
    assert "in English" in en[0]["content"] and "한국어" not in en[1]["content"]
    assert conversation_language(["User: 콩이 산책 갔어 (walk)"]) == "ko"
    assert conversation_language(["User: I said 안녕 to my neighbour today"]) == "en"



def test_user_sentences_split_keep_short_tails_and_skip_the_assistant():
    messages = [msg(0, "user", "My dog is Kong. He is three! (turn 4)"), msg(1, "assistant", "Cute. Very cute."),
                msg(2, "user", "우리 강아지 이름은 콩이야. 세 살이야.\nMy dog is Kong.")]
    assert user_sentences(messages) == ["My dog is Kong.", "He is three! (turn 4)", "우리 강아지 이름은 콩이야.", "세 살이야."]


class _JudgeEngine:
    """Answers the facts style's yes/no from a fixed set (the grammar is the real one, passed along)."""

    context_window = 2048

    def __init__(self, keep: set[str]) -> None:
        self.keep, self.asked = keep, []

    def complete_messages(self, messages, *, processors=(), **_):
        from memory.grammar import JsonConstraint

        assert [type(p) for p in processors] == [JsonConstraint]
        line = messages[-1]["content"].split("\n")[0].removeprefix("Line: ")
        self.asked.append(line)
        return '"yes"' if line in self.keep else '"no"'


def test_facts_style_keeps_verbatim_sentences_incrementally_within_max_tokens():
    tok = smollm2_counter()
    engine = _JudgeEngine({"My dog is Kong.", "I live in Seoul.", "I work at a bakery."})
    limit = tok.count("- I live in Seoul.\n- I work at a bakery.")
    summ = ModelSummarizer(engine, tok, max_tokens=limit)
    first = summ("", [msg(0, "user", "My dog is Kong. It rained."), msg(1, "assistant", "I live in Seoul.")])
    assert first == "- My dog is Kong." and engine.asked == ["My dog is Kong.", "It rained."]  # never the reply
    second = summ(first, [msg(2, "user", "I live in Seoul."), msg(3, "user", "My dog is Kong.")])
    assert second == "- My dog is Kong.\n- I live in Seoul." and engine.asked[-1] == "I live in Seoul."  # no re-ask
    third = summ(second, [msg(4, "user", "I work at a bakery.")])
    assert third == "- I live in Seoul.\n- I work at a bakery."  # over the limit: the oldest left first


@pytest.mark.slow
def test_facts_style_with_real_smollm2_only_copies_what_the_user_said(smollm2):
    lm, engine = smollm2
    summ = ModelSummarizer(engine, lm.tokenizer)
    said = ["내 아내 이름은 소라야.", "오늘 저녁에 뭐 먹지?", "My car is a green Skoda.", "Tell me about the ocean."]
    out = summ("", [msg(i, "user", text) for i, text in enumerate(said)])
    assert summ.decisions == 4 and out == summ("", [msg(i, "user", text) for i, text in enumerate(said)])
    assert all(line.startswith("- ") and line[2:] in said for line in out.splitlines())
