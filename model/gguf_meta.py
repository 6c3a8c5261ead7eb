"""Read a GGUF file's header: metadata key/values and the tensor directory.

GGUF layout (little endian): magic "GGUF", version u32, n_tensors u64, n_kv u64, then n_kv
key/value pairs, then n_tensors tensor infos (name, dims, ggml type, offset), padding to
`general.alignment`, then tensor data. We parse the header ourselves with `struct` / numpy
because `gguf.GGUFReader` builds numpy views for every vocabulary string (~12 s for Gemma's
262k-token vocab); the type codes and block sizes come from the `gguf` package.

    meta = read_metadata(path)            # {"general.architecture": "llama", ...}, plain Python values
    header = read_header(path)            # + tensor directory, for the weight loader
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from model.config import ModelLoadError

GGUF_MAGIC = b"GGUF"
_U64 = struct.Struct("<Q")

# scalar value types -> (struct format, numpy dtype) for single values and fast arrays
_SCALARS: dict[int, tuple[str, str]] = {
    GGUFValueType.UINT8: ("<B", "<u1"),
    GGUFValueType.INT8: ("<b", "<i1"),
    GGUFValueType.UINT16: ("<H", "<u2"),
    GGUFValueType.INT16: ("<h", "<i2"),
    GGUFValueType.UINT32: ("<I", "<u4"),
    GGUFValueType.INT32: ("<i", "<i4"),
    GGUFValueType.FLOAT32: ("<f", "<f4"),
    GGUFValueType.UINT64: ("<Q", "<u8"),
    GGUFValueType.INT64: ("<q", "<i8"),
    GGUFValueType.FLOAT64: ("<d", "<f8"),
    GGUFValueType.BOOL: ("<?", "?"),
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # PyTorch order (ggml stores dims fastest-first; we reverse them)
    ggml_type: GGMLQuantizationType
    offset: int  # absolute byte offset of the data in the file
    n_bytes: int  # bytes of (possibly quantized) data


@dataclass(frozen=True)
class GGUFHeader:
    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    data_offset: int  # start of the tensor data section
    file_size: int


class _Cursor:
    """Sequential little-endian reader over a bytes-like buffer, with bounds checks."""

    def __init__(self, buf: Any, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int) -> Any:
        if self.pos + n > len(self.buf):
            raise ModelLoadError(
                f"{self.path}: GGUF header is truncated (needs byte {self.pos + n}, file has "
                f"{len(self.buf)}); the file is incomplete - download or assemble it again"
            )
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        raw = bytes(self.take(self.scalar("<Q")))
        return raw.decode("utf-8", errors="replace")

    def strings(self, count: int) -> list[str]:
        """`count` strings in a tight loop (vocabularies have 50k-260k of them)."""
        buf, pos, size, out = self.buf, self.pos, len(self.buf), []
        unpack = _U64.unpack_from
        try:
            for _ in range(count):
                (n,) = unpack(buf, pos)
                if pos + 8 + n > size:
                    break
                out.append(buf[pos + 8 : pos + 8 + n].decode("utf-8", errors="replace"))
                pos += 8 + n
        except struct.error:
            pass
        self.pos = pos
        if len(out) < count:
            raise ModelLoadError(
                f"{self.path}: GGUF header is truncated inside a string array at byte {pos} (file has {size}); "
                f"the file is incomplete - download or assemble it again"
            )
        return out

    def value(self, vtype: int) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype][0])
        if vtype == GGUFValueType.ARRAY:
            item_type, count = self.scalar("<I"), self.scalar("<Q")
            if item_type in _SCALARS:  # one numpy read instead of `count` struct calls
                dtype = np.dtype(_SCALARS[item_type][1])
                return np.frombuffer(self.take(dtype.itemsize * count), dtype=dtype).tolist()
            if item_type == GGUFValueType.STRING:
                return self.strings(count)
            return [self.value(item_type) for _ in range(count)]
        raise ModelLoadError(f"{self.path}: unknown GGUF value type {vtype} at byte {self.pos}")


def _open(path: str | Path) -> tuple[Path, Any, Any]:
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: model file not found; check the path or the model name")
    f = path.open("rb")
    if path.stat().st_size == 0:
        f.close()
        raise ModelLoadError(f"{path}: file is empty (0 bytes); download or assemble it again")
    return path, f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def read_header(path: str | Path, with_tensors: bool = True) -> GGUFHeader:
    """Parse metadata (and the tensor directory) and check that every tensor lies inside the file."""
    path, f, buf = _open(path)
    try:
        cur = _Cursor(buf, path)
        if bytes(cur.take(4)) != GGUF_MAGIC:
            raise ModelLoadError(f"{path}: not a GGUF file (bad magic bytes); expected a .gguf model file")
        version = cur.scalar("<I")
        if version not in (2, 3):
            raise ModelLoadError(f"{path}: unsupported GGUF version {version}; only versions 2 and 3 are read")
        n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            metadata[key] = cur.value(cur.scalar("<I"))
        tensors: list[TensorInfo] = []
        raw_infos = []
        if with_tensors:
            for _ in range(n_tensors):
                name = cur.string()
                dims = [cur.scalar("<Q") for _ in range(cur.scalar("<I"))]
                raw_infos.append((name, dims, cur.scalar("<I"), cur.scalar("<Q")))
        align = int(metadata.get("general.alignment", 32))
        data_offset = -(-cur.pos // align) * align
        for name, dims, type_id, rel in raw_infos:
            tensors.append(_tensor_info(path, name, dims, type_id, data_offset + rel, len(buf)))
        return GGUFHeader(path, version, metadata, tensors, data_offset, len(buf))
    finally:
        buf.close()
        f.close()


def _tensor_info(path: Path, name: str, dims: list[int], type_id: int, offset: int, size: int) -> TensorInfo:
    try:
        gtype = GGMLQuantizationType(type_id)
    except ValueError:
        raise ModelLoadError(
            f"{path}: tensor {name!r} has unknown ggml type id {type_id}; re-quantize the model "
            f"with a standard type (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K)"
        ) from None
    block, type_size = GGML_QUANT_SIZES[gtype]
    n_elem = int(np.prod(dims)) if dims else 1
    n_bytes = n_elem // block * type_size
    if offset + n_bytes > size:
        raise ModelLoadError(
            f"{path}: file is truncated: tensor {name!r} needs bytes up to {offset + n_bytes} but the "
            f"file has {size}; download or assemble it again"
        )
    return TensorInfo(name, tuple(reversed(dims)), gtype, offset, n_bytes)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """All metadata key/values of a GGUF file as plain Python values (str, int, float, bool, list)."""
    return read_header(path, with_tensors=False).metadata
