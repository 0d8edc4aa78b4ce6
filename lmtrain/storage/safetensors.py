"""The safetensors format (https://github.com/huggingface/safetensors): an 8-byte header length, a JSON header
of {name: {dtype, shape, data_offsets}} plus '__metadata__', then the tensors' bytes, 8-byte aligned.

Read and written directly rather than through the safetensors package: its numpy reader cannot return bfloat16
(the dtype of most released checkpoints), and writing the header first lets a writer stream tensors one at a
time from the devices, so the host never holds more than one. Local paths and cloud storage (gs://) alike.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Sequence

import ml_dtypes
import numpy as np
from etils import epath

from lmtrain.paths import as_path, is_remote
from lmtrain.storage.atomic import flush_to_disk

# safetensors dtype codes, with ml_dtypes for bfloat16.
DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
CODES = {np.dtype(t): code for code, t in DTYPES.items()}


class SafetensorsError(ValueError):
    """A file that is not a whole, well-formed safetensors file."""


class SafetensorsReader:
    """Names, shapes and one-tensor-at-a-time reads over the files of a (possibly sharded) safetensors checkpoint.

    Every header is checked against its file's size when opened, so a truncated download is named here
    rather than read as garbage (or failing inside numpy) later.
    """

    def __init__(self, files: list[str | os.PathLike], error: type[Exception] = SafetensorsError):
        self.error = error  # the caller's error class: the message names the file and says what to do
        self._metadata: dict[str, dict] = {}  # each file's '__metadata__' (str -> str), by path
        self.entries: dict[str, tuple[epath.Path, str, tuple[int, ...], int, int]] = {}
        for path in files:
            self._read_header(as_path(path))

    def _read_header(self, path: epath.Path) -> None:
        redo = "Re-download or re-save the checkpoint."
        size = path.stat().length
        with path.open("rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise self.error(f"{path}: not a safetensors file ({size} bytes, shorter than its 8-byte "
                                 f"header length). {redo}")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > size - 8:
                raise self.error(f"{path}: truncated or not a safetensors file (its header claims {header_len} "
                                 f"bytes, the file has {size}). {redo}")
            try:
                header = json.loads(f.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise self.error(f"{path}: not a safetensors file (its header is not JSON). {redo}") from None
        if not isinstance(header, dict):
            raise self.error(f"{path}: not a safetensors file (its header is not a JSON object). {redo}")
        meta = header.get("__metadata__")
        self._metadata[str(path)] = meta if isinstance(meta, dict) else {}
        data_start = 8 + header_len
        spans = []
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                code, shape, (start, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
                if not (isinstance(code, str) and all(isinstance(n, int) and n >= 0 for n in shape)
                        and isinstance(start, int) and isinstance(end, int) and 0 <= start <= end):
                    raise TypeError
            except (KeyError, TypeError, ValueError):
                raise self.error(f"{path}: the header entry of tensor '{name}' is malformed ({info!r}). "
                                 f"{redo}") from None
            if name in self.entries:
                raise self.error(f"tensor '{name}' is stored twice: in {self.entries[name][0]} and {path}.")
            if code in DTYPES:  # another dtype is refused by name (check_dtype) if the import needs the tensor
                want = np.dtype(DTYPES[code]).itemsize * int(np.prod(shape, dtype=np.int64))
                if end - start != want:
                    raise self.error(f"{path}: tensor '{name}' ({code} {list(shape)}) spans {end - start} bytes "
                                     f"in its header, not {want}. {redo}")
            self.entries[name] = (path, code, shape, data_start + start, end - start)
            spans.append((start, end, name))
        self._check_tiling(path, sorted(spans), size - data_start, redo)

    def _check_tiling(self, path: epath.Path, spans: list[tuple[int, int, str]], data_len: int, redo: str) -> None:
        """The tensors cover the data exactly, in order: none overlaps another (one tensor would read another's
        bytes) and no bytes lie between or after them, as the safetensors format requires."""
        position, previous = 0, None
        for start, end, name in spans:
            if start != position:
                what = f"overlaps tensor '{previous}'" if start < position else \
                    f"leaves bytes {position}..{start} unused before it"
                raise self.error(f"{path}: the header's data_offsets of tensor '{name}' ({start}, {end}) {what}; "
                                 f"the tensors must tile the data exactly. {redo}")
            position, previous = end, name
        if position > data_len:
            raise self.error(
                f"{path} is truncated: it has {data_len} data bytes, but its header places tensor '{previous}' up to "
                f"byte {position} of the data. {redo}"
            )
        if position < data_len:
            raise self.error(f"{path}: {data_len - position} bytes after the last tensor are not part of any "
                             f"tensor in the header; the tensors must tile the data exactly. {redo}")

    def metadata(self, path: str | os.PathLike) -> dict:
        """The '__metadata__' of one of the files ({} when it has none)."""
        return self._metadata[str(as_path(path))]

    def names(self) -> set[str]:
        return set(self.entries)

    def file_of(self, name: str) -> epath.Path:
        return self.entries[name][0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][2]

    def check_dtype(self, name: str) -> None:
        path, code = self.entries[name][:2]
        if code not in DTYPES:
            raise self.error(f"{path}: tensor '{name}' has dtype {code}, which lmtrain cannot read (it reads "
                             f"{', '.join(DTYPES)}). Save the model in float32 or bfloat16.")

    def read(self, name: str) -> np.ndarray:
        path, code, shape, offset, nbytes = self.entries[name]
        self.check_dtype(name)
        dtype = np.dtype(DTYPES[code])
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if count * dtype.itemsize != nbytes:
            raise self.error(f"{path}: tensor '{name}' has {nbytes} bytes, not {count * dtype.itemsize}.")
        if not is_remote(path):
            return np.fromfile(os.fspath(path), dtype=dtype, count=count, offset=offset).reshape(shape)
        with path.open("rb") as f:
            f.seek(offset)
            return np.frombuffer(f.read(nbytes), dtype=dtype, count=count).reshape(shape)



def _write_tensor(f, tensor: np.ndarray) -> None:
    f.write(np.ascontiguousarray(tensor).tobytes())


def write_safetensors(path: epath.Path, entries: Sequence[tuple[str, str, tuple[int, ...]]],
                      tensors: Iterable[np.ndarray], metadata: dict[str, str]) -> None:
    """Write a safetensors file whose header is known up front: `entries` gives each tensor's (name, dtype code,
    shape) in file order, and `tensors` yields them in that order, one at a time."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, code, shape in entries:
        nbytes = int(np.prod(shape)) * np.dtype(DTYPES[code]).itemsize
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for (name, code, shape), tensor in zip(entries, tensors, strict=True):
            if tuple(tensor.shape) != tuple(shape) or CODES.get(tensor.dtype) != code:
                raise AssertionError(f"{name}: produced {tensor.dtype} {tensor.shape}, planned {code} {shape}")
            _write_tensor(f, tensor)
        flush_to_disk(f)  # on disk before the directory holding it is published


def write_tensors(path: epath.Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """A safetensors file of host arrays (float32, bfloat16, float16, ...), in name order."""
    names = sorted(tensors)
    entries = [(name, CODES[tensors[name].dtype], tuple(tensors[name].shape)) for name in names]
    write_safetensors(path, entries, (tensors[name] for name in names), metadata)

