"""TrimLlava15ChatHandler / TrimLlava16ChatHandler on tiny random-weight models (trimcpp.testing).

The tiny mmproj turns an image into 36 rows (84 px, patch 14) of width 256; LLaVA-1.6 adds one
36-row chunk per slice, then the overview's. The reference for every count is the stock handler run
on the same Llama object.
"""

from __future__ import annotations

import base64
import dataclasses

import numpy as np
import pytest
from llama_cpp import Llama
from llama_cpp.llama_chat_format import Llava15ChatHandler, Llava16ChatHandler

import trimcpp
from trimcpp import TrimLlava15ChatHandler, TrimLlava16ChatHandler
from trimcpp.testing import SHAPES, write_mmproj

from helpers import ROWS, STOCK_ENCODER, image_url

STOCK = {"1.5": Llava15ChatHandler, "1.6": Llava16ChatHandler}
TRIM = {"1.5": TrimLlava15ChatHandler, "1.6": TrimLlava16ChatHandler}


def ask(question: str = "What is in the image?", images: int = 1, seed: int = 0) -> list[dict]:
    content = [{"type": "image_url", "image_url": {"url": image_url(seed + i)}} for i in range(images)]
    return [{"role": "user", "content": content + [{"type": "text", "text": question}]}]


def make_llama(models, handler, **kwargs) -> Llama:
    options = dict(n_ctx=1024, logits_all=True, verbose=False, seed=1)
    options.update(kwargs)
    return Llama(model_path=models["llm"], chat_handler=handler, **options)


def run(llm: Llama, messages, max_tokens: int = 4, **kwargs):
    """Greedy completion; returns (response, logits after the prompt and after each new token)."""
    response = llm.create_chat_completion(messages=messages, max_tokens=max_tokens, temperature=0.0, **kwargs)
    n = response["usage"]["prompt_tokens"]
    generated = response["usage"]["completion_tokens"]
    return response, np.array(llm.scores[n - 1 : n - 1 + generated])


@pytest.mark.parametrize("version", ["1.5", "1.6"])
@pytest.mark.parametrize("keep_all", [None, 10_000, "method-none"])
def test_keep_all_is_bit_identical_to_stock(models, version, keep_all):
    stock = STOCK[version](clip_model_path=models[version], verbose=False)
    if keep_all == "method-none":
        trimmed = TRIM[version](clip_model_path=models[version], keep=4, method="none", verbose=False, **STOCK_ENCODER)
    else:
        trimmed = TRIM[version](clip_model_path=models[version], keep=keep_all, verbose=False, **STOCK_ENCODER)
    llm = make_llama(models, stock)
    expected, expected_logits = run(llm, ask(), max_tokens=6)
    llm.chat_handler = trimmed
    got, logits = run(llm, ask(), max_tokens=6)
    assert got["usage"] == expected["usage"]
    assert got["choices"][0]["message"]["content"] == expected["choices"][0]["message"]["content"]
    assert logits.shape == expected_logits.shape and logits.shape[0] == 6
    assert np.array_equal(logits, expected_logits)
    [image] = trimmed.last_selection
    assert image.kept == image.rows and sum(image.chunk_rows) == image.rows
    assert all(np.array_equal(k, np.arange(n)) for k, n in zip(image.indices, image.chunk_rows))


def test_kept_rows_change_the_logits(models):
    """The control for the test above: keeping fewer rows must change what the LLM computes."""
    llm = make_llama(models, TrimLlava15ChatHandler(clip_model_path=models["1.5"], keep=None, verbose=False))
    _, full = run(llm, ask())
    llm.chat_handler = TrimLlava15ChatHandler(clip_model_path=models["1.5"], keep=8, verbose=False)
    _, trimmed = run(llm, ask())
    assert not np.array_equal(full[0], trimmed[0])


