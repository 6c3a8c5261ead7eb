"""Tokenizers for Memento's models: GGUF metadata, Hugging Face directories, Meta's tiktoken files.

    tok = Tokenizer.from_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    tok.encode("안녕, <|im_start|> is just text here")     # plain text, no BOS
    tok.apply_chat_template([{"role": "user", "content": "hi"}])  # ids, template markers special

GGUF files carry no tokenizer.json, only the vocabulary (+ merges or scores) as metadata; we rebuild
the same `tokenizers` pipeline transformers builds from them (`AutoTokenizer.from_pretrained(dir,
gguf_file=...)`), so ids agree with it:
  * `gpt2`: byte-level BPE, pre-tokenizer regex chosen by `tokenizer.ggml.pre`;
  * `llama` (SentencePiece, e.g. Gemma 3): BPE with byte fallback, merges recovered from the vocabulary.
Special-token strings in user text are never special: encode() tokenizes them as plain text, and
apply_chat_template() recognises specials only in the text the template itself wrote.
"""

from __future__ import annotations

import base64
import copy
import json
import logging
import re
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from model import chat_template as ct
from model.detokenize import StreamDecoder

log = logging.getLogger(__name__)


class TokenizerError(ValueError):
    """A tokenizer file is missing, malformed or of an unsupported kind."""


# Tokens that end an assistant turn in the chat formats we know; added to eos_ids when special.
TURN_END_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|eom_id|>", "<|endoftext|>",
                   "<|end_of_text|>", "<eos>", "</s>")


RUN_CACHE_SIZE = 20_000  # cached template runs ("user\n" + content); ~ a few MB
RUN_CACHE_MAX_CHARS = 20_000


class SpecialMatcher:
    """Leftmost-longest exact matching of special-token strings (what `tokenizers` does for added tokens).

    Gemma has 6k specials, so instead of one huge alternation we jump between occurrences of their
    first characters and try each distinct length, longest first.
    """

    def __init__(self, specials: dict[str, int]):
        self.ids = dict(specials)
        first_chars = sorted({s[0] for s in specials if s})
        # a class that matches nothing when there are no specials
        self._candidate = re.compile("[" + "".join(re.escape(c) for c in first_chars) + "]" if first_chars else "(?!)")
        self.lengths = sorted({len(s) for s in specials if s}, reverse=True)

    def find(self, text: str, start: int = 0) -> Iterable[tuple[int, int, int]]:
        """Yield (start, end, id) of non-overlapping specials in `text`, left to right."""
        n = len(text)
        m = self._candidate.search(text, start)
        while m is not None:
            i = m.start()
            for length in self.lengths:
                tid = self.ids.get(text[i:i + length]) if i + length <= n else None
                if tid is not None:
                    yield i, i + length, tid
                    i += length
                    break
            else:
                i += 1
            m = self._candidate.search(text, i)

    def contains_any(self, text: str) -> bool:
        return next(iter(self.find(text)), None) is not None


