"""Where trimcpp meets llama-cpp-python: the one module that uses its private names.

llama-cpp-python's chat handlers have no public hook for what trimcpp changes, so everything that
reaches into them lives here, and only here:

- a stock handler calls libmtmd through its attribute ``_mtmd_cpp`` (normally the module
  ``llama_cpp.mtmd_cpp``): :func:`use_view` puts an :class:`MtmdView` there for one call;
- it loads the mmproj in ``_init_mtmd_context`` (:func:`load_mmproj`), frees it through the
  Llama's ``_stack`` and decodes image bytes in ``_create_bitmap_from_bytes``: :class:`StockHooks`
  keeps a context per Llama, wraps the decoding and offers hooks of ours;
- ``mtmd_helper_eval_chunk_single`` hands the new position back through a ctypes ``byref``
  (:func:`set_out_position`);
- libmtmd logs through ``llama_cpp._logger`` (:func:`quiet_logs`) and prints through
  ``llama_cpp._utils`` (:func:`silenced`);
- a background prefill is stopped mid-batch through llama.cpp's abort callback, a C function of
  trimcpp's own ``_core`` reading a flag (:func:`abortable`);
- the stock ``__call__`` empties the KV cache with ``llama.reset()`` and
  ``llama._ctx.kv_cache_clear()`` and prefills text with ``llama.eval``: :func:`prompt_hooks` swaps
  those for one call (KV reuse), :func:`on_state_change` watches them (and ``load_state``) between
  calls, and :func:`trim_kv` removes a tail of the cache.

It also holds the few pieces every user of llama-cpp-python in trimcpp shares: the walk over
libmtmd's input chunks, encoding one picture on its own (:func:`encode_image`) and the
construction of a ``Llama``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import weakref
from typing import Any, Callable, Iterator, Optional, Sequence

import llama_cpp
import llama_cpp.mtmd_cpp as mtmd_cpp
import numpy as np
from llama_cpp import _logger as llama_logger
from llama_cpp._utils import suppress_stdout_stderr

from . import _core


class MtmdView:
    """``llama_cpp.mtmd_cpp`` as a stock handler sees it through :func:`use_view`: every name is the
    module's own unless a subclass defines it."""

    def __getattr__(self, name: str) -> Any:
        return getattr(mtmd_cpp, name)


@contextlib.contextmanager
def use_view(handler: Any, view: Any) -> Iterator[None]:
    """Within the block, the stock `handler` calls libmtmd through `view` (then through what it used before)."""
    previous = getattr(handler, "_mtmd_cpp", mtmd_cpp)
    handler._mtmd_cpp = view
    try:
        yield
    finally:
        handler._mtmd_cpp = previous


# The encoder's flash attention as libmtmd takes it ("auto": libmtmd's own default, llama-server's).
FLASH_ATTN = {"auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO, True: llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
              False: llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED}


class EncoderParams(MtmdView):
    """``llama_cpp.mtmd_cpp`` whose ``mtmd_init_from_file`` sets fields of ``mtmd_context_params``
    (``flash_attn_type``, ``n_threads``, ``image_min_tokens``, ...) after the stock handler filled them:
    the stock ``_init_mtmd_context`` takes the encoder's threads and flash attention from the Llama
    and never sets the image token limits."""

    def __init__(self, **fields: Any):
        unknown = set(fields) - {name for name, _ in mtmd_cpp.mtmd_context_params._fields_}
        if unknown:
            raise TypeError(f"EncoderParams: mtmd_context_params has no field {', '.join(sorted(unknown))}")
        self.fields = fields

    def mtmd_init_from_file(self, path, model, params):
        for name, value in self.fields.items():
            setattr(params, name, value)
        return mtmd_cpp.mtmd_init_from_file(path, model, params)


def configure_encoder(handler: Any, llama: llama_cpp.Llama, **fields: Any) -> None:
    """Loads a stock `handler`'s mmproj for `llama` now, with these ``mtmd_context_params`` fields
    (see :class:`EncoderParams`); its later calls keep that context. A context it holds already is
    freed first (see :func:`free_encoder`)."""
    free_encoder(handler)
    with use_view(handler, EncoderParams(**fields)):
        handler._init_mtmd_context(llama)


