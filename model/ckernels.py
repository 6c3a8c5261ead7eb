"""C kernels built at first use with the machine's compiler (model/q4dot.c, model/decode_attention.c,
model/decode_layer.c).

    lib = ckernels.load(Path("model/q4dot.c"), "the AVX2 int4 kernel",
                        {"q4dot_matmul": ([c_void_p, ...], c_int)}, self_check)   # ctypes.CDLL, or None

Each shared library is compiled once per source, flags and compiler into ~/.cache/memento/kernels
($MEMENTO_KERNEL_DIR), about a second; later starts load it. They are AVX2 code: `buildable()`
says whether this CPU and a compiler allow it, and callers without it keep torch's ops. Their
OpenMP runtime is the libgomp torch already loaded (same soname), so each calling thread's torch
team runs them.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC"]
CPU_FLAGS = {"avx2", "fma", "f16c"}


@cache
def cpu_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def compiler() -> str:
    return os.environ.get("CC", "cc")


def cpu_ok() -> bool:
    return CPU_FLAGS <= cpu_flags()


def buildable() -> bool:
    """This CPU has AVX2, FMA and F16C and a C compiler is there: the kernels should then load, and
    tests fail rather than skip when one does not (a self-check that disagrees)."""
    return cpu_ok() and shutil.which(compiler()) is not None


def enabled(env: str) -> bool:
    """Whether the switch `env` (auto, the default, or torch) lets a C kernel run instead of torch's ops."""
    choice = os.environ.get(env, "auto").lower()
    if choice not in ("auto", "torch"):
        raise ValueError(f"{env}={choice!r}: use auto or torch")
    return choice == "auto"


def _kernel_dir() -> Path:
    env = os.environ.get("MEMENTO_KERNEL_DIR")
    return Path(env) if env else Path.home() / ".cache" / "memento" / "kernels"


def _text_with_includes(source: Path, seen: set[Path] | None = None) -> str:
    """The source and every local file it `#include "..."`s, recursively: what the build depends on."""
    seen = set() if seen is None else seen
    if source in seen:
        return ""
    seen.add(source)
    text = source.read_text()
    included = re.findall(r'^#include "([^"]+)"', text, flags=re.MULTILINE)
    return text + "".join(_text_with_includes(source.parent / name, seen) for name in included)


def _build(source: Path, cc: str) -> Path:
    """The shared library for this source (and what it includes), flags and compiler, compiled if
    it is not there yet."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256((_text_with_includes(source) + " ".join(FLAGS) + version).encode()).hexdigest()[:16]
    out_dir = _kernel_dir()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only home: a private temp dir still spares the next start nothing, but works
        out_dir = Path(tempfile.gettempdir()) / f"memento-kernels-{os.getuid()}"
        out_dir.mkdir(parents=True, exist_ok=True)
    lib = out_dir / f"{source.stem}-{key}.so"
    if not lib.exists():
        log.info("building %s into %s (once per machine)", source.name, lib)
        tmp = out_dir / f".{source.stem}-{key}-{os.getpid()}.so"  # then renamed: concurrent starts never see half a file
        subprocess.run([cc, *FLAGS, str(source), "-o", str(tmp)], check=True, capture_output=True, text=True,
                       timeout=300)
        os.replace(tmp, lib)
    return lib


def load(source: Path, what: str, signatures: dict[str, tuple[list, Any]],
         self_check: Callable[[ctypes.CDLL], bool]) -> ctypes.CDLL | None:
    """The built and loaded library with `signatures` (function name -> (argtypes, restype)) set, or
    None where it cannot run here (no AVX2/FMA/F16C, no compiler, a failed build, or `self_check`,
    its comparison with torch's result, failing): the reason is logged (callers cache the result)."""
    if not cpu_ok():
        return None
    try:
        lib = ctypes.CDLL(str(_build(source, compiler())))
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        log.warning("%s is not available (%s); using torch's", what, str(detail).strip()[:300])
        return None
    for name, (argtypes, restype) in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype
    if not self_check(lib):
        log.warning("%s disagrees with torch's result here; using torch's", what)
        return None
    return lib
