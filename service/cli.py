"""`memento`: serve, chat, generate, bench, memory and persona tools (typer + rich).

    memento serve [--host] [--port] [--config FILE] [--insecure-no-auth]
    memento chat [--url URL] [--session ID] [--persona NAME] [--memory JSON]
    memento generate --prompt TEXT [--raw] [--max-tokens N] [--temperature T] [--seed S] [--model SPEC]
    memento bench [--model SPEC] [--json]      memento bench memory
    memento memory rebuild SESSION             memento memory reindex [SESSION]
    memento persona list|show NAME|validate FILE|import CARD
    memento register                           (Korean replies on stdin -> one label per line)
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

app = typer.Typer(help="Memento: a self-hosted chat service that remembers.", no_args_is_help=True)
bench_app = typer.Typer(help="Performance numbers (engine; `bench memory` for memory strategies).")
memory_app = typer.Typer(help="Maintain derived memory state (summaries, vector index).", no_args_is_help=True)
persona_app = typer.Typer(help="List, show, validate and import personas.", no_args_is_help=True)
chat_app = typer.Typer(help="Chat in the terminal; `chat import FILE` / `chat export SESSION` move chats.")
app.add_typer(chat_app, name="chat")
app.add_typer(bench_app, name="bench")
app.add_typer(memory_app, name="memory")
app.add_typer(persona_app, name="persona")

err = Console(stderr=True)
log = logging.getLogger("memento")

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="YAML, TOML or JSON settings file")]


def fail(message: str) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code=2)


def settings_or_exit(config: Path | None = None, **overrides: Any) -> Any:
    from pydantic import ValidationError

    from service.settings import load_settings

    try:
        return load_settings(config, **overrides)
    except (ValidationError, ValueError) as exc:
        raise fail(f"invalid settings: {exc}") from exc


# ------------------------------------------------------------------------------------ serve


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="bind address (default 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option(help="port (default 8000)")] = None,
    config: ConfigOpt = None,
    insecure_no_auth: Annotated[bool, typer.Option(
        "--insecure-no-auth", help="bind a non-loopback address without MEMENTO_API_KEYS (anyone reaching it is user 'local')")] = False,
) -> None:
    """Serve the HTTP API and the web chat page."""
    import uvicorn

    from service.main import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    settings = settings_or_exit(config, host=host, port=port)
    if not settings.auth_enabled and not is_loopback(settings.host) and not insecure_no_auth:
        raise fail(f"refusing to bind {settings.host} without API keys: set MEMENTO_API_KEYS=key:user,... "
                   "(or pass --insecure-no-auth to serve every caller as user 'local')")
    describe_auth(settings)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


def describe_auth(settings: Any) -> None:
    """Say who can reach the server (never prints keys)."""
    loopback = is_loopback(settings.host)
    if settings.auth_enabled:
        log.info("API keys on: %d key(s) for users %s", len(settings.key_owners), sorted(set(settings.key_owners.values())))
    elif loopback:
        log.info("no MEMENTO_API_KEYS: every caller is user 'local'; binding %s only", settings.host)
    else:
        log.warning(
            "--insecure-no-auth: no MEMENTO_API_KEYS and binding %s: anyone who can reach this port can read "
            "every session; set MEMENTO_API_KEYS=key:user,... before exposing it",
            settings.host,
        )


# ------------------------------------------------------------------------------------ chat


UrlOpt = Annotated[str, typer.Option(help="server URL")]
KeyOpt = Annotated[str | None, typer.Option(envvar="MEMENTO_API_KEY", help="bearer key")]


@chat_app.callback(invoke_without_command=True)
def chat(
    ctx: typer.Context,
    url: Annotated[str, typer.Option(help="server URL")] = "http://127.0.0.1:8000",
    session: Annotated[str | None, typer.Option(help="continue this session id")] = None,
    persona: Annotated[str | None, typer.Option(help="persona for a new session")] = None,
    memory: Annotated[str | None, typer.Option(help='memory JSON, e.g. {"strategy":"window","turns":8}')] = None,
    api_key: Annotated[str | None, typer.Option(envvar="MEMENTO_API_KEY", help="bearer key")] = None,
) -> None:
    """Chat in the terminal with a running server (replies stream). Commands: /persona NAME,
    /memory JSON, /context, /new, /quit."""
    from service.chat_client import ChatClient, ClientError

    if ctx.invoked_subcommand is not None:
        return
    try:
        client = ChatClient(url, api_key)
        sid = client.open_session(session, persona, parse_memory_option(memory))
    except ClientError as exc:
        raise fail(str(exc)) from exc
    client.repl(sid)


@chat_app.command("import")
def chat_import(
    file: Annotated[Path, typer.Argument(help="a SillyTavern chat (.jsonl) or {\"messages\": [...]} JSON")],
    session: Annotated[str | None, typer.Option(help="import into this session id (created if new)")] = None,
    url: UrlOpt = "http://127.0.0.1:8000",
    api_key: KeyOpt = None,
) -> None:
    """Store a chat in a session without generating; the server builds its memory in the background."""
    from service.chat_client import ChatClient, ClientError

    try:
        body = file.read_bytes()
    except OSError as exc:
        raise fail(f"cannot read {file}: {exc.strerror or exc}") from exc
    try:
        client = ChatClient(url, api_key)
        sid = session or client.call("POST", "/v1/sessions", json={})["id"]
        out = client.call("POST", f"/v1/sessions/{sid}/import", content=body)
    except ClientError as exc:
        raise fail(f"{file}: {exc}") from exc
    pending = out["memory_status"]["pending"]
    typer.echo(f"imported {out['imported']} messages into session {sid} ({pending} waiting for the memory build)")


@chat_app.command("export")
def chat_export(
    session: Annotated[str, typer.Argument(help="session id")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="write here (default: stdout)")] = None,
    url: UrlOpt = "http://127.0.0.1:8000",
    api_key: KeyOpt = None,
) -> None:
    """Print (or write) a session as a SillyTavern chat file (JSONL)."""
    from service.chat_client import ChatClient, _error_text

    client = ChatClient(url, api_key)
    try:
        r = client.http.get(f"/v1/sessions/{session}/export")
    except Exception as exc:
        raise fail(f"cannot reach {url}: {exc} (is `memento serve` running?)") from exc
    if r.status_code >= 400:
        raise fail(_error_text(r))
    if out is None:
        typer.echo(r.text, nl=False)
    else:
        out.write_text(r.text, encoding="utf-8")
        typer.echo(f"wrote {out}")


def parse_memory_option(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    from service.settings import parse_memory

    try:
        return parse_memory(text, source="--memory")
    except ValueError as exc:
        raise fail(str(exc)) from exc


# ------------------------------------------------------------------------------------ generate


@app.command()
def generate(
    prompt: Annotated[str, typer.Option(help="the user message (or, with --raw, the text to continue)")],
    raw: Annotated[bool, typer.Option(help="skip the chat template: plain continuation")] = False,
    max_tokens: Annotated[int, typer.Option(min=1)] = 128,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy")] = 0.7,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 1.0,
    seed: Annotated[int | None, typer.Option()] = None,
    model: Annotated[str | None, typer.Option(help="built-in name, .gguf file or HF directory")] = None,
    device: Annotated[str | None, typer.Option()] = None,
    dtype: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Generate once with the engine directly (no server); prints only the generated text."""
    from model import Engine, SamplingParams, load_model

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    settings = settings_or_exit(None, model=model, device=device, dtype=dtype)
    lm = load_or_exit(load_model, settings)
    tok = lm.tokenizer
    ids = tok.encode(prompt) if raw else tok.apply_chat_template([{"role": "user", "content": prompt}])
    if raw and tok.add_bos_token and tok.bos_id is not None:  # as the checkpoint says (Gemma yes, SmolLM2 no)
        ids = [tok.bos_id, *ids]
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p or 1.0, seed=seed)
    except ValueError as exc:
        raise fail(str(exc)) from exc
    for ev in Engine(lm).generate(ids, params):
        sys.stdout.write(ev.text)
        sys.stdout.flush()
    sys.stdout.write("\n")