def free_encoder(handler: Any) -> None:
    """Frees a stock handler's libmtmd context now (the stock free, registered on the Llama it was
    loaded for, then finds none); its next call loads the mmproj again."""
    if handler.mtmd_ctx is not None:
        with suppress_stdout_stderr(disable=handler.verbose):
            mtmd_cpp.mtmd_free(handler.mtmd_ctx)
        handler.mtmd_ctx = None


def set_view(handler: Any, view: Any) -> None:
    """From now on the stock `handler` calls libmtmd through `view` (for a handler owned by one caller;
    on a trimmed handler, whose view is each thread's own, only in the calling thread)."""
    handler._mtmd_cpp = view


def llama_closed(llama: llama_cpp.Llama) -> bool:
    """Whether `llama` was closed (``Llama.close()``: its model is freed, or being freed)."""
    model = getattr(llama, "_model", None)
    return bool(getattr(llama, "_trimcpp_closed", False)) or model is None or getattr(model, "model", None) is None


def load_mmproj(handler: Any, llama: llama_cpp.Llama) -> None:
    """Loads the handler's mmproj for `llama` now (the stock handler does it on its first call)."""
    handler._init_mtmd_context(llama)


class _Owner:
    """A Llama as the stock ``_init_mtmd_context`` sees it, with an exit stack of its own: the stock
    code registers there a free of whatever context the handler holds when the Llama closes, which
    :class:`StockHooks` replaces by a free of the context made for that Llama."""

    def __init__(self, llama: llama_cpp.Llama):
        self._llama = llama
        self._stack = contextlib.ExitStack()  # dropped unclosed

    def __getattr__(self, name: str) -> Any:
        return getattr(self._llama, name)


def per_thread(name: str, default: Any) -> property:
    """An attribute whose value is each thread's own (in the instance's ``_local``)."""
    return property(lambda self: getattr(self._local, name, default),
                    lambda self, value: setattr(self._local, name, value))


