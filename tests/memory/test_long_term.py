"""long_term memory: hybrid retrieval, facts that supersede, core blocks; real stores, real Chroma, real USE."""

from __future__ import annotations

import chromadb
import pytest

from memory.blocks import CoreMemory, fact_edits
from memory.context import build_context
from memory.embeddings import get_embedder
from memory.facts import FactBook, FactNotFound, extract, subject_of
from memory.hybrid import BM25, Candidate, dedupe, fuse, hybrid_rank, terms
from memory.strategies import StrategyDeps, build_strategy
from memory.strategies.long_term import PAST_LABEL
from memory.vector_store import VectorMemory, chroma_settings
from tests.memory.strategy_helpers import WordCounter, fill, make_session, msg

PERSONA = [{"role": "system", "content": "You are Memo."}]


@pytest.fixture(scope="module")
def vm(tmp_path_factory):
    client = chromadb.PersistentClient(path=str(tmp_path_factory.mktemp("chroma")), settings=chroma_settings())
    return VectorMemory(client, get_embedder("use-multilingual-v3"))


def long_term(store, vm=None, editor=None, **params):
    config = {"strategy": "long_term", "k": 3, "turns": 2, **params}
    return build_strategy(config, StrategyDeps(store=store, counter=WordCounter(), vector=vm, block_editor=editor))


def context_text(strategy, store, session, question: str) -> str:
    view = strategy.view(session, store.list_messages(session.id), question)
    ctx = build_context(PERSONA, None, view, question, WordCounter(), 4096, 256, "long_term")
    return "\n".join(m["content"] for m in ctx.messages)


def run_turns(strategy, store, session, texts: dict[int, str], turns: int, lang: str = "en") -> None:
    for i in range(turns):
        fill(store, session, 1, plant={i: texts[i]} if i in texts else None, lang=lang, start=i)
        strategy.after_turn(session, store.list_messages(session.id))


# ---------------------------------------------------------------- lexical terms, BM25, fusion


def test_terms_are_kiwi_morphemes_for_korean_and_stemmed_words_otherwise():
    assert {"가족", "대전", "이사"} <= set(terms("우리 가족은 작년에 대전으로 이사했어"))
    assert "이사" in terms("이사를 갔어요")  # a different ending, the same content morpheme
    assert terms("We moved to Daejeon") == ["mov", "daejeon"]
    assert terms("moving") == terms("moves") == ["mov"]


def test_bm25_prefers_rare_matching_terms_and_fusion_adds_ranks():
    docs = [terms(t) for t in ["the park run", "my dog Biscuit", "rainy week", "dog food prices"]]
    bm = BM25(docs)
    assert bm.rank(terms("what is my dog Biscuit like"), 2) == [1, 3]
    assert fuse({"a": ["x", "y"], "b": ["y", "z"]}, {"a": 1, "b": 1}) == ["y", "x", "z"]


def test_near_copies_of_one_line_collapse_so_the_answer_gets_a_place():
    """A line said every turn ("... (17)") must not fill the top-n ahead of the one statement that answers."""
    cands = [Candidate(f"r{i}", "", f"I went for a run this morning around the park. ({i})", i) for i in range(30)]
    cands += [Candidate("dog", "", "My dog is called Biscuit.", 40), Candidate("rex", "", "My dog is called Rex.", 41)]
    dense = [f"r{i}" for i in range(30)] + ["dog", "rex"]  # every copy ranked above the answer
    assert set(hybrid_rank("my pet", cands, dense, 3)) == {"r0", "dog", "rex"}  # two dogs: different facts
    assert hybrid_rank("my pet", cands, dense, 3, near_duplicates=False) == ["r0", "r1", "r2"]
    by_key = {c.key: c for c in cands}
    assert dedupe(["r3", "r17", "dog"], by_key) == ["r3", "dog"] and dedupe(["r3", "r17"], by_key, near=False) == ["r3", "r17"]


def test_paraphrase_track_questions_share_no_content_term_with_their_lines():
    from memory.bench_tracks import PARAPHRASE_EN, PARAPHRASE_KO

    for lines in (PARAPHRASE_EN, PARAPHRASE_KO):
        assert len(lines) >= 10
        for line, question, key in lines:
            assert not set(terms(line)) & set(terms(question)), (line, question)
            assert key in line and key not in question


def test_recency_breaks_ties_and_duplicates_are_dropped():
    cands = [Candidate(f"k{i}", "I live in Busan", "I live in Busan", i) for i in range(3)]
    cands.append(Candidate("k9", "unrelated words", "unrelated words", 9))
    ranked = hybrid_rank("where do I live", cands, [], 3)
    assert ranked == ["k2"]  # same user text three times: only the best ranked (the newest) is kept
    by_key = {c.key: c for c in cands}
    assert dedupe(["k0", "k1", "k9"], by_key) == ["k0", "k9"]


