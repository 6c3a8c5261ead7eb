"""docker-compose.yml: the scale-out stack's structure (parsed, not run: CI has no Docker)."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_services_and_wiring():
    services = compose()["services"]
    assert {"api", "redis", "chroma"} <= set(services)
    api = services["api"]
    env = api["environment"]
    assert env["MEMENTO_STORE_URL"] == "redis://redis:6379/0"
    assert env["MEMENTO_CHROMA_URL"] == "http://chroma:8000"
    assert api["build"]["context"] == "."
    for dep in ("redis", "chroma"):
        assert api["depends_on"][dep]["condition"] == "service_healthy"


def test_every_service_has_a_healthcheck():
    for name, svc in compose()["services"].items():
        test = svc.get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), name
    assert "/readyz" in " ".join(compose()["services"]["api"]["healthcheck"]["test"])


def test_redis_aof_and_volumes():
    doc = compose()
    redis = doc["services"]["redis"]
    cmd = redis["command"] if isinstance(redis["command"], list) else redis["command"].split()
    assert cmd[cmd.index("--appendonly") + 1] == "yes"
    named = set(doc["volumes"])
    for svc in ("redis", "chroma", "api"):
        volumes = doc["services"][svc]["volumes"]
        assert any(v.split(":")[0] in named for v in volumes), svc


def test_dockerfile_cpu_default_cuda_arg():
    text = (ROOT / "Dockerfile").read_text()
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in text
    assert "HEALTHCHECK" in text and "memento" in text


def test_api_keys_are_required():
    """Compose's `${VAR:?message}` fails `docker compose up` when the keys are unset; the image
    binds 0.0.0.0, which `memento serve` refuses without keys (tests/service/test_cli.py)."""
    env = compose()["services"]["api"]["environment"]
    assert env["MEMENTO_API_KEYS"].startswith("${MEMENTO_API_KEYS:?")
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "MEMENTO_HOST=0.0.0.0" in dockerfile and "--insecure-no-auth" not in dockerfile


def test_engine_profiles():
    """`--profile llamacpp` (CPU) and `--profile vllm` (GPU) add an engine; the API points at it
    through MEMENTO_ENGINE_URL and waits for it only when that profile runs."""
    services = compose()["services"]
    assert services["llamacpp"]["profiles"] == ["llamacpp"] and services["vllm"]["profiles"] == ["vllm"]
    assert "/health" in " ".join(services["llamacpp"]["healthcheck"]["test"])
    assert "/health" in " ".join(services["vllm"]["healthcheck"]["test"])
    api = services["api"]
    assert api["environment"]["MEMENTO_ENGINE_URL"] == "${MEMENTO_ENGINE_URL:-}"  # empty: the local model
    for engine in ("llamacpp", "vllm"):
        assert api["depends_on"][engine] == {"condition": "service_healthy", "required": False}
    assert "profiles" not in api  # plain `docker compose up` still starts the API


def test_replicas_profile_routes_by_session():
    services = compose()["services"]
    for name in ("api-2", "api-3"):
        replica = services[name]
        assert replica["profiles"] == ["replicas"] and replica["ports"] == []
        assert replica["environment"] == services["api"]["environment"]  # the same API, another process
    proxy = services["proxy"]
    assert all(proxy["depends_on"][n]["condition"] == "service_healthy" for n in ("api", "api-2", "api-3"))
    conf = (ROOT / "deploy" / "nginx.conf").read_text()
    assert "hash $memento_session consistent" in conf and "$http_x_session_id" in conf
    assert all(f"server {n}:8000" in conf for n in ("api", "api-2", "api-3"))
