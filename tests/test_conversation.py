"""Conversations: the image cache and KV reuse (trimcpp.handlers.conversation) on the tiny models.

The reference is always a fresh Llama with a fresh handler (nothing to reuse), or the stock handler,
on the same messages. The conversations carry fixed assistant answers, so every handler sees the
same messages.
"""

from __future__ import annotations

import base64
import threading

import llama_cpp
import llama_cpp.llama_cpp as llama_api
import llama_cpp.mtmd_cpp as mtmd_cpp
import numpy as np
import pytest
from llama_cpp import Llama
from llama_cpp.llama_chat_format import Llava15ChatHandler

from trimcpp import TrimLlava15ChatHandler, TrimLlava16ChatHandler, TrimMTMDChatHandler
from trimcpp.testing import write_pair

from helpers import ROWS, image_url

QUESTIONS = ["What is in the image?", "What color is it?", "How many are there?"]
ANSWERS = ["A red square.", "Red.", "Two."]


def conversation(turns: int, url: str | None = None, first: str = QUESTIONS[0]) -> list[dict]:
    """`turns` user questions about one picture; the assistant's fixed answers between them."""
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url or image_url(0)}},
                                             {"type": "text", "text": first}]}]
    for turn in range(1, turns):
        messages += [{"role": "assistant", "content": ANSWERS[turn - 1]}, {"role": "user", "content": QUESTIONS[turn]}]
    return messages


def make(models, handler, llm: str | None = None, **kwargs) -> Llama:
    options = dict(n_ctx=2048, verbose=False, seed=1)
    options.update(kwargs)
    return Llama(model_path=llm or models["llm"], chat_handler=handler, **options)


def answer(llama: Llama, messages, max_tokens: int = 6) -> tuple[str, dict]:
    response = llama.create_chat_completion(messages=messages, max_tokens=max_tokens, temperature=0.0)
    return response["choices"][0]["message"]["content"], response["usage"]


def fresh(models, messages, mmproj: str | None = None, **trim) -> str:
    """The answer of a new Llama with a new trimmed handler (nothing to reuse)."""
    handler = TrimLlava15ChatHandler(clip_model_path=mmproj or models["1.5"], verbose=False, **trim)
    return answer(make(models, handler), messages)[0]


class Counters:
    """mtmd_encode_chunk calls and tokens decoded (text batches and trimcpp's image rows)."""

    def __init__(self, monkeypatch):
        self.encodes = self.decoded = self.rows = 0
        encode, decode, add_row = mtmd_cpp.mtmd_encode_chunk, llama_api.llama_decode, llama_cpp.llama_batch_ext_add_embd

        def counted_encode(*args):
            self.encodes += 1
            return encode(*args)

        def counted_decode(ctx, batch):  # Llama.eval's text batches
            self.decoded += batch.n_tokens
            return decode(ctx, batch)

        def counted_row(*args):  # trimcpp's image rows, one call each
            self.decoded += 1
            self.rows += 1
            return add_row(*args)

        monkeypatch.setattr(mtmd_cpp, "mtmd_encode_chunk", counted_encode)
        monkeypatch.setattr(llama_api, "llama_decode", counted_decode)
        monkeypatch.setattr(llama_cpp, "llama_batch_ext_add_embd", counted_row)

    def reset(self) -> None:
        self.encodes = self.decoded = self.rows = 0


def test_keep_all_follow_ups_equal_stock_and_only_new_tokens_are_decoded(models, monkeypatch):
    stock = make(models, Llava15ChatHandler(clip_model_path=models["1.5"], verbose=False))
    handler = TrimLlava15ChatHandler(clip_model_path=models["1.5"], keep=None, verbose=False)
    llama = make(models, handler)
    counts = Counters(monkeypatch)
    previous = 0
    for turn in range(1, 4):
        messages = conversation(turn)
        expected, expected_usage = answer(stock, messages)
        counts.reset()
        got, usage = answer(llama, messages)
        assert got == expected and usage == expected_usage
        prompt = usage["prompt_tokens"]
        # Generation decodes every new token but the last; the prompt, only what the cache lacked.
        assert counts.decoded == prompt - handler.last_reused + usage["completion_tokens"] - 1
        if turn == 1:
            assert counts.encodes == 1 and handler.last_reused == 0
        else:
            assert counts.encodes == 0 and handler.image_cache.hits == turn - 1
            # Everything up to the previous answer was reused, the picture's 36 rows included.
            assert previous - 1 - 10 <= handler.last_reused < prompt and prompt - handler.last_reused < prompt - ROWS
        previous = prompt


