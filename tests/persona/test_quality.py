"""persona/quality.py: leaked instructions, degeneration, script drift, and the settle() policy."""

from persona.quality import (
    ReplyRules,
    copied_share,
    cut_foreign_tail,
    cut_leak,
    cut_repetition,
    degeneration,
    find_leak,
    foreign_words,
    looping_tail,
    rules_for,
    settle,
    words,
)

NOTE = "지우는 아빠에게 반말로 다정하게 짧게 대답한다."
# what gemma-3-270m wrote with the daughter-ko persona (issue 15)
ECHOED = "응, 어미 짱아, 어미 짱아, 어미 짱아, 어미 짱아!\n\n[System note: 지우는 아빠에게 반말로 대답한다.]"
MIXED = "응, 아빠가 지금 취준생, 장충만 특별한 건 없다. angeboten / これからも, 월요일, 2주째. implementación"


def test_the_marked_note_is_found_and_cut():
    leak = find_leak(ECHOED, [NOTE])
    assert leak is not None and leak.what == "[System note"
    assert cut_leak(ECHOED, leak) == "응, 어미 짱아, 어미 짱아, 어미 짱아, 어미 짱아!"


def test_a_paraphrased_unmarked_instruction_is_a_leak_too():
    leak = find_leak("응 알겠어! 지우는 아빠에게 반말로 대답한다.", [NOTE])
    assert leak is not None and cut_leak("응 알겠어! 지우는 아빠에게 반말로 대답한다.", leak) == "응 알겠어!"
    bracketed = "좋아!\n(기억해: 아빠에게는 반말로만 말해.)"
    assert cut_leak(bracketed, find_leak(bracketed)) == "좋아!"
    assert find_leak("아빠, 나 내일 갈게!\n아빠: 그래", markers=["\n아빠:"]).start == len("아빠, 나 내일 갈게!")


def test_ordinary_replies_do_not_leak():
    for reply in ["응, 방금 먹었어! 아빠는?", "아빠에게 전화할게.", "토요일에 갈게!"]:
        assert find_leak(reply, [NOTE]) is None


def test_repeated_phrase_and_word_runs_are_degenerate():
    assert "repeated_phrase" in degeneration("응, 어미 짱아, 어미 짱아, 어미 짱아, 어미 짱아!", language="ko")
    assert "repeated_phrase" in degeneration("응, 아빠, 아빠, 아빠, 아빠, 좋아", language="ko")
    assert cut_repetition("응, 어미 짱아, 어미 짱아, 어미 짱아, 어미 짱아!") == "응, 어미 짱아"
    assert degeneration("응, 방금 먹었어! 아빠는? 또 라면 먹은 거 아니지?", language="ko") == []


def test_few_distinct_pairs_and_copying_an_earlier_reply():
    loop = "the cat sat on the mat the cat sat on the mat the cat sat"
    assert "few_distinct_pairs" in degeneration(loop)
    earlier = ["I went to the market and bought apples for the pie today."]
    assert copied_share(words("I went to the market and bought apples for the pie."), earlier) > 0.9
    assert "copied_reply" in degeneration("I went to the market and bought apples for the pie.", earlier)
    assert degeneration("Sure, we can bake it on Sunday afternoon together.", earlier) == []


def test_korean_persona_writes_no_kana_and_no_latin_beyond_names():
    assert foreign_words(MIXED, "ko") == ["angeboten", "これからも", "implementación"]
    assert "foreign_script" in degeneration(MIXED, language="ko")
    assert foreign_words("민준이 추천하는 Mocha 어때?", "ko", names=["mocha"]) == []
    assert foreign_words("Sure, 안녕!", "en") == ["안녕"]
    assert foreign_words("ok 2주째 ㅋㅋ", "ko") == ["ok"]


def test_settle_cuts_the_leak_and_regenerates_what_stays_degenerate():
    rules = ReplyRules(instructions=[NOTE], language="ko")
    fresh = iter(["응, 오늘 학교 재밌었어! 아빠는 밥 먹었어?"])
    out = settle(ECHOED, rules, lambda attempt: next(fresh))
    assert out.text == "응, 오늘 학교 재밌었어! 아빠는 밥 먹었어?"
    assert out.metadata["leak_cut"] and out.metadata["quality_regenerations"] == 1


def test_settle_never_keeps_a_leak_even_when_every_retry_leaks():
    rules = ReplyRules(instructions=[NOTE], language="ko")
    out = settle(ECHOED, rules, lambda attempt: ECHOED, max_retries=2)
    assert "System note" not in out.text and "대답한다" not in out.text
    assert out.text == "응, 어미 짱아" and out.metadata["repetition_cut"]
    only = settle("[System note: " + NOTE + "]", rules, None)
    assert only.text == "" and only.metadata["quality"] == ["leak_only"]


def test_settle_leaves_a_clean_reply_alone():
    out = settle("응, 방금 먹었어!", ReplyRules(language="ko"), lambda attempt: 1 / 0)
    assert out.text == "응, 방금 먹었어!" and out.metadata == {}


