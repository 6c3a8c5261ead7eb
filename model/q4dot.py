"""The AVX2 int4/int8 x int8 matmul (model/q4dot.c): built with the machine's C compiler at first use.

    if q4dot.available():
        y = q4dot.run(x, nib, dm)   # x (M, K) float32, nib (N, K/2) uint8, dm (N, 2, K/32) float16 -> (M, N)
        y = q4dot.run(x, q, dm)     # 8-bit weights: q (N, K) int8, one pass (GGUF's Q8_0)

torch's packed int4 CPU kernel is quick where it was built for AVX-512 but on AVX2-only CPUs it
dequantizes every group in float for every 4 rows: 114 us for a 1536x576 weight at one row, 480
us at eight, against 12 ms for llama.cpp's whole token on the same 2 cores. This kernel quantizes
the activations per group of 32 to int8 (as llama.cpp does) and lets vpmaddubsw do the
multiply-adds. 8-bit weights go through the same kernel in one pass rather than as two 4-bit planes
(half the work for SmolLM2's tied Q8_0 head, 35% of a step's weight reads that way). The shared library is compiled once per source and compiler into
~/.cache/memento/kernels ($MEMENTO_KERNEL_DIR), about a second; without a compiler or AVX2 it is
simply not available and the callers keep torch's kernel. Its OpenMP runtime is the libgomp
torch already loaded (same soname), so both share one thread team per thread.

`matmul` is the custom op `memento::q4dot`, so a compiled graph holds it as one opaque node; eager
callers use `run`, the same call without the op's dispatch.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("q4dot.c")
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC"]
GROUP = 32


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _kernel_dir() -> Path:
    env = os.environ.get("MEMENTO_KERNEL_DIR")
    return Path(env) if env else Path.home() / ".cache" / "memento" / "kernels"


def _build(compiler: str) -> Path:
    """The shared library for this source, flags and compiler, compiled if it is not there yet."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256((SOURCE.read_text() + " ".join(FLAGS) + version).encode()).hexdigest()[:16]
    out_dir = _kernel_dir()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only home: a private temp dir still spares the next start nothing, but works
        out_dir = Path(tempfile.gettempdir()) / f"memento-kernels-{os.getuid()}"
        out_dir.mkdir(parents=True, exist_ok=True)
    lib = out_dir / f"q4dot-{key}.so"
    if not lib.exists():
        log.info("building the AVX2 int4 kernel into %s (once per machine)", lib)
        tmp = out_dir / f".q4dot-{key}-{os.getpid()}.so"  # then renamed: concurrent starts never see half a file
        subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(tmp)], check=True, capture_output=True,
                       text=True, timeout=300)
        os.replace(tmp, lib)
    return lib


def _compiler() -> str:
    return os.environ.get("CC", "cc")


def buildable() -> bool:
    """This CPU has AVX2, FMA and F16C and a C compiler is there: the kernel should then be
    available(), and tests fail rather than skip when it is not (a self-check that disagrees)."""
    return {"avx2", "fma", "f16c"} <= _cpu_flags() and shutil.which(_compiler()) is not None


@cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel, or None where it cannot run here (not x86 with AVX2, FMA and F16C, no compiler,
    a failed build, or a self-check that disagrees with float32): the reason is logged once."""
    if not {"avx2", "fma", "f16c"} <= _cpu_flags():
        return None
    compiler = _compiler()
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        log.warning("the AVX2 int4 kernel is not available (%s); using torch's", str(detail).strip()[:300])
        return None
    p, i = ctypes.c_void_p, ctypes.c_int
    for fn in (lib.q4dot_matmul, lib.q8dot_matmul):
        fn.argtypes = [p, p, p, p, i, i, i, p, p]
        fn.restype = None
    if not _self_check(lib):
        log.warning("the AVX2 int4 kernel disagrees with float32 here; using torch's")
        return None
    return lib


def available() -> bool:
    return library() is not None


def run(x: torch.Tensor, w: torch.Tensor, dm: torch.Tensor, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """The kernel called directly (eager callers: the custom op's dispatch costs more than a small
    matmul); `matmul` below is the same as an op a compiled graph can hold. w is 4-bit nibbles
    (N, K/2) uint8 or 8-bit weights (N, K) int8."""
    m, k = x.shape
    n = w.shape[0]
    bits = {torch.uint8: 4, torch.int8: 8}.get(w.dtype)
    if bits is None or w.shape[1] * 8 != k * bits or dm.shape != (n, 2, k // GROUP):
        raise ValueError(f"q4dot.run: w {tuple(w.shape)} {w.dtype} and dm {tuple(dm.shape)} do not fit x "
                         f"{tuple(x.shape)}; want (N, K/2) uint8 or (N, K) int8, and (N, 2, K/32)")
    if dm.dtype != torch.float16 or not (w.is_contiguous() and dm.is_contiguous()):
        raise ValueError(f"q4dot.run needs contiguous w and float16 dm, got dm {dm.dtype}")
    lib = lib or library()
    x = x.to(torch.float32).contiguous()
    y = torch.empty(m, n, dtype=torch.float32)
    xq = torch.empty(m, k, dtype=torch.int8)
    xs = torch.empty(2, m, k // GROUP, dtype=torch.float32)
    fn = lib.q4dot_matmul if bits == 4 else lib.q8dot_matmul
    fn(w.data_ptr(), dm.data_ptr(), x.data_ptr(), y.data_ptr(), m, n, k, xq.data_ptr(), xs.data_ptr())
    return y


def _self_check(lib: ctypes.CDLL) -> bool:
    g = torch.Generator().manual_seed(0)
    u = torch.randint(0, 16, (40, 96), generator=g, dtype=torch.uint8)
    dm = torch.stack([torch.rand(40, 3, generator=g) * 0.1, torch.rand(40, 3, generator=g) - 0.5], 1).half()
    x = torch.randn(9, 96, generator=g)
    q = (u.to(torch.int8) - 8) * 15  # [-120, 105]: both signs and large magnitudes
    ok = True
    for w, packed in ((dequantize(u, dm), pack_nibbles(u)), (dequantize(q, dm), q)):
        want = x @ w.T
        ok &= bool((run(x, packed, dm, lib) - want).abs().max() <= 0.02 * want.abs().max())
    return ok


def pack_nibbles(u: torch.Tensor) -> torch.Tensor:
    """u (N, K) uint8 in [0, 15] -> (N, K/2): per group of 32, byte i = u[i] | u[i + 16] << 4."""
    n, k = u.shape
    groups = u.view(n, k // GROUP, 2, GROUP // 2)
    return (groups[:, :, 0] | (groups[:, :, 1] << 4)).reshape(n, k // 2)


def unpack_rows(nib: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """u (len(rows), K) of the given rows: the inverse of pack_nibbles."""
    b = nib[rows].view(len(rows), -1, GROUP // 2)
    return torch.stack([b & 15, b >> 4], dim=2).reshape(len(rows), -1)


def dequantize(u: torch.Tensor, dm: torch.Tensor) -> torch.Tensor:
    """w = u * d + m per group of 32, float32 (u 4- or 8-bit values, one per weight; dm (N, 2, K/32)
    float16: d, then m)."""
    n, k = u.shape
    dm = dm.float()
    w = u.view(n, k // GROUP, GROUP).float() * dm[:, 0, :, None] + dm[:, 1, :, None]
    return w.view(n, k)


@torch.library.custom_op("memento::q4dot", mutates_args=())
def matmul(x: torch.Tensor, w: torch.Tensor, dm: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ w.T for w held as (nibbles or int8, dm): (M, N) float32. Needs available()."""
    return run(x, w, dm)


@matmul.register_fake
def _(x: torch.Tensor, w: torch.Tensor, dm: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[0], dtype=torch.float32)
