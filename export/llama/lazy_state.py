"""A state dict whose tensors are read from disk when asked for, one at a time.

Why: an 8B checkpoint is 16 GB of bf16 and 32 GB as fp32, more than this 24 GB machine holds, so
the export builds and quantizes the model layer by layer (`Llama.load_weights(..., on_loaded=...)`)
and must not have read the whole checkpoint first. safetensors' own `get_tensor` copies each
tensor into RAM and keeps nothing lazy, so the loader reads the safetensors header itself (8-byte
length, JSON table of dtype / shape / byte range) and each tensor with one positioned read. Read
this way the file's pages stay in the page cache, not in the process's RSS.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch

from llamaship.errors import CheckpointError

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
MAX_HEADER = 100 * 1024 * 1024


class LazyState(Mapping[str, torch.Tensor]):
    """name -> tensor, loaded on access (and not cached); shapes are known without loading.
    Each loaded floating tensor is checked for NaN/Inf, so a corrupt checkpoint still names the
    tensor, only later than an eager load would."""

    def __init__(self, source: Path) -> None:
        self.source = source
        self._entries: dict[str, tuple[Callable[[], torch.Tensor], tuple[int, ...]]] = {}

    def add(self, name: str, load: Callable[[], torch.Tensor], shape: tuple[int, ...]) -> None:
        self._entries[name] = (load, tuple(shape))

    def map(self, name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply `fn` when `name` is loaded (e.g. Meta's q/k row order); the shape must not change."""
        load, shape = self._entries[name]
        self._entries[name] = (lambda: fn(load()), shape)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def __getitem__(self, name: str) -> torch.Tensor:
        tensor = self._entries[name][0]()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{self.source}: weight {name} contains NaN or Inf values; the checkpoint "
                                  "is corrupt (re-download or re-convert it)")
        return tensor

    def __contains__(self, name: object) -> bool:  # Mapping's default would read the tensor
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def pop(self, name: str, default: object = None) -> object:  # type: ignore[override]
        return self._entries.pop(name, default)  # type: ignore[arg-type]


def shape_of(state: Mapping[str, torch.Tensor], name: str) -> tuple[int, ...]:
    return state.shape(name) if isinstance(state, LazyState) else tuple(state[name].shape)


def read_safetensors_lazy(files: list[Path], rename: Callable[[str], str | None], state: LazyState) -> None:
    """Add every tensor of `files` (renamed; None drops it) to `state` without reading its data.

    The header is checked the way the safetensors library checks it, because a corrupt one
    otherwise exports garbage with exit 0: each byte range non-negative, in bounds, of exactly
    dtype x shape bytes, no two overlapping, no name twice (in a file or across shards)."""
    seen: dict[str, Path] = {}
    for path in files:
        header, base, size = _read_header(path)
        ranges = []
        for key, info in header.items():
            if key == "__metadata__":
                continue
            try:
                dtype = DTYPES[info["dtype"]]
                shape = tuple(_count(d) for d in info["shape"])
                begin, end = (_count(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError) as exc:
                raise CheckpointError(f"{path}: tensor {key} has a malformed header entry ({exc}); the file "
                                      "is corrupt: download or convert it again") from exc
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            if end - begin != nbytes or base + end > size:
                raise CheckpointError(
                    f"{path}: tensor {key} needs bytes {begin}..{end} of the data ({nbytes} for "
                    f"{info['dtype']} {list(shape)}) but the file has {size - base}; it is truncated or "
                    "corrupt: download or convert it again")
            ranges.append((begin, end, key))
            if key in seen:
                raise CheckpointError(f"{path}: tensor {key} is also in {seen[key]}; the shards do not belong "
                                      "together")
            seen[key] = path
            ours = rename(key)
            if ours is not None:
                state.add(ours, _reader(path, base + begin, nbytes, dtype, shape), shape)
        ranges.sort()
        for (_, end_a, a), (begin_b, _, b) in zip(ranges, ranges[1:], strict=False):
            if begin_b < end_a:
                raise CheckpointError(f"{path}: tensors {a} and {b} claim the same bytes; the file is corrupt: "
                                      "download or convert it again")


def _read_header(path: Path) -> tuple[dict, int, int]:
    """(header, offset of the data, file size), the 8-byte length and the JSON table checked."""
    from llamaship.safe_io import parse_json_object, regular_file

    size = regular_file(path, CheckpointError, "safetensors file")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise ValueError(f"header length {n} does not fit a {size}-byte file")
            raw = f.read(n)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read safetensors file ({exc}); it is truncated or corrupt: "
                              "download or convert it again") from exc
    return parse_json_object(raw, path, CheckpointError, "safetensors header"), 8 + n, size


def _count(value: object) -> int:
    """A header number: a non-negative integer (JSON floats and booleans are not)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{value!r} is not a non-negative integer")
    return value


def _reader(path: Path, offset: int, nbytes: int, dtype: torch.dtype,
            shape: tuple[int, ...]) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        buf = bytearray(nbytes)
        fd = os.open(path, os.O_RDONLY)
        try:
            view, done = memoryview(buf), 0
            while done < nbytes:
                got = os.preadv(fd, [view[done:]], offset + done)
                if got <= 0:
                    raise CheckpointError(f"{path}: ended early while reading a tensor; it was truncated")
                done += got
        finally:
            os.close(fd)
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)

    return load
