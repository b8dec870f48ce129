"""The shared mechanism of the trimmed handlers: encode, select, decode the kept rows.

A trimmed handler is a stock llama-cpp-python handler with :class:`Trimming` mixed in before it
(same template, image loading, sampling, tools, streaming). The stock ``__call__`` tokenises the
prompt with libmtmd and evaluates each image chunk with ``mtmd_helper_eval_chunk_single``; for the
length of one call, :class:`Trimming` gives it a :class:`TrimmedMtmd` view of ``llama_cpp.mtmd_cpp``
(see :mod:`trimcpp.llamacpp`) in which image chunks take another way to the LLM:

1. ``mtmd_encode_chunk``, and a copy of ``mtmd_get_output_embd`` (N x ``n_embd_inp`` floats);
2. :func:`trimcpp.prune` with the question's token embeddings (read from the LLM's GGUF);
3. the kept rows, in their original order, decoded as embeddings in batches of at most
   ``n_batch`` rows (:mod:`trimcpp.handlers.decode`, the way libmtmd's helper decodes all of them).

Where the kept rows sit is the model's business, asked of libmtmd at run time
(ALGORITHM.md, "Placing the kept rows"):

- plain positions (LLaVA, Gemma 3, ...): consecutive positions from the image's first one; the
  prompt goes on right after the last kept row;
- M-RoPE (Qwen2-VL, Qwen2.5-VL, ...; ``mtmd_decode_use_mrope``): each kept row at its original
  (t, y, x) position from ``mtmd_image_tokens_get_decoder_pos``; the prompt goes on where the
  stock handler goes on (``n_pos`` positions after the image's first one);
- non-causal images (Gemma 3; ``mtmd_decode_use_non_causal``): causal attention off while the
  image's rows are decoded, all of them in one batch (a clear error when ``n_ubatch`` is smaller).

Everything else is the stock code path. The view also reports the kept count as the chunk's
token count, so the stock ``n_ctx`` check counts what the LLM will really see.

The encoder runs with the handler's own settings (:mod:`.encoder`: flash attention ``auto`` and
every core by default, the image token budget), and :meth:`Trimming.preload` encodes a picture in
the background before its question comes; :meth:`Trimming.attach` also prefills its every row
while the question is typed, and the question takes the sooner of that and the pruned path
(:mod:`.attach`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import dataclasses
import hashlib
import os
import threading
import time
import weakref
from typing import Any, Optional, Union

import gguf
import llama_cpp
import llama_cpp.mtmd_cpp as mtmd_cpp
import numpy as np

from ..embeddings import TokenEmbeddings
from ..llamacpp import (
    MtmdView,
    StockHooks,
    abortable,
    encode_picture,
    encoded_rows,
    input_chunks,
    is_image,
    llama_closed,
    load_mmproj,
    per_thread,
    prompt_hooks,
    set_out_position,
    silenced,
    trim_kv,
    use_view,
)
from ..selection import (
    DEFAULT_ALIGNMENT,
    DEFAULT_STAGE1_RATIO,
    Keep,
    Stage1,
    check_backend,
    check_cpu_only,
    check_keep,
    check_method,
    prune,
    resolve_keep,
    split_budget,
)
from .attach import POLICIES, Attached, Decision, Prefill, PrefillStopped, Rates, continues, next_batch
from .conversation import FOLLOW_UPS, ImageCache, KvRecord, Restart, Reuse
from .decode import Aborted, attention, decode_rows, row_ids
from .encoder import EncoderSettings, FlashAttn

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
    encode_seconds: float = 0.0  # this call's encoder time (0 for a picture found in the image cache)
    select_seconds: float = 0.0
    decode_seconds: float = 0.0
    wait_seconds: float = 0.0  # time this call waited for a preload of the picture that was still encoding
    preloaded: bool = False  # the rows came from the image cache or a preload: this call encoded nothing
    path: Optional[str] = None  # an attached picture (handler.attach): "full" (every row, prefilled) or "pruned"
    prefilled_rows: int = 0  # rows the background prefill had decoded when the question came ("full")
    saved_seconds: float = 0.0  # background encode and prefill done before the question that this answer used


@dataclasses.dataclass
class Preloaded:
    """A picture encoded by :meth:`Trimming.preload` (the result of its future)."""

    digest: str  # sha256 of the picture's bytes
    rows: int  # image rows libmtmd produced (all chunks)
    chunk_rows: list[int]
    encode_seconds: float  # 0 when the picture was already in the image cache
    chunks: list[np.ndarray] = dataclasses.field(repr=False)  # the encoder's rows per chunk


class PreloadSuperseded(RuntimeError):
    """A preload that did not encode because what it was for went away (the encoder settings
    changed, the Llama closed): a request waiting for it encodes the picture itself."""


def image_parts(messages: list[Any]) -> list[tuple[int, dict[str, Any]]]:
    """(message index, part) of each ``image_url`` part of the user messages, in prompt order: where
    the stock handlers find a prompt's images."""
    return [(i, part) for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "user"
            and isinstance(m.get("content"), list)
            for part in m["content"] if isinstance(part, dict) and part.get("type") == "image_url"]


def part_url(part: dict[str, Any]) -> Optional[str]:
    """An ``image_url`` part's URL (given as a string or as ``{"url": ...}``), or None if it has none."""
    url = part.get("image_url")
    url = url.get("url") if isinstance(url, dict) else url
    return url if isinstance(url, str) else None


def message_texts(message: Any) -> list[str]:
    """The text of a chat message: its content string, or its text parts."""
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text"]
    return []


def user_texts(messages: list[Any]) -> list[str]:
    """The text parts of the user messages (ALGORITHM.md: no template boilerplate)."""
    return [t for message in messages if message.get("role") == "user" for t in message_texts(message) if t]


def check_no_marker(owner: str, messages: list[Any]) -> None:
    """Raises ValueError when a message's text holds libmtmd's picture marker: libmtmd would take it for
    a picture and fail to tokenise the prompt (llama-cpp-python says "error code 2")."""
    marker = mtmd_cpp.mtmd_default_marker().decode()
    for message in messages if isinstance(messages, list) else ():
        if any(isinstance(text, str) and marker in text for text in message_texts(message)):
            raise ValueError(f"{owner}: a {message.get('role', 'chat')} message's text contains {marker!r}, "
                             "libmtmd's placeholder for a picture; send pictures as image_url parts and leave "
                             "the placeholder out of the text")


def image_target(keep: KeepArg, method: str, rows: int, chunks: int) -> int:
    """Rows the LLM sees of an image of `rows` rows in `chunks` chunks (at least one per chunk)."""
    if keep is None or method == "none":
        return rows
    return min(rows, max(resolve_keep("keep", keep, rows), chunks))