# ---------------------------------------------------------------- facts


@pytest.mark.parametrize(
    "text, subject",
    [
        ("I live in Busan.", "home"),
        ("We moved to Daejeon last month.", "home"),
        ("My dog is called Biscuit.", "dog"),
        ("My sister Alice lives in Lisbon now.", "sister alice home"),
        ("나는 부산에 살아", "home"),
        ("우리 가족은 대전으로 이사했어", "home"),
        ("우리 강아지 이름은 콩이야", "강아지 이름"),
        ("What is my dog called?", None),
        ("I went for a run this morning.", None),
    ],
)
def test_subjects(text, subject):
    assert subject_of(text) == subject


def test_a_new_fact_supersedes_the_old_one_which_is_kept_as_past(store):
    session = make_session(store)
    book = FactBook(store)
    fill(store, session, 3, plant={0: "I live in Busan.", 2: "We moved to Daejeon."})
    book.update(session, store.list_messages(session.id))
    facts = book.list_facts(session.owner)
    [now] = [f for f in facts if f.current]
    [past] = [f for f in facts if not f.current]
    assert now.text == "We moved to Daejeon." and past.text == "I live in Busan."
    assert past.valid_to == now.valid_from and past.superseded_by == now.id
    assert book.update(session, store.list_messages(session.id)) == 0  # watermark: nothing twice


def test_facts_keep_the_language_they_were_said_in(store):
    session = make_session(store)
    fill(store, session, 1, plant={0: "우리 강아지 이름은 콩이야"}, lang="ko")
    FactBook(store).update(session, store.list_messages(session.id))
    [fact] = FactBook(store).list_facts(session.owner)
    assert fact.text == "우리 강아지 이름은 콩이야" and fact.lang == "ko"


def test_user_scope_newest_session_wins_and_correct_and_delete(store):
    book = FactBook(store)
    a, b = make_session(store), make_session(store)
    fill(store, a, 1, plant={0: "I live in Busan."})
    book.update(a, store.list_messages(a.id))
    fill(store, b, 1, plant={0: "I live in Daejeon."})
    book.update(b, store.list_messages(b.id))
    facts = book.list_facts("alice")
    assert [f.text for f in facts if f.current] == ["I live in Daejeon."]
    current = next(f for f in facts if f.current)
    fixed = book.correct("alice", current.id, "I live in Daejeon, Yuseong-gu.", at="2099-01-01T00:00:00Z")
    texts = {f.text: f for f in book.list_facts("alice")}
    assert texts["I live in Daejeon, Yuseong-gu."].current and fixed.origin == "user"
    assert not texts["I live in Daejeon."].current  # corrected, kept as past
    book.delete("alice", fixed.id)
    assert "I live in Daejeon, Yuseong-gu." not in {f.text for f in book.list_facts("alice")}
    with pytest.raises(FactNotFound):
        book.delete("bob", current.id)  # another owner's fact is not found


# ---------------------------------------------------------------- the strategy end to end


def test_current_fact_shown_first_and_stale_exchange_labelled_past(store, vm):
    session = make_session(store, memory={"strategy": "long_term"})
    strategy = long_term(store, vm)
    run_turns(strategy, store, session, {2: "I live in Busan.", 30: "We moved to Daejeon last month."}, 40)
    text = context_text(strategy, store, session, "Where do I live these days?")
    assert "We moved to Daejeon last month." in text
    assert text.index("Daejeon") < text.index("Busan")  # current first
    assert "PAST, until" in text  # the old fact is labelled as past
    view = strategy.view(session, store.list_messages(session.id), "Busan")
    stale = [m.content for ex in view.retrieved for m in ex if "Busan" in m.content]
    assert stale and all(c.startswith(PAST_LABEL) for c in stale)


def test_paraphrase_found_by_dense_and_korean_by_morphemes(store, vm):
    session = make_session(store)
    strategy = long_term(store, vm, max_facts=0)
    plant = {3: "어제 우리 집 고양이가 새끼를 다섯 마리 낳았어"}
    run_turns(strategy, store, session, plant, 25, lang="ko")
    assert "고양이" in context_text(strategy, store, session, "새끼 고양이는 몇 마리였지?")  # shared morphemes