@pytest.mark.parametrize("n_batch", [512, 3])
def test_prompt_tokens_count_kept_rows(models, n_batch):
    stock = Llava15ChatHandler(clip_model_path=models["1.5"], verbose=False)
    llm = make_llama(models, stock, n_batch=n_batch)
    expected, _ = run(llm, ask(), max_tokens=1)
    text_tokens = expected["usage"]["prompt_tokens"] - ROWS
    handler = TrimLlava15ChatHandler(clip_model_path=models["1.5"], keep=8, verbose=False)
    llm.chat_handler = handler
    got, _ = run(llm, ask(), max_tokens=1)
    assert got["usage"]["prompt_tokens"] == text_tokens + 8
    [image] = handler.last_selection
    assert (image.rows, image.kept, image.chunk_rows) == (ROWS, 8, [ROWS])
    assert list(image.indices[0]) == sorted(set(image.indices[0].tolist()))
    assert image.encode_seconds > 0 and image.select_seconds > 0 and image.decode_seconds > 0
    assert llm.n_tokens == got["usage"]["total_tokens"] - 1  # the last sampled token is not evaluated


def test_small_n_batch_gives_the_same_answer(models):
    """Decoding the kept rows in slices of n_batch changes nothing the LLM sees (up to float rounding)."""
    results = []
    for n_batch in (512, 3):
        llm = make_llama(models, TrimLlava15ChatHandler(clip_model_path=models["1.5"], keep=8, verbose=False),
                         n_batch=n_batch)
        results.append(run(llm, ask()))
    (a, la), (b, lb) = results
    assert a["usage"] == b["usage"]
    np.testing.assert_allclose(la, lb, rtol=1e-3, atol=1e-3)


def test_two_images_and_two_turns(models):
    stock = Llava15ChatHandler(clip_model_path=models["1.5"], verbose=False)
    llm = make_llama(models, stock)
    messages = ask("Which one is brighter?", images=2) + [
        {"role": "assistant", "content": "The first."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url(7)}},
                                     {"type": "text", "text": "And this one?"}]},
    ]
    expected, _ = run(llm, messages, max_tokens=1)
    handler = TrimLlava15ChatHandler(clip_model_path=models["1.5"], keep=0.25, verbose=False)
    llm.chat_handler = handler
    got, _ = run(llm, messages, max_tokens=1)
    per_image = 9  # round(0.25 * 36)
    assert got["usage"]["prompt_tokens"] == expected["usage"]["prompt_tokens"] - 3 * (ROWS - per_image)
    assert [s.image for s in handler.last_selection] == [0, 1, 2]
    assert [s.kept for s in handler.last_selection] == [per_image] * 3
    # Stage 1 used the text of both user turns, tokenised without special tokens.
    question = llm.tokenize(b"Which one is brighter?", add_bos=False, special=False)
    follow_up = llm.tokenize(b"And this one?", add_bos=False, special=False)
    assert handler.last_text_rows == len(question) + len(follow_up)


def test_llava16_splits_keep_over_slices(models):
    stock = Llava16ChatHandler(clip_model_path=models["1.6"], verbose=False)
    llm = make_llama(models, stock)
    expected, _ = run(llm, ask(), max_tokens=1)
    handler = TrimLlava16ChatHandler(clip_model_path=models["1.6"], keep=20, verbose=False)
    llm.chat_handler = handler
    got, _ = run(llm, ask(), max_tokens=1)
    [image] = handler.last_selection
    chunks = len(image.chunk_rows)
    assert chunks > 2  # several slices and the overview for a 150 x 100 image
    assert image.rows == chunks * ROWS == expected["usage"]["prompt_tokens"] - (got["usage"]["prompt_tokens"] - 20)
    assert image.kept == 20 and sum(len(k) for k in image.indices) == 20
    assert all(1 <= len(k) <= ROWS for k in image.indices)


