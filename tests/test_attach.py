"""Prefill on attach (Trimming.attach, trimcpp.handlers.attach): the background prefill's answer is
stock's, a stopped one's is today's pruned answer, nothing stale stays in the KV cache, a second
attach or another conversation stops it, errors reach the next call, and every family follows its
placement rules. Tiny random-weight pairs (trimcpp.testing); the decode is slowed down where a test
needs the question to come while the prefill runs."""

from __future__ import annotations

import base64
import ctypes
import threading
import time

import llama_cpp
import numpy as np
import pytest
from llama_cpp import Llama
from llama_cpp.llama_chat_format import Llava15ChatHandler, MTMDChatHandler, Qwen25VLChatHandler

from trimcpp import TrimLlava15ChatHandler, TrimLlava16ChatHandler, TrimMTMDChatHandler, TrimQwen25VLChatHandler
from trimcpp.handlers import attach as attach_module
from trimcpp.handlers import decode
from trimcpp.handlers.attach import Attached, continues
from trimcpp.llamacpp import abortable
from trimcpp.testing import write_pair

from helpers import ROWS, STOCK_ENCODER, image_url

SIZE = (224, 168)  # tiny Qwen: 48 rows; tiny Gemma: 64 rows


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("attach-families")
    return {"qwen": write_pair(root, "tiny", family="qwen2.5-vl"), "gemma": write_pair(root, "tiny", family="gemma3")}


def attached(url: str) -> list[dict]:
    """The conversation when the picture is attached: the user message without its question."""
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]


def ask(url: str, question: str = "What is in the image?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": question}]}]


def make(llm, handler) -> Llama:
    return Llama(model_path=str(llm), chat_handler=handler, n_ctx=1024, logits_all=True, verbose=False, seed=1)


def run(llama: Llama, messages, max_tokens: int = 5):
    response = llama.create_chat_completion(messages=messages, max_tokens=max_tokens, temperature=0.0)
    n, generated = response["usage"]["prompt_tokens"], response["usage"]["completion_tokens"]
    return response, np.array(llama.scores[n - 1 : n - 1 + generated])


def text(response) -> str:
    return response["choices"][0]["message"]["content"]


class Slow:
    """Every llama_process of image rows takes `delay` seconds longer; background batches of
    `batch` rows (FIRST_BATCH, and BATCH_SECONDS so small that every later batch is SMALLEST_BATCH)."""

    def __init__(self, monkeypatch, delay: float = 0.15, batch: int = 4):
        self.calls: list[int] = []  # rows per batch of image rows
        rows = [0]
        process, clear, add = llama_cpp.llama_process, llama_cpp.llama_batch_ext_clear, llama_cpp.llama_batch_ext_add_embd

        def added(*args):
            rows[0] += 1
            return add(*args)

        def cleared(batch_):
            rows[0] = 0
            return clear(batch_)

        def slowed(lctx, kind, batch_):
            if rows[0]:
                self.calls.append(rows[0])
                time.sleep(delay)
            return process(lctx, kind, batch_)

        monkeypatch.setattr(decode.llama_cpp, "llama_process", slowed)
        monkeypatch.setattr(decode.llama_cpp, "llama_batch_ext_clear", cleared)
        monkeypatch.setattr(decode.llama_cpp, "llama_batch_ext_add_embd", added)
        monkeypatch.setattr(attach_module, "FIRST_BATCH", batch)
        monkeypatch.setattr(attach_module, "SMALLEST_BATCH", batch)
        monkeypatch.setattr(attach_module, "BATCH_SECONDS", 1e-6)


def wait_for(future, rows: int, timeout: float = 30.0) -> None:
    """Until the background prefill has decoded at least `rows` rows."""
    end = time.monotonic() + timeout
    while future.progress()["prefilled_rows"] < rows:
        assert time.monotonic() < end, future.progress()
        assert not future.done(), future.result()
        time.sleep(0.01)