def _turns(models, handler, *conversations):
    llama = make(models, handler)
    return [answer(llama, messages)[0] for messages in conversations]


def test_different_picture_of_the_same_size_is_not_reused(models, monkeypatch):
    handler = TrimLlava15ChatHandler(clip_model_path=models["1.5"], keep=8, verbose=False)
    llama = make(models, handler)
    answer(llama, conversation(2))
    counts = Counters(monkeypatch)
    other = conversation(2, url=image_url(7))
    got, _ = answer(llama, other)
    assert handler.image_cache.hits == 0 and counts.encodes == 1 and counts.rows == 8  # decoded anew
    assert got == fresh(models, other, keep=8)


def test_same_picture_under_another_mmproj(models, tmp_path):
    _, other_mmproj = write_pair(tmp_path, "tiny", version="1.5", seed=5)
    first = TrimLlava15ChatHandler(clip_model_path=models["1.5"], keep=8, verbose=False)
    second = TrimLlava15ChatHandler(clip_model_path=str(other_mmproj), keep=8, verbose=False)
    llama = make(models, first)
    answer(llama, conversation(1))
    llama.chat_handler = second
    got_second, _ = answer(llama, conversation(2))
    assert second.last_reused == 0 and got_second == fresh(models, conversation(2), mmproj=str(other_mmproj), keep=8)
    llama.chat_handler = first
    got_first, _ = answer(llama, conversation(2))
    assert first.last_reused == 0  # the other handler used the cache in between
    assert got_first == fresh(models, conversation(2), keep=8)


@pytest.mark.parametrize("change", [{"keep": 12}, {"method": "divprune"}, {"stage1_ratio": 0.5}])
def test_changed_selection_settings_are_not_reused(models, change, monkeypatch):
    handler = TrimLlava15ChatHandler(clip_model_path=models["1.5"], keep=8, verbose=False)
    llama = make(models, handler)
    answer(llama, conversation(2))
    for name, value in change.items():
        setattr(handler, name, value)
    counts = Counters(monkeypatch)
    got, _ = answer(llama, conversation(3))
    # The encode is reused, the rows are decoded anew.
    assert handler.image_cache.hits == 1 and counts.encodes == 0 and counts.rows == change.get("keep", 8)
    assert got == fresh(models, conversation(3), **{"keep": 8, **change})


def test_edited_earlier_message(models):
    handler = TrimLlava15ChatHandler(clip_model_path=models["1.5"], keep=8, verbose=False)
    llama = make(models, handler)
    answer(llama, conversation(2))
    edited = conversation(3, first="Describe the picture please")
    got, usage = answer(llama, edited)
    assert handler.last_reused < usage["prompt_tokens"] - 20  # not past the edited question
    assert got == fresh(models, edited, keep=8)


@pytest.mark.parametrize("between", ["stock handler", "completion", "load_state"])
def test_llama_used_in_between(models, between):
    handler = TrimLlava15ChatHandler(clip_model_path=models["1.5"], keep=8, verbose=False)
    llama = make(models, handler)
    answer(llama, conversation(1))
    saved = llama.save_state()
    answer(llama, conversation(2))
    if between == "stock handler":
        llama.chat_handler = Llava15ChatHandler(clip_model_path=models["1.5"], verbose=False)
        answer(llama, conversation(2, url=image_url(3)))
        llama.chat_handler = handler
    elif between == "completion":
        llama.create_completion("USER: tell me about a cat ASSISTANT:", max_tokens=3, temperature=0.0)
    else:
        llama.load_state(saved)
    got, _ = answer(llama, conversation(3))
    assert handler.last_reused == 0
    assert got == fresh(models, conversation(3), keep=8)


def test_errors_leave_the_next_call_correct(models):
    handler = TrimLlava15ChatHandler(clip_model_path=models["1.5"], keep=8, verbose=False)
    llama = make(models, handler, n_ctx=160)
    answer(llama, conversation(2))
    corrupt = conversation(2) + [{"role": "assistant", "content": "Ok."}, {"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"junk").decode()}},
        {"type": "text", "text": "And this one?"}]}]
    with pytest.raises(ValueError, match="could not decode an image"):
        answer(llama, corrupt)
    long = conversation(3)
    long[-1] = {"role": "user", "content": "tell me " * 60}
    with pytest.raises(ValueError, match="Prompt exceeds n_ctx"):
        answer(llama, long)
    got, _ = answer(llama, conversation(3))
    assert got == fresh(models, conversation(3), keep=8)


