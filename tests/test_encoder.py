"""The encoder of a trimmed handler (trimcpp.handlers.encoder, Trimming.preload): its settings reach
libmtmd, keep-all equals stock with the same settings, a preloaded picture is encoded once, and bad
values are clear errors. Tiny random-weight pairs (trimcpp.testing)."""

from __future__ import annotations

import base64
import concurrent.futures
import ctypes
import hashlib
import threading
import time

import llama_cpp
import llama_cpp.mtmd_cpp as mtmd_cpp
import numpy as np
import pytest
from llama_cpp import Llama
from llama_cpp.llama_chat_format import Llava15ChatHandler, Qwen25VLChatHandler

from trimcpp import TrimLlava15ChatHandler, TrimQwen25VLChatHandler
from trimcpp.handlers.conversation import ImageCache
from trimcpp.handlers.mechanism import Preloaded, PreloadSuperseded
from trimcpp.llamacpp import configure_encoder, load_mmproj, use_view
from trimcpp.testing import write_pair

from helpers import ROWS, image_url

QWEN_ROWS = 48  # the tiny Qwen mmproj's rows for a 224 x 168 picture (test_families)
SIZE = (224, 168)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    llm, mmproj = write_pair(tmp_path_factory.mktemp("qwen"), "tiny", family="qwen2.5-vl")
    return str(llm), str(mmproj)


def picture(seed: int = 0, size=(150, 100)) -> bytes:
    return base64.b64decode(image_url(seed, size).split(",", 1)[1])


def ask(url: str, question: str = "What is in the image?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": question}]}]


def make(llm: str, handler, **kwargs) -> Llama:
    return Llama(model_path=llm, chat_handler=handler, **{"n_ctx": 1024, "logits_all": True, "verbose": False,
                                                          "seed": 1, **kwargs})


def run(llama: Llama, messages, max_tokens: int = 5):
    response = llama.create_chat_completion(messages=messages, max_tokens=max_tokens, temperature=0.0)
    n, generated = response["usage"]["prompt_tokens"], response["usage"]["completion_tokens"]
    return response, np.array(llama.scores[n - 1: n - 1 + generated])


class Inits:
    """The mtmd_context_params of every mtmd_init_from_file, as libmtmd received them."""

    def __init__(self, monkeypatch):
        self.params: list[dict] = []
        init = mtmd_cpp.mtmd_init_from_file

        def spy(path, model, params):
            self.params.append({name: getattr(params, name) for name, _ in mtmd_cpp.mtmd_context_params._fields_
                                if name in ("flash_attn_type", "n_threads", "image_min_tokens", "image_max_tokens")})
            return init(path, model, params)

        monkeypatch.setattr(mtmd_cpp, "mtmd_init_from_file", spy)


class Encodes:
    """mtmd_encode_chunk calls (optionally slowed down, to catch a request while an encode runs)."""

    def __init__(self, monkeypatch, delay: float = 0.0):
        self.count = 0
        encode = mtmd_cpp.mtmd_encode_chunk

        def counted(*args):
            self.count += 1
            time.sleep(delay)
            return encode(*args)

        monkeypatch.setattr(mtmd_cpp, "mtmd_encode_chunk", counted)


# The settings reach libmtmd

def test_defaults_reach_libmtmd(models, monkeypatch):
    inits = Inits(monkeypatch)
    handler = TrimLlava15ChatHandler(clip_model_path=models["1.5"], verbose=False)
    llama = make(models["llm"], handler, n_threads=1, n_threads_batch=2)
    run(llama, ask(image_url(0)), max_tokens=1)
    # llama-cpp-python's stock handler would give DISABLED and n_threads (1); libmtmd's default limits stay.
    assert inits.params == [{"flash_attn_type": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO, "n_threads": 2,
                             "image_min_tokens": -1, "image_max_tokens": -1}]