@pytest.fixture
def reference(models):
    """Answers and logits of a stock handler and of a trimmed one without attach, per (keep, messages)."""
    cache = {}

    def answer(keep, messages, follow_up=None):
        key = (keep, repr(messages), repr(follow_up))
        if key not in cache:
            handler = (Llava15ChatHandler(clip_model_path=models["1.5"], verbose=False) if keep == "stock" else
                       TrimLlava15ChatHandler(clip_model_path=models["1.5"], keep=keep, verbose=False, **STOCK_ENCODER))
            llama = make(models["llm"], handler)
            first = run(llama, messages)
            cache[key] = first if follow_up is None else run(llama, follow_up(first[0]))
        return cache[key]

    return answer


def trimmed(models, keep=8, **options):
    handler = TrimLlava15ChatHandler(clip_model_path=models["1.5"], keep=keep, verbose=False, **STOCK_ENCODER, **options)
    return handler, make(models["llm"], handler)


def follow(url):
    return lambda first: ask(url) + [first["choices"][0]["message"], {"role": "user", "content": "And the colours?"}]


# The full path: the answer is stock's

@pytest.mark.parametrize("policy", ["auto", "full"])
def test_a_finished_prefill_answers_as_stock_bit_for_bit(models, reference, policy):
    url = image_url(3)
    expected, expected_logits = reference("stock", ask(url))
    handler, llama = trimmed(models, attach_policy=policy)
    result = handler.attach(attached(url), llama=llama).result(timeout=60)
    assert isinstance(result, Attached) and (result.state, result.rows, result.prefilled_rows) == ("prefilled", ROWS, ROWS)
    got, logits = run(llama, ask(url))
    [image] = handler.last_selection
    assert (image.path, image.kept, image.rows, image.prefilled_rows) == ("full", ROWS, ROWS, ROWS)
    assert image.decode_seconds == 0 and image.preloaded  # the call decoded only its question
    assert handler.last_reused > ROWS
    assert text(got) == text(expected) and got["usage"] == expected["usage"]
    assert np.array_equal(logits, expected_logits)


def test_a_follow_up_keeps_the_whole_picture_and_reuses_it(models, reference):
    url = image_url(3)
    handler, llama = trimmed(models)
    handler.attach(attached(url), llama=llama).result(timeout=60)
    first, _ = run(llama, ask(url))
    got, logits = run(llama, follow(url)(first))
    [image] = handler.last_selection
    assert image.kept == ROWS and image.path is None  # whole, as the conversation saw it, from the cache
    assert handler.last_reused >= first["usage"]["prompt_tokens"]
    # As a keep-all conversation with KV reuse, bit for bit; stock (which prefills it all again) says the same.
    expected, expected_logits = reference(None, ask(url), follow_up=follow(url))
    assert text(got) == text(expected) and np.array_equal(logits, expected_logits)
    stock, stock_logits = reference("stock", ask(url), follow_up=follow(url))
    assert text(got) == text(stock) and np.abs(logits - stock_logits).max() < 1e-2 * np.abs(stock_logits).max()


# The pruned path

def test_the_pruned_policy_only_encodes_and_answers_as_today(models, reference, monkeypatch):
    url = image_url(4)
    expected, expected_logits = reference(8, ask(url))
    slow = Slow(monkeypatch, delay=0.0)
    handler, llama = trimmed(models, attach_policy="pruned")
    result = handler.attach(attached(url), llama=llama).result(timeout=60)
    assert (result.state, result.prefilled_rows, result.prefill_seconds) == ("encoded", 0, 0.0)
    assert slow.calls == []  # nothing decoded in the background
    got, logits = run(llama, ask(url))
    [image] = handler.last_selection
    assert (image.path, image.kept, image.preloaded) == ("pruned", 8, True)
    assert text(got) == text(expected) and np.array_equal(logits, expected_logits)


