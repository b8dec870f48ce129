"""The shared mechanism of the trimmed handlers: encode, select, decode the kept rows.

A trimmed handler is a stock llama-cpp-python handler with :class:`Trimming` mixed in before it
(same template, image loading, sampling, tools, streaming). The stock ``__call__`` tokenises the
prompt with libmtmd and evaluates each image chunk with ``mtmd_helper_eval_chunk_single``; for the
length of one call, :class:`Trimming` gives it a :class:`TrimmedMtmd` view of ``llama_cpp.mtmd_cpp``
(see :mod:`trimcpp.llamacpp`) in which image chunks take another way to the LLM:

1. ``mtmd_encode_chunk``, and a copy of ``mtmd_get_output_embd`` (N x ``n_embd_inp`` floats);
2. :func:`trimcpp.prune` with the question's token embeddings (read from the LLM's GGUF);
3. the kept rows, in their original order, decoded as embeddings at consecutive positions in
   batches of at most ``n_batch`` rows (:mod:`trimcpp.handlers.decode`, the way libmtmd's helper
   decodes all of them).

Everything else is the stock code path. The view also reports the kept count as the chunk's
token count, so the stock ``n_ctx`` check counts what the LLM will really see.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Optional

import gguf
import llama_cpp
import llama_cpp.mtmd_cpp as mtmd_cpp
import numpy as np

from ..embeddings import TokenEmbeddings
from ..llamacpp import (
    MtmdView,
    StockHooks,
    encoded_rows,
    input_chunks,
    is_image,
    load_mmproj,
    set_out_position,
    silenced,
    use_view,
)
from ..selection import Keep, check_backend, check_keep, check_method, prune, resolve_keep, split_budget
from .decode import decode_rows, row_ids

KeepArg = Optional[Keep]
_DEFAULT: Any = object()  # keep not given: the handler's default (None means keep every row)


@dataclasses.dataclass
class ImageSelection:
    """What the handler did with one image of the last call."""

    image: int  # 0-based, in prompt order
    rows: int  # image rows libmtmd produced (all slices of a LLaVA-1.6 image)
    kept: int  # rows the LLM saw
    chunk_rows: list[int]  # rows per chunk (LLaVA-1.5: one; 1.6: the slices, then the overview)
    indices: list[np.ndarray]  # kept row indices per chunk, ascending
    encode_seconds: float = 0.0
    select_seconds: float = 0.0
    decode_seconds: float = 0.0


def user_texts(messages: list[Any]) -> list[str]:
    """The text parts of the user messages (ALGORITHM.md: no template boilerplate)."""
    texts = []
    for message in messages:
        if message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts += [part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text"]
    return [t for t in texts if t]


def image_target(keep: KeepArg, method: str, rows: int, chunks: int) -> int:
    """Rows the LLM sees of an image of `rows` rows in `chunks` chunks (at least one per chunk)."""
    if keep is None or method == "none":
        return rows
    return min(rows, max(resolve_keep("keep", keep, rows), chunks))


def select_image(chunks: list[np.ndarray], text: Optional[np.ndarray], keep: KeepArg, *, method: str,
                 stage1_ratio: float, backend: Optional[str] = None) -> list[np.ndarray]:
    """Kept rows (ascending) per chunk of one image whose chunks' rows are `chunks` (LLaVA-1.6: the
    slices, then the overview): the image's target split over the chunks with split_budget, each chunk
    pruned with its budget. The patched llama.cpp tools do the same in C++ (csrc/image.cpp)."""
    sizes = [c.shape[0] for c in chunks]
    target = image_target(keep, method, sum(sizes), len(chunks))
    if target >= sum(sizes):
        budgets = sizes
    elif len(chunks) == 1:
        budgets = [target]
    else:
        budgets = split_budget(chunks, target)
    return [np.arange(rows.shape[0], dtype=np.int64) if budget >= rows.shape[0] else
            prune(rows, text, budget, method=method, stage1_ratio=stage1_ratio, backend=backend)
            for rows, budget in zip(chunks, budgets)]


class Trimming(StockHooks):
    """The trimmed handlers' behaviour, mixed in before a stock handler class."""

    DEFAULT_KEEP: KeepArg = 64

    def __init__(
        self,
        clip_model_path: str,
        keep: KeepArg = _DEFAULT,
        *,
        method: str = "trimtokenator",
        stage1_ratio: float = 0.8,
        backend: Optional[str] = None,
        verbose: bool = True,
        **kwargs: Any,
    ):
        super().__init__(clip_model_path=clip_model_path, verbose=verbose, **kwargs)  # type: ignore[call-arg]
        owner = type(self).__name__
        self.keep = self.DEFAULT_KEEP if keep is _DEFAULT else keep
        check_method(owner, method, stage1_ratio)
        check_backend(owner, backend)
        self.method = method
        self.stage1_ratio = float(stage1_ratio)
        self.backend = backend
        self.last_selection: list[ImageSelection] = []
        self.last_text_rows = 0  # M: text-token rows the last call's stage 1 used
        self._tables: dict[str, TokenEmbeddings] = {}
        self._images_seen = 0

    @property
    def keep(self) -> KeepArg:
        """Rows kept per image: an int, a share in (0, 1] of each image's rows, or None (all)."""
        return self._keep

    @keep.setter
    def keep(self, value: KeepArg) -> None:
        self._keep = check_keep(type(self).__name__, value)

    def explain_mmproj_failure(self, llama: llama_cpp.Llama) -> str:
        """Why libmtmd refused the mmproj, in words (it only logs the reason)."""
        path = self.clip_model_path  # type: ignore[attr-defined]
        want = llama_cpp.llama_model_n_embd_inp(llama.model)
        try:
            reader = gguf.GGUFReader(path, "r")
            proj = next((t for t in reader.tensors if t.name == "mm.2.weight"), None)
            if proj is not None and int(proj.shape[1]) != want:
                return (
                    f"mmproj {path!r} projects image rows to {int(proj.shape[1])} values, but the LLM's "
                    f"embeddings have {want}: this mmproj belongs to another LLM"
                )
        except Exception:  # noqa: BLE001 - the file may not even be GGUF; fall through to the generic message
            pass
        return f"libmtmd could not load the mmproj {path!r} for this LLM (n_embd {want}); see its log"

    def image_loaded(self, bitmap: Any) -> None:
        # A distinct id per image: libmtmd gives it to every chunk (slice) of that image.
        self._images_seen += 1
        mtmd_cpp.mtmd_bitmap_set_id(bitmap, f"trimcpp-{self._images_seen}".encode())

    def text_rows(self, llama: llama_cpp.Llama, messages: list[Any]) -> np.ndarray:
        """Stage 1's text: the user messages' token embeddings, from the LLM's GGUF (opened once)."""
        path = os.fspath(llama.model_path)
        table = self._tables.get(path)
        if table is None:
            table = self._tables[path] = TokenEmbeddings(path)
        ids: list[int] = []
        for text in user_texts(messages):
            ids += llama.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        return table.rows(ids)

    def __call__(self, *, llama: llama_cpp.Llama, messages: list[Any], **kwargs: Any):
        load_mmproj(self, llama)
        text = self.text_rows(llama, messages)
        view = TrimmedMtmd(self, llama, text)
        self.last_selection = view.selections
        self.last_text_rows = text.shape[0]
        with use_view(self, view):
            return super().__call__(llama=llama, messages=messages, **kwargs)  # type: ignore[misc]