def test_set_values_reach_libmtmd_and_a_change_makes_a_new_context(qwen, monkeypatch):
    llm, mmproj = qwen
    inits = Inits(monkeypatch)
    handler = TrimQwen25VLChatHandler(clip_model_path=mmproj, verbose=False, encoder_flash_attn=False, encoder_threads=1,
                                      image_min_tokens=4, image_max_tokens=32)
    llama = make(llm, handler)
    run(llama, ask(image_url(0, SIZE)), max_tokens=1)
    run(llama, ask(image_url(0, SIZE)), max_tokens=1)  # same settings: the same context
    assert inits.params == [{"flash_attn_type": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED, "n_threads": 1,
                             "image_min_tokens": 4, "image_max_tokens": 32}]
    handler.encoder_flash_attn = True
    run(llama, ask(image_url(0, SIZE)), max_tokens=1)
    assert len(inits.params) == 2 and inits.params[1]["flash_attn_type"] == llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED


def test_flash_attention_changes_the_rows_a_little(models):
    """An observable effect in libmtmd: the encoder's rows with flash attention on differ in their
    bits from those without, and by rounding only."""
    llama = make(models["llm"], None)
    rows = {}
    for flash in (True, False):
        handler = TrimLlava15ChatHandler(clip_model_path=models["1.5"], verbose=False, encoder_flash_attn=flash)
        [rows[flash]] = handler.preload(picture(), llama=llama).result(timeout=60).chunks
    assert rows[True].shape == rows[False].shape == (ROWS, 256)
    assert not np.array_equal(rows[True], rows[False])
    cosine = (rows[True] * rows[False]).sum(1) / np.linalg.norm(rows[True], axis=1) / np.linalg.norm(rows[False], axis=1)
    assert cosine.min() > 0.9999


# Keep-all against stock

def test_keep_all_with_the_defaults_is_bit_identical_to_stock_with_the_same_settings(models):
    stock = Llava15ChatHandler(clip_model_path=models["1.5"], verbose=False)
    trimmed = TrimLlava15ChatHandler(clip_model_path=models["1.5"], keep=None, verbose=False)
    llama = make(models["llm"], stock)
    configure_encoder(stock, llama, **trimmed.encoder.fields(llama))
    expected, expected_logits = run(llama, ask(image_url(0)))
    llama.chat_handler = trimmed
    got, logits = run(llama, ask(image_url(0)))
    assert got["usage"] == expected["usage"] and logits.shape == (5, llama.n_vocab())
    assert np.array_equal(logits, expected_logits)


def test_keep_all_with_the_defaults_is_close_to_plain_stock(models):
    """What the defaults change against a stock handler as llama-cpp-python configures it: the
    encoder's flash attention moves the logits by rounding, the answer stays."""
    stock = Llava15ChatHandler(clip_model_path=models["1.5"], verbose=False)
    llama = make(models["llm"], stock)
    expected, expected_logits = run(llama, ask(image_url(0)))
    llama.chat_handler = TrimLlava15ChatHandler(clip_model_path=models["1.5"], keep=None, verbose=False)
    got, logits = run(llama, ask(image_url(0)))
    assert got["choices"][0]["message"]["content"] == expected["choices"][0]["message"]["content"]
    assert got["usage"] == expected["usage"]
    assert not np.array_equal(logits, expected_logits)
    assert np.abs(logits - expected_logits).max() < 1e-2 * np.abs(expected_logits).max()


# preload

def test_preload_then_a_request_encodes_once_and_answers_as_without(models, monkeypatch):
    url = image_url(3)
    reference, reference_logits = run(make(models["llm"], TrimLlava15ChatHandler(clip_model_path=models["1.5"],
                                                                                 verbose=False)), ask(url))
    encodes = Encodes(monkeypatch)
    handler = TrimLlava15ChatHandler(clip_model_path=models["1.5"], verbose=False)
    llama = make(models["llm"], handler)
    result = handler.preload(url, llama=llama).result(timeout=60)
    assert isinstance(result, Preloaded) and (result.rows, result.chunk_rows) == (ROWS, [ROWS])
    assert result.encode_seconds > 0 and result.digest == hashlib.sha256(base64.b64decode(url.split(",")[1])).hexdigest()
    assert encodes.count == 1
    got, logits = run(llama, ask(url))
    assert encodes.count == 1  # the request found the rows
    [image] = handler.last_selection
    assert image.preloaded and image.encode_seconds == 0 and image.rows == ROWS
    assert got["choices"][0]["message"]["content"] == reference["choices"][0]["message"]["content"]
    assert np.array_equal(logits, reference_logits)
    again = handler.preload(url).result(timeout=60)  # cached: nothing to encode (the last call's Llama)
    assert again.encode_seconds == 0 and encodes.count == 1