class Tokenizer:
    """One model's tokenizer: plain-text encode/decode, chat templates, streaming decode."""

    def __init__(self, backend: Any, *, specials: dict[str, int], bos_id: int | None, eos_ids: Iterable[int],
                 chat_template: str | None, template_vars: dict[str, Any] | None = None,
                 add_bos_token: bool = False, name: str = "", tool_template: str | None = None):
        self._backend = backend  # _HFBackend or _TiktokenBackend
        self.specials = SpecialMatcher(specials)
        self.bos_id = bos_id
        self.eos_ids: set[int] = set(eos_ids)
        self.add_bos_token = add_bos_token  # what the checkpoint says for raw prompts (chat templates add their own)
        self.chat_template = chat_template
        # a checkpoint's separate "tool_use" template (Hermes 2 Pro, Command R), used when tools are
        # given, as transformers picks it
        self.tool_template = tool_template
        self.template_vars = dict(template_vars or {})  # bos_token, eos_token, ... as the template sees them
        self.name = name
        self._run_cache: dict[str, list[int]] = {}  # template run text -> ids (see _encode_runs)

    def __copy__(self) -> Tokenizer:
        """Shares the (read-only) backend; the mutable attributes are the copy's own."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.eos_ids, new.template_vars, new._run_cache = set(self.eos_ids), dict(self.template_vars), {}
        return new

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_gguf(cls, path: str | Path, metadata: dict[str, Any] | None = None) -> Tokenizer:
        """Rebuild the tokenizer described by a GGUF file's `tokenizer.*` metadata.

        `metadata` is the file's own metadata if the caller has already read it (model.gguf_meta).

        Building Gemma's 262k-token vocabulary takes seconds, so a file seen before in this process
        (same path, size and mtime) gets a copy sharing the already built backend.
        """
        path = Path(path)
        key = _file_key(path)
        if key is not None and key in _GGUF_CACHE:
            return copy.copy(_GGUF_CACHE[key])
        if metadata is None:
            metadata = _read_gguf_metadata(path)
        tok = _build_from_gguf(cls, metadata, source=path.name)
        if key is not None:
            _GGUF_CACHE[key] = tok
            tok = copy.copy(tok)
        return tok

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json + tokenizer_config.json (+ chat_template.jinja) from a HF model directory."""
        return _build_from_hf_dir(cls, Path(path))

    @classmethod
    def from_tiktoken(cls, model_path: str | Path, special_tokens: dict[str, int] | None = None,
                      pattern: str | None = None) -> Tokenizer:
        """Meta's Llama 3 `tokenizer.model` (base64 token + rank per line), via tiktoken."""
        return _build_tiktoken(cls, Path(model_path), special_tokens, pattern)

    # -- plain text -------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of `text` as plain text: no BOS, special-token strings are not special."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        return self._backend.encode_plain(text) if text else []

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; control tokens (<|im_end|>, <eos>...) are left out unless asked for."""
        return self._backend.decode(list(ids), skip_special_tokens)

    def count(self, text: str) -> int:
        return len(self.encode(text))

    @property
    def vocab_size(self) -> int:
        return self._backend.vocab_size

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (b"" for control tokens)."""
        return self._backend.token_bytes(token_id)

    def id_to_token(self, token_id: int) -> str | None:
        """The token's spelling in the vocabulary (e.g. "Ġhello", "▁hello", "<0xEA>")."""
        return self._backend.id_to_token(token_id)

    def vocab_texts(self) -> list[str]:
        """Text each token decodes to on its own ("" for control tokens; partial UTF-8 -> U+FFFD). Cached."""
        return self._vocab_texts

    @cached_property
    def _vocab_texts(self) -> list[str]:
        return self._backend.decode_each(range(self.vocab_size))

    def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
        return StreamDecoder(lambda ids: self.decode(ids, skip_special_tokens))

    # -- chat -------------------------------------------------------------------------------------
    def _template(self, tools: list[dict[str, Any]] | None = None) -> str:
        if tools and self.tool_template:
            return self.tool_template
        if self.chat_template:
            return self.chat_template
        raise ct.ChatTemplateError(
            f"tokenizer {self.name or '?'} has no chat template and its vocabulary has no known turn markers "
            "(Gemma, ChatML, Llama 3); set Tokenizer.chat_template to a Jinja template or use raw prompts")

    @property
    def has_tools_template(self) -> bool:
        """Whether the chat template describes `tools` itself (else callers put them in a prompt)."""
        return any(t and ct.has_tools_section(t) for t in (self.tool_template, self.chat_template))

    def render_chat(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None) -> str:
        """The prompt text the model's chat template produces (what transformers renders)."""
        return ct.render(self._template(tools), messages, add_generation_prompt=add_generation_prompt,
                         variables=self.template_vars, tools=tools)

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Prompt ids: specials written by the template are special; message content is plain text.

        Normal messages give exactly transformers' ids (the rendered text is split at specials and the
        pieces encoded whole, as `tokenizers` does). When content itself contains special-token text,
        specials are recognised only outside the located content spans. `tools` goes to the template
        (transformers' `tools=`); tool-call arguments are client or model text, so specials in them
        are defused, as content is where it cannot be located.
        """
        template = self._template(tools)
        msgs = [self._defuse_calls(m) for m in ct.check_messages(messages)]
        if not any(self.specials.contains_any(m["content"]) for m in msgs):
            text = self.render_chat(msgs, add_generation_prompt, tools)
            return self._encode_with_specials(text, [])
        located = ct.locate_contents(template, msgs, add_generation_prompt=add_generation_prompt,
                                     variables=self.template_vars, tools=tools)
        if located is not None:
            return self._encode_with_specials(located.text, located.content_spans)
        # Content can't be located (template rewrites it): break special strings inside the content.
        log.warning("chat template rewrites message content; defusing special-token text in messages")
        safe = [dict(m, content=self._defuse(m["content"])) for m in msgs]
        return self._encode_with_specials(self.render_chat(safe, add_generation_prompt, tools), [])

    def _defuse_calls(self, message: dict[str, Any]) -> dict[str, Any]:
        """`tool_calls` with special-token text in their strings broken (the template writes them raw)."""
        calls = message.get("tool_calls")
        if not calls or not self.specials.contains_any(json.dumps(calls, ensure_ascii=False)):
            return message
        return dict(message, tool_calls=_map_strings(calls, self._defuse))

    def _encode_runs(self, texts: list[str]) -> list[list[int]]:
        """Encode many runs; cached per run, since callers re-count a growing chat turn after turn."""
        out: list[list[int] | None] = [self._run_cache.get(t) for t in texts]
        missing = [t for t, ids in zip(texts, out, strict=True) if ids is None]
        fresh = dict(zip(missing, self._backend.encode_plain_batch(missing), strict=True)) if missing else {}
        if len(self._run_cache) + len(fresh) > RUN_CACHE_SIZE:
            self._run_cache = {}  # crude but thread-safe reset; a chat's runs refill it at once
        self._run_cache.update((t, ids) for t, ids in fresh.items() if len(t) <= RUN_CACHE_MAX_CHARS)
        return [ids if ids is not None else fresh[t] for t, ids in zip(texts, out, strict=True)]

    def count_messages(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                       tools: list[dict[str, Any]] | None = None) -> int:
        return len(self.apply_chat_template(messages, add_generation_prompt, tools))

    def _defuse(self, text: str) -> str:
        out, pos = [], 0
        for start, end, _ in self.specials.find(text):
            out += [text[pos:start], text[start], "\u200b", text[start + 1:end]]
            pos = end
        return "".join(out) + text[pos:]

    def _encode_with_specials(self, text: str, plain_spans: list[tuple[int, int]]) -> list[int]:
        """Encode `text`, turning specials into their ids except those overlapping `plain_spans`."""
        texts: list[str] = []  # plain runs between the specials we keep
        special_ids: list[int] = []
        pos = 0
        for start, end, tid in self.specials.find(text):
            if any(s < end and start < e for s, e in plain_spans):
                continue
            texts.append(text[pos:start])
            special_ids.append(tid)
            pos = end
        texts.append(text[pos:])
        encoded = self._encode_runs(texts)
        ids: list[int] = []
        for run, tid in zip(encoded, special_ids + [None], strict=True):
            ids += run
            if tid is not None:
                ids.append(tid)
        return ids


# -- backends -------------------------------------------------------------------------------------
class _HFBackend:
    """A `tokenizers.Tokenizer`; its added special tokens are never matched in plain text."""

    def __init__(self, tk: Any, kind: str, bytes_decode: bool = False):
        tk.encode_special_tokens = True  # plain text: "<|im_start|>" is just characters
        self.tk = tk
        self.kind = kind  # "byte_level" | "sentencepiece" | "other": how token spellings map to bytes
        # `tokenizers`' ByteFallback turns a whole run of byte tokens into U+FFFDs when any byte in it
        # is bad, losing good characters too; joining token bytes keeps them (and streams consistently).
        self.bytes_decode = bytes_decode
        added = tk.get_added_tokens_decoder()
        self.special_ids = {i for i, t in added.items() if t.special}
        self.special_text = {i: added[i].content for i in self.special_ids}

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode_plain(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_plain_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tk.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        if not self.bytes_decode:
            return self.tk.decode(ids, skip_special_tokens=skip_special_tokens)
        parts = [self.special_text[i].encode() if i in self.special_text and not skip_special_tokens
                 else self.token_bytes(i) for i in ids]
        return b"".join(parts).decode("utf-8", errors="replace")

    def decode_each(self, ids: Iterable[int]) -> list[str]:
        if self.bytes_decode:
            return [self.token_bytes(i).decode("utf-8", errors="replace") for i in ids]
        return self.tk.decode_batch([[i] for i in ids], skip_special_tokens=True)

    def id_to_token(self, token_id: int) -> str | None:
        return self.tk.id_to_token(token_id)

    def token_bytes(self, token_id: int) -> bytes:
        piece = self.tk.id_to_token(token_id)
        if piece is None or token_id in self.special_ids:
            return b""
        if self.kind == "byte_level":
            table = _byte_decoder()
            if all(c in table for c in piece):
                return bytes(table[c] for c in piece)
        if self.kind == "sentencepiece":
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                return bytes([int(piece[3:5], 16)])
            return piece.replace("\u2581", " ").encode("utf-8")
        return self.tk.decode([token_id], skip_special_tokens=False).encode("utf-8")


class _TiktokenBackend:
    def __init__(self, enc: Any):
        self.enc = enc
        self.special_ids = set(enc._special_tokens.values())

    @property
    def vocab_size(self) -> int:
        return self.enc.n_vocab

    def encode_plain(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def encode_plain_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.enc.encode_ordinary(t) for t in texts]

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special_ids]
        return self.enc.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_each(self, ids: Iterable[int]) -> list[str]:
        return [self.token_bytes(i).decode("utf-8", errors="replace") for i in ids]

    def id_to_token(self, token_id: int) -> str | None:
        try:
            return self.enc.decode_single_token_bytes(token_id).decode("utf-8", errors="replace")
        except KeyError:
            return None

    def token_bytes(self, token_id: int) -> bytes:
        if token_id in self.special_ids:
            return b""
        try:
            return self.enc.decode_single_token_bytes(token_id)
        except KeyError:
            return b""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used to spell byte-level BPE tokens."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_DECODER: dict[str, int] | None = None


def _byte_decoder() -> dict[str, int]:
    global _BYTE_DECODER
    if _BYTE_DECODER is None:
        _BYTE_DECODER = {c: b for b, c in _bytes_to_unicode().items()}
    return _BYTE_DECODER


# -- tiktoken (Meta Llama 3 tokenizer.model) ----------------------------------------------------------
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_NUM_RESERVED_SPECIAL = 256


def llama3_special_tokens(n_base: int) -> dict[str, int]:
    """Llama 3.1's 256 special tokens, numbered after the `n_base` ordinary ones."""
    named = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
             "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
             "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
    reserved = [f"<|reserved_special_token_{2 + i}|>" for i in range(LLAMA3_NUM_RESERVED_SPECIAL - len(named))]
    return {tok: n_base + i for i, tok in enumerate(named + reserved)}


def load_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """Parse `base64-token rank` lines; a clear error names the bad line."""
    if not path.is_file():
        raise TokenizerError(f"tiktoken model file not found: {path}")
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(path.read_text(encoding="ascii", errors="strict").splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as e:
            raise TokenizerError(f"{path}:{lineno}: expected '<base64 token> <rank>', got {line[:60]!r}") from e
    if not ranks:
        raise TokenizerError(f"{path}: no tokens in tiktoken model file")
    return ranks


def _build_tiktoken(cls: type[Tokenizer], path: Path, special_tokens: dict[str, int] | None,
                    pattern: str | None) -> Tokenizer:
    import tiktoken

    ranks = load_tiktoken_ranks(path)
    specials = special_tokens if special_tokens is not None else llama3_special_tokens(len(ranks))
    enc = tiktoken.Encoding(name=path.stem, pat_str=pattern or LLAMA3_PATTERN, mergeable_ranks=ranks,
                            special_tokens=specials)
    bos = specials.get("<|begin_of_text|>")
    eos = [specials[t] for t in TURN_END_TOKENS if t in specials]
    names = {v: k for k, v in specials.items()}
    variables = {"bos_token": names.get(bos, ""), "eos_token": "<|end_of_text|>" if "<|end_of_text|>" in specials else ""}
    return cls(_TiktokenBackend(enc), specials=specials, bos_id=bos, eos_ids=eos,
               chat_template=ct.builtin_template_for(specials), template_vars=variables,
               add_bos_token=bos is not None, name=path.name)


# -- GGUF ---------------------------------------------------------------------------------------------
# GGUF token types (llama.cpp): 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
TOKEN_CONTROL, TOKEN_USER_DEFINED = 3, 4

_LLAMA3_SPLIT = LLAMA3_PATTERN
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# `tokenizer.ggml.pre` -> split regex applied before the byte-level mapping (as transformers maps them);
# anything else gets GPT-2's own regex.
GGUF_PRE_SPLITS = {
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx", "pixtral"], _LLAMA3_SPLIT),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "megrez"], _QWEN2_SPLIT),
}
GEMMA_ARCHS = {"gemma", "gemma2", "gemma3"}


_GGUF_CACHE: dict[tuple[str, int, int], Tokenizer] = {}


def _file_key(path: Path) -> tuple[str, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def _read_gguf_metadata(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise TokenizerError(f"GGUF file not found: {path}")
    try:
        from model.gguf_meta import read_metadata
    except ImportError:  # the shared fast reader is not there: slower gguf package reader
        import gguf

        reader = gguf.GGUFReader(str(path))
        return {k: f.contents() for k, f in reader.fields.items()}
    return read_metadata(path)


def _as_list(value: Any) -> list:
    """Metadata arrays as plain lists (a reader may hand back numpy arrays); None -> []."""
    return [] if value is None else [v.item() if hasattr(v, "item") else v for v in value]


def _build_from_gguf(cls: type[Tokenizer], meta: dict[str, Any], source: str) -> Tokenizer:
    from tokenizers import AddedToken

    kind, tokens = meta.get("tokenizer.ggml.model"), _as_list(meta.get("tokenizer.ggml.tokens"))
    if not tokens:
        raise TokenizerError(f"{source}: GGUF metadata has no tokenizer.ggml.tokens; this file has no tokenizer, "
                             "load one with Tokenizer.from_hf_dir()")
    types = _as_list(meta.get("tokenizer.ggml.token_type")) or [1] * len(tokens)
    if len(types) != len(tokens):
        raise TokenizerError(f"{source}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    arch = meta.get("general.architecture", "")
    if kind == "gpt2":
        tk = _byte_level_bpe(tokens, _as_list(meta.get("tokenizer.ggml.merges")), meta.get("tokenizer.ggml.pre"))
        alphabet = set(_bytes_to_unicode().values())
        backend_kind = "byte_level"
    elif kind == "llama":
        tk = _sentencepiece_bpe(tokens, _as_list(meta.get("tokenizer.ggml.scores")) or None, arch,
                                bool(meta.get("tokenizer.ggml.add_space_prefix", True)), source)
        alphabet = None
        backend_kind = "sentencepiece"
    else:
        raise TokenizerError(f"{source}: unsupported tokenizer.ggml.model {kind!r}; supported: 'gpt2' (byte-level "
                             "BPE) and 'llama' (SentencePiece)")
    # Control tokens become specials; user-defined ones (Gemma's "\n\n", tab runs) are matched whole but
    # are ordinary text. A "control" token spelled outside the byte alphabet is a llama.cpp mislabel.
    control = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types, strict=True)
               if ty == TOKEN_CONTROL and (alphabet is None or set(t) <= alphabet)]
    tk.add_special_tokens(control)
    vocab = tk.get_vocab(with_added_tokens=True)
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types, strict=True)
                   if ty == TOKEN_USER_DEFINED and t in vocab])
    backend = _HFBackend(tk, backend_kind, bytes_decode=arch in GEMMA_ARCHS and kind == "llama")
    specials = {tokens[i]: i for i in backend.special_ids}
    return cls(backend, specials=specials, **_gguf_chat_info(meta, tokens, specials), name=source)