class StockHooks:
    """Mixed in before a stock multimodal handler: one libmtmd context per Llama, made with the
    encoder settings of :meth:`encoder_fields`, clear errors where the stock code only logs, and a
    hook per image. A subclass defines :meth:`explain_mmproj_failure` and may define
    :meth:`encoder_fields` and :meth:`image_loaded`.

    The stock handler keeps one libmtmd context, made with the first Llama it serves (its model's
    vocabulary and width), and frees it when that Llama closes, even while another Llama's call is
    using it. Here each Llama gets its own context (the mmproj is loaded once per Llama, and again
    when the encoder settings change), freed when that Llama closes. ``mtmd_ctx`` is the context of
    the Llama this thread last loaded for (a thread's own: an encode in the background does not move
    a running call's), and so is the libmtmd view the stock code calls (``_mtmd_cpp``);
    :attr:`encoder_lock` is held around every use of a context's encoder and
    around loading and freeing one."""

    def __init__(self, *args: Any, **kwargs: Any):
        self._contexts: dict[int, tuple[dict[str, Any], Any]] = {}  # id(Llama) -> (its settings, its context)
        self.encoder_lock = threading.RLock()  # a Llama may close (and free its context) in any thread
        self._local = threading.local()
        super().__init__(*args, **kwargs)

    # Each thread's own (see the class doc): a preload loading a context in one thread does not
    # swap the view or the context of a call running in another.
    _mtmd_cpp = per_thread("view", mtmd_cpp)
    mtmd_ctx = per_thread("ctx", None)

    def encoder_fields(self, llama: llama_cpp.Llama) -> dict[str, Any]:
        """The ``mtmd_context_params`` fields set over the stock handler's for `llama` ({}: the stock ones)."""
        return {}

    def _init_mtmd_context(self, llama_model: llama_cpp.Llama) -> None:
        key, fields = id(llama_model), self.encoder_fields(llama_model)
        entry = self._contexts.get(key)
        if entry is not None and entry[0] == fields:  # loaded: no wait for an encode in flight
            self.mtmd_ctx = entry[1]
            return
        with self.encoder_lock:
            if llama_closed(llama_model):
                raise ValueError("the Llama is closed: its model is freed (make a new Llama)")
            entry = self._contexts.get(key)
            if entry is not None and entry[0] != fields:  # new settings: a new context
                self._free_context(key)
                entry = None
            if entry is None:
                route_logs()  # an encode in the background must not print (nor silence the process's stderr)
                self.mtmd_ctx = None
                try:
                    with use_view(self, EncoderParams(**fields)):
                        super()._init_mtmd_context(_Owner(llama_model))  # type: ignore[misc]
                except ValueError:
                    raise ValueError(self.explain_mmproj_failure(llama_model)) from None
                entry = self._contexts[key] = (fields, self.mtmd_ctx)
                if not getattr(llama_model, "_trimcpp_frees", None):
                    llama_model._trimcpp_frees = weakref.WeakSet()
                if self not in llama_model._trimcpp_frees:
                    llama_model._trimcpp_frees.add(self)
                    llama_model._stack.callback(self._llama_closing, weakref.ref(llama_model), key)
            self.mtmd_ctx = entry[1]

    def _llama_closing(self, llama: weakref.ref, key: int) -> None:
        # Marked under the lock, before the model is freed (the Llama's exit stack runs this first):
        # a preload waiting for the lock then finds the Llama closed instead of loading on a freed model.
        with self.encoder_lock:
            if llama() is not None:
                llama()._trimcpp_closed = True
            self._free_context(key)

    def _free_context(self, key: int) -> None:
        with self.encoder_lock:
            entry = self._contexts.pop(key, None)
            if entry is None:
                return
            if self.mtmd_ctx == entry[1]:
                self.mtmd_ctx = None
            # A Llama may close in a background thread (the last reference dropped by a prefill): the
            # process's stdout and stderr are swapped only from the main thread, never under others.
            main = threading.current_thread() is threading.main_thread()
            with suppress_stdout_stderr(disable=self.verbose or not main):
                mtmd_cpp.mtmd_free(entry[1])

    def _create_bitmap_from_bytes(self, image_bytes: bytes):
        try:
            bitmap = super()._create_bitmap_from_bytes(image_bytes)  # type: ignore[misc]
        except ValueError:
            raise ValueError(
                f"could not decode an image ({len(image_bytes)} bytes): not a PNG, JPEG, BMP, GIF or other format "
                "libmtmd reads, or a corrupt file"
            ) from None
        self.image_loaded(bitmap, image_bytes)
        return bitmap

    def explain_mmproj_failure(self, llama: llama_cpp.Llama) -> str:
        """Why libmtmd refused this handler's mmproj for `llama`, in words."""
        raise NotImplementedError

    def image_loaded(self, bitmap: Any, image_bytes: bytes) -> None:
        """Called with each image's libmtmd bitmap and bytes, in prompt order."""


_MISSING = object()


def _override(obj: Any, name: str, value: Any) -> Any:
    """Sets an instance attribute that shadows a method; returns what to restore with :func:`_restore`."""
    previous = vars(obj).get(name, _MISSING)
    setattr(obj, name, value)
    return previous


def _restore(obj: Any, name: str, previous: Any) -> None:
    if previous is _MISSING:
        vars(obj).pop(name, None)
    else:
        setattr(obj, name, previous)


@contextlib.contextmanager
def prompt_hooks(llama: llama_cpp.Llama, *, clear: Callable[[Callable[[], None]], None],
                 evaluate: Callable[[Callable[[Sequence[int]], None], Sequence[int]], None]) -> Iterator[None]:
    """Within the block, ``llama._ctx.kv_cache_clear()`` calls ``clear(original)`` and
    ``llama.eval(tokens)`` calls ``evaluate(original, tokens)``; ``llama.reset()`` is the plain
    method (not a watcher of :func:`on_state_change`). Restored afterwards, also on errors."""
    ctx = llama._ctx
    original_clear, original_eval = type(ctx).kv_cache_clear.__get__(ctx), type(llama).eval.__get__(llama)
    saved = [
        (ctx, "kv_cache_clear", _override(ctx, "kv_cache_clear", lambda: clear(original_clear))),
        (llama, "eval", _override(llama, "eval", lambda tokens: evaluate(original_eval, tokens))),
        (llama, "reset", _override(llama, "reset", type(llama).reset.__get__(llama))),
    ]
    try:
        yield
    finally:
        for obj, name, previous in reversed(saved):
            _restore(obj, name, previous)


