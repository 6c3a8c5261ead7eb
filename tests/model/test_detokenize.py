"""model.detokenize: streaming decode never emits half a character and adds up to decode(all ids)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.detokenize import StreamDecoder
from model.tokenizer import Tokenizer
from tests.model.test_tokenizer import real_tokenizer, tiny_gemma, tiny_tokenizer, write_tiktoken_file

KOREAN = "안녕! 오늘 뭐 해? 밥은 먹었어? 안녕하세요, 식사는 하셨어요? 🎉👩‍👩‍👧 𝄞 끝."


def stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    """Every push's output, then the flush."""
    dec = tok.stream_decoder()
    return [dec.push(i) for i in ids] + [dec.flush()]


def _tiktoken(tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("tiktoken") / "tokenizer.model"
    write_tiktoken_file(path)
    return Tokenizer.from_tiktoken(path)


@pytest.fixture(scope="module", params=["byte_level", "byte_fallback", "tiktoken"])
def tok(request, tmp_path_factory):
    if request.param == "byte_level":
        return tiny_tokenizer()
    if request.param == "byte_fallback":
        return tiny_gemma()
    return _tiktoken(tmp_path_factory)


def test_partial_syllable_is_held_back(tok):
    ids = tok.encode("가나")
    assert len(ids) == 6  # the tiny vocabularies split these syllables into byte pieces
    dec = tok.stream_decoder()
    out = [dec.push(i) for i in ids]
    assert all("\ufffd" not in piece for piece in out)
    assert out == ["", "", "가", "", "", "나"]  # each syllable appears exactly when complete
    assert dec.flush() == "" and dec.pending == 0


def test_stream_equals_decode_on_mixed_text(tok):
    ids = tok.encode(KOREAN)
    pieces = stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == KOREAN
    assert not any("\ufffd" in p for p in pieces)


def test_flush_releases_an_incomplete_tail(tok):
    ids = tok.encode("가나")
    dec = tok.stream_decoder()
    got = "".join(dec.push(i) for i in ids[:-1])  # last byte piece of "나" missing
    assert got == "가" and dec.pending >= 1
    assert dec.flush() == tok.decode(ids[:-1])[1:]  # "\ufffd"s, as decode() gives them
    assert "".join(dec.push(i) for i in tok.encode("가")) == "가"  # a flushed decoder starts over


def test_special_tokens_are_skipped_in_stream():
    tok = tiny_tokenizer()
    ids = tok.encode("hi") + [2] + tok.encode("안")
    assert "".join(stream(tok, ids)) == "hi안" == tok.decode(ids)
    dec = tok.stream_decoder(skip_special_tokens=False)
    assert "".join([dec.push(i) for i in ids] + [dec.flush()]) == "hi<|im_end|>안"


@settings(max_examples=150, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("안녕하세요반말존댓 helo\n🎉é𝄞") + ["\u200d"]), max_size=40))
def test_property_stream_equals_decode_for_random_text(text):
    for tok in (tiny_tokenizer(), tiny_gemma()):
        ids = tok.encode(text)
        assert "".join(stream(tok, ids)) == tok.decode(ids) == text


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_property_stream_equals_decode_for_random_ids(data):
    # arbitrary ids include invalid UTF-8 (lone continuation bytes, truncated sequences)
    for tok in (tiny_tokenizer(), tiny_gemma()):
        ids = data.draw(st.lists(st.integers(0, tok.vocab_size - 1), max_size=30))
        assert "".join(stream(tok, ids)) == tok.decode(ids)


def test_random_flush_points_join_to_decode():
    # the engine may flush at a stop string and start a new decoder: each part is decode(part)
    tok, rng = tiny_tokenizer(), random.Random(0)
    ids = tok.encode(KOREAN * 3)
    for _ in range(20):
        cut = rng.randrange(len(ids))
        for part in (ids[:cut], ids[cut:]):
            assert "".join(stream(tok, part)) == tok.decode(part)


def test_decoder_works_with_any_decode_function():
    dec = StreamDecoder(lambda ids: bytes(ids).decode("utf-8", errors="replace"))
    assert [dec.push(b) for b in "é!".encode()] == ["", "é", "!"]


# ---------------------------------------------------------------------------------------------------
# slow: the real tokenizers


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_real_korean_stream(name):
    tok = real_tokenizer(name)
    text = KOREAN + " 저는 학생입니다. 너 어디야? 뷁 쀍 똠양꿍 \U000e0001"  # rare syllables: byte pieces
    ids = tok.encode(text)
    pieces = stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    assert sum(1 for i in ids if "\ufffd" in tok.vocab_texts()[i]) > 0  # some tokens really are partial


@pytest.mark.slow
def test_gemma_byte_fallback_tokens_stream():
    tok = real_tokenizer("gemma3")
    ids = tok.encode("\U000e0001")  # a tag character with no piece: four <0xNN> tokens
    assert [tok.id_to_token(i) for i in ids] == ["<0xF3>", "<0xA0>", "<0x80>", "<0x81>"]
    assert stream(tok, ids) == ["", "", "", "\U000e0001", ""]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_real_random_ids_stream_equals_decode(name):
    tok, rng = real_tokenizer(name), random.Random(1)
    for _ in range(200):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 12))]
        assert "".join(stream(tok, ids)) == tok.decode(ids)