def test_auto_stops_an_early_prefill_and_leaves_no_stale_rows(models, reference, monkeypatch):
    url = image_url(5)
    slow = Slow(monkeypatch)
    handler, llama = trimmed(models)
    future = handler.attach(attached(url), llama=llama)
    wait_for(future, 4)  # 32 rows left > 8 kept: the pruned path is sooner
    got, logits = run(llama, ask(url))
    result = future.result(timeout=5)
    assert (result.state, result.prefilled_rows) == ("stopped", 0)
    assert future.progress()["state"] == "stopped"
    [image] = handler.last_selection
    assert (image.path, image.kept, image.prefilled_rows) == ("pruned", 8, 0)
    assert max(slow.calls) <= 8  # the question's 8 rows; the background took 4 at a time
    expected, expected_logits = reference(8, ask(url))
    assert text(got) == text(expected) and np.array_equal(logits, expected_logits)
    question = len(llama.tokenize(b"What is in the image?", add_bos=False))
    assert 0 < handler.last_reused <= got["usage"]["prompt_tokens"] - 8 - question  # the text before the picture
    # A follow-up reuses the pruned conversation: no row of the stopped prefill is left behind.
    expected, expected_logits = reference(8, ask(url), follow_up=follow(url))
    got, logits = run(llama, follow(url)(got))
    assert text(got) == text(expected) and np.array_equal(logits, expected_logits)
    assert handler.last_reused > 8


def test_auto_finishes_a_prefill_with_few_rows_left(models, reference, monkeypatch):
    url = image_url(6)
    Slow(monkeypatch)
    handler, llama = trimmed(models)
    future = handler.attach(attached(url), llama=llama)
    wait_for(future, ROWS - 8)  # 8 rows left, 8 kept: a tie goes to every row
    got, logits = run(llama, ask(url))
    assert future.result(timeout=5).state == "prefilled"
    [image] = handler.last_selection
    assert image.path == "full" and image.kept == ROWS and image.prefilled_rows >= ROWS - 8
    expected, expected_logits = reference("stock", ask(url))
    assert text(got) == text(expected) and np.array_equal(logits, expected_logits)


def test_the_full_policy_waits_for_every_row(models, reference, monkeypatch):
    url = image_url(7)
    Slow(monkeypatch)
    handler, llama = trimmed(models, attach_policy="full")
    future = handler.attach(attached(url), llama=llama)
    wait_for(future, 4)
    got, logits = run(llama, ask(url))
    [image] = handler.last_selection
    assert future.result(timeout=5).state == "prefilled" and image.path == "full" and image.kept == ROWS
    expected, expected_logits = reference("stock", ask(url))
    assert text(got) == text(expected) and np.array_equal(logits, expected_logits)


def test_the_decision_compares_seconds_with_the_measured_speeds(models):
    handler, llama = trimmed(models, keep=8)
    prefill = attach_module.Prefill(threading.Condition(), llama, attached(image_url(0)), ["x"])
    prefill.rows, prefill.chunk_rows, prefill.done = 36, [[36]], 20
    assert handler._decide(prefill) == "stop"  # no speed known: 16 rows left > 8
    handler._rates.note(llama, "background", 10, 1.0)  # 0.1 s per row in small batches
    handler._rates.note(llama, "pruned", 8, 1.6)  # 0.2 s per row: 8 rows take 1.6 s, 16 rows left 1.6 s
    assert handler._decide(prefill) == "finish"  # a tie goes to every row
    prefill.done = 19
    assert handler._decide(prefill) == "stop"
    handler.keep = None
    assert handler._decide(prefill) == "finish"  # every row either way
    handler.keep, handler.attach_policy = 8, "full"
    assert handler._decide(prefill) == "finish"


# Stopping and errors

def test_another_conversation_stops_the_prefill(models, reference, monkeypatch):
    Slow(monkeypatch)
    handler, llama = trimmed(models)
    future = handler.attach(attached(image_url(8)), llama=llama)
    wait_for(future, 4)
    got, logits = run(llama, ask(image_url(9)))
    assert future.result(timeout=5).state == "stopped"
    [image] = handler.last_selection
    assert image.path is None and image.kept == 8
    expected, expected_logits = reference(8, ask(image_url(9)))
    assert text(got) == text(expected) and np.array_equal(logits, expected_logits)