def _gguf_chat_info(meta: dict[str, Any], tokens: list[str], specials: dict[str, int]) -> dict[str, Any]:
    """bos/eos ids, template and template variables from GGUF metadata."""
    def token_at(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    eos_ids = {meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                 "tokenizer.ggml.eom_token_id") if isinstance(meta.get(k), int)}
    eos_ids |= {specials[t] for t in TURN_END_TOKENS if t in specials}
    variables = {name: token_at(key) for name, key in [("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                                                       ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")]}
    template = meta.get("tokenizer.chat_template") or ct.builtin_template_for(specials)
    return {"bos_id": meta.get("tokenizer.ggml.bos_token_id"), "eos_ids": eos_ids, "chat_template": template,
            "tool_template": meta.get("tokenizer.chat_template.tool_use"),  # llama.cpp's name for it
            "template_vars": {k: v for k, v in variables.items() if v is not None},
            "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", meta.get("tokenizer.ggml.model") == "llama"))}


def _byte_level_bpe(tokens: list[str], merges: list[str], pre: str | None) -> Any:
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    # Tokens outside the byte alphabet (rare llama.cpp exports) are re-spelled from their UTF-8 bytes.
    vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ")) for m in merges]
    tk = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, dropout=None, continuing_subword_prefix="",
                                end_of_word_suffix="", fuse_unk=False))
    split = GGUF_PRE_SPLITS.get(pre or "")
    if split is None:
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    return tk


