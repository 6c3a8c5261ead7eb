"""Vector memory on a real embedded ChromaDB with the real embedders (USE multilingual, MiniLM)."""

from __future__ import annotations

import socket

import chromadb
import pytest

from memory.embeddings import get_embedder
from memory.sqlite_store import SQLiteStore
from memory.strategies import StrategyDeps, build_strategy
from memory.vector_store import (
    VIEWS,
    ModelMismatch,
    VectorMemory,
    chroma_settings,
    collection_name,
    extra_views,
    indexable_exchanges,
    open_vector_memory,
)
from tests.memory.strategy_helpers import WordCounter, fill, make_session, msg


@pytest.fixture(scope="module")
def chroma(tmp_path_factory):
    """One embedded Chroma per module: starting it costs about a second."""
    return chromadb.PersistentClient(path=str(tmp_path_factory.mktemp("chroma")), settings=chroma_settings())


@pytest.fixture(scope="module")
def use_vm(chroma):
    return VectorMemory(chroma, get_embedder("use-multilingual-v3"))


@pytest.fixture(scope="module")
def minilm_vm(chroma):
    return VectorMemory(chroma, get_embedder("all-minilm-l6-v2"))


@pytest.fixture
def store(tmp_path):
    s = SQLiteStore(tmp_path / "t.db")
    yield s
    s.close()


def vector_strategy(store, vm, **params):
    config = {"strategy": "vector", "k": 3, "turns": 4, **params}
    return build_strategy(config, StrategyDeps(store=store, counter=WordCounter(), vector=vm))


def texts(view) -> str:
    return "\n".join(m.content for ex in view.retrieved for m in ex)


