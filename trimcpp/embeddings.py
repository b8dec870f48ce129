"""Text-token embeddings for stage 1, read from the LLM's own GGUF (``token_embd.weight``).

Opening a table reads only what is needed to find it: the GGUF header, one metadata value
(``general.architecture``; the alignment) and the tensor directory. Metadata arrays, the tokenizer's
vocabulary among them (262k strings for Gemma 3), are skipped by their lengths rather than parsed:
``gguf.GGUFReader`` builds every field and took 1 s (LLaMA's 32k vocabulary) to 10 s (Gemma 3's)
before stage 1 could read a row, on every fresh handler's first request. The file is memory-mapped;
only the rows asked for are read and dequantised, so a 7B model's table costs nothing until a
question is asked.

Stage 1 compares image rows with text rows as the LLM receives them. Most architectures take the
table's rows as they are; the Gemma family multiplies token embeddings (and only those: image rows
go in unscaled) by sqrt(n_embd) in its graph (llama.cpp ``src/models/gemma*.cpp``), so for those
the rows come back scaled the same way (:data:`SCALED_INPUT`).
"""

from __future__ import annotations

import mmap
import os
import struct
from typing import Any, Sequence

import gguf
import numpy as np

TABLE = "token_embd.weight"

# Architectures whose graph scales token embeddings (not embedding inputs) by sqrt(n_embd).
SCALED_INPUT = frozenset({"gemma", "gemma2", "gemma3", "gemma3n", "gemma4", "gemma-embedding"})

# GGUF metadata value types (gguf.GGUFValueType) -> size in bytes of a fixed-size value.
_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY, _UINT32 = 8, 9, 4


class GGUFHeader:
    """A little-endian GGUF's metadata (only its string and uint32 scalars kept, in :attr:`values`) and
    tensor directory (:attr:`tensors`), read from a memory map without parsing array values."""

    @classmethod
    def read(cls, path: os.PathLike | str) -> GGUFHeader:
        """The header of the GGUF file at `path` (ValueError if it cannot be read as one)."""
        try:
            with open(path, "rb") as f:
                return cls(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
        except (OSError, ValueError, struct.error, UnicodeDecodeError) as error:
            raise ValueError(f"cannot read GGUF file {os.fspath(path)!r}: {error}") from None

    def __init__(self, view: mmap.mmap):
        self.view, self._at = view, 0
        if self._take(4) != b"GGUF":
            raise ValueError("not a GGUF file (bad magic)")
        version, n_tensors, n_kv = self._unpack("<IQQ")
        if not 2 <= version <= 3:
            raise ValueError(f"GGUF version {version} (big-endian or unknown; this reader takes 2 and 3)")
        self.values: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            (kind,) = self._unpack("<I")
            value = self._value(kind)
            if value is not None:
                self.values[key] = value
        self.tensors: dict[str, tuple[tuple[int, ...], int, int]] = {}  # name -> (ggml shape, type, offset)
        for _ in range(n_tensors):
            name = self._string()
            (n_dims,) = self._unpack("<I")
            shape = self._unpack(f"<{n_dims}Q")
            kind, offset = self._unpack("<IQ")
            self.tensors[name] = (shape, kind, offset)
        alignment = self.values.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment <= 0:
            raise ValueError(f"general.alignment must be a positive integer, got {alignment!r}")
        self.data_start = -(-self._at // alignment) * alignment

    def _take(self, n: int) -> bytes:
        if self._at + n > len(self.view):
            raise ValueError("truncated GGUF file")
        data = self.view[self._at : self._at + n]
        self._at += n
        return data

    def _unpack(self, layout: str) -> tuple:
        size = struct.calcsize(layout)
        if self._at + size > len(self.view):
            raise ValueError("truncated GGUF file")
        values = struct.unpack_from(layout, self.view, self._at)
        self._at += size
        return values

    def _string(self) -> str:
        (n,) = self._unpack("<Q")
        return self._take(n).decode("utf-8", errors="replace")

    def _value(self, kind: int) -> Any:
        """The value at the cursor: strings and uint32 scalars returned, anything else skipped (None)."""
        if kind == _STRING:
            return self._string()
        if kind == _UINT32:
            return self._unpack("<I")[0]
        if kind in _FIXED:
            self._at += _FIXED[kind]
        elif kind == _ARRAY:
            element, count = self._unpack("<IQ")
            if element in _FIXED:
                self._at += _FIXED[element] * count
            elif element == _STRING:  # a vocabulary: hop over each string by its length
                view, at = self.view, self._at
                for _ in range(count):
                    at += 8 + int.from_bytes(view[at : at + 8], "little")
                self._at = at
            else:
                for _ in range(count):
                    self._value(element)
        else:
            raise ValueError(f"unknown GGUF value type {kind}")
        if self._at > len(self.view):
            raise ValueError("truncated GGUF file")
        return None


class TokenEmbeddings:
    """The token-embedding table of one GGUF file, opened once."""

    def __init__(self, path: os.PathLike | str):
        self.path = os.fspath(path)
        header = GGUFHeader.read(self.path)
        view = header.view
        if TABLE not in header.tensors:
            raise ValueError(f"{self.path!r} has no {TABLE} tensor")
        shape, kind, offset = header.tensors[TABLE]
        if len(shape) != 2:
            raise ValueError(f"{self.path!r}: {TABLE} must be 2-D (n_embd x n_vocab), got shape {list(shape)}")
        try:
            self.qtype = gguf.GGMLQuantizationType(kind)
        except ValueError:
            raise ValueError(f"{self.path!r}: {TABLE} has an unknown tensor type {kind}") from None
        self.n_embd, self.n_vocab = int(shape[0]), int(shape[1])
        self.architecture = header.values.get("general.architecture")
        self.scale = float(np.sqrt(self.n_embd)) if self.architecture in SCALED_INPUT else 1.0
        block, block_bytes = gguf.GGML_QUANT_SIZES[self.qtype]
        row_bytes = self.n_embd // block * block_bytes
        start = header.data_start + offset
        if self.n_embd % block or start + self.n_vocab * row_bytes > len(view):
            raise ValueError(f"{self.path!r}: {TABLE} ({self.n_embd} x {self.n_vocab}, {self.qtype.name}) does not fit the file")
        dtype = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}.get(self.qtype)
        # n_vocab rows of raw blocks (uint8) for quantised types, of values for F32/F16.
        raw = np.frombuffer(view, dtype=np.uint8, count=self.n_vocab * row_bytes, offset=start)
        self._data = raw.reshape(self.n_vocab, row_bytes) if dtype is None else raw.view(dtype).reshape(self.n_vocab, -1)

    def rows(self, token_ids: Sequence[int]) -> np.ndarray:
        """len(token_ids) x n_embd float32 rows (dequantised, times :attr:`scale`), in the order given."""
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            return np.zeros((0, self.n_embd), np.float32)
        if ids.min() < 0 or ids.max() >= self.n_vocab:
            raise ValueError(f"token ids must be in [0, {self.n_vocab}), got {ids.min()}..{ids.max()}")
        unique, inverse = np.unique(ids, return_inverse=True)
        raw = np.ascontiguousarray(self._data[unique])
        if self.qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            values = raw.astype(np.float32)
        else:
            values = gguf.quants.dequantize(raw, self.qtype).astype(np.float32, copy=False)
        values = values.reshape(len(unique), self.n_embd)[inverse]
        return values * np.float32(self.scale) if self.scale != 1.0 else values