def test_follow_up_modes(models, monkeypatch):
    """keep-rows: an image keeps the rows chosen with the text of its own turn, so the follow-up
    reuses the cache through it; reselect: the rows follow all the user text, and the cache is
    reused only up to the picture."""
    kept = {}
    for mode in ("keep-rows", "reselect"):
        # The paper's L2 score: on these random rows it moves with the text more than the cosine does.
        handler = TrimLlava15ChatHandler(clip_model_path=models["1.5"], keep=8, follow_ups=mode, alignment="l2",
                                         verbose=False)
        llama = make(models, handler)
        answer(llama, conversation(1))
        first = handler.last_selection[0].indices[0]
        counts = Counters(monkeypatch)
        got, usage = answer(llama, conversation(2))
        kept[mode] = (first, handler.last_selection[0].indices[0], counts.rows, handler.last_reused, usage["prompt_tokens"])
        monkeypatch.undo()
        assert got == fresh(models, conversation(2), keep=8, follow_ups=mode, alignment="l2")
    first, second, rows, reused, prompt = kept["keep-rows"]
    assert np.array_equal(first, second) and rows == 0 and reused > prompt - 20
    first, second, rows, _, _ = kept["reselect"]
    assert not np.array_equal(first, second) and rows == 8


def test_image_cache_stays_under_its_bound(models):
    one_image = ROWS * 256 * 4  # 36 rows of 256 float32
    handler = TrimLlava15ChatHandler(clip_model_path=models["1.5"], keep=8, image_cache_bytes=2 * one_image,
                                     verbose=False)
    llama = make(models, handler)
    for seed in range(4):
        answer(llama, conversation(1, url=image_url(seed)))
        assert handler.image_cache.bytes <= 2 * one_image
    assert len(handler.image_cache) == 2
    answer(llama, conversation(1, url=image_url(3)))  # the most recent one is still there
    assert handler.image_cache.hits == 1
    off = TrimLlava15ChatHandler(clip_model_path=models["1.5"], keep=8, image_cache_bytes=0, verbose=False)
    llama.chat_handler = off
    answer(llama, conversation(1))
    answer(llama, conversation(1))
    assert len(off.image_cache) == 0 and off.image_cache.hits == 0


def test_llava16_and_two_images(models, monkeypatch):
    counts = Counters(monkeypatch)
    handler = TrimLlava16ChatHandler(clip_model_path=models["1.6"], keep=20, verbose=False)
    llama = make(models, handler)
    messages = conversation(1, url=image_url(0, (168, 84)))  # two slices and the overview: three chunks
    messages[0]["content"].insert(1, {"type": "image_url", "image_url": {"url": image_url(1)}})
    _, first = answer(llama, messages)
    chunks = [len(s.chunk_rows) for s in handler.last_selection]
    assert chunks[0] == 3 and counts.encodes == sum(chunks)
    follow = messages + [{"role": "assistant", "content": "Two pictures."}, {"role": "user", "content": "And?"}]
    counts.reset()
    got, _ = answer(llama, follow)
    # Both pictures reused; the last tokens of the first prompt may tokenise otherwise once the answer follows.
    assert counts.encodes == 0 and counts.rows == 0 and handler.last_reused >= first["prompt_tokens"] - 3
    reference = TrimLlava16ChatHandler(clip_model_path=models["1.6"], keep=20, verbose=False)
    assert got == answer(make(models, reference), follow)[0]


def test_gemma_non_causal_follow_up(tmp_path):
    llm, mmproj = (str(p) for p in write_pair(tmp_path, "tiny", family="gemma3"))
    handler = TrimMTMDChatHandler(clip_model_path=mmproj, keep=16, verbose=False)
    llama = Llama(model_path=llm, chat_handler=handler, n_ctx=1024, verbose=False, seed=1)
    _, first = answer(llama, conversation(1, url=image_url(0, (224, 168))))
    got, _ = answer(llama, conversation(2, url=image_url(0, (224, 168))))
    assert handler.last_reused >= first["prompt_tokens"] - 3
    reference = TrimMTMDChatHandler(clip_model_path=mmproj, keep=16, verbose=False)
    expected = answer(Llama(model_path=llm, chat_handler=reference, n_ctx=1024, verbose=False, seed=1),
                      conversation(2, url=image_url(0, (224, 168))))[0]
    assert got == expected