def test_a_foreign_tail_is_cut_at_the_sentence_before_it_without_regenerating():
    raw = "응, 지우. 어릴 때 자전거를 타고 다녔지. 그런데 아빠는 널 좋아했어.길죄setInputsetInputsetInput"
    out = settle(raw, ReplyRules(language="ko"), lambda attempt: 1 / 0)
    assert out.text == "응, 지우. 어릴 때 자전거를 타고 다녔지. 그런데 아빠는 널 좋아했어."
    assert out.metadata == {"degenerate_cut": ["foreign_script"]}
    assert cut_foreign_tail("좋아! 今年も 또 가자", "ko") == "좋아!"


def test_a_register_persona_narrating_its_register_rule_is_a_leak():
    from persona.registry import PersonaRegistry

    daughter = PersonaRegistry().get("daughter-ko")
    rules = rules_for(daughter, "지우는 아빠에게 반말로 다정하게 짧게 대답한다.", [])
    text, problems = rules.problems("응, 알겠어. 지우는 아빠가 너에게 반말로 말한다.")
    assert text == "응, 알겠어." and problems == []
    assert rules.problems("응, 방금 먹었어! 아빠는?") == ("응, 방금 먹었어! 아빠는?", [])
    assert "지우" in rules.names and "아빠" in rules.names


def test_a_syllable_stuck_inside_a_word_is_a_loop_but_a_laugh_is_not():
    stuck = "응, 갈비 좋아. 아빠가 잘 지내고 있니?겪맬맬맬맬맬맬맬맬맬맬"
    assert "repeated_phrase" in degeneration(stuck, language="ko")
    assert cut_repetition(stuck) == "응, 갈비 좋아. 아빠가 잘 지내고 있니?겪"
    assert degeneration("하하하하 아빠 웃겨 ㅋㅋㅋㅋㅋㅋㅋ", language="ko") == []


def test_a_reply_ending_in_a_loop_over_forms_of_one_word_is_cut_before_it():
    # gemma-3-270m, daughter-ko, through POST /v1/sessions/{id}/messages: no phrase comes back four
    # times and no one word runs four times, but the reply has stopped saying anything
    tail = "응, 아빠! 오늘은 학교에서 친구들이랑 점심 먹고.겪는데.겪는데.겪어.겪어.겪는다.겪는다.겪다.겪다.겪는다.겪는다.겪는다."
    assert "repeated_phrase" in degeneration(tail, language="ko")
    assert cut_repetition(tail) == "응, 아빠! 오늘은 학교에서 친구들이랑 점심 먹고."
    assert cut_repetition("yes no yes no maybe no yes yes") == "yes no"  # all loop: up to the first repeat
    # eight words from three is a loop; a laugh in jamo, and everyday replies, are not
    assert looping_tail(words("아빠 사랑해 ㅋㅋ ㅋㅋㅋ ㅋㅋ ㅋㅋㅋㅋ ㅋㅋ ㅋㅋㅋ ㅋ ㅋㅋ")) is None
    for fine in ("응 응, 알았어 아빠. 나도 아빠 사랑해, 진짜로 많이 사랑해!",
                 "It is what it is, and it is fine with me, so we go on."):
        assert looping_tail(words(fine)) is None, fine
        assert degeneration(fine, language="ko" if "아빠" in fine else "en") == []


def test_a_phrase_looping_without_spaces_is_found():
    loop = "오늘 날씨도 덥네요.먹고 싶은 맘이든든든 하네요.먹으세요.먹고싶어요.먹고 싶어요먹고 싶어요 먹고 싶어요 먹고 싶은 맘을"
    assert "repeated_phrase" in degeneration(loop, language="ko")
    fine = "오늘은 에티오피아 원두로 내린 핸드드립을 추천해요. 산미가 부드러워서 아침에 드시기 좋아요."
    assert degeneration(fine, language="ko") == []


def test_a_looping_sentence_is_cut_after_its_first_time():
    loop = "I'm sorry for any misunderstanding. " * 5
    assert "repeated_phrase" in degeneration(loop)
    assert cut_repetition(loop) == "I'm sorry for any misunderstanding."
    glued = "먹고 싶어요먹고 싶어요 먹고 싶어요 먹고싶어요"
    assert cut_repetition(glued) == "먹고 싶어요"


def test_english_function_words_alone_are_no_echo():
    note = ["Memento answers User in a few plain sentences."]
    assert find_leak("Sure, I'll be back in a few minutes.", note) is None
    leak = find_leak("Okay. You can use memento in a few plain sentences.", note, language="en")
    assert leak is not None and leak.start == len("Okay. ")


def test_an_empty_reply_is_tried_again_and_any_words_beat_an_empty_cut():
    rules = ReplyRules(instructions=[NOTE], language="ko")
    assert settle("", rules, lambda attempt: "응, 알겠어!").text == "응, 알겠어!"
    echo_only = "[System note: " + NOTE + "]"
    looping = "응, 아빠, 아빠, 아빠, 아빠!"
    out = settle(echo_only, rules, lambda attempt: looping, max_retries=1)
    assert out.text == "응, 아빠" and out.metadata["repetition_cut"]
