"""`memento` CLI: generate (real SmolLM2), chat against a live server, persona tools, register."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from service.cli import app

runner = CliRunner()


@pytest.mark.slow
def test_generate_greedy_is_deterministic_and_prints_only_text(monkeypatch, smol_lm):
    import service.cli

    # the session's already-loaded real SmolLM2 (packed int4 weights, what "auto" gives on CPU): one load per run.
    # A wording that is no near-tie: "Which city is the capital of France?" leads "The" over "Le" by
    # 0.03 in float32, so bf16 scales or q4dot's int8 activations flip it; this one answers Paris by
    # at least 2.4 logits with float, torch int4 and q4dot weights alike.
    monkeypatch.setitem(service.cli._LOADED, ("smollm2-135m-instruct", "auto", "auto"), smol_lm)
    monkeypatch.delenv("MEMENTO_MODEL", raising=False)
    args = ["generate", "--prompt", "What is the name of the capital of France?", "--temperature", "0", "--max-tokens", "12"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "Paris" in first.stdout
    assert "loading" not in first.stdout and "loaded" not in first.stdout  # progress goes to stderr
    second = runner.invoke(app, args)
    assert second.stdout == first.stdout
    raw = runner.invoke(app, ["generate", "--raw", "--prompt", "The capital of France is", "--temperature", "0",
                              "--max-tokens", "4"])
    assert raw.exit_code == 0 and "Paris" in raw.stdout


def test_generate_bad_model_names_it():
    r = runner.invoke(app, ["generate", "--prompt", "x", "--model", "/nonexistent/model.gguf"])
    assert r.exit_code != 0
    assert "/nonexistent/model.gguf" in r.output


def test_chat_against_live_server(live_server):
    script = "hello bot\n/context\n/memory {\"strategy\": \"buffer\"}\n/persona pirate\nagain\n/new\n/quit\n"
    r = runner.invoke(app, ["chat", "--url", live_server.url, "--persona", "assistant",
                            "--memory", '{"strategy":"window","turns":2}'], input=script)
    assert r.exit_code == 0, r.output
    assert "bot>" in r.output and "tokens" in r.output
    assert "context:" in r.output and "persona" in r.output  # the /context table
    assert "memory -> {\"strategy\": \"buffer\"}" in r.output and "persona -> pirate" in r.output
    import httpx

    sessions = httpx.get(f"{live_server.url}/v1/sessions").json()["data"]
    assert len(sessions) == 2  # the first one and /new
    first = next(s for s in sessions if s["persona"] == "pirate")
    msgs = httpx.get(f"{live_server.url}/v1/sessions/{first['id']}/messages").json()["data"]
    assert [m["content"] for m in msgs if m["role"] == "user"] == ["hello bot", "again"]


def test_chat_unreachable_server_is_clear():
    r = runner.invoke(app, ["chat", "--url", "http://127.0.0.1:9"], input="/quit\n")
    assert r.exit_code == 2 and "cannot reach" in r.output


def test_register_labels_lines():
    r = runner.invoke(app, ["register"], input="밥 먹었어?\n식사하셨어요?\n\n")
    assert r.exit_code == 0
    assert r.stdout.splitlines() == ["banmal", "polite", "none"]


def test_persona_commands(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMENTO_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("MEMENTO_PERSONA_DIR", raising=False)
    r = runner.invoke(app, ["persona", "list"])
    assert r.exit_code == 0 and "assistant" in r.stdout

    r = runner.invoke(app, ["persona", "show", "assistant"])
    assert r.exit_code == 0 and "[system]" in r.stdout

    good = tmp_path / "chef.md"
    good.write_text("---\nname: chef\ndescription: A chef.\n---\n")
    r = runner.invoke(app, ["persona", "validate", str(good)])
    assert r.exit_code == 0 and "chef" in r.stdout
    bad = tmp_path / "bad.md"
    bad.write_text("---\nname: bad\nregister: loud\n---\n")
    r = runner.invoke(app, ["persona", "validate", str(bad)])
    assert r.exit_code == 2 and "register" in r.output

    card = tmp_path / "nova.json"
    card.write_text(json.dumps({"spec": "chara_card_v2", "spec_version": "2.0",
                                "data": {"name": "Nova", "description": "A pilot."}}))
    r = runner.invoke(app, ["persona", "import", str(card)])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "data" / "personas" / "nova.md").exists()
    assert "nova" in runner.invoke(app, ["persona", "list"]).stdout


def test_memory_rebuild_unknown_session(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMENTO_DATA_DIR", str(tmp_path))
    r = runner.invoke(app, ["memory", "rebuild", "sess_missing"])
    assert r.exit_code == 2 and "sess_missing" in r.output


def test_serve_rejects_bad_settings(monkeypatch):
    monkeypatch.setenv("MEMENTO_MEMORY", "forgetful")
    r = runner.invoke(app, ["serve"])
    assert r.exit_code == 2 and "MEMENTO_MEMORY" in r.output


def test_serve_refuses_a_public_bind_without_keys(monkeypatch, tmp_path):
    monkeypatch.setenv("MEMENTO_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("MEMENTO_API_KEYS", raising=False)
    r = runner.invoke(app, ["serve", "--host", "0.0.0.0"])
    assert r.exit_code == 2
    assert "MEMENTO_API_KEYS" in r.output and "--insecure-no-auth" in r.output


def test_loopback_names():
    from service.cli import is_loopback

    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.5", "myhost"))