def test_reuse_off_and_bad_arguments(models):
    handler = TrimLlava15ChatHandler(clip_model_path=models["1.5"], keep=8, reuse_kv=False, verbose=False)
    llama = make(models, handler)
    answer(llama, conversation(1))
    answer(llama, conversation(2))
    assert handler.last_reused == 0
    for kwargs, error in (({"follow_ups": "sometimes"}, ValueError), ({"image_cache_bytes": -1}, ValueError),
                          ({"reuse_kv": "yes"}, TypeError)):
        with pytest.raises(error, match=next(iter(kwargs))):
            TrimLlava15ChatHandler(clip_model_path=models["1.5"], **kwargs)
        if "image_cache_bytes" not in kwargs:  # the same checks when set later
            with pytest.raises(error, match=next(iter(kwargs))):
                setattr(handler, *next(iter(kwargs.items())))
    assert handler.follow_ups == "keep-rows" and handler.reuse_kv is False


def test_one_handler_two_threads(models):
    """Calls of one handler from two threads (each with its own Llama) are serialised."""
    handler = TrimLlava15ChatHandler(clip_model_path=models["1.5"], keep=8, verbose=False)
    expected = fresh(models, conversation(2), keep=8)
    results: list[str] = []

    def run() -> None:
        llama = make(models, handler)
        answer(llama, conversation(1))
        results.append(answer(llama, conversation(2))[0])

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [expected, expected]


def test_a_llama_closing_leaves_the_others_calls_alone(models):
    """One handler, two Llamas: the first closes in the middle of the second's call (as the garbage
    collector may do, in any thread); the second's libmtmd context is its own, so its answers stand
    (the stock handler frees its only context, made for the first Llama, under the running call)."""
    handler = TrimLlava15ChatHandler(clip_model_path=models["1.5"], keep=8, verbose=False)
    expected = [fresh(models, conversation(turns), keep=8) for turns in (1, 2)]
    first = make(models, handler)
    assert answer(first, conversation(1))[0] == expected[0]
    second = make(models, handler)
    loaded = handler.image_loaded

    def close_first(bitmap, image_bytes) -> None:
        first.close()
        loaded(bitmap, image_bytes)

    handler.image_loaded = close_first
    assert answer(second, conversation(1))[0] == expected[0]
    del handler.image_loaded
    assert answer(second, conversation(2))[0] == expected[1]
    third = make(models, handler)  # a Llama made after the close gets a context of its own too
    assert answer(third, conversation(2))[0] == expected[1]


def test_cache_that_cannot_drop_a_tail_starts_again(models, monkeypatch):
    """When llama.cpp cannot remove the tail of the cache, the call starts over from an empty cache."""
    from trimcpp.handlers import conversation as module

    handler = TrimLlava15ChatHandler(clip_model_path=models["1.5"], keep=8, verbose=False)
    llama = make(models, handler)
    answer(llama, conversation(1))
    refused = []
    monkeypatch.setattr(module, "trim_kv", lambda llama, position: refused.append(position) or False)
    got, _ = answer(llama, conversation(2))
    assert refused and handler.last_reused == 0
    assert got == fresh(models, conversation(2), keep=8)


def test_bench_turns_command(models, capsys):
    import json

    from trimcpp.cli import main

    code = main(["bench", "--model", models["llm"], "--mmproj", models["1.5"], "--turns", "3", "--keep", "16,8",
                 "--repeat", "1", "--answer-tokens", "4", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["turns"] == 3 and result["keep"] == 8
    assert [e["handler"] for e in result["results"]] == ["stock", "keep-rows", "reselect"]
    for entry in result["results"]:
        assert len(entry["ttft_s"]) == 3 and all(s > 0 for s in entry["ttft_s"])
    keep_rows = result["results"][1]
    assert keep_rows["kept"] == [8, 8, 8] and keep_rows["reused"][0] == 0 and min(keep_rows["reused"][1:]) > 40
    with pytest.raises(SystemExit) as stop:
        main(["bench", "--turns", "9"])
    assert stop.value.code == 2