def on_state_change(llama: llama_cpp.Llama, callback: Callable[[], None]) -> None:
    """From now on, ``callback()`` runs before ``llama.reset()``, ``llama._ctx.kv_cache_clear()`` and
    ``llama.load_state()`` whoever calls them (another handler, Llama.generate, the caller): the KV
    cache is about to hold something this module's caller did not put there."""
    if hasattr(llama, "_trimcpp_watchers"):  # already watched: one more callback
        llama._trimcpp_watchers.append(callback)
        return
    watchers = llama._trimcpp_watchers = [callback]

    def watched(obj: Any, name: str) -> None:
        # The method through a weak reference: no cycle keeps a Llama (and its buffers) alive.
        method, owner = getattr(type(obj), name), weakref.ref(obj)

        def call(*args: Any, **kwargs: Any) -> Any:
            for watcher in list(watchers):
                watcher()
            return method(owner(), *args, **kwargs)

        setattr(obj, name, call)

    watched(llama, "reset")
    watched(llama, "load_state")
    watched(llama._ctx, "kv_cache_clear")


@contextlib.contextmanager
def abortable(lctx, flag: ctypes.c_ubyte) -> Iterator[None]:
    """Within the block, llama.cpp abandons a decode in flight as soon as `flag` is nonzero (its
    abort callback: trimcpp's C function reading the flag, so ggml's threads never need the GIL);
    the decode then returns 2 and llama.cpp drops the cells of that batch."""
    callback = llama_cpp.ggml_abort_callback(_core.abort_callback())
    llama_cpp.llama_set_abort_callback(lctx, callback, ctypes.cast(ctypes.pointer(flag), ctypes.c_void_p))
    try:
        yield
    finally:
        llama_cpp.llama_set_abort_callback(lctx, ctypes.cast(None, llama_cpp.ggml_abort_callback), None)


def trim_kv(llama: llama_cpp.Llama, position: int) -> bool:
    """Removes positions >= `position` of sequence 0 from the KV cache; False when the cache cannot
    drop a tail (then nothing may be assumed about it)."""
    return bool(llama._ctx.kv_cache_seq_rm(0, position, -1))


def set_out_position(new_n_past: Any, value: int) -> None:
    """Writes `value` through the ``byref`` out-parameter that libmtmd's eval helpers take."""
    new_n_past._obj.value = value


def input_chunks(chunks: Any) -> list[Any]:
    """The chunks of a libmtmd ``mtmd_input_chunks``, in prompt order."""
    return [mtmd_cpp.mtmd_input_chunks_get(chunks, i) for i in range(mtmd_cpp.mtmd_input_chunks_size(chunks))]


def is_image(chunk: Any) -> bool:
    return bool(chunk) and mtmd_cpp.mtmd_input_chunk_get_type(chunk) == mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_IMAGE


def text_tokens(chunk: Any) -> list[int]:
    """The token ids of a text chunk."""
    n = ctypes.c_size_t()
    ids = mtmd_cpp.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
    return [ids[j] for j in range(n.value)]


def encoded_rows(ctx: Any, chunk: Any, n_embd: int) -> Optional[np.ndarray]:
    """The rows libmtmd encodes of one image chunk (n x n_embd, copied: the next encode overwrites
    libmtmd's buffer), or None when encoding fails."""
    if mtmd_cpp.mtmd_encode_chunk(ctx, chunk) != 0:
        return None
    n = mtmd_cpp.mtmd_input_chunk_get_n_tokens(chunk)
    return np.ctypeslib.as_array(mtmd_cpp.mtmd_get_output_embd(ctx), shape=(n * n_embd,)).reshape(n, n_embd).copy()