def dead_chroma() -> VectorMemory:
    """A Chroma server URL where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    vm = open_vector_memory("unused", f"http://127.0.0.1:{port}", "use-multilingual-v3")
    vm.retry_after_s = 600  # after one failure, fail fast instead of reconnecting every turn
    return vm


def converse(store, session, strat, turns: int, plant: dict[int, str] | None = None, lang: str = "en"):
    """Append turns, running after_turn after each reply as the service does."""
    for i in range(turns):
        messages = fill(store, session, 1, plant=plant, lang=lang, start=i)
        strat.after_turn(session, messages)
    return store.list_messages(session.id)


def test_embedders_names_dims_and_normalised_vectors():
    for name, dim in (("use-multilingual-v3", 512), ("all-minilm-l6-v2", 384)):
        emb = get_embedder(name)
        assert emb is get_embedder(name)  # loaded once, cached
        [v] = emb.embed(["hello"])
        assert (emb.name, emb.dim, len(v)) == (name, dim, dim)
        assert abs(sum(x * x for x in v) - 1.0) < 1e-3
    with pytest.raises(ValueError, match="MEMENTO_EMBEDDINGS='word2vec'.*use-multilingual-v3"):
        get_embedder("word2vec")


def test_recalls_english_fact_planted_100_turns_earlier(store, minilm_vm):
    session = make_session(store, owner="eng")
    strat = vector_strategy(store, minilm_vm)
    messages = fill(store, session, 101, plant={0: "My sister Alice lives in Lisbon and works as a dentist."})
    strat.after_turn(session, messages)  # indexes all 101 exchanges in batches
    view = strat.view(session, messages, "Where does my sister Alice live?")
    assert "Lisbon" in texts(view)
    assert view.recent == messages[-8:] and view.warnings == []


def test_recalls_korean_fact_planted_100_turns_earlier(store, use_vm):
    session = make_session(store, owner="kor")
    strat = vector_strategy(store, use_vm)
    messages = converse(store, session, strat, 101, plant={0: "우리 강아지 이름은 콩이야"}, lang="ko")
    view = strat.view(session, messages, "강아지 이름이 뭐였지?")
    assert "콩이야" in texts(view)


def test_never_retrieves_another_owners_exchanges(store, use_vm):
    other = make_session(store, owner="mallory")
    converse(store, other, vector_strategy(store, use_vm, scope="user"), 3, plant={1: "우리 고양이 이름은 나비야"}, lang="ko")
    mine = make_session(store, owner="bob")
    strat = vector_strategy(store, use_vm, scope="user")
    messages = converse(store, mine, strat, 6, lang="ko")
    view = strat.view(mine, messages, "고양이 이름이 뭐였지?")
    assert view.retrieved and "나비" not in texts(view)
    assert all(m.session_id == mine.id for ex in view.retrieved for m in ex)


def test_scope_user_recalls_across_own_sessions_scope_session_does_not(store, use_vm):
    first = make_session(store, owner="carol")
    converse(store, first, vector_strategy(store, use_vm), 10, plant={2: "My car is a red Volvo from 1998."})
    second = make_session(store, owner="carol")
    for scope, expected in (("user", True), ("session", False)):
        strat = vector_strategy(store, use_vm, scope=scope, turns=2)
        messages = converse(store, second, strat, 3) if scope == "user" else store.list_messages(second.id)
        view = strat.view(second, messages, "What car do I drive, the Volvo?")
        assert ("Volvo" in texts(view)) is expected, scope


def test_skips_exchanges_already_in_recent_window(store, use_vm):
    session = make_session(store, owner="dave")
    strat = vector_strategy(store, use_vm, k=20, turns=3)
    messages = converse(store, session, strat, 8)
    view = strat.view(session, messages, "anything")
    recent_ids = {m.id for m in view.recent}
    assert len(view.retrieved) == 5  # 8 indexed - 3 in the window
    assert not recent_ids & {m.id for ex in view.retrieved for m in ex}


def test_switching_to_vector_indexes_the_old_transcript_lazily(store, use_vm):
    session = make_session(store, owner="erin", memory={"strategy": "window", "turns": 2})
    messages = fill(store, session, 30, plant={3: "My favourite number is forty-two."})
    strat = vector_strategy(store, use_vm)  # nothing indexed while the session used `window`
    view = strat.view(session, messages, "What is my favourite number?")
    assert "forty-two" in texts(view)


def test_degrades_when_chroma_is_down_and_catches_up_later(store, use_vm):
    session = make_session(store, owner="frank")
    down = vector_strategy(store, dead_chroma())
    messages = converse(store, session, down, 12, plant={1: "My bank PIN hint is the blue elephant."})
    view = down.view(session, messages, "What was my PIN hint?")
    assert view.retrieved == [] and view.recent == messages[-8:]
    assert view.warnings and "vector memory unavailable" in view.warnings[0]
    assert "Could not connect" in view.warnings[0] and "retrying in" in view.warnings[0]
    assert store.get_state(session.id, "vector:use-multilingual-v3") is None  # watermark did not move

    up = vector_strategy(store, use_vm)
    view = up.view(session, messages, "What was my PIN hint?")
    assert "blue elephant" in texts(view) and view.warnings == []


def test_reindex_rebuilds_without_duplicates(store, use_vm):
    session = make_session(store, owner="gina")
    strat = vector_strategy(store, use_vm)
    messages = converse(store, session, strat, 7)
    assert use_vm.count("gina") == 7
    strat.after_turn(session, messages)
    use_vm.index_exchange("gina", session.id, messages[0:2], turn=0)  # upsert, not a duplicate
    assert use_vm.count("gina") == 7
    strat.rebuild(session)
    assert use_vm.count("gina") == 7
    assert store.get_state(session.id, "vector:use-multilingual-v3")["count"] == 14


def test_each_sentence_of_a_message_is_found_and_an_exchange_comes_back_once(store, use_vm):
    """The user's message and each of its sentences are embedded as well as the exchange (the views
    collection, long_term's), so a first topic does not hide a statement; a query there returns each
    exchange once, by its best record; the vector strategy's collection and count hold exchanges only."""
    said = "The weather has been awful and the trains are all late. Also, my sister Alice moved to Lisbon."
    views = extra_views([msg(0, "user", said), msg(1, "assistant", "Oh no!")])
    assert views == [said, said.split(". ")[0] + ".", "Also, my sister Alice moved to Lisbon."]
    assert extra_views([msg(0, "user", "I went for a run. (turn 5)"), msg(1, "assistant", "Nice.")]) == [
        "I went for a run. (turn 5)"]  # a counter is not a sentence
    session = make_session(store, owner="jo")
    strat = vector_strategy(store, use_vm, k=3, turns=1)
    messages = converse(store, session, strat, 12, plant={2: said})
    use_vm.index_exchanges("jo", session.id, indexable_exchanges(messages), VIEWS)
    assert use_vm.count("jo") == 12
    question = "Where does my sister Alice live?"
    hits = use_vm.query("jo", question, k=5, session_id=session.id, kind=VIEWS)
    firsts = [h.exchange[0].id for h in hits]
    assert len(firsts) == len(set(firsts)) == 5
    assert "Lisbon" in hits[0].exchange[0].content
    [q, whole, sentence] = use_vm.embedder.embed([question, f"{said}\nOh no!", views[-1]])
    cos = lambda a, b: sum(x * y for x, y in zip(a, b, strict=True))  # noqa: E731
    assert cos(q, sentence) > cos(q, whole) + 0.1  # the sentence alone is much closer than the whole message
    assert hits[0].distance == pytest.approx(1 - cos(q, sentence), abs=1e-3)  # and it is what ranked the exchange
    plain = use_vm.query("jo", question, k=5, session_id=session.id)
    assert all(h.distance > hits[0].distance + 0.05 for h in plain)  # exchanges only: no view matched