def test_a_request_waits_for_the_preload_in_flight(models, monkeypatch):
    encodes = Encodes(monkeypatch, delay=2.0)  # the request's own setup has well over a second
    handler = TrimLlava15ChatHandler(clip_model_path=models["1.5"], verbose=False)
    llama = make(models["llm"], handler)
    future = handler.preload(picture(5), llama=llama)
    time.sleep(0.2)
    assert not future.done()
    assert not future.cancel()  # others may wait for it: running, not cancellable
    run(llama, ask("data:image/png;base64," + base64.b64encode(picture(5)).decode()), max_tokens=1)
    [image] = handler.last_selection
    assert encodes.count == 1 and future.done() and image.preloaded
    assert image.wait_seconds > 0.3  # most of the slowed encode was still to come


def test_two_concurrent_requests_for_one_picture_encode_once(models, monkeypatch):
    """A handler serves one call at a time: the second request finds the first one's rows cached."""
    encodes = Encodes(monkeypatch, delay=0.3)
    handler = TrimLlava15ChatHandler(clip_model_path=models["1.5"], verbose=False)
    llama = make(models["llm"], handler)
    answers, errors = [], []

    def ask_once():
        try:
            answers.append(run(llama, ask(image_url(7)), max_tokens=3)[0]["choices"][0]["message"]["content"])
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=ask_once) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors and len(answers) == 2 and answers[0] == answers[1]
    assert encodes.count == 1 and handler.image_cache.hits == 1


def test_a_corrupt_preload_fails_cleanly_and_the_handler_still_answers(models):
    handler = TrimLlava15ChatHandler(clip_model_path=models["1.5"], verbose=False)
    llama = make(models["llm"], handler)
    bad = b"\x89PNG not really a picture"
    future = handler.preload(bad, llama=llama)
    with pytest.raises(ValueError, match="could not decode an image"):
        future.result(timeout=60)
    key = handler.picture_key(hashlib.sha256(bad).hexdigest())
    assert handler.image_cache.pending(key) is None and handler.image_cache.get(key) is None
    response, _ = run(llama, ask(image_url(1)), max_tokens=2)
    assert response["usage"]["completion_tokens"] >= 1 and handler.last_selection[0].rows == ROWS


def test_a_request_encodes_itself_when_the_preload_it_waits_for_gives_up(models, monkeypatch):
    """The settings change while a preload waits to start: it gives up (PreloadSuperseded), and the
    request that was waiting for it encodes the picture instead of failing."""
    encodes = Encodes(monkeypatch)
    handler = TrimLlava15ChatHandler(clip_model_path=models["1.5"], verbose=False)
    llama = make(models["llm"], handler)
    url = image_url(8)
    answers, errors = [], []

    def ask_once():
        try:
            answers.append(run(llama, ask(url), max_tokens=2)[0])
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    waiting = threading.Event()
    in_flight = handler.image_cache.in_flight

    def seen(key):
        future, mine = in_flight(key)
        if not mine:
            waiting.set()  # the request found the preload in flight and waits for it
        return future, mine

    monkeypatch.setattr(handler.image_cache, "in_flight", seen)
    with handler.encoder_lock:  # the preload's thread waits here
        future = handler.preload(url, llama=llama)
        handler.encoder_threads = 1  # same rows (the picture key is the same), other settings
        load_mmproj(handler, llama)  # the request need not wait for the lock to load: it waits for the preload
        asking = threading.Thread(target=ask_once)
        asking.start()
        assert waiting.wait(30)
        time.sleep(0.1)
    asking.join(60)
    with pytest.raises(PreloadSuperseded, match="encoder settings changed"):
        future.result(timeout=60)
    assert not errors and len(answers) == 1 and answers[0]["usage"]["completion_tokens"] >= 1
    [image] = handler.last_selection
    assert encodes.count == 1 and not image.preloaded and image.encode_seconds > 0 and image.rows == ROWS
    assert image.wait_seconds > 0.05  # it did wait for the preload, until the lock was let go