def test_llava16_keeps_at_least_one_row_per_chunk(models):
    handler = TrimLlava16ChatHandler(clip_model_path=models["1.6"], keep=2, verbose=False)
    llm = make_llama(models, handler)
    got, _ = run(llm, ask(), max_tokens=1)
    [image] = handler.last_selection
    chunks = len(image.chunk_rows)
    assert chunks > 2 and image.kept == chunks and [len(k) for k in image.indices] == [1] * chunks
    llm.chat_handler = Llava16ChatHandler(clip_model_path=models["1.6"], verbose=False)
    expected, _ = run(llm, ask(), max_tokens=1)
    assert got["usage"]["prompt_tokens"] == expected["usage"]["prompt_tokens"] - image.rows + chunks


def test_default_keep_per_handler(models):
    assert TrimLlava15ChatHandler(clip_model_path=models["1.5"], verbose=False).keep == 64
    assert TrimLlava16ChatHandler(clip_model_path=models["1.6"], verbose=False).keep == 320


def test_default_keep_64_on_an_81_row_encoder(models):
    """keep=64 literally: an encoder of 126 px (81 rows) next to the same LLM."""
    shape = dataclasses.replace(SHAPES["tiny"], image_size=126)
    mmproj = str(write_mmproj(models["root"] / "mmproj-81.gguf", shape))
    llm = make_llama(models, Llava15ChatHandler(clip_model_path=mmproj, verbose=False))
    expected, _ = run(llm, ask(images=2), max_tokens=1)
    handler = TrimLlava15ChatHandler(clip_model_path=mmproj, verbose=False)
    llm.chat_handler = handler
    got, _ = run(llm, ask(images=2), max_tokens=1)
    assert got["usage"]["prompt_tokens"] == expected["usage"]["prompt_tokens"] - 2 * (81 - 64)
    assert [(s.rows, s.kept) for s in handler.last_selection] == [(81, 64), (81, 64)]


def test_uniform_method_keeps_the_uniform_rows(models):
    handler = TrimLlava15ChatHandler(clip_model_path=models["1.5"], keep=6, method="uniform", verbose=False)
    run(make_llama(models, handler), ask(), max_tokens=1)
    [image] = handler.last_selection
    expected = trimcpp.prune(np.zeros((ROWS, 1)), None, 6, method="uniform")
    assert np.array_equal(image.indices[0], expected)


def test_streaming(models):
    handler = TrimLlava15ChatHandler(clip_model_path=models["1.5"], keep=8, verbose=False)
    llm = make_llama(models, handler)
    expected = llm.create_chat_completion(messages=ask(), max_tokens=6, temperature=0.0)
    pieces = [
        chunk["choices"][0]["delta"].get("content") or ""
        for chunk in llm.create_chat_completion(messages=ask(), max_tokens=6, temperature=0.0, stream=True)
    ]
    assert "".join(pieces) == expected["choices"][0]["message"]["content"]
    assert handler.last_selection[0].kept == 8


def test_image_positions_hold_row_digests(models):
    """Token ids at image positions depend on the kept rows, so no prefix match can reuse another image's KV."""
    handler = TrimLlava15ChatHandler(clip_model_path=models["1.5"], keep=8, verbose=False)
    llm = make_llama(models, handler)
    ids = []
    for seed in (0, 1, 0):
        response, _ = run(llm, ask(seed=seed), max_tokens=1)
        ids.append(llm.input_ids[: response["usage"]["prompt_tokens"]].copy())
    assert np.array_equal(ids[0], ids[2])
    assert not np.array_equal(ids[0], ids[1])
    assert np.all((ids[0] >= 0) & (ids[0] < llm.n_vocab()))


# Bad input: a clear exception, and the same Llama answers the next valid request as before.


def test_corrupt_image_then_valid_request(models):
    llm = make_llama(models, TrimLlava15ChatHandler(clip_model_path=models["1.5"], keep=8, verbose=False))
    _, before = run(llm, ask())
    corrupt = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"\x89PNG junk").decode()}},
        {"type": "text", "text": "What is in the image?"}]}]
    with pytest.raises(ValueError, match="could not decode an image"):
        run(llm, corrupt)
    _, after = run(llm, ask())
    assert np.array_equal(before, after)