def test_collections_are_per_owner_and_model_and_never_mix_models(chroma, use_vm):
    assert collection_name("a", "m1") != collection_name("b", "m1") != collection_name("a", "m2")
    assert collection_name("weird owner/../é", "m").startswith("memento-")
    use_vm.count("hank")
    col = chroma.get_collection(collection_name("hank", "use-multilingual-v3"))
    assert col.metadata["memento_model"] == "use-multilingual-v3" and col.metadata["memento_dim"] == 512
    # a collection under our name holding another model's vectors is refused
    chroma.create_collection(collection_name("ivy", "all-minilm-l6-v2"), metadata={"memento_model": "x", "memento_dim": 3})
    with pytest.raises(ModelMismatch, match="memento memory reindex"):
        VectorMemory(chroma, get_embedder("all-minilm-l6-v2")).count("ivy")


def test_open_vector_memory_embedded_under_data_dir_and_url_checks(tmp_path):
    with pytest.raises(ValueError, match="MEMENTO_CHROMA_URL='ftp://x' must look like http://host:port"):
        open_vector_memory(tmp_path, "ftp://x", "use-multilingual-v3")
    vm = open_vector_memory(tmp_path, None, "use-multilingual-v3")
    assert not (tmp_path / "chroma").exists()  # connects lazily: the service starts without waiting
    vm.ping()
    assert (tmp_path / "chroma").is_dir()


def test_memory_bench_smoke(tmp_path, capsys):
    from memory.bench import print_table, run_memory_bench

    results = run_memory_bench(
        [f"sqlite:///{tmp_path / 'b.db'}"], turns=(8,),
        strategies=[{"strategy": "window", "turns": 2}, {"strategy": "vector", "k": 4, "turns": 2, "scope": "session"}],
    )
    rows = {r["strategy"]: r for r in results["rows"]}
    assert rows["vector"]["recall"][8] == 1.0  # every planted fact retrieved
    assert rows["window"]["recall"][8] < 1.0  # facts older than 2 turns are gone from a window
    assert rows["window"]["total_ms"]["p95"] >= rows["window"]["critical_ms"]["p50"] >= 0
    print_table(results)
    assert "recall@8" in capsys.readouterr().out


def test_scope_user_never_retrieves_a_deleted_sessions_exchanges(store, use_vm):
    """The deleted session's vectors are left in Chroma on purpose (as when Chroma was down at delete
    time): retrieval in the owner's other sessions must still drop them."""
    first = make_session(store, owner="dora")
    converse(store, first, vector_strategy(store, use_vm), 6, plant={2: "My boat is called Seagull."})
    second = make_session(store, owner="dora")
    strat = vector_strategy(store, use_vm, scope="user", turns=2)
    messages = converse(store, second, strat, 3)
    assert "Seagull" in texts(strat.view(second, messages, "What is my boat called, Seagull?"))
    store.delete_session(first.id)
    view = strat.view(second, messages, "What is my boat called, Seagull?")
    assert "Seagull" not in texts(view)
    assert all(m.session_id == second.id for ex in view.retrieved for m in ex)