def test_a_preload_during_a_requests_own_encode_waits_for_it(models, monkeypatch):
    encodes = Encodes(monkeypatch, delay=1.0)
    handler = TrimLlava15ChatHandler(clip_model_path=models["1.5"], verbose=False)
    llama = make(models["llm"], handler)
    data = picture(12)
    key = handler.picture_key(hashlib.sha256(data).hexdigest())
    asking = threading.Thread(target=run, args=(llama, ask("data:image/png;base64," + base64.b64encode(data).decode())),
                              kwargs={"max_tokens": 1})
    asking.start()
    deadline = time.monotonic() + 30
    while handler.image_cache.pending(key) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    future = handler.preload(data, llama=llama)
    assert future is handler.image_cache.pending(key)  # the request's encode, not a second one
    result = future.result(timeout=60)
    asking.join(60)
    assert encodes.count == 1 and result.rows == ROWS and result.encode_seconds > 0.9
    [image] = handler.last_selection
    assert not image.preloaded and image.encode_seconds > 0.9
    assert handler.preload(data).result(timeout=60).encode_seconds == 0 and encodes.count == 1


def test_a_preload_without_a_thread_leaves_nothing_in_flight(models, monkeypatch):
    encodes = Encodes(monkeypatch)
    handler = TrimLlava15ChatHandler(clip_model_path=models["1.5"], verbose=False)
    llama = make(models["llm"], handler)
    data = picture(13)
    key = handler.picture_key(hashlib.sha256(data).hexdigest())
    futures = []
    in_flight = handler.image_cache.in_flight
    monkeypatch.setattr(handler.image_cache, "in_flight", lambda k: futures.append(in_flight(k)[0]) or (futures[-1], True))

    def no_thread(self):
        raise RuntimeError("can't start new thread")

    with monkeypatch.context() as patch:
        patch.setattr(threading.Thread, "start", no_thread)
        with pytest.raises(RuntimeError, match="can't start new thread"):
            handler.preload(data, llama=llama)
    [future] = futures
    assert handler.image_cache.pending(key) is None and encodes.count == 0
    with pytest.raises(PreloadSuperseded, match="could not start the encoding thread") as error:
        future.result(timeout=1)  # a request waiting for it encodes the picture itself
    assert isinstance(error.value.__cause__, RuntimeError)
    run(llama, ask("data:image/png;base64," + base64.b64encode(data).decode()), max_tokens=1)
    assert encodes.count == 1 and handler.last_selection[0].rows == ROWS


def test_the_libmtmd_view_is_each_threads_own(models):
    """A preload loading a context in its thread does not swap the view of a call running in another."""
    handler = TrimLlava15ChatHandler(clip_model_path=models["1.5"], verbose=False)
    view, seen = object(), []
    with use_view(handler, view):
        other = threading.Thread(target=lambda: seen.append(handler._mtmd_cpp))
        other.start()
        other.join(10)
        assert handler._mtmd_cpp is view
    assert seen == [mtmd_cpp] and handler._mtmd_cpp is mtmd_cpp


def test_an_encode_lands_only_its_own_future():
    cache = ImageCache(1 << 20)
    first, mine = cache.in_flight(("k",))
    assert mine and first.running() and not first.cancel()
    again, mine = cache.in_flight(("k",))
    assert again is first and not mine
    cache.landed(("k",), concurrent.futures.Future())  # another encode's future: not this one's
    assert cache.pending(("k",)) is first
    cache.landed(("k",), first)
    assert cache.pending(("k",)) is None


def test_a_preload_for_a_llama_closed_meanwhile_gives_up(models, monkeypatch):
    encodes = Encodes(monkeypatch)
    handler = TrimLlava15ChatHandler(clip_model_path=models["1.5"], verbose=False)
    llama = make(models["llm"], handler)
    with handler.encoder_lock:
        future = handler.preload(picture(9), llama=llama)
        llama.close()  # frees the model and the handler's context (the lock is this thread's)
    with pytest.raises(PreloadSuperseded, match="the Llama was closed"):
        future.result(timeout=60)
    assert encodes.count == 0
    with pytest.raises(ValueError, match="the Llama is closed"):
        handler.preload(picture(10), llama=llama)
    other = make(models["llm"], handler)  # the handler serves a new Llama
    response, _ = run(other, ask(image_url(9)), max_tokens=1)
    assert response["usage"]["completion_tokens"] == 1 and handler.last_selection[0].rows == ROWS