def test_a_second_attach_stops_the_first(models, reference, monkeypatch):
    Slow(monkeypatch)
    handler, llama = trimmed(models)
    first = handler.attach(attached(image_url(10)), llama=llama)
    wait_for(first, 4)
    second = handler.attach(attached(image_url(11)), llama=llama)
    assert first.result(timeout=10).state == "stopped"
    assert second.result(timeout=30).state == "prefilled"
    got, logits = run(llama, ask(image_url(11)))
    assert handler.last_selection[0].path == "full"
    expected, expected_logits = reference("stock", ask(image_url(11)))
    assert text(got) == text(expected) and np.array_equal(logits, expected_logits)


def test_cancel_attach_stops_and_removes_the_rows(models, reference, monkeypatch):
    Slow(monkeypatch)
    url = image_url(12)
    handler, llama = trimmed(models)
    future = handler.attach(attached(url), llama=llama)
    wait_for(future, 4)
    handler.cancel_attach()
    assert future.done() and future.result().state == "stopped"
    got, logits = run(llama, ask(url))
    assert handler.last_selection[0].path is None and handler.last_selection[0].kept == 8
    expected, expected_logits = reference(8, ask(url))
    assert text(got) == text(expected) and np.array_equal(logits, expected_logits)


def test_a_prefill_waits_for_a_stream_to_end(models, reference):
    handler, llama = trimmed(models)
    stream = llama.create_chat_completion(messages=ask(image_url(13)), max_tokens=4, temperature=0.0, stream=True)
    next(stream)
    future = handler.attach(attached(image_url(14)), llama=llama)
    end = time.monotonic() + 30
    while future.progress()["state"] == "encoding":
        assert time.monotonic() < end
        time.sleep(0.01)
    time.sleep(0.3)
    assert future.progress()["state"] == "waiting" and future.progress()["prefilled_rows"] == 0
    list(stream)
    assert future.result(timeout=30).state == "prefilled"
    got, logits = run(llama, ask(image_url(14)))
    expected, expected_logits = reference("stock", ask(image_url(14)))
    assert text(got) == text(expected) and np.array_equal(logits, expected_logits)


def test_a_failed_attach_surfaces_in_the_next_call_and_the_handler_still_answers(models, reference):
    handler, llama = trimmed(models)
    bad = "data:image/png;base64," + base64.b64encode(b"not a picture at all").decode()
    future = handler.attach(attached(bad), llama=llama)
    with pytest.raises(ValueError, match="could not decode an image"):
        future.result(timeout=30)
    with pytest.raises(ValueError, match="could not decode an image"):  # the call's own error, as without attach
        run(llama, ask(bad))
    assert handler.attach_progress() is None  # the failed prefill was the call's, and is gone
    url = image_url(15)
    got, logits = run(llama, ask(url))
    expected, expected_logits = reference(8, ask(url))
    assert text(got) == text(expected) and np.array_equal(logits, expected_logits)


def test_attach_arguments(models):
    handler, llama = trimmed(models)
    with pytest.raises(ValueError, match="ending with the user message"):
        handler.attach([], llama=llama)
    with pytest.raises(ValueError, match="ending with the user message"):
        handler.attach(attached(image_url(0)) + [{"role": "assistant", "content": "Hi"}], llama=llama)
    with pytest.raises(ValueError, match="has no picture"):
        handler.attach([{"role": "user", "content": "Hello"}], llama=llama)
    marked = [{"role": "system", "content": "Answer <__media__> briefly."}] + attached(image_url(0))
    with pytest.raises(ValueError, match="a system message's text contains '<__media__>'"):
        handler.attach(marked, llama=llama)
    with pytest.raises(ValueError, match="a system message's text contains '<__media__>'"):
        llama.create_chat_completion(messages=marked, max_tokens=1)
    assert text(run(llama, ask(image_url(0)))[0]) is not None  # and the Llama goes on
    with pytest.raises(ValueError, match="attach_policy must be one of auto, full, pruned"):
        handler.attach_policy = "fast"
    with pytest.raises(ValueError, match="attach_policy must be one of"):
        TrimLlava15ChatHandler(clip_model_path=models["1.5"], attach_policy="soon", verbose=False)
    off = TrimLlava15ChatHandler(clip_model_path=models["1.5"], image_cache_bytes=0, verbose=False)
    with pytest.raises(ValueError, match="image cache is off"):
        off.attach(attached(image_url(0)), llama=make(models["llm"], off))


