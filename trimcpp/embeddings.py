"""Text-token embeddings for stage 1, read from the LLM's own GGUF (``token_embd.weight``).

The ``gguf`` package (llama.cpp's reader) memory-maps the file; only the rows asked for are read
and dequantised, so a 7B model's 32000-row table costs nothing until a question is asked.

Stage 1 compares image rows with text rows as the LLM receives them. Most architectures take the
table's rows as they are; the Gemma family multiplies token embeddings (and only those: image rows
go in unscaled) by sqrt(n_embd) in its graph (llama.cpp ``src/models/gemma*.cpp``), so for those
the rows come back scaled the same way (:data:`SCALED_INPUT`).
"""

from __future__ import annotations

import os
from typing import Sequence

import gguf
import numpy as np

TABLE = "token_embd.weight"

# Architectures whose graph scales token embeddings (not embedding inputs) by sqrt(n_embd).
SCALED_INPUT = frozenset({"gemma", "gemma2", "gemma3", "gemma3n", "gemma4", "gemma-embedding"})


class TokenEmbeddings:
    """The token-embedding table of one GGUF file, opened once."""

    def __init__(self, path: os.PathLike | str):
        self.path = os.fspath(path)
        try:
            reader = gguf.GGUFReader(self.path, "r")
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot read GGUF file {self.path!r}: {error}") from None
        tensor = next((t for t in reader.tensors if t.name == TABLE), None)
        if tensor is None:
            raise ValueError(f"{self.path!r} has no {TABLE} tensor")
        self.qtype = gguf.GGMLQuantizationType(tensor.tensor_type)
        self.n_embd = int(tensor.shape[0])
        self.n_vocab = int(tensor.shape[1])
        field = reader.get_field("general.architecture")
        self.architecture = None if field is None else str(field.contents())
        self.scale = float(np.sqrt(self.n_embd)) if self.architecture in SCALED_INPUT else 1.0
        # n_vocab rows of raw blocks (uint8) for quantised types, of values for F32/F16/BF16.
        self._data = tensor.data.reshape(self.n_vocab, -1)

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