def _sentencepiece_bpe(tokens: list[str], scores: list[float] | None, arch: str, add_space_prefix: bool,
                       source: str) -> Any:
    """SentencePiece BPE as `tokenizers` runs it: byte fallback, merges recovered from the vocabulary."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers

    gemma = arch in GEMMA_ARCHS
    if gemma:
        # Gemma stores whitespace-only tokens as real spaces; the model looks them up as "▁▁".
        tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
        order = {t: -i for i, t in enumerate(tokens)}  # Gemma merges follow vocabulary order, not scores
    elif scores is None:
        raise TokenizerError(f"{source}: SentencePiece GGUF without tokenizer.ggml.scores; cannot order merges")
    else:
        order = dict(zip(tokens, scores, strict=True))
    vocab = {t: i for i, t in enumerate(tokens)}
    tk = HFTokenizer(models.BPE(vocab=vocab, merges=merges_from_vocab(vocab, order), fuse_unk=True,
                                unk_token="<unk>" if "<unk>" in vocab else None, byte_fallback=True, dropout=None))
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if gemma:  # spaces become "▁" and nothing is prepended
        tk.normalizer = normalizers.Replace(" ", "\u2581")
        tk.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    else:  # Llama 2 / Mistral: "▁" prepended to the first word, stripped again when decoding
        prepend = "first" if add_space_prefix else "never"
        tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=prepend, split=False)
        if add_space_prefix:
            steps.append(decoders.Strip(content=" ", left=1, right=0))
    tk.decoder = decoders.Sequence(steps)
    return tk


def merges_from_vocab(vocab: dict[str, int], order: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a vocabulary: every split of a token into two tokens, best token first.

    Ranked by `order` (higher first), then longer left piece, as transformers' `generate_merges`
    does, so the BPE ranks (and the ids) agree with it.
    """
    ranked = []
    for token, score in order.items():
        if len(token) < 2:
            continue
        local = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in vocab and token[k:] in vocab]
        if len(local) > 1:
            local.sort(key=lambda p: (vocab[p[0]], vocab[p[1]]))
        ranked.extend((score, left, right) for left, right in local)
    ranked.sort(key=lambda m: (m[0], len(m[1]), len(m[2])), reverse=True)
    return [(left, right) for _, left, right in ranked]