def test_without_kv_reuse_attach_only_encodes(models):
    handler, llama = trimmed(models, reuse_kv=False)
    assert handler.attach(attached(image_url(16)), llama=llama).result(timeout=30).state == "encoded"
    run(llama, ask(image_url(16)))
    assert handler.last_selection[0].path == "pruned" and handler.last_selection[0].kept == 8


def test_continues_compares_the_conversation_and_its_pictures():
    a, b = image_url(0), image_url(1)
    assert continues(ask(a), attached(a))
    assert continues(ask(a, "Another question"), attached(a))
    assert not continues(ask(b), attached(a))
    text_first = [{"role": "user", "content": [{"type": "text", "text": "Look:"}, *attached(a)[0]["content"]]}]
    assert not continues(text_first, attached(a))  # the question's text would come before the picture
    assert not continues([{"role": "system", "content": "Be brief."}] + ask(a), attached(a))
    earlier = ask(b) + [{"role": "assistant", "content": "A cat."}]
    assert continues(earlier + ask(a), earlier + attached(a))
    assert not continues(ask(b) + [{"role": "assistant", "content": "A dog."}] + ask(a), earlier + attached(a))


# Other families and several chunks

def test_llava16_slices_are_prefilled_whole(models):
    url = image_url(17, (336, 168))
    stock = make(models["llm"], llama_cpp.llama_chat_format.Llava16ChatHandler(clip_model_path=models["1.6"],
                                                                               verbose=False))
    expected, expected_logits = run(stock, ask(url))
    handler = TrimLlava16ChatHandler(clip_model_path=models["1.6"], keep=8, verbose=False, **STOCK_ENCODER)
    llama = make(models["llm"], handler)
    result = handler.attach(attached(url), llama=llama).result(timeout=60)
    got, logits = run(llama, ask(url))
    [image] = handler.last_selection
    assert len(image.chunk_rows) > 1 and result.rows == image.rows == image.kept and image.path == "full"
    assert text(got) == text(expected) and np.array_equal(logits, expected_logits)


@pytest.mark.parametrize("family", ["qwen", "gemma"])
def test_other_families_prefill_as_stock(families, family):
    llm, mmproj = families[family]
    url = image_url(18, SIZE)
    stock = Qwen25VLChatHandler if family == "qwen" else MTMDChatHandler
    expected, expected_logits = run(make(llm, stock(clip_model_path=str(mmproj), verbose=False)), ask(url))
    trim = TrimQwen25VLChatHandler if family == "qwen" else TrimMTMDChatHandler
    handler = trim(clip_model_path=str(mmproj), keep=8, verbose=False, **STOCK_ENCODER)
    llama = make(llm, handler)
    result = handler.attach(attached(url), llama=llama).result(timeout=60)
    assert result.state == "prefilled"
    got, logits = run(llama, ask(url))
    [image] = handler.last_selection
    assert image.path == "full" and image.kept == image.rows == result.rows
    assert got["usage"] == expected["usage"]
    assert text(got) == text(expected) and np.array_equal(logits, expected_logits)