def test_cached_rows_that_do_not_fit_the_chunks_are_encoded_again(models, monkeypatch):
    encodes = Encodes(monkeypatch)
    handler = TrimLlava15ChatHandler(clip_model_path=models["1.5"], verbose=False)
    llama = make(models["llm"], handler)
    url = image_url(11)
    digest = hashlib.sha256(base64.b64decode(url.split(",")[1])).hexdigest()
    n_embd = llama_cpp.llama_model_n_embd_inp(llama.model)
    handler.image_cache.put(handler.picture_key(digest), [np.zeros((5, n_embd), np.float32)])
    run(llama, ask(url), max_tokens=1)
    [image] = handler.last_selection
    assert encodes.count == 1 and not image.preloaded and image.rows == ROWS
    assert [c.shape[0] for c in handler.image_cache.get(handler.picture_key(digest))] == [ROWS]


def test_preload_arguments(models, tmp_path):
    handler = TrimLlava15ChatHandler(clip_model_path=models["1.5"], verbose=False)
    with pytest.raises(ValueError, match=r"TrimLlava15ChatHandler.preload: pass llama="):
        handler.preload(picture())
    llama = make(models["llm"], handler)
    with pytest.raises(TypeError, match="preload: image must be bytes, a path or a URL string"):
        handler.preload(12, llama=llama)
    with pytest.raises(TypeError, match="preload: llama must be a llama_cpp.Llama"):
        handler.preload(picture(), llama="model.gguf")
    with pytest.raises(ValueError, match="preload: cannot read"):
        handler.preload(tmp_path / "none.png", llama=llama)
    with pytest.raises(ValueError, match="empty"):
        handler.preload(b"", llama=llama)
    off = TrimLlava15ChatHandler(clip_model_path=models["1.5"], verbose=False, image_cache_bytes=0)
    with pytest.raises(ValueError, match="image cache is off"):
        off.preload(picture(), llama=llama)
    path = tmp_path / "p.png"
    path.write_bytes(picture(2))
    assert handler.preload(path, llama=llama).result(timeout=60).rows == ROWS


# image_max_tokens / image_min_tokens

def libmtmd_rows(llm: str, mmproj: str, data: bytes, **fields) -> int:
    """Rows libmtmd itself makes of a picture with these context parameters (no trimcpp code)."""
    model = llama_cpp.llama_model_load_from_file(llm.encode(), llama_cpp.llama_model_default_params())
    params = mtmd_cpp.mtmd_context_params_default()
    params.use_gpu, params.print_timings, params.warmup = False, False, False
    for name, value in fields.items():
        setattr(params, name, value)
    ctx = mtmd_cpp.mtmd_init_from_file(mmproj.encode(), model, params)
    buffer = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
    bitmap = mtmd_cpp.mtmd_helper_bitmap_init_from_buf(ctx, buffer, len(data), False)
    chunks = mtmd_cpp.mtmd_input_chunks_init()
    try:
        marker = mtmd_cpp.mtmd_default_marker()
        text = mtmd_cpp.mtmd_input_text(marker, len(marker), False, True)
        assert mtmd_cpp.mtmd_tokenize(ctx, chunks, ctypes.byref(text), (ctypes.c_void_p * 1)(bitmap), 1) == 0
        return sum(mtmd_cpp.mtmd_input_chunk_get_n_tokens(mtmd_cpp.mtmd_input_chunks_get(chunks, i))
                   for i in range(mtmd_cpp.mtmd_input_chunks_size(chunks))
                   if mtmd_cpp.mtmd_input_chunk_get_type(mtmd_cpp.mtmd_input_chunks_get(chunks, i))
                   == mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_IMAGE)
    finally:
        mtmd_cpp.mtmd_input_chunks_free(chunks)
        mtmd_cpp.mtmd_bitmap_free(bitmap)
        mtmd_cpp.mtmd_free(ctx)
        llama_cpp.llama_model_free(model)


