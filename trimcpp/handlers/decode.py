"""The decode of kept rows: image rows into the LLM as embeddings, and the token ids that stand for them."""

from __future__ import annotations

import ctypes
import hashlib

import llama_cpp
import numpy as np


def decode_rows(lctx, rows: np.ndarray, n_past: int, seq_id: int, n_batch: int) -> None:
    """Decodes `rows` as embeddings at positions n_past.. in batches of at most n_batch rows, like
    libmtmd's mtmd_helper_decode_image_chunk (same batches, so keeping all rows gives the same logits)."""
    if n_batch < 1:
        raise ValueError(f"n_batch must be >= 1, got {n_batch}")
    n, n_embd = rows.shape  # C-contiguous float32 (fancy indexing of the copied output)
    base = rows.ctypes.data
    batch = llama_cpp.llama_batch_ext_init(lctx)
    if not batch:
        raise RuntimeError("llama_batch_ext_init failed")
    try:
        for first in range(0, n, n_batch):
            llama_cpp.llama_batch_ext_clear(batch)
            for i in range(first, min(n, first + n_batch)):
                pointer = ctypes.cast(base + i * n_embd * 4, ctypes.POINTER(ctypes.c_float))
                index = llama_cpp.llama_batch_ext_add_embd(batch, seq_id, llama_cpp.llama_embd(pointer, 1, n_embd))
                if index < 0:
                    raise RuntimeError(f"llama_batch_ext_add_embd failed ({index}) at row {i}")
                position = llama_cpp.llama_pos(n_past + i)
                llama_cpp.llama_batch_ext_set_pos(batch, index, ctypes.byref(position))
            status = llama_cpp.llama_process(lctx, llama_cpp.LLAMA_PROCESS_TYPE_DECODE, batch)
            if status != 0:
                raise RuntimeError(f"llama.cpp failed to decode image rows (status {status})")
    finally:
        llama_cpp.llama_batch_ext_free(batch)


def row_ids(rows: np.ndarray, n_vocab: int) -> np.ndarray:
    """Token ids derived from the rows' bytes: equal rows give equal ids, other rows other ids."""
    digest = hashlib.blake2b(np.ascontiguousarray(rows).tobytes(), digest_size=16).digest()
    rng = np.random.default_rng(np.frombuffer(digest, dtype=np.uint64))
    return rng.integers(0, n_vocab, size=rows.shape[0], dtype=np.int64)