@pytest.mark.parametrize("family", ["qwen", "gemma"])
def test_other_families_stop_cleanly(families, family, monkeypatch):
    llm, mmproj = families[family]
    url = image_url(19, SIZE)
    trim = TrimQwen25VLChatHandler if family == "qwen" else TrimMTMDChatHandler
    reference = trim(clip_model_path=str(mmproj), keep=8, verbose=False, **STOCK_ENCODER)
    expected, expected_logits = run(make(llm, reference), ask(url))
    slow = Slow(monkeypatch)
    handler = trim(clip_model_path=str(mmproj), keep=8, verbose=False, **STOCK_ENCODER)
    llama = make(llm, handler)
    future = handler.attach(attached(url), llama=llama)
    if family == "qwen":
        wait_for(future, 4)
    else:  # non-causal: the picture's rows go in one batch or not at all; the question comes first
        end = time.monotonic() + 30
        while future.progress()["rows"] == 0:
            assert time.monotonic() < end and not future.done(), future.progress()
            time.sleep(0.01)
    got, logits = run(llama, ask(url))
    if family == "gemma":
        # Not started (the question came before it): nothing decoded in the background, or the
        # whole picture in one batch, then every row answers.
        assert all(n in (8, 64) for n in slow.calls if n > 4), slow.calls
    [image] = handler.last_selection
    if image.path == "pruned":
        assert future.result().state == "stopped" and image.kept == 8
        assert text(got) == text(expected) and np.array_equal(logits, expected_logits)
    else:  # Gemma's one batch was done first: every row, stock's answer
        assert family == "gemma" and image.kept == 64 and future.result().state == "prefilled"
        stock, stock_logits = run(make(llm, MTMDChatHandler(clip_model_path=str(mmproj), verbose=False)), ask(url))
        assert text(got) == text(stock) and np.array_equal(logits, stock_logits)


def test_a_raised_abort_flag_abandons_the_batch_and_its_cells(models):
    """llama.cpp's abort callback, reading the prefill's flag: the decode in flight returns at once
    and the cells of its batch are gone (what a stop relies on to be quick)."""
    llama = Llama(model_path=models["llm"], n_ctx=256, verbose=False)
    llama.eval(llama.tokenize(b"Hello there"))
    before = llama_cpp.llama_memory_seq_pos_max(llama_cpp.llama_get_memory(llama.ctx), 0)
    rows = np.random.default_rng(0).standard_normal((12, llama.n_embd()), dtype=np.float32)
    positions = before + 1 + np.arange(12, dtype=np.int32)
    flag = ctypes.c_ubyte(1)
    with abortable(llama.ctx, flag), pytest.raises(decode.Aborted):
        decode.decode_rows(llama.ctx, rows, positions, 0, 4, lambda done: 4)
    assert llama_cpp.llama_memory_seq_pos_max(llama_cpp.llama_get_memory(llama.ctx), 0) == before
    flag.value = 0
    with abortable(llama.ctx, flag):
        decode.decode_rows(llama.ctx, rows, positions, 0, 4, lambda done: 4)
    assert llama_cpp.llama_memory_seq_pos_max(llama_cpp.llama_get_memory(llama.ctx), 0) == before + 12
    flag.value = 1
    decode.decode_rows(llama.ctx, rows[:1], positions[-1:] + 1, 0, 4)  # no callback left behind: not aborted
    assert llama_cpp.llama_memory_seq_pos_max(llama_cpp.llama_get_memory(llama.ctx), 0) == before + 13


def test_a_whole_picture_that_does_not_fit_is_not_prefilled_and_the_question_prunes(models, reference):
    url = image_url(20)
    n_ctx = reference(8, ask(url))[0]["usage"]["prompt_tokens"] + 4  # the pruned prompt fits; 28 more rows do not
    handler = TrimLlava15ChatHandler(clip_model_path=models["1.5"], keep=8, verbose=False, **STOCK_ENCODER)
    llama = Llama(model_path=models["llm"], chat_handler=handler, n_ctx=n_ctx, logits_all=True, verbose=False, seed=1)
    assert handler.attach(attached(url), llama=llama).result(timeout=30).state == "encoded"
    run(llama, ask(url), max_tokens=2)
    assert handler.last_selection[0].path == "pruned" and handler.last_selection[0].kept == 8


def test_a_whole_picture_does_not_leak_into_another_conversation(models, reference):
    url = image_url(21)
    handler, llama = trimmed(models)
    handler.attach(attached(url), llama=llama).result(timeout=30)
    first, _ = run(llama, ask(url))
    assert handler.last_selection[0].kept == ROWS
    other = [{"role": "system", "content": "Answer briefly."}] + ask(url)  # the same picture, another conversation
    got, logits = run(llama, other)
    assert handler.last_selection[0].kept == 8 and handler.last_selection[0].path is None
    expected, expected_logits = reference(8, other)
    assert text(got) == text(expected) and np.array_equal(logits, expected_logits)