def _encode_bitmap(ctx: Any, bitmap: Any, n_embd: int) -> list[np.ndarray]:
    """The rows of each image chunk libmtmd makes of `bitmap` on its own (a prompt of just its marker)."""
    chunks = mtmd_cpp.mtmd_input_chunks_init()
    try:
        marker = mtmd_cpp.mtmd_default_marker()
        text = mtmd_cpp.mtmd_input_text(marker, len(marker), False, True)
        if mtmd_cpp.mtmd_tokenize(ctx, chunks, ctypes.byref(text), (ctypes.c_void_p * 1)(bitmap), 1) != 0:
            raise RuntimeError("libmtmd could not tokenise the image")
        rows = []
        for chunk in filter(is_image, input_chunks(chunks)):
            encoded = encoded_rows(ctx, chunk, n_embd)
            if encoded is None:
                raise RuntimeError("libmtmd could not encode the image")
            rows.append(encoded)
        return rows
    finally:
        mtmd_cpp.mtmd_input_chunks_free(chunks)


def encode_picture(ctx: Any, image_bytes: bytes, n_embd: int) -> list[np.ndarray]:
    """The rows libmtmd's context `ctx` makes of a picture file's bytes, per chunk, as a chat prompt
    with that picture gets them (ValueError when the bytes are not a picture libmtmd reads)."""
    buffer = (ctypes.c_uint8 * len(image_bytes)).from_buffer_copy(image_bytes)
    bitmap = mtmd_cpp.mtmd_helper_bitmap_init_from_buf(ctx, buffer, len(image_bytes), False)
    if not bitmap:
        raise ValueError(f"could not decode an image ({len(image_bytes)} bytes): not a PNG, JPEG, BMP, GIF or "
                         "other format libmtmd reads, or a corrupt file")
    try:
        return _encode_bitmap(ctx, bitmap, n_embd)
    finally:
        mtmd_cpp.mtmd_bitmap_free(bitmap)


def encode_image(llama: llama_cpp.Llama, mmproj: str, pixels: np.ndarray) -> list[np.ndarray]:
    """The image rows libmtmd makes of `pixels` (H x W x 3 uint8) with `mmproj` for `llama`'s LLM, per
    chunk: a context of its own (one thread, CPU), freed before returning."""
    params = mtmd_cpp.mtmd_context_params_default()
    params.use_gpu, params.print_timings, params.n_threads, params.warmup = False, False, 1, False
    ctx = mtmd_cpp.mtmd_init_from_file(os.fsencode(mmproj), llama.model, params)
    if not ctx:
        raise ValueError(f"libmtmd could not load the mmproj {mmproj!r}")
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    bitmap = mtmd_cpp.mtmd_bitmap_init(pixels.shape[1], pixels.shape[0],
                                       pixels.ctypes.data_as(ctypes.POINTER(ctypes.c_ubyte)))
    try:
        return _encode_bitmap(ctx, bitmap, llama_cpp.llama_model_n_embd_inp(llama.model))
    finally:
        mtmd_cpp.mtmd_bitmap_free(bitmap)
        mtmd_cpp.mtmd_free(ctx)


def route_logs() -> None:
    """libmtmd logs to stderr on its own; send it through llama-cpp-python's logger, which is silent
    unless the last Llama made (or :func:`quiet_logs`) asked for its logs."""
    mtmd_cpp.mtmd_helper_log_set(llama_logger.llama_log_callback, ctypes.c_void_p(0))


def quiet_logs(verbose: bool) -> None:
    """llama.cpp's and libmtmd's logs on stderr only if `verbose`."""
    llama_logger.set_verbose(verbose)
    route_logs()


def silenced(verbose: bool) -> contextlib.AbstractContextManager:
    """A block whose C-level stdout and stderr are dropped unless `verbose`."""
    return suppress_stdout_stderr(disable=verbose)


def load_llama(model: str, handler: Any, *, n_ctx: int, threads: Optional[int] = None, verbose: bool = False,
               **kwargs: Any) -> llama_cpp.Llama:
    """A Llama with `handler` on `threads` threads (default: every core) for prompt and generation alike."""
    threads = threads or os.cpu_count() or 1
    return llama_cpp.Llama(model_path=model, chat_handler=handler, n_ctx=n_ctx, n_threads=threads,
                           n_threads_batch=threads, verbose=verbose, **kwargs)