# -- Hugging Face directory -----------------------------------------------------------------------------
def _map_strings(value: Any, fn: Any) -> Any:
    """`value` (JSON-like) with `fn` applied to every string in it, keys included."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, dict):
        return {fn(k) if isinstance(k, str) else k: _map_strings(v, fn) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_strings(v, fn) for v in value]
    return value


def _token_str(value: Any) -> str | None:
    """tokenizer_config.json writes tokens either as "<s>" or as {"content": "<s>", ...}."""
    return value.get("content") if isinstance(value, dict) else value


def _hf_chat_templates(path: Path, config: dict[str, Any]) -> tuple[str | None, str | None]:
    """(the chat template, the separate "tool_use" one if any), wherever transformers saved them:
    chat_template.jinja (+ additional_chat_templates/<name>.jinja), or tokenizer_config.json's
    "chat_template", a string or [{"name": "default", "template": ...}, {"name": "tool_use", ...}]."""
    jinja_file, extra = path / "chat_template.jinja", path / "additional_chat_templates" / "tool_use.jinja"
    tool_use = extra.read_text(encoding="utf-8") if extra.is_file() else None
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8"), tool_use
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
        tool_use = named.get("tool_use") or tool_use
    return template, tool_use


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}: invalid JSON ({e})") from e


def _build_from_hf_dir(cls: type[Tokenizer], path: Path) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models

    tokenizer_json = path / "tokenizer.json"
    if not tokenizer_json.is_file():
        raise TokenizerError(f"{path}: no tokenizer.json (a 'fast' tokenizer file is required; convert a "
                             "sentencepiece-only checkpoint with transformers first)")
    tk = HFTokenizer.from_file(str(tokenizer_json))
    config = _read_json(path / "tokenizer_config.json")
    if isinstance(tk.decoder, decoders.ByteLevel):
        kind = "byte_level"
    elif isinstance(tk.model, models.BPE) and tk.model.byte_fallback:
        kind = "sentencepiece"
    else:
        kind = "other"
    backend = _HFBackend(tk, kind)
    specials = {t.content: i for i, t in tk.get_added_tokens_decoder().items() if t.special}
    variables = {k: _token_str(config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    variables = {k: v for k, v in variables.items() if isinstance(v, str)}
    bos_id = tk.token_to_id(variables["bos_token"]) if "bos_token" in variables else None
    eos_ids = {specials[t] for t in TURN_END_TOKENS if t in specials}
    if "eos_token" in variables and tk.token_to_id(variables["eos_token"]) is not None:
        eos_ids.add(tk.token_to_id(variables["eos_token"]))
    gen_eos = _read_json(path / "generation_config.json").get("eos_token_id")
    eos_ids |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if isinstance(gen_eos, int) else [])
    template, tool_use = _hf_chat_templates(path, config)
    return cls(backend, specials=specials, bos_id=bos_id, eos_ids=eos_ids,
               chat_template=template or ct.builtin_template_for(specials), tool_template=tool_use,
               template_vars=variables, add_bos_token=bool(config.get("add_bos_token", False)), name=path.name)