def test_reselect_with_earlier_pictures_only_encodes(models):
    handler, llama = trimmed(models, follow_ups="reselect")
    first, _ = run(llama, ask(image_url(22)))
    conversation = ask(image_url(22)) + [first["choices"][0]["message"]] + attached(image_url(23))
    assert handler.attach(conversation, llama=llama).result(timeout=30).state == "encoded"


def test_closing_the_llama_stops_its_prefill_first(models, monkeypatch):
    Slow(monkeypatch)
    handler, llama = trimmed(models)
    future = handler.attach(attached(image_url(24)), llama=llama)
    wait_for(future, 4)
    llama.close()  # the prefill stops (its batch abandoned) before the model and context are freed
    assert future.result(timeout=10).state == "stopped"
    got, _ = run(make(models["llm"], handler), ask(image_url(24)))  # the handler serves a new Llama
    assert handler.last_selection[0].kept == 8


def test_a_llama_dropped_during_its_prefill_is_freed_after_it(models, monkeypatch):
    import gc
    import weakref

    Slow(monkeypatch)
    handler, llama = trimmed(models)
    future = handler.attach(attached(image_url(25)), llama=llama)
    wait_for(future, 4)
    gone = weakref.ref(llama)
    del llama
    gc.collect()
    assert future.result(timeout=30).state == "prefilled"  # nobody asked: it ran to its end
    end = time.monotonic() + 10
    while gone() is not None:  # then the Llama goes, closing in the prefill's thread without waiting for itself
        assert time.monotonic() < end, "the dropped Llama was never freed"
        time.sleep(0.05)
        gc.collect()
    run(make(models["llm"], handler), ask(image_url(25)))
    assert handler.last_selection[0].kept == 8


def test_a_qwen_follow_up_after_every_row_reuses_the_whole_picture(families):
    llm, mmproj = families["qwen"]
    url = image_url(26, SIZE)
    handler = TrimQwen25VLChatHandler(clip_model_path=str(mmproj), keep=8, verbose=False, **STOCK_ENCODER)
    llama = make(llm, handler)
    handler.attach(attached(url), llama=llama).result(timeout=60)
    first, _ = run(llama, ask(url))
    rows = handler.last_selection[0].rows
    assert handler.last_selection[0].kept == rows and handler.last_selection[0].path == "full"
    follow_up = ask(url) + [first["choices"][0]["message"], {"role": "user", "content": "And the colours?"}]
    got, logits = run(llama, follow_up)
    assert handler.last_selection[0].kept == rows and handler.last_reused >= first["usage"]["prompt_tokens"]
    keep_all = TrimQwen25VLChatHandler(clip_model_path=str(mmproj), keep=None, verbose=False, **STOCK_ENCODER)
    other = make(llm, keep_all)
    expected_first, _ = run(other, ask(url))
    expected, expected_logits = run(other, ask(url) + [expected_first["choices"][0]["message"],
                                                       {"role": "user", "content": "And the colours?"}])
    assert text(got) == text(expected) and np.array_equal(logits, expected_logits)


def test_a_llama_closing_in_a_background_thread_leaves_stdout_and_stderr_alone(models, monkeypatch):
    """A prefill may hold a dropped Llama's last reference, so it may close there: llama-cpp-python's
    silencing swaps the process's sys.stdout and sys.stderr, which must not happen under the main thread."""
    import sys

    import llama_cpp.mtmd_cpp as mtmd_cpp

    handler, llama = trimmed(models)
    run(llama, ask(image_url(27)), max_tokens=1)  # the mmproj context is loaded
    free, seen = mtmd_cpp.mtmd_free, []
    monkeypatch.setattr(mtmd_cpp, "mtmd_free", lambda ctx: seen.append((sys.stdout, sys.stderr)) or free(ctx))
    streams = (sys.stdout, sys.stderr)
    closing = threading.Thread(target=llama.close)
    closing.start()
    closing.join(timeout=30)
    assert seen and all(pair == streams for pair in seen)
