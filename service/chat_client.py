"""The terminal chat behind `memento chat`: an HTTP client of the native sessions API.

Replies stream from `POST /v1/sessions/{id}/messages` (SSE). Slash commands:
/persona NAME, /memory JSON, /context, /new, /help, /quit.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

HELP = "/persona NAME · /memory JSON · /context · /new · /help · /quit"


class ClientError(Exception):
    pass


class ChatClient:
    def __init__(self, url: str, api_key: str | None = None, console: Console | None = None):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=httpx.Timeout(30, read=600))
        self.console = console or Console()
        self.persona: str | None = None
        self.memory: dict[str, Any] | None = None

    # ---------------------------------------------------------------- HTTP

    def call(self, method: str, path: str, **kw: Any) -> Any:
        try:
            r = self.http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise ClientError(f"cannot reach {self.http.base_url}: {exc} (is `memento serve` running?)") from exc
        if r.status_code >= 400:
            raise ClientError(_error_text(r))
        return r.json() if r.content else None

    def open_session(self, session_id: str | None, persona: str | None, memory: dict[str, Any] | None) -> str:
        self.persona, self.memory = persona, memory
        if session_id:
            s = self.call("GET", f"/v1/sessions/{session_id}")
            if persona or memory:
                s = self.call("PATCH", f"/v1/sessions/{session_id}", json=_drop_none(persona=persona, memory=memory))
        else:
            s = self.call("POST", "/v1/sessions", json=_drop_none(persona=persona, memory=memory))
        self.console.print(f"[dim]session {s['id']} · persona {s['persona']} · memory {json.dumps(s['memory'])}[/]")
        return s["id"]

    def stream_reply(self, session_id: str, text: str) -> Iterator[dict[str, Any]]:
        body = {"content": text, "stream": True}
        with self.http.stream("POST", f"/v1/sessions/{session_id}/messages", json=body) as r:
            if r.status_code >= 400:
                r.read()
                raise ClientError(_error_text(r))
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue  # blank separators and ": keep-alive" comments
                data = line[len("data: ") :]
                if data == "[DONE]":
                    return
                yield json.loads(data)

    # ---------------------------------------------------------------- the loop

    def repl(self, session_id: str) -> None:
        self.console.print(f"[dim]{HELP}[/]")
        while True:
            try:
                text = self.console.input("[bold cyan]you>[/] ").strip()
            except (EOFError, KeyboardInterrupt):
                self.console.print()
                return
            if not text:
                continue
            try:
                if text.startswith("/"):
                    session_id = self.command(session_id, text)
                else:
                    self.turn(session_id, text)
            except ClientError as exc:
                self.console.print(f"[red]{exc}[/]")
            except StopIteration:
                return

    def turn(self, session_id: str, text: str) -> None:
        self.console.print("[bold magenta]bot>[/] ", end="")
        try:
            for ev in self.stream_reply(session_id, text):
                if "delta" in ev:
                    self.console.print(ev["delta"], end="", markup=False, highlight=False)
                elif "error" in ev:
                    self.console.print(f"\n[red]{ev['error']['message']}[/]", end="")
                elif "usage" in ev:
                    u = ev["usage"]
                    self.console.print(
                        f"\n[dim]{u['completion_tokens']} tokens · prompt {u['prompt_tokens']} "
                        f"({u['cached_tokens']} cached)[/]",
                        end="",
                    )
        except KeyboardInterrupt:  # closing the stream cancels the generation server-side
            self.console.print("\n[dim](interrupted)[/]", end="")
        self.console.print()

    def command(self, session_id: str, text: str) -> str:
        name, _, arg = text.partition(" ")
        arg = arg.strip()
        if name in ("/quit", "/exit"):
            raise StopIteration
        if name == "/help":
            self.console.print(HELP)
        elif name == "/new":
            return self.open_session(None, self.persona, self.memory)
        elif name == "/persona" and arg:
            s = self.call("PATCH", f"/v1/sessions/{session_id}", json={"persona": arg})
            self.persona = s["persona"]
            self.console.print(f"[dim]persona -> {s['persona']}[/]")
        elif name == "/memory" and arg:
            from service.settings import parse_memory

            try:
                memory = parse_memory(arg, source="/memory")
            except ValueError as exc:
                raise ClientError(str(exc)) from exc
            s = self.call("PATCH", f"/v1/sessions/{session_id}", json={"memory": memory})
            self.memory = s["memory"]
            self.console.print(f"[dim]memory -> {json.dumps(s['memory'])}[/]")
        elif name == "/context":
            self.show_context(self.call("GET", f"/v1/sessions/{session_id}/context", params={"message": arg}))
        else:
            self.console.print(f"[yellow]unknown or incomplete command {text!r}[/]; {HELP}")
        return session_id

    def show_context(self, ctx: dict[str, Any]) -> None:
        b = ctx["budget"]
        table = Table(title=f"context: {b['used']} / {b['context_window']} tokens ({b['reserved_for_reply']} kept for the reply)")
        for col in ("part", "tokens"):
            table.add_column(col)
        for part, n in b["parts"].items():
            table.add_row(part, str(n))
        self.console.print(table)
        mem = ctx["memory"]
        self.console.print(f"[dim]strategy {mem.get('strategy')}[/]")
        if mem.get("summary"):
            self.console.print(f"[bold]summary:[/] {mem['summary']}")
        for ex in mem.get("retrieved") or []:
            self.console.print("[bold]retrieved:[/] " + " / ".join(f"{m['role']}: {m['content']}" for m in ex))


def _drop_none(**kw: Any) -> dict[str, Any]:
    return {k: v for k, v in kw.items() if v is not None}


def _error_text(r: httpx.Response) -> str:
    try:
        return f"HTTP {r.status_code}: {r.json()['error']['message']}"
    except Exception:
        return f"HTTP {r.status_code}: {r.text[:200]}"