def test_without_vector_memory_bm25_still_retrieves(store):
    session = make_session(store)
    strategy = long_term(store, None, max_facts=0)
    run_turns(strategy, store, session, {1: "The vet said Biscuit needs a new collar."}, 15)
    view = strategy.view(session, store.list_messages(session.id), "What did the vet say about Biscuit?")
    assert "collar" in " ".join(m.content for ex in view.retrieved for m in ex)
    assert any("vector memory is not configured" in w for w in view.warnings)


# ---------------------------------------------------------------- core blocks


def test_blocks_validate_every_edit_and_keep_history(store):
    session = make_session(store)
    core = CoreMemory(store, WordCounter())
    core.put(session.id, "user", "Name: Ada", message_id=None, source="user")
    applied, rejected = core.apply(session.id, [
        {"label": "user", "op": "append", "text": "Lives in Busan"},
        {"label": "user", "op": "append", "text": "Lives in Busan"},  # duplicate
        {"label": "nope", "op": "append", "text": "x"},  # unknown block
        {"label": "user", "op": "replace", "old": "Lives in Seoul", "text": "y"},  # no such line
        {"label": "user", "op": "append", "text": "word " * 300},  # over the limit
        {"label": "user", "op": "append", "text": "My wife is Sora. My wife is Sora."},  # repeats itself
        {"label": "user", "op": "replace", "old": "Lives in Busan", "text": "Lives in Daejeon"},
    ], message_id="msg_7", source="model")
    assert len(applied) == 2 and len(rejected) == 5
    assert core.get(session.id, "user").value == "Name: Ada\nLives in Daejeon"
    history = core.history(session.id, "user")
    assert [h["message_id"] for h in history] == [None, "msg_7", "msg_7"]
    assert history[-1]["old_value"] == "Name: Ada\nLives in Busan"


def test_block_limit_is_enforced_on_put(store):
    session = make_session(store)
    core = CoreMemory(store, WordCounter())
    from memory.blocks import BlockError

    with pytest.raises(BlockError, match="over the block's limit_tokens=5"):
        core.put(session.id, "user", "one two three four five six", limit_tokens=5)
    with pytest.raises(BlockError, match="label"):
        core.put(session.id, "Bad Label!", "x")


def test_facts_feed_the_user_block_and_a_change_replaces_the_line(store):
    session = make_session(store)
    strategy = long_term(store, None)
    run_turns(strategy, store, session, {0: "My name is Ada.", 1: "I live in Busan.", 5: "We moved to Daejeon."}, 8)
    user = CoreMemory(store, WordCounter()).get(session.id, "user").value
    assert user.splitlines() == ["My name is Ada.", "We moved to Daejeon."]
    assert "[Core memory: user]" in context_text(strategy, store, session, "hi")


def test_model_proposed_edits_are_applied_only_when_valid_and_once_per_exchange(store):
    calls = []

    def editor(blocks, exchange):
        calls.append(exchange[0].content)
        return [{"label": "relationship", "op": "append", "text": f"We talked: {exchange[0].content}"},
                {"label": "ghost", "op": "append", "text": "rejected"},
                {"label": "user", "op": "append", "text": "I'm a software engineer from London."}]  # never said

    session = make_session(store)
    strategy = long_term(store, None, editor=editor)
    run_turns(strategy, store, session, {}, 3)
    strategy.after_turn(session, store.list_messages(session.id))  # again: same exchange, no new call
    assert len(calls) == 3
    rel = CoreMemory(store, WordCounter()).get(session.id, "relationship").value
    assert len(rel.splitlines()) == 3 and "ghost" not in rel
    assert "software engineer" not in CoreMemory(store, WordCounter()).texts(session.id).get("user", "")
    stats = CoreMemory(store, WordCounter()).stats(session.id)["by_source"]["model"]
    assert stats == {"proposed": 9, "applied": 3, "rejected": 6}
    hist = CoreMemory(store, WordCounter()).history(session.id, "relationship")
    ids = {m.id for m in store.list_messages(session.id) if m.role == "user"}
    assert all(h["message_id"] in ids and h["source"] == "model" for h in hist)


def test_fact_edits_for_new_and_changed_facts():
    old = extract(msg(1, "user", "I live in Busan."))[0]
    new = extract(msg(3, "user", "We moved to Daejeon."))[0]
    old.valid_to, old.superseded_by = new.valid_from, new.id
    assert fact_edits({"user": "I live in Busan."}, [new], [old, new]) == [
        {"label": "user", "op": "replace", "old": "I live in Busan.", "text": "We moved to Daejeon."}]
    assert fact_edits({}, [new], [new]) == [{"label": "user", "op": "append", "text": "We moved to Daejeon."}]