def select_image(chunks: list[np.ndarray], text: Optional[np.ndarray], keep: KeepArg, *, method: str,
                 stage1_ratio: Stage1, alignment: str = DEFAULT_ALIGNMENT, backend: Optional[str] = None) -> list[np.ndarray]:
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
            prune(rows, text, budget, method=method, stage1_ratio=stage1_ratio, alignment=alignment, backend=backend)
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
        stage1_ratio: Stage1 = DEFAULT_STAGE1_RATIO,
        alignment: str = DEFAULT_ALIGNMENT,
        backend: Optional[str] = None,
        follow_ups: str = "keep-rows",
        image_cache_bytes: int = 256 << 20,
        reuse_kv: bool = True,
        encoder_flash_attn: FlashAttn = "auto",
        encoder_threads: Optional[int] = None,
        image_min_tokens: Optional[int] = None,
        image_max_tokens: Optional[int] = None,
        attach_policy: str = "auto",
        verbose: bool = True,
        **kwargs: Any,
    ):
        owner = type(self).__name__
        try:
            self._cache = ImageCache(image_cache_bytes)
        except ValueError as error:
            raise ValueError(f"{owner}: {error}") from None
        super().__init__(clip_model_path=clip_model_path, verbose=verbose, **kwargs)  # type: ignore[call-arg]
        self._encoder = EncoderSettings(encoder_flash_attn, encoder_threads, image_min_tokens,
                                        image_max_tokens).check(owner, clip_model_path)
        self._llama: Optional[weakref.ref] = None  # the Llama of the last call or preload
        self.keep = self.DEFAULT_KEEP if keep is _DEFAULT else keep
        check_method(owner, method, stage1_ratio, alignment)
        check_backend(owner, backend)
        check_cpu_only(owner, method, backend)
        self.method = method
        self.stage1_ratio = stage1_ratio if isinstance(stage1_ratio, str) else float(stage1_ratio)
        self.alignment = alignment
        self.backend = backend
        self._kv = KvRecord()
        self.follow_ups = follow_ups
        self.reuse_kv = reuse_kv
        self.last_selection: list[ImageSelection] = []
        self.last_text_rows = 0  # M: text-token rows of all user text in the last call
        self.last_reused = 0  # prompt positions the last call found in the KV cache
        self.images_encoded = 0  # pictures the image encoder has run on (a call's or a preload's)
        self._tables: dict[str, TokenEmbeddings] = {}
        self._lock = threading.RLock()  # one call (or background prefill) on the LLM at a time
        self._attach = threading.Condition()  # guards the fields below and every Prefill's
        self._prefill: Optional[Prefill] = None  # the last attach's background prefill
        self._active = 0  # calls in progress (a stream: until it ends): a background prefill waits for 0
        self._live: set[Prefill] = set()  # prefills not ended (a superseded one may still be stopping)
        self._rates = Rates()
        self.attach_policy = attach_policy

    _pictures = per_thread("pictures", None)  # sha256 of each image of this thread's call, in prompt order

    @property
    def attach_policy(self) -> str:
        """What a question does with the background prefill of :meth:`attach`: "auto" (the sooner of
        finishing it and the pruned path), "full" (finish it: every row), "pruned" (attach only encodes)."""
        return self._attach_policy

    @attach_policy.setter
    def attach_policy(self, value: str) -> None:
        if value not in POLICIES:
            raise ValueError(f"{type(self).__name__}: attach_policy must be one of {', '.join(POLICIES)}, got {value!r}")
        self._attach_policy = value

    @property
    def keep(self) -> KeepArg:
        """Rows kept per image: an int, a share in (0, 1] of each image's rows, or None (all)."""
        return self._keep

    @keep.setter
    def keep(self, value: KeepArg) -> None:
        self._keep = check_keep(type(self).__name__, value)

    @property
    def follow_ups(self) -> str:
        """Which user text selects a follow-up's rows: "keep-rows" or "reselect" (ALGORITHM.md)."""
        return self._follow_ups

    @follow_ups.setter
    def follow_ups(self, value: str) -> None:
        if value not in FOLLOW_UPS:
            raise ValueError(f"{type(self).__name__}: follow_ups must be one of {', '.join(FOLLOW_UPS)}, got {value!r}")
        self._follow_ups = value

    @property
    def reuse_kv(self) -> bool:
        """Whether a call reuses what this handler left in the Llama's KV cache."""
        return self._reuse_kv

    @reuse_kv.setter
    def reuse_kv(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"{type(self).__name__}: reuse_kv must be True or False, got {value!r}")
        if not value and getattr(self, "_attach", None) is not None:
            self.cancel_attach()
        self._reuse_kv = value
        if not value:
            self._kv.drop()

    @property
    def encoder(self) -> EncoderSettings:
        """The encoder's settings (set them through the four properties below)."""
        return self._encoder

    def set_encoder(self, **change: Any) -> None:
        """Changes several encoder settings at once (``flash_attn``, ``threads``, ``image_min_tokens``,
        ``image_max_tokens``), checked together: a ValueError leaves all of them as they were. Waits
        for a call in progress and for an encode in flight (a call's settings do not move under it)."""
        changed = lambda: dataclasses.replace(self._encoder, **change).check(type(self).__name__, self.clip_model_path)  # type: ignore[attr-defined]  # noqa: E731
        if changed() == self._encoder:
            return  # nothing to wait for
        self.cancel_attach()  # its rows would be of the old settings
        with self._lock, self.encoder_lock:  # type: ignore[attr-defined]
            self._encoder = changed()

    def restore_encoder(self, settings: EncoderSettings) -> None:
        """Puts back encoder settings this handler had (as :attr:`encoder` gave them), unchecked:
        what was valid then is put back even if the mmproj cannot be read now."""
        if settings != self._encoder:
            self.cancel_attach()
            with self._lock, self.encoder_lock:  # type: ignore[attr-defined]
                self._encoder = settings

    @property
    def encoder_flash_attn(self) -> FlashAttn:
        """The encoder's flash attention: "auto" (libmtmd's default: on where supported), True or False."""
        return self._encoder.flash_attn

    @encoder_flash_attn.setter
    def encoder_flash_attn(self, value: FlashAttn) -> None:
        self.set_encoder(flash_attn=value)

    @property
    def encoder_threads(self) -> Optional[int]:
        """The encoder's CPU threads (None: the Llama's n_threads_batch)."""
        return self._encoder.threads

    @encoder_threads.setter
    def encoder_threads(self, value: Optional[int]) -> None:
        self.set_encoder(threads=value)

    @property
    def image_min_tokens(self) -> Optional[int]:
        """Fewest rows a dynamic-resolution encoder makes of an image (None: the model's own)."""
        return self._encoder.image_min_tokens

    @image_min_tokens.setter
    def image_min_tokens(self, value: Optional[int]) -> None:
        self.set_encoder(image_min_tokens=value)

    @property
    def image_max_tokens(self) -> Optional[int]:
        """Most rows a dynamic-resolution encoder makes of an image (None: the model's own)."""
        return self._encoder.image_max_tokens

    @image_max_tokens.setter
    def image_max_tokens(self, value: Optional[int]) -> None:
        self.set_encoder(image_max_tokens=value)

    def encoder_fields(self, llama: llama_cpp.Llama) -> dict[str, Any]:
        return self._encoder.fields(llama)

    def explain_mmproj_failure(self, llama: llama_cpp.Llama) -> str:
        """Why libmtmd refused the mmproj, in words (it only logs the reason)."""
        path = self.clip_model_path  # type: ignore[attr-defined]
        want = llama_cpp.llama_model_n_embd_inp(llama.model)
        try:
            tensors = {t.name: t for t in gguf.GGUFReader(path, "r").tensors}
            # The projector's last matrix (ggml order: ne[0] inputs, ne[1] outputs; Gemma 3 transposed).
            width = (int(tensors["mm.input_projection.weight"].shape[0]) if "mm.input_projection.weight" in tensors
                     else int(tensors["mm.2.weight"].shape[1]) if "mm.2.weight" in tensors else None)
            if width is not None and width != want:
                return (
                    f"mmproj {path!r} projects image rows to {width} values, but the LLM's "
                    f"embeddings have {want}: this mmproj belongs to another LLM"
                )
        except Exception:  # noqa: BLE001 - the file may not even be GGUF; fall through to the generic message
            pass
        return f"libmtmd could not load the mmproj {path!r} for this LLM (n_embd {want}); see its log"

    @property
    def image_cache(self) -> ImageCache:
        """The encoded rows of recent pictures (``limit``, ``bytes``, ``hits``)."""
        return self._cache

    def image_loaded(self, bitmap: Any, image_bytes: bytes) -> None:
        # A distinct id per image of the prompt (libmtmd gives it to every chunk of that image),
        # carrying the picture's digest for the image cache.
        picture = hashlib.sha256(image_bytes).hexdigest()
        self._pictures.append(picture)
        mtmd_cpp.mtmd_bitmap_set_id(bitmap, f"trimcpp-{len(self._pictures)}-{picture}".encode())

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

    def image_texts(self, llama: llama_cpp.Llama, messages: list[Any], everything: np.ndarray) -> list[np.ndarray]:
        """Stage 1's text for each image of the prompt, in order: with follow_ups "reselect" all user
        text (`everything`, the text_rows of all messages); with "keep-rows" the user text up to and
        including the message the image came in, so an image's rows stay those chosen in the turn it
        arrived (ALGORITHM.md, conversations)."""
        owners = [i for i, _ in image_parts(messages)]
        if self.follow_ups == "reselect":
            return [everything] * len(owners)
        texts: dict[int, np.ndarray] = {}
        for owner in owners:
            if owner not in texts:
                texts[owner] = self.text_rows(llama, messages[: owner + 1])
        return [texts[owner] for owner in owners]

    def stock_call(self, **kwargs: Any) -> Any:
        """The stock handler's ``__call__``."""
        return super().__call__(**kwargs)  # type: ignore[misc]

    def picture_key(self, digest: str) -> tuple:
        """The image cache's key of a picture (its sha256) under the current encoder settings."""
        return ImageCache.picture_key(self.clip_model_path, self._encoder.rows_key(), digest)  # type: ignore[attr-defined]

    def preload(self, image: Union[bytes, str, os.PathLike], *,
                llama: Optional[llama_cpp.Llama] = None) -> concurrent.futures.Future:
        """Starts encoding a picture into the image cache in a background thread, so that a request
        about it later finds the encoder's rows ready (or waits for the encode in flight instead of
        encoding again). Returns a future whose result is a :class:`Preloaded` (already done when
        the picture is cached) and whose exception is the encode's error (the request then raises it).

        `image`: the picture file's bytes, a path, or a URL as a message's ``image_url`` gives it
        (loaded with this handler's ``load_image``, so a request's own picture has the same bytes).
        `llama`: the Llama the requests will use (default: the one of this handler's last call or
        preload). The picture is encoded with the encoder settings of this moment; needs the image
        cache (``image_cache_bytes`` > 0). If the handler has no mmproj context for `llama` yet, it
        is loaded here, in the caller's thread (llama-cpp-python silences the process's output while
        it loads one), and waits for an encode in flight; else this returns at once."""
        owner = f"{type(self).__name__}.preload"
        llama = self._served(owner, llama)
        return self._start_preload(owner, self._picture_bytes(owner, image), llama)

    def _served(self, owner: str, llama: Optional[llama_cpp.Llama]) -> llama_cpp.Llama:
        """The Llama a preload or attach is for (default: the last one served), checked."""
        if llama is None:
            llama = self._llama() if self._llama is not None else None
            if llama is None:
                raise ValueError(f"{owner}: pass llama= (this handler has not served a Llama yet)")
        if not isinstance(llama, llama_cpp.Llama):
            raise TypeError(f"{owner}: llama must be a llama_cpp.Llama, got {type(llama).__name__}")
        if not self._cache.limit:
            raise ValueError(f"{owner}: the image cache is off (image_cache_bytes=0), so nothing would keep the rows")
        return llama

    def _start_preload(self, owner: str, data: bytes, llama: llama_cpp.Llama) -> concurrent.futures.Future:
        settings = self._encoder  # read once: the key, the mmproj context and the encode are of these settings
        load_mmproj(self, llama)
        self._llama = weakref.ref(llama)
        digest = hashlib.sha256(data).hexdigest()
        key = ImageCache.picture_key(self.clip_model_path, settings.rows_key(), digest)  # type: ignore[attr-defined]
        future, mine = self._cache.in_flight(key)
        if mine:
            try:
                threading.Thread(target=self._preload, args=(future, key, llama, data, digest, settings),
                                 name="trimcpp-preload", daemon=True).start()
            except BaseException as error:  # no thread (e.g. the process is at its limit): nobody waits forever
                self._cache.landed(key, future)
                superseded = PreloadSuperseded(f"{owner}: could not start the encoding thread ({error})")
                superseded.__cause__ = error
                future.set_exception(superseded)  # a request waiting for it encodes the picture itself
                raise
        return future

    def _picture_bytes(self, owner: str, image: Union[bytes, str, os.PathLike]) -> bytes:
        if isinstance(image, (bytes, bytearray, memoryview)):
            data = bytes(image)
        elif isinstance(image, os.PathLike):
            try:
                with open(image, "rb") as f:
                    data = f.read()
            except OSError as error:
                raise ValueError(f"{owner}: cannot read {os.fspath(image)!r}: {error.strerror or error}") from None
        elif isinstance(image, str):
            data = self.load_image(image)  # type: ignore[attr-defined]
        else:
            raise TypeError(f"{owner}: image must be bytes, a path or a URL string, got {type(image).__name__}")
        if not data:
            raise ValueError(f"{owner}: the picture is empty (0 bytes)")
        return data

    def _preload(self, future: concurrent.futures.Future, key: tuple, llama: llama_cpp.Llama, data: bytes,
                 digest: str, settings: EncoderSettings) -> None:
        """The background thread of :meth:`preload`. The key leaves the in-flight table before the
        future is done, so whoever its result wakes finds the rows cached (or no encode in flight)."""
        try:
            cached, seconds = self._cache.get(key, hit=False), 0.0  # hits: requests that found rows
            if cached is None:
                with self.encoder_lock:  # settings and contexts cannot change while it is held
                    if llama_closed(llama):
                        raise PreloadSuperseded("the Llama was closed before the preload could start")
                    entry = self._contexts.get(id(llama))  # preload() loaded it; never loaded here
                    if self._encoder != settings or entry is None or entry[0] != settings.fields(llama):
                        raise PreloadSuperseded("the handler's encoder settings changed before the preload could start")
                    cached = self._cache.get(key, hit=False)  # encoded by a call meanwhile
                    if cached is None:
                        began = time.perf_counter()
                        # Not silenced(): that swaps the process's stdout and stderr, under whatever runs
                        # meanwhile; libmtmd's logs go through llama-cpp-python's logger (StockHooks).
                        cached = encode_picture(entry[1], data, llama_cpp.llama_model_n_embd_inp(llama.model))
                        seconds = time.perf_counter() - began
                        self.images_encoded += 1
                self._cache.put(key, cached)
            result = Preloaded(digest, sum(c.shape[0] for c in cached), [c.shape[0] for c in cached], seconds, cached)
        except BaseException as error:  # noqa: BLE001 - the future carries it to whoever waits
            self._cache.landed(key, future)
            future.set_exception(error)
        else:
            self._cache.landed(key, future)
            future.set_result(result)

    def attach(self, messages: list[Any], *, llama: Optional[llama_cpp.Llama] = None) -> concurrent.futures.Future:
        """Starts reading the pictures of the conversation's last user message while the question is
        typed: encodes them into the image cache (as :meth:`preload`), then, on a background thread
        while no call runs, prefills the prompt up to and including their every row into `llama`'s
        KV cache, in batches of a few seconds (:mod:`.attach`; a question stops one at once). The question's call
        then finishes or stops it (:attr:`attach_policy`); ``last_selection`` says which path answered.

        `messages`: the conversation so far, ending with the user message that holds the pictures
        (and no question yet). The question's call keeps the prefill if its messages start with these
        and its last user message starts with the attached one's content (the question's text after
        the pictures). Returns a future whose result is an :class:`~.attach.Attached`, with
        ``progress()`` (state, rows, prefilled_rows) and ``encodes`` (each picture's encode: a
        :class:`Preloaded`). A picture libmtmd cannot read fails the future, and the question's own
        encode raises the same error; any other failure of the prefill is raised by that question.
        A second attach stops the first; so do a call about another conversation,
        :meth:`cancel_attach` and a change of encoder settings. With ``attach_policy="pruned"``,
        ``reuse_kv=False``, a prompt that does not fit with every row, or ``follow_ups="reselect"``
        and earlier pictures, it only encodes."""
        owner = f"{type(self).__name__}.attach"
        llama = self._served(owner, llama)
        if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict) \
                or messages[-1].get("role") != "user":
            raise ValueError(f"{owner}: messages must be a list of chat messages ending with the user message "
                             "that holds the picture")
        check_no_marker(owner, messages)
        parts = [part for i, part in image_parts(messages) if i == len(messages) - 1]
        if not parts:
            raise ValueError(f"{owner}: the last user message has no picture (an image_url part)")
        urls = [part_url(part) for part in parts]
        data = [self._picture_bytes(owner, url) if url is not None else b"" for url in urls]
        if not all(data):
            raise ValueError(f"{owner}: an image_url part has no URL")
        encodes = [self._start_preload(owner, picture, llama) for picture in data]
        prefill = Prefill(self._attach, llama, copy.deepcopy(messages), [hashlib.sha256(d).hexdigest() for d in data])
        prefill.future.encodes = encodes
        with self._attach:
            previous, self._prefill = self._prefill, prefill
            self._live.add(prefill)
        if previous is not None:
            previous.stop()
        try:
            threading.Thread(target=self._attached, args=(prefill, encodes, previous), name="trimcpp-attach",
                             daemon=True).start()
        except BaseException as error:
            prefill.end(error=error)
            with self._attach:
                self._live.discard(prefill)
            raise
        return prefill.future

    def cancel_attach(self, llama: Optional[llama_cpp.Llama] = None) -> None:
        """Stops the background prefills of :meth:`attach` (of `llama`'s, if given; the rows they
        decoded leave the KV cache); returns once none uses the LLM (an encode in flight goes on
        into the image cache)."""
        with self._attach:
            if self._prefill is not None and llama in (None, self._prefill.llama):
                self._prefill = None
            live = [p for p in self._live if llama in (None, p.llama)]
        for prefill in live:
            self._stop(prefill)

    def attach_progress(self) -> Optional[dict[str, Any]]:
        """The last attach's progress (its future's ``progress()``), or None when there is none."""
        with self._attach:
            prefill = self._prefill
        return None if prefill is None else prefill.future.progress()

    def _stop(self, prefill: Prefill) -> None:
        """Stops `prefill` and waits until it no longer uses the LLM (not for an encode in flight;
        not at all in its own thread, e.g. a Llama it dropped, closing there)."""
        prefill.stop()
        with self._attach:
            while prefill.state == "prefilling" and not prefill.finished and prefill.thread != threading.get_ident():
                self._attach.wait()

    def _attached(self, prefill: Prefill, encodes: list[concurrent.futures.Future], previous: Optional[Prefill]) -> None:
        """The background thread of :meth:`attach`."""
        prefill.thread = threading.get_ident()
        llama = None  # held from the LLM phase until the prefill has ended: a Llama dropped meanwhile closes after
        try:
            if previous is not None:
                concurrent.futures.wait([previous.future])  # it stops at its next boundary
            encoded = [future.result() for future in encodes]
            prefill.encoded([e.chunk_rows for e in encoded], sum(e.encode_seconds for e in encoded))
            earlier = len(image_parts(prefill.messages)) > len(prefill.pictures)
            if self.attach_policy == "pruned" or not self.reuse_kv or (self.follow_ups == "reselect" and earlier):
                # Nothing a prefill could keep: no KV reuse, or earlier pictures whose rows the question picks
                prefill.end(Attached(prefill.pictures, prefill.rows, 0, "encoded", prefill.encode_seconds, 0.0))
                return
            self._wait_idle(prefill)
            llama = prefill.llama
            with self._lock:
                result = self._prefill_prompt(prefill, llama)
            prefill.end(result)
        except PrefillStopped:
            prefill.end(Attached(prefill.pictures, prefill.rows, 0, "stopped", prefill.encode_seconds, 0.0))
        except BaseException as error:  # noqa: BLE001 - the future (and the next call) carry it
            prefill.end(error=error)
        finally:
            with self._attach:
                self._live.discard(prefill)
                self._attach.notify_all()

    def _wait_idle(self, prefill: Prefill) -> None:
        """Until no call runs on the handler (or a call decides): the LLM is one call's at a time."""
        with self._attach:
            while prefill.order is None and self._active:
                self._attach.wait()
            if prefill.order == "stop":
                raise PrefillStopped()
            prefill.state = "prefilling"

    def _prefill_prompt(self, prefill: Prefill, llama: Optional[llama_cpp.Llama]) -> Attached:
        """Runs the stock call on the attach's messages up to the last row of its pictures (a
        :class:`TrimmedMtmd` with those pictures whole and the batches of :mod:`.attach`)."""
        prefill.checkpoint(0)  # stopped while it waited for the lock
        if llama is None or llama_closed(llama):
            raise PreloadSuperseded("the Llama was closed before the prefill could start")
        began = time.perf_counter()
        self._llama = weakref.ref(llama)
        load_mmproj(self, llama)
        texts = self.image_texts(llama, prefill.messages, self.text_rows(llama, prefill.messages))
        whole = self._kv.whole(llama) | frozenset(prefill.pictures)
        for attempt in range(2):
            self._pictures = []
            view = TrimmedMtmd(self, llama, texts, self._kv if attempt == 0 else None, whole=whole, prefill=prefill)
            try:
                with use_view(self, view), prompt_hooks(llama, clear=view.clear, evaluate=view.evaluate):
                    self.stock_call(llama=llama, messages=prefill.messages, max_tokens=1)
            except Restart:
                continue
            except PromptTooLong:  # every row does not fit (n_ctx, or n_ubatch): the question prunes
                return Attached(prefill.pictures, prefill.rows, 0, "encoded", prefill.encode_seconds, 0.0)
            except Prefilled as end:
                if end.length is None:
                    self._kv.drop()
                else:
                    self._kv.remember(llama, end.length, end.whole)
                done = prefill.rows if end.whole >= frozenset(prefill.pictures) else 0
                return Attached(prefill.pictures, prefill.rows, done, "prefilled" if done else "stopped",
                                prefill.encode_seconds, time.perf_counter() - began)
            except BaseException:
                self._kv.drop()
                raise
            self._kv.drop()
            raise RuntimeError("the attached pictures are not in the prompt the chat template makes of the messages")
        raise RuntimeError("the KV cache could not be emptied")  # not reached: attempt 1 never reuses

    def _claim(self, llama: llama_cpp.Llama, messages: list[Any]) -> Optional[Decision]:
        """A call's turn with the last attach's prefill: another conversation's (or another
        Llama's) stops; this conversation's is finished or stopped, as :attr:`attach_policy` and
        the measured speeds decide, and waited for. A failed prefill's error is raised here, once
        (a picture libmtmd cannot read is left to the call's own encode, which says so)."""
        with self._attach:
            prefill = self._prefill
        if prefill is None:
            return None
        if prefill.llama is not llama or not continues(messages, prefill.messages):
            self._stop(prefill)
            with self._attach:
                if self._prefill is prefill:
                    self._prefill = None
            return None
        began = time.perf_counter()
        done = prefill.claim(self._decide)
        try:
            result = prefill.future.result()
        except (PreloadSuperseded, ValueError):
            return None  # a picture libmtmd cannot read, ...: this call's own encode says so
        except Exception as error:
            raise RuntimeError(f"the background prefill of the attached picture failed: {error}") from error
        finally:
            with self._attach:
                if self._prefill is prefill:
                    self._prefill = None
        full = result.state == "prefilled"
        return Decision("full" if full else "pruned", frozenset(prefill.pictures), done if full else 0,
                        result.encode_seconds, result.prefill_seconds, time.perf_counter() - began)

    def _decide(self, prefill: Prefill) -> str:
        """With the question here: "finish" when the rows left take no longer than the pruned path's
        rows (seconds per row as measured on this Llama; ties to every row), else "stop"."""
        if self.attach_policy != "auto":
            return "finish" if self.attach_policy == "full" else "stop"
        kept = sum(image_target(self.keep, self.method, sum(rows), len(rows)) for rows in prefill.chunk_rows)
        left = prefill.rows - prefill.done
        background = self._rates.get(prefill.llama, "background")
        pruned = self._rates.get(prefill.llama, "pruned") or background
        if background is None or pruned is None:
            return "finish" if left <= kept else "stop"
        return "finish" if left * background <= kept * pruned else "stop"

    def _llama_closing(self, llama: weakref.ref, key: int) -> None:
        # Prefills on that Llama stop before its model and context are freed.
        if llama() is not None:
            self.cancel_attach(llama())
        super()._llama_closing(llama, key)

    def __call__(self, *, llama: llama_cpp.Llama, messages: list[Any], **kwargs: Any):
        check_no_marker(type(self).__name__, messages)
        with self._attach:
            self._active += 1  # no new prefill starts now; the one this call finishes does
        try:
            result = self._call(llama, messages, kwargs, self._claim(llama, messages))
        except BaseException:
            self._leave()
            raise
        if kwargs.get("stream"):
            return Held(result, self._leave)  # the LLM is busy until the stream ends
        self._leave()
        return result

    def _leave(self) -> None:
        with self._attach:
            self._active -= 1
            self._attach.notify_all()

    def _call(self, llama: llama_cpp.Llama, messages: list[Any], kwargs: dict[str, Any],
              decision: Optional[Decision]) -> Any:
        with self._lock:
            self._llama = weakref.ref(llama)
            load_mmproj(self, llama)
            everything = self.text_rows(llama, messages)
            texts = self.image_texts(llama, messages, everything)
            self.last_text_rows = everything.shape[0]
            whole = self._kv.whole(llama) if self.reuse_kv else frozenset()
            for attempt in range(2):
                self._pictures = []
                view = TrimmedMtmd(self, llama, texts, self._kv if self.reuse_kv and attempt == 0 else None,
                                   whole=whole, decision=decision)
                self.last_selection = view.selections
                try:
                    with use_view(self, view), prompt_hooks(llama, clear=view.clear, evaluate=view.evaluate):
                        result = self.stock_call(llama=llama, messages=messages, **kwargs)
                except Restart:
                    continue  # the cache could not drop a tail: again, from an empty cache
                except BaseException:
                    self._kv.drop()
                    raise
                self.last_reused = view.reused
                if self.reuse_kv:
                    self._kv.remember(llama, view.prompt_length, view.whole_kept)
                return result
            raise RuntimeError("the KV cache could not be emptied")  # not reached: attempt 1 never reuses


