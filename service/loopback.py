"""The app on a loopback port in this process: what the benches and the tests serve through.

    with LoopbackServer(create_app(settings), free_port()) as srv:
        httpx.get(f"{srv.url}/healthz")
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LoopbackServer:
    """uvicorn serving `app` in a daemon thread on 127.0.0.1:`port` (lifespan on: the runtime
    starts and stops with it)."""

    def __init__(self, app: Any, port: int, start_timeout: float = 60.0) -> None:
        import uvicorn

        self.app, self.port, self.start_timeout = app, port, start_timeout
        self.url = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LoopbackServer:
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"uvicorn did not start on {self.url}")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