def test_prompt_longer_than_n_ctx_then_valid_request(models):
    llm = make_llama(models, TrimLlava15ChatHandler(clip_model_path=models["1.5"], keep=8, verbose=False), n_ctx=128)
    _, before = run(llm, ask())
    with pytest.raises(ValueError, match="n_ctx"):
        run(llm, ask("what is " * 60))
    _, after = run(llm, ask())
    assert np.array_equal(before, after)


def test_pruning_lets_a_prompt_fit_n_ctx(models):
    """The n_ctx check counts kept rows: 2 images x 36 rows overflow n_ctx=96, 2 x 8 do not."""
    messages = ask(images=2)
    llm = make_llama(models, Llava15ChatHandler(clip_model_path=models["1.5"], verbose=False), n_ctx=96)
    # The stock handler checks against llama.cpp's padded context (256) and then fails to store
    # the ids in Llama.input_ids (96 slots) with a NumPy broadcast error; still a ValueError.
    with pytest.raises(ValueError):
        run(llm, messages)
    llm.chat_handler = TrimLlava15ChatHandler(clip_model_path=models["1.5"], keep=8, verbose=False)
    response, _ = run(llm, messages)
    assert response["usage"]["prompt_tokens"] < 96


def test_mmproj_of_another_llm(models):
    wrong = write_mmproj(models["root"] / "mmproj-wrong.gguf", SHAPES["tiny"], n_embd_out=128)
    good = TrimLlava15ChatHandler(clip_model_path=models["1.5"], keep=8, reuse_kv=False, verbose=False)
    llm = make_llama(models, good)
    _, before = run(llm, ask())
    llm.chat_handler = TrimLlava15ChatHandler(clip_model_path=str(wrong), keep=8, verbose=False)
    with pytest.raises(ValueError, match="128.*256"):
        run(llm, ask())
    llm.chat_handler = good
    _, after = run(llm, ask())
    assert np.array_equal(before, after)


@pytest.mark.parametrize("keep, error", [(0, ValueError), (-3, ValueError), (1.5, ValueError), (0.0, ValueError),
                                         ("64", TypeError), (True, TypeError)])
def test_bad_keep(models, keep, error):
    with pytest.raises(error, match="keep"):
        TrimLlava15ChatHandler(clip_model_path=models["1.5"], keep=keep, verbose=False)
    handler = TrimLlava15ChatHandler(clip_model_path=models["1.5"], verbose=False)
    with pytest.raises(error, match="keep"):
        handler.keep = keep
    assert handler.keep == 64


def test_cdpruner_is_refused_on_a_gpu_backend(models, monkeypatch):
    import trimcpp.handlers.mechanism as mechanism

    monkeypatch.setattr(mechanism, "check_backend", lambda owner, backend: None)  # as if a GPU were here
    with pytest.raises(ValueError, match="TrimLlava15ChatHandler: method 'cdpruner' runs on the CPU backend only"):
        TrimLlava15ChatHandler(clip_model_path=models["1.5"], method="cdpruner", backend="cuda", verbose=False)
    handler = TrimLlava15ChatHandler(clip_model_path=models["1.5"], method="cdpruner", backend="cpu", verbose=False)
    assert handler.method == "cdpruner"


def test_bad_method_and_backend(models):
    with pytest.raises(ValueError, match="unknown method"):
        TrimLlava15ChatHandler(clip_model_path=models["1.5"], method="best", verbose=False)
    with pytest.raises(ValueError, match="stage1_ratio"):
        TrimLlava15ChatHandler(clip_model_path=models["1.5"], stage1_ratio=0, verbose=False)
    with pytest.raises(RuntimeError, match="not available"):
        TrimLlava15ChatHandler(clip_model_path=models["1.5"], backend="metal", verbose=False)