@pytest.mark.parametrize("limits", [{"image_max_tokens": 16}, {"image_max_tokens": 8}, {"image_min_tokens": 80}])
def test_image_token_limits_change_qwens_rows_as_libmtmd_does(qwen, limits):
    llm, mmproj = qwen
    data = picture(0, SIZE)
    expected = libmtmd_rows(llm, mmproj, data, **limits)
    assert expected != QWEN_ROWS  # the limit bites
    handler = TrimQwen25VLChatHandler(clip_model_path=mmproj, verbose=False, keep=None, **limits)
    llama = make(llm, handler)
    response, _ = run(llama, ask(image_url(0, SIZE)), max_tokens=1)
    [image] = handler.last_selection
    assert image.rows == image.kept == expected
    # The stock handler given the same limits prompts the same number of positions.
    stock = Qwen25VLChatHandler(clip_model_path=mmproj, verbose=False)
    configure_encoder(stock, llama, **handler.encoder.fields(llama))
    llama.chat_handler = stock
    assert run(llama, ask(image_url(0, SIZE)), max_tokens=1)[0]["usage"]["prompt_tokens"] == response["usage"]["prompt_tokens"]


def test_a_limited_picture_is_cached_apart(qwen):
    llm, mmproj = qwen
    handler = TrimQwen25VLChatHandler(clip_model_path=mmproj, verbose=False)
    llama = make(llm, handler)
    full = handler.preload(picture(0, SIZE), llama=llama).result(timeout=60)
    handler.image_max_tokens = 16
    limited = handler.preload(picture(0, SIZE)).result(timeout=60)
    assert full.rows == QWEN_ROWS and limited.rows < 16 and limited.encode_seconds > 0 and len(handler.image_cache) == 2


@pytest.mark.parametrize(("options", "error", "message"), [
    ({"image_max_tokens": 64}, ValueError, "projector 'mlp' makes a fixed number of rows"),
    ({"image_min_tokens": 4}, ValueError, "fixed number of rows"),
    ({"encoder_flash_attn": "yes"}, ValueError, "encoder_flash_attn must be 'auto', True or False"),
    ({"encoder_flash_attn": 1}, ValueError, "encoder_flash_attn must be"),
    ({"encoder_threads": 0}, ValueError, "encoder_threads must be >= 1 and <= 1024, got 0"),
    ({"encoder_threads": 2**31}, ValueError, "encoder_threads must be >= 1 and <= 1024, got 2147483648"),
    ({"encoder_threads": 2.0}, TypeError, "encoder_threads must be an int or None"),
])
def test_bad_encoder_arguments_on_llava(models, options, error, message):
    with pytest.raises(error, match=f"TrimLlava15ChatHandler: .*{message}"):
        TrimLlava15ChatHandler(clip_model_path=models["1.5"], verbose=False, **options)


@pytest.mark.parametrize(("options", "error", "message"), [
    ({"image_min_tokens": 5000}, ValueError, "image_min_tokens 5000 > image_max_tokens 4096"),
    ({"image_max_tokens": 32, "image_min_tokens": 64}, ValueError, "image_min_tokens 64 > image_max_tokens 32"),
    ({"image_max_tokens": 0}, ValueError, "image_max_tokens must be >= 1 and <= 1048576, got 0"),
    ({"image_min_tokens": 2**32}, ValueError, "image_min_tokens must be >= 1 and <= 1048576"),
    ({"image_max_tokens": True}, TypeError, "image_max_tokens must be an int or None"),
])
def test_bad_limits_on_qwen_leave_the_handler_usable(qwen, options, error, message):
    llm, mmproj = qwen
    with pytest.raises(error, match=message):
        TrimQwen25VLChatHandler(clip_model_path=mmproj, verbose=False, **options)
    handler = TrimQwen25VLChatHandler(clip_model_path=mmproj, verbose=False, keep=None)
    llama = make(llm, handler)
    *before, (name, value) = options.items()
    for earlier, setting in before:  # valid on their own
        setattr(handler, earlier, setting)
    with pytest.raises(error, match=f"TrimQwen25VLChatHandler: {message}"):
        setattr(handler, name, value)
    assert getattr(handler, name) is None  # the bad value was not taken
    for earlier, _ in before:
        setattr(handler, earlier, None)
    run(llama, ask(image_url(0, SIZE)), max_tokens=1)
    assert handler.last_selection[0].rows == QWEN_ROWS