class TrimmedMtmd(MtmdView):
    """``llama_cpp.mtmd_cpp`` as the stock handler sees it during one trimmed call."""

    def __init__(self, handler: Trimming, llama: llama_cpp.Llama, text: np.ndarray):
        self._handler = handler
        self._llama = llama
        self._text = text if text.shape[0] > 0 else None
        self._chunks: Any = None
        self._plans: dict[int, tuple[ImageSelection, np.ndarray]] = {}  # chunk -> (its image, kept rows)
        self.selections: list[ImageSelection] = []

    def mtmd_tokenize(self, ctx, chunks, text, bitmaps, n_bitmaps):
        self._chunks = chunks
        status = mtmd_cpp.mtmd_tokenize(ctx, chunks, text, bitmaps, n_bitmaps)
        if status == 0:
            self._check_length()
        return status

    def _check_length(self) -> None:
        """Refuses, before encoding anything, a prompt longer than the context even after pruning
        (the Llama's token buffer has exactly n_ctx slots)."""
        text, images = 0, {}  # image id -> (rows, chunks)
        for i, chunk in enumerate(input_chunks(self._chunks)):
            n = mtmd_cpp.mtmd_input_chunk_get_n_tokens(chunk)
            if is_image(chunk):
                key = mtmd_cpp.mtmd_input_chunk_get_id(chunk) or i
                rows, count = images.get(key, (0, 0))
                images[key] = (rows + n, count + 1)
            else:
                text += n
        handler = self._handler
        total = text + sum(image_target(handler.keep, handler.method, rows, count) for rows, count in images.values())
        limit = len(self._llama.input_ids)
        if total > limit:
            raise ValueError(
                f"Prompt exceeds n_ctx: {total} tokens ({text} text, {total - text} image rows after pruning) > {limit}"
            )

    def mtmd_input_chunk_get_n_tokens(self, chunk) -> int:
        if not is_image(chunk):
            return mtmd_cpp.mtmd_input_chunk_get_n_tokens(chunk)
        return len(self._plan(chunk)[1])

    def mtmd_helper_eval_chunk_single(self, ctx, lctx, chunk, n_past, seq_id, n_batch, logits_last, new_n_past):
        if not is_image(chunk):
            return mtmd_cpp.mtmd_helper_eval_chunk_single(
                ctx, lctx, chunk, n_past, seq_id, n_batch, logits_last, new_n_past
            )
        selection, rows = self._plan(chunk)
        start = int(getattr(n_past, "value", n_past))
        began = time.perf_counter()
        decode_rows(lctx, rows, start, int(getattr(seq_id, "value", seq_id)), int(n_batch))
        selection.decode_seconds += time.perf_counter() - began
        # Token ids for the image positions: a digest of the rows the LLM saw, so that prefix
        # matching (Llama.generate) or a LlamaCache only ever reuses KV state of identical rows.
        self._llama.input_ids[start : start + len(rows)] = row_ids(rows, self._llama.n_vocab())
        set_out_position(new_n_past, start + len(rows))
        return 0

    def _plan(self, chunk) -> tuple[ImageSelection, np.ndarray]:
        """Encodes and selects the whole image `chunk` belongs to, on first sight of any of its chunks."""
        key = int(chunk)
        if key in self._plans:
            return self._plans[key]
        handler = self._handler
        ctx = handler.mtmd_ctx  # type: ignore[attr-defined]
        if mtmd_cpp.mtmd_decode_use_mrope(ctx) or mtmd_cpp.mtmd_decode_use_non_causal(ctx, chunk):
            raise ValueError("trimcpp's handlers support LLaVA-style models (plain positions, causal decode) only")
        image_id = mtmd_cpp.mtmd_input_chunk_get_id(chunk)
        group = [c for c in self._image_chunks() if mtmd_cpp.mtmd_input_chunk_get_id(c) == image_id] or [chunk]
        n_embd = llama_cpp.llama_model_n_embd_inp(self._llama.model)
        selection = ImageSelection(image=len(self.selections), rows=0, kept=0, chunk_rows=[], indices=[])
        embeddings = []
        began = time.perf_counter()
        for c in group:
            with silenced(handler.verbose):  # type: ignore[attr-defined]
                rows = encoded_rows(ctx, c, n_embd)
            if rows is None:
                raise RuntimeError(f"libmtmd failed to encode image {selection.image}")
            embeddings.append(rows)
            selection.chunk_rows.append(rows.shape[0])
        selection.encode_seconds = time.perf_counter() - began
        selection.rows = sum(selection.chunk_rows)

        began = time.perf_counter()
        selection.indices = select_image(embeddings, self._text, handler.keep, method=handler.method,
                                         stage1_ratio=handler.stage1_ratio, backend=handler.backend)
        for c, rows, kept in zip(group, embeddings, selection.indices):
            self._plans[int(c)] = (selection, rows[kept])
        selection.kept = sum(len(k) for k in selection.indices)
        selection.select_seconds = time.perf_counter() - began
        self.selections.append(selection)
        return self._plans[key]

    def _image_chunks(self) -> list[Any]:
        return [] if self._chunks is None else [c for c in input_chunks(self._chunks) if is_image(c)]