_LOADED: dict[tuple[str, str, str], Any] = {}  # one load per process (tests invoke the CLI repeatedly)


def load_or_exit(load_model: Any, settings: Any) -> Any:
    """Load with a progress display on stderr (stdout carries only generated text)."""
    key = (settings.model, settings.device, settings.dtype)
    try:
        if key not in _LOADED:
            with err.status(f"loading {settings.model} ..."):
                _LOADED[key] = load_model(
                    settings.model, device=settings.device, dtype=settings.dtype, data_dir=str(settings.data_dir),
                    progress=False,
                )
        return _LOADED[key]
    except Exception as exc:  # ModelLoadError names the file and the problem
        raise fail(f"cannot load model {settings.model!r}: {exc}") from exc


# ------------------------------------------------------------------------------------ bench


@bench_app.callback(invoke_without_command=True)
def bench(
    ctx: typer.Context,
    model: Annotated[str | None, typer.Option(help="built-in name, .gguf file or HF directory")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print the results as JSON")] = False,
    concurrency: Annotated[str | None, typer.Option(
        help="serving bench instead: comma-separated levels of concurrent streaming sessions, e.g. 1,4,8,16")] = None,
    llama_server: Annotated[str | None, typer.Option(
        help="with --concurrency: a llama-server binary measured by the same client on the same GGUF")] = None,
    max_tokens: Annotated[int, typer.Option(min=2, max=2048, help="with --concurrency: tokens per reply")] = 64,
    engine_url: Annotated[str | None, typer.Option(
        help="Memento's added latency per turn in front of this OpenAI-compatible engine (http://host:port/v1)")] = None,
    strategies: Annotated[str, typer.Option(help="with --engine-url: memory strategies, comma-separated")] = (
        "window,token_buffer,vector"),
    turns: Annotated[int, typer.Option(min=1, max=1000, help="with --engine-url: turns per strategy")] = 20,
    structured: Annotated[bool, typer.Option(
        "--structured", help="decode with a JSON schema against free decoding (same engine, same run)")] = False,
) -> None:
    """Engine numbers against Hugging Face transformers on the same weights (or, with
    --concurrency, serving numbers over HTTP against llama.cpp; with --engine-url, what Memento
    adds per turn in front of a remote engine)."""
    if ctx.invoked_subcommand is not None:
        return
    from model.bench import print_table, run_bench

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if engine_url is not None:
        engine_bench(engine_url, model, strategies, turns, json_out)
        return
    settings = settings_or_exit(None, model=model)
    if concurrency is not None:
        serving_bench(settings.model, concurrency, llama_server, max_tokens, json_out)
        return
    if structured:
        from model import load_model
        from service.structured_bench import print_structured_table, run_structured_bench

        r = run_structured_bench(load_or_exit(load_model, settings))
        print(json.dumps(r, indent=2)) if json_out else print_structured_table(r)
        return
    result = run_bench(settings.model, device=settings.device, dtype=settings.dtype, json_out=json_out)
    if not json_out:
        print_table(result)


def engine_bench(engine_url: str, model: str | None, strategies: str, turns: int, json_out: bool) -> None:
    from service.engine_bench import print_engine_table, run_engine_bench

    names = [x.strip() for x in strategies.split(",") if x.strip()]
    bad = [n for n in names if n not in ("window", "token_buffer", "vector", "summary", "summary_buffer", "long_term")]
    if not names or bad:
        raise fail(f"--strategies {strategies!r}: unknown {bad or 'empty'}; e.g. window,token_buffer,vector")
    logging.basicConfig(level=logging.WARNING)
    result = run_engine_bench(engine_url.rstrip("/"), strategies=names, turns=turns, model=model,
                              engine_key=os.environ.get("MEMENTO_ENGINE_KEY"))
    if json_out:
        print(json.dumps(result, indent=2))
    else:
        print_engine_table(result)


def serving_bench(model: str, levels_text: str, llama_server: str | None, max_tokens: int, json_out: bool) -> None:
    from service.serving_bench import print_serving_table, run_serving_bench

    try:
        levels = [int(x) for x in levels_text.split(",") if x.strip()]
    except ValueError:
        raise fail(f"--concurrency {levels_text!r}: give comma-separated integers, e.g. 1,4,8,16") from None
    if not levels or any(not 1 <= c <= 64 for c in levels):
        raise fail(f"--concurrency {levels_text!r}: every level must be between 1 and 64")
    if llama_server is not None and not Path(llama_server).is_file():
        raise fail(f"--llama-server {llama_server}: no such file (build it: cmake --build build --target llama-server)")
    result = run_serving_bench(levels, model=model, llama_server=llama_server, max_tokens=max_tokens)
    if json_out:
        print(json.dumps(result, indent=2))
    else:
        print_serving_table(result)


@bench_app.command("memory")
def bench_memory(json_out: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Memory strategies: recall, tokens in context and latency per strategy."""
    from memory.bench import print_table, run_memory_bench

    result = run_memory_bench()
    if json_out:
        print(json.dumps(result, indent=2, ensure_ascii=False, default=str))
    else:
        print_table(result)


# ------------------------------------------------------------------------------------ memory


@memory_app.command("rebuild")
def memory_rebuild(
    session: Annotated[str, typer.Argument(help="session id")],
    config: ConfigOpt = None,
) -> None:
    """Recompute a session's derived memory (summary, vector index) from its transcript."""
    from service.maintenance import rebuild_session

    settings = settings_or_exit(config)
    try:
        what = rebuild_session(settings, session)
    except LookupError as exc:
        raise fail(str(exc)) from exc
    err.print(f"rebuilt {what} for session {session}")


@memory_app.command("reindex")
def memory_reindex(
    session: Annotated[str | None, typer.Argument(help="only this session (default: every session of --owner)")] = None,
    owner: Annotated[str, typer.Option(help="whose sessions (the API key's user; 'local' without keys)")] = "local",
    config: ConfigOpt = None,
) -> None:
    """Re-embed past exchanges into vector memory (after changing MEMENTO_EMBEDDINGS or losing Chroma)."""
    from service.maintenance import reindex_sessions

    settings = settings_or_exit(config)
    try:
        n = reindex_sessions(settings, session, owner=owner)
    except LookupError as exc:
        raise fail(str(exc)) from exc
    err.print(f"re-indexed {n} exchange(s)")


# ------------------------------------------------------------------------------------ persona


def _registry(config: Path | None = None) -> Any:
    from persona.registry import PersonaRegistry

    settings = settings_or_exit(config)
    return PersonaRegistry(extra_dir=settings.persona_dir, local_dir=settings.data_dir / "personas")


def _persona_errors() -> tuple[type[Exception], ...]:
    from persona.errors import PersonaError

    return (PersonaError,)


@persona_app.command("list")
def persona_list(config: ConfigOpt = None) -> None:
    """Every persona, with its language and register."""
    from rich.table import Table

    from persona.commands import list_personas

    table = Table("name", "display name", "language", "register")
    for row in list_personas(_registry(config)):
        table.add_row(*row)
    Console().print(table)


@persona_app.command("show")
def persona_show(name: str, config: ConfigOpt = None) -> None:
    """What the model sees of a persona before any history."""
    from persona.commands import show_persona

    try:
        text, _ = show_persona(_registry(config), name)
    except _persona_errors() as exc:
        raise fail(str(exc)) from exc
    print(text)


@persona_app.command("validate")
def persona_validate(file: Path) -> None:
    """Check a persona file: errors name the line, the field and the fix."""
    from persona.commands import validate_file

    try:
        persona = validate_file(file)
    except _persona_errors() as exc:
        raise fail(str(exc)) from exc
    print(f"ok: {file} is persona '{persona.name}' ({persona.language}, register {persona.register})")


@persona_app.command("import")
def persona_import(card: Path, config: ConfigOpt = None) -> None:
    """Import a character card (JSON or PNG) as a persona file under <data dir>/personas."""
    from persona.commands import import_card

    settings = settings_or_exit(config)
    out_dir = settings.data_dir / "personas"
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        path = import_card(card, out_dir)
    except _persona_errors() as exc:
        raise fail(str(exc)) from exc
    print(f"imported {card} -> {path}")


@app.command()
def register() -> None:
    """Read Korean text, one reply per line on stdin; print banmal, polite, mixed or none per line."""
    from persona.commands import register_lines

    for label in register_lines(sys.stdin):
        print(label, flush=True)


if __name__ == "__main__":
    app()
