"""The decode of kept rows: image rows into the LLM as embeddings at their positions, and the
token ids that stand for them."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
from typing import Callable, Iterator, Optional

import llama_cpp
import numpy as np

MROPE_SECTIONS = 4  # positions per embedding for M-RoPE models (t, y, x, z: llama.cpp's order)


def decode_rows(lctx, rows: np.ndarray, positions: np.ndarray, seq_id: int, n_batch: int,
                batches: Optional[Callable[[int], int]] = None) -> None:
    """Decodes `rows` as embeddings in batches of at most n_batch rows, like libmtmd's
    mtmd_helper_decode_image_chunk (same batches, so keeping all rows gives the same logits).

    `positions` has one entry per row (plain positions) or one row of MROPE_SECTIONS entries per
    row (M-RoPE: section-wise t, y, x, z, as libmtmd's helper lays them out). `batches`, if given,
    is called before each batch with the rows decoded so far and returns the next batch's size
    (a background prefill: it may raise there to stop between batches)."""
    if n_batch < 1:
        raise ValueError(f"n_batch must be >= 1, got {n_batch}")
    n, n_embd = rows.shape  # C-contiguous float32 (fancy indexing of the copied output)
    slots = np.zeros((n, MROPE_SECTIONS), dtype=np.int32)  # llama_batch_ext_set_pos reads up to 4
    slots[:, : positions.reshape(n, -1).shape[1]] = positions.reshape(n, -1)
    base = rows.ctypes.data
    batch = llama_cpp.llama_batch_ext_init(lctx)
    if not batch:
        raise RuntimeError("llama_batch_ext_init failed")
    try:
        first = 0
        while first < n:
            size = n_batch if batches is None else max(1, min(n_batch, batches(first)))
            llama_cpp.llama_batch_ext_clear(batch)
            for i in range(first, min(n, first + size)):
                pointer = ctypes.cast(base + i * n_embd * 4, ctypes.POINTER(ctypes.c_float))
                index = llama_cpp.llama_batch_ext_add_embd(batch, seq_id, llama_cpp.llama_embd(pointer, 1, n_embd))
                if index < 0:
                    raise RuntimeError(f"llama_batch_ext_add_embd failed ({index}) at row {i}")
                position = slots[i].ctypes.data_as(ctypes.POINTER(llama_cpp.llama_pos))
                llama_cpp.llama_batch_ext_set_pos(batch, index, position)
            status = llama_cpp.llama_process(lctx, llama_cpp.LLAMA_PROCESS_TYPE_DECODE, batch)
            if status == 2 and batches is not None:
                raise Aborted()  # abortable(): llama.cpp dropped this batch's cells
            if status != 0:
                raise RuntimeError(f"llama.cpp failed to decode image rows (status {status})")
            first += size
    finally:
        llama_cpp.llama_batch_ext_free(batch)


class Aborted(Exception):
    """A batch of :func:`decode_rows` was abandoned through its :func:`abortable` flag."""


@contextlib.contextmanager
def attention(lctx, causal: bool) -> Iterator[None]:
    """Within the block the LLM attends causally or not; causal again afterwards, also on errors
    (libmtmd's scope_non_causal)."""
    if causal:
        yield
        return
    llama_cpp.llama_set_causal_attn(lctx, False)
    try:
        yield
    finally:
        llama_cpp.llama_set_causal_attn(lctx, True)


def row_ids(rows: np.ndarray, n_vocab: int, count: int) -> np.ndarray:
    """`count` token ids derived from the rows' bytes: equal rows give equal ids, other rows other ids."""
    digest = hashlib.blake2b(np.ascontiguousarray(rows).tobytes(), digest_size=16).digest()
    rng = np.random.default_rng(np.frombuffer(digest, dtype=np.uint64))
    return rng.integers(0, n_vocab, size=count, dtype=np.int64)