class Held:
    """A stream that calls `leave` once, when it ends, is closed or is dropped."""

    def __init__(self, stream: Any, leave: Any):
        self._stream, self._leave = stream, leave

    def __iter__(self) -> "Held":
        return self

    def __next__(self) -> Any:
        try:
            return next(self._stream)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        leave, self._leave = self._leave, None
        if leave is not None:
            try:
                getattr(self._stream, "close", lambda: None)()
            finally:
                leave()

    def __del__(self) -> None:
        self.close()


class PromptTooLong(ValueError):
    """The prompt does not fit the Llama's n_ctx (or a non-causal image its n_ubatch)."""


class Prefilled(Exception):
    """Ends the stock call of a background prefill after the attached pictures' last row:
    `length` positions in the cache (None: nothing may be assumed), `whole` the pictures among them
    decoded with every row."""

    def __init__(self, length: Optional[int], whole: frozenset):
        super().__init__()
        self.length, self.whole = length, whole


class TrimmedMtmd(MtmdView):
    """``llama_cpp.mtmd_cpp`` as the stock handler sees it during one trimmed call."""

    def __init__(self, handler: Trimming, llama: llama_cpp.Llama, texts: list[np.ndarray], kv: Optional[KvRecord], *,
                 whole: frozenset = frozenset(), decision: Optional[Decision] = None, prefill: Optional[Prefill] = None):
        self._handler = handler
        self._llama = llama
        self._texts = [t if t.shape[0] > 0 else None for t in texts]
        self._kv = kv
        self._decision = decision
        self._prefill = prefill  # a background prefill: its pictures whole, stoppable, and stop after them
        if decision is not None and decision.path == "full":
            whole |= decision.pictures
        # Pictures (sha256) kept whole where the KV cache holds every row of them at their place: a
        # picture prefilled on attach, in the call that asks about it and in that conversation's follow-ups.
        self._whole = whole
        self.whole_kept: frozenset = frozenset()  # pictures this prompt holds whole (for the KV record)
        self._forced: set[bytes] = set()  # image ids of a prefill's own pictures: whole, in stoppable batches
        self._prefilled = 0  # rows of the prefill's pictures decoded so far
        self._starts: dict[bytes, int] = {}  # image id -> its first position
        self._last_image: Optional[int] = None  # the prompt's last image chunk
        self._cells = self._limit = 0  # KV cells the prompt needs (as planned so far), and n_ctx
        self.reuse: Optional[Reuse] = None
        self.prompt_length = 0  # positions the prompt fills
        self._chunks: Any = None
        self._plans: dict[int, tuple[ImageSelection, np.ndarray, np.ndarray]] = {}  # chunk -> _plan's answer
        self.selections: list[ImageSelection] = []

    def mtmd_tokenize(self, ctx, chunks, text, bitmaps, n_bitmaps):
        self._chunks = chunks
        status = mtmd_cpp.mtmd_tokenize(ctx, chunks, text, bitmaps, n_bitmaps)
        if status == 0:
            self._check_length()
        return status

    def _check_length(self) -> None:
        """Refuses, before encoding anything, a prompt that does not fit even after pruning: the KV
        cache holds n_ctx cells (a cell per text token and per kept row), and the Llama's token
        buffer has n_ctx slots, one per position (M-RoPE: an image spans n_pos positions however
        many of its rows are kept). Also refuses a non-causal image whose rows do not fit in one
        ubatch (llama.cpp aborts on that)."""
        ctx = self._handler.mtmd_ctx  # type: ignore[attr-defined]
        text, images = 0, {}  # image id -> [rows, chunks, positions, non-causal]
        for i, chunk in enumerate(input_chunks(self._chunks)):
            n = mtmd_cpp.mtmd_input_chunk_get_n_tokens(chunk)
            if is_image(chunk):
                key = mtmd_cpp.mtmd_input_chunk_get_id(chunk) or i
                self._last_image = int(chunk)
                image = images.setdefault(key, [0, 0, 0, False])
                image[0] += n
                image[1] += 1
                image[2] += mtmd_cpp.mtmd_input_chunk_get_n_pos(chunk)
                image[3] = image[3] or mtmd_cpp.mtmd_decode_use_non_causal(ctx, chunk)
            else:
                text += n
        if self._prefill is not None:  # its pictures: the prompt's last ones
            self._forced = set(list(images)[-len(self._prefill.pictures):])
        targets = [image_target(self._keep(key), self._handler.method, rows, count)
                   for key, (rows, count, _, _) in images.items()]
        cells = text + sum(targets)
        positions = text + sum(image[2] for image in images.values()) if mtmd_cpp.mtmd_decode_use_mrope(ctx) else cells
        self.prompt_length = positions
        limit = len(self._llama.input_ids)
        self._cells, self._limit = cells, limit
        if max(cells, positions) > limit:
            what = f"{cells} tokens ({text} text, {cells - text} image rows after pruning)"
            if positions != cells:
                what += f", {positions} positions (M-RoPE)"
            raise PromptTooLong(f"Prompt exceeds n_ctx: {what} > {limit}")
        n_ubatch = llama_cpp.llama_n_ubatch(self._llama.ctx)
        for target, (_, count, _, non_causal) in zip(targets, images.values()):
            if non_causal and target > n_ubatch * count:
                raise PromptTooLong(self._ubatch_message(target, n_ubatch))
        if self._kv is not None:
            self.reuse = self._kv.begin(self._llama, positions)

    @property
    def reused(self) -> int:
        """Prompt positions found in the KV cache (0 without reuse)."""
        return 0 if self.reuse is None else self.reuse.kept

    def clear(self, original: Any) -> None:
        """The stock ``kv_cache_clear()``: with a reuse, the cache drops its tail at the first difference."""
        if self.reuse is None:
            original()

    def evaluate(self, original: Any, tokens: Any) -> None:
        """The stock ``llama.eval(tokens)`` of a text chunk: tokens already in the cache are skipped
        (and a background prefill told to stop stops before it)."""
        if self._prefill is not None:
            try:
                self._prefill.checkpoint(self._prefilled)
            except PrefillStopped:  # the cache keeps what it holds before this text
                at = self._llama.n_tokens
                raise Prefilled(at if trim_kv(self._llama, at) else None, self.whole_kept) from None
        tokens = list(tokens)
        reuse = self.reuse
        if reuse is not None and reuse.matching:
            n = reuse.text(self._llama.n_tokens, tokens)
            self._llama.n_tokens += n
            tokens = tokens[n:]
            if not tokens:
                return
            reuse.diverge(self._llama.n_tokens)
        original(tokens)

    @staticmethod
    def _ubatch_message(rows: int, n_ubatch: int) -> str:
        return (f"this model attends to an image's rows all at once (non-causal), so they must fit in one "
                f"ubatch: {rows} rows > n_ubatch {n_ubatch}; raise n_ubatch (and n_batch) or keep fewer rows")

    def mtmd_input_chunk_get_n_tokens(self, chunk) -> int:
        if not is_image(chunk):
            return mtmd_cpp.mtmd_input_chunk_get_n_tokens(chunk)
        return len(self._plan(chunk)[1])

    def mtmd_helper_eval_chunk_single(self, ctx, lctx, chunk, n_past, seq_id, n_batch, logits_last, new_n_past):
        start = int(getattr(n_past, "value", n_past))
        if not is_image(chunk):
            if self.reuse is not None:
                self.reuse.diverge(start)
            return mtmd_cpp.mtmd_helper_eval_chunk_single(
                ctx, lctx, chunk, n_past, seq_id, n_batch, logits_last, new_n_past
            )
        selection, rows, kept = self._plan(chunk)
        positions, n_pos = placement(ctx, chunk, kept, start)
        # Token ids for the image's positions: a digest of the rows the LLM saw, so that prefix
        # matching (here, Llama.generate, a LlamaCache) only ever reuses KV state of identical rows.
        ids = row_ids(rows, self._llama.n_vocab(), n_pos)
        if self.reuse is not None:
            if self.reuse.image(start, ids):
                set_out_position(new_n_past, start + n_pos)
                return self._after_image(chunk, start + n_pos)
            self.reuse.diverge(start)
        causal = not mtmd_cpp.mtmd_decode_use_non_causal(ctx, chunk)
        n_batch = int(n_batch)
        if not causal:
            n_ubatch = llama_cpp.llama_n_ubatch(lctx)
            if len(rows) > n_ubatch:
                raise ValueError(self._ubatch_message(len(rows), n_ubatch))
            n_batch = max(n_batch, len(rows))  # one batch: every row sees every other row
        began = time.perf_counter()
        image_id = mtmd_cpp.mtmd_input_chunk_get_id(chunk) or b""
        first = self._starts.setdefault(image_id, start)  # the image's first position (LLaVA-1.6: several chunks)
        batches, stop = None, contextlib.nullcontext()
        if self._prefill is not None:  # stoppable between batches, and within one (the abort flag)
            batches = self._batches(len(rows) if not causal else None, n_batch, image_id in self._forced)
            stop = abortable(lctx, self._prefill.abort)
        try:
            with attention(lctx, causal), stop:
                decode_rows(lctx, rows, positions, int(getattr(seq_id, "value", seq_id)), n_batch, batches)
        except (PrefillStopped, Aborted):
            # The image's rows leave the cache; the prompt before it stays.
            self._llama.n_tokens = first
            picture = image_id.decode().split("-")[-1]
            raise Prefilled(first if trim_kv(self._llama, first) else None, self.whole_kept - {picture}) from None
        seconds = time.perf_counter() - began
        selection.decode_seconds += seconds
        if batches is None:
            self._handler._rates.note(self._llama, "pruned", len(rows), seconds)
        elif image_id in self._forced:
            self._prefilled += len(rows)
        self._llama.input_ids[start : start + n_pos] = ids
        set_out_position(new_n_past, start + n_pos)
        return self._after_image(chunk, start + n_pos)

    def _after_image(self, chunk: Any, end: int) -> int:
        """A background prefill ends after the last image chunk (the stock call goes no further)."""
        if self._prefill is not None and int(chunk) == self._last_image:
            self._llama.n_tokens = end
            raise Prefilled(end, self.whole_kept)
        return 0

    def _batches(self, rows: Optional[int], n_batch: int, counted: bool = True) -> Any:
        """The batch sizes of a background prefill (decode_rows' `batches`): a checkpoint before each
        batch; about BATCH_SECONDS each at the speed measured, full-size ones once told to finish;
        `rows` (a non-causal image) all in one batch."""
        prefill, rates, llama = self._prefill, self._handler._rates, self._llama
        base = self._prefilled  # `counted`: whether this image's rows are the prefill's progress
        last = {"at": time.perf_counter(), "done": 0}

        def batches(done: int) -> int:
            now = time.perf_counter()
            if done > last["done"]:
                rates.note(llama, "background", done - last["done"], now - last["at"])
            last["at"], last["done"] = now, done
            finish = prefill.checkpoint(base + (done if counted else 0))
            if rows is not None:
                return rows
            return n_batch if finish else next_batch(rates.get(llama, "background"), n_batch)

        return batches

    def _plan(self, chunk) -> tuple[ImageSelection, np.ndarray, np.ndarray]:
        """Encodes and selects the whole image `chunk` belongs to, on first sight of any of its
        chunks: (the image's selection, the chunk's kept rows, their indices)."""
        key = int(chunk)
        if key in self._plans:
            return self._plans[key]
        handler = self._handler
        ctx = handler.mtmd_ctx  # type: ignore[attr-defined]
        image_id = mtmd_cpp.mtmd_input_chunk_get_id(chunk)
        group = [c for c in self._image_chunks() if mtmd_cpp.mtmd_input_chunk_get_id(c) == image_id] or [chunk]
        selection = ImageSelection(image=len(self.selections), rows=0, kept=0, chunk_rows=[], indices=[])
        picture = (image_id or b"").decode().split("-")[-1]
        embeddings = self._encoded(ctx, group, picture, selection)
        selection.chunk_rows = [rows.shape[0] for rows in embeddings]
        selection.rows = sum(selection.chunk_rows)

        began = time.perf_counter()
        whole = image_id in self._forced or (picture in self._whole and self._held_whole(ctx, group[0], embeddings))
        text = self._texts[selection.image] if selection.image < len(self._texts) else None
        selection.indices = select_image(embeddings, text, None if whole else handler.keep, method=handler.method,
                                         stage1_ratio=handler.stage1_ratio, alignment=handler.alignment,
                                         backend=handler.backend)
        for c, rows, kept in zip(group, embeddings, selection.indices):
            self._plans[int(c)] = (selection, rows[kept], kept)
        selection.kept = sum(len(k) for k in selection.indices)
        selection.select_seconds = time.perf_counter() - began
        if whole:
            self.whole_kept |= {picture}
        decision = self._decision
        if decision is not None and picture in decision.pictures:
            full = whole and decision.path == "full"  # else the KV cache no longer held it: the pruned path
            selection.path = "full" if full else "pruned"
            selection.prefilled_rows = decision.rows_ahead if full else 0
            selection.saved_seconds = max(0.0, decision.encode_seconds + full * decision.prefill_seconds - decision.waited)
        self.selections.append(selection)
        return self._plans[key]

    def _held_whole(self, ctx: Any, chunk: Any, embeddings: list[np.ndarray]) -> bool:
        """Whether the KV cache holds every row of this image where it starts now (a picture prefilled
        on attach, or answered whole earlier in this conversation), and the prompt still fits with
        every row; if so, the prompt's counts become those of the whole image."""
        reuse, start = self.reuse, self._llama.n_tokens
        rows = embeddings[0]
        n_pos = int(mtmd_cpp.mtmd_input_chunk_get_n_pos(chunk)) if mtmd_cpp.mtmd_decode_use_mrope(ctx) else rows.shape[0]
        if reuse is None or not reuse.holds(start, row_ids(rows, self._llama.n_vocab(), n_pos)):
            return False
        total = sum(r.shape[0] for r in embeddings)
        extra = total - image_target(self._handler.keep, self._handler.method, total, len(embeddings))
        if self._cells + extra > self._limit:
            return False
        self._cells += extra
        if not mtmd_cpp.mtmd_decode_use_mrope(ctx):
            self.prompt_length += extra
        reuse.limit = min(self.prompt_length - 1, len(reuse.old))
        return True

    def _keep(self, image_id: Any) -> KeepArg:
        """The keep `_check_length` counts for the image whose libmtmd id is `image_id`: None (every
        row) for a prefill's own pictures; a picture kept whole because the KV cache holds it is
        counted as the handler's keep, then recounted if it is (:meth:`_held_whole`)."""
        return None if image_id in self._forced else self._handler.keep

    def _encoded(self, ctx: Any, group: list[Any], picture: str, selection: ImageSelection) -> list[np.ndarray]:
        """The encoder's rows of each chunk of one image: from the image cache, from a preload in
        flight (waited for; ``wait_seconds``), or encoded here (``encode_seconds``), in flight
        meanwhile so that a preload of the same picture waits instead of encoding again."""
        handler = self._handler
        cache = handler.image_cache
        fits = lambda chunks: chunks is not None and len(chunks) == len(group) and all(  # noqa: E731
            rows.shape[0] == mtmd_cpp.mtmd_input_chunk_get_n_tokens(c) for rows, c in zip(chunks, group))
        key, future = (handler.picture_key(picture) if cache.limit else None), None
        for _ in range(2) if key is not None else ():
            chunks = cache.get(key)
            if fits(chunks):
                selection.preloaded = True
                return chunks
            future, mine = cache.in_flight(key)
            if mine:
                break
            began = time.perf_counter()  # a preload is encoding this picture: wait for it
            try:
                chunks = future.result().chunks  # its error is this call's
            except (concurrent.futures.CancelledError, PreloadSuperseded):
                continue  # it gave up: encode here (it has left the in-flight table)
            finally:
                selection.wait_seconds += time.perf_counter() - began
                future = None
            if fits(chunks):
                selection.preloaded = True
                return chunks
            break  # not this libmtmd's chunks of the picture: encode, not in flight
        try:
            began = time.perf_counter()
            # A background prefill does not swap the process's stdout and stderr (libmtmd's logs go
            # through llama-cpp-python's logger: StockHooks).
            quiet = silenced(handler.verbose) if self._prefill is None else contextlib.nullcontext()
            with handler.encoder_lock, quiet:  # type: ignore[attr-defined]
                if llama_closed(self._llama):  # closed in another thread: its model and context are freed
                    raise ValueError("the Llama was closed during the call: its model is freed (make a new Llama)")
                n_embd = llama_cpp.llama_model_n_embd_inp(self._llama.model)
                chunks = []
                for c in group:
                    rows = encoded_rows(ctx, c, n_embd)
                    if rows is None:
                        raise RuntimeError(f"libmtmd failed to encode image {selection.image}")
                    chunks.append(rows)
                handler.images_encoded += 1
            selection.encode_seconds = time.perf_counter() - began
            if key is not None:
                cache.put(key, chunks)
        except BaseException as error:
            if future is not None:
                cache.landed(key, future)
                future.set_exception(error)
            raise
        if future is not None:
            cache.landed(key, future)
            future.set_result(Preloaded(picture, sum(r.shape[0] for r in chunks), [r.shape[0] for r in chunks],
                                        selection.encode_seconds, chunks))
        return chunks

    def _image_chunks(self) -> list[Any]:
        return [] if self._chunks is None else [c for c in input_chunks(self._chunks) if is_image(c)]


def placement(ctx: Any, chunk: Any, kept: np.ndarray, start: int) -> tuple[np.ndarray, int]:
    """Where the kept rows (indices `kept` of the image chunk that starts at position `start`) go,
    and how many positions the chunk spans: M-RoPE models keep each row's original (t, y, x, z)
    position (libmtmd's decoder positions, in the order its helper hands them to llama.cpp) and
    span the stock n_pos; others take consecutive positions and span the kept count."""
    if not mtmd_cpp.mtmd_decode_use_mrope(ctx):
        return start + np.arange(len(kept), dtype=np.int32), len(kept)
    tokens = mtmd_cpp.mtmd_input_chunk_get_tokens_image(chunk)
    positions = np.empty((len(kept), 4), dtype=np.int32)
    for j, i in enumerate(kept):
        p = mtmd_cpp.mtmd_image_tokens_get_decoder_pos(tokens, start, int(i))
        positions[j] = (p.t, p.y, p.x, p.z)
    return positions, int(mtmd_cpp.mtmd_input_chunk_get_n_pos(chunk))
