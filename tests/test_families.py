"""The trimmed handlers on the other families libmtmd runs: Qwen2.5-VL (M-RoPE) and Gemma 3
(non-causal image rows), with the tiny random pairs of trimcpp.testing.

Tiny Qwen2.5-VL: one row per 28 x 28 pixels, so a 224 x 168 picture gives 8 x 6 = 48 rows that
span max(8, 6) = 8 positions. Tiny Gemma 3: 224 px, patch 14, pooled 2 x 2: 64 rows per picture.
The reference for every count is the stock handler on the same Llama object.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes

import llama_cpp
import llama_cpp.mtmd_cpp as mtmd_cpp
import numpy as np
import pytest
from llama_cpp import Llama
from llama_cpp.llama_chat_format import MTMDChatHandler, Qwen25VLChatHandler

from trimcpp import TrimMTMDChatHandler, TrimQwen25VLChatHandler
from trimcpp.handlers import mechanism
from trimcpp.testing import write_pair

from helpers import STOCK_ENCODER, image_url

QWEN_ROWS, QWEN_NX, QWEN_NY = 48, 8, 6
GEMMA_ROWS = 64
SIZE = (224, 168)

# family -> (stock handler, trimmed handler, rows per picture)
CASES = {
    "qwen": (Qwen25VLChatHandler, TrimQwen25VLChatHandler, QWEN_ROWS),
    "qwen-mtmd": (MTMDChatHandler, TrimMTMDChatHandler, QWEN_ROWS),  # the GGUF's ChatML template
    "gemma": (MTMDChatHandler, TrimMTMDChatHandler, GEMMA_ROWS),
}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    qwen = write_pair(root, "tiny", family="qwen2.5-vl")
    gemma = write_pair(root, "tiny", family="gemma3")
    return {"qwen": qwen, "qwen-mtmd": qwen, "gemma": gemma}


def ask(question: str = "What is in the image?", images: int = 1, seed: int = 0) -> list[dict]:
    content = [{"type": "image_url", "image_url": {"url": image_url(seed + i, SIZE)}} for i in range(images)]
    return [{"role": "user", "content": content + [{"type": "text", "text": question}]}]


def make(pairs, case, handler, **kwargs) -> Llama:
    options = dict(n_ctx=1024, logits_all=True, verbose=False, seed=1)
    options.update(kwargs)
    return Llama(model_path=str(pairs[case][0]), chat_handler=handler, **options)


def handlers(pairs, case, **trim):
    stock, trimmed, _ = CASES[case]
    mmproj = str(pairs[case][1])
    trim = {**STOCK_ENCODER, **trim}  # the stock handler's encoder settings unless a test says otherwise
    return stock(clip_model_path=mmproj, verbose=False), trimmed(clip_model_path=mmproj, verbose=False, **trim)


def run(llm: Llama, messages, max_tokens: int = 4):
    """Greedy completion; returns (response, logits after the prompt and after each new token)."""
    response = llm.create_chat_completion(messages=messages, max_tokens=max_tokens, temperature=0.0)
    n = response["usage"]["prompt_tokens"]
    return response, np.array(llm.scores[n - 1 : n - 1 + response["usage"]["completion_tokens"]])


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("images", [1, 2])
def test_keep_all_is_bit_identical_to_stock(pairs, case, images):
    stock, trimmed = handlers(pairs, case, keep=None)
    llm = make(pairs, case, stock)
    expected, expected_logits = run(llm, ask(images=images), max_tokens=5)
    llm.chat_handler = trimmed
    got, logits = run(llm, ask(images=images), max_tokens=5)
    assert got["usage"] == expected["usage"]
    assert logits.shape == expected_logits.shape == (5, llm.n_vocab())
    assert np.array_equal(logits, expected_logits)
    assert [(s.rows, s.kept) for s in trimmed.last_selection] == [(CASES[case][2],) * 2] * images


@pytest.mark.parametrize("case", list(CASES))
def test_kept_rows_change_the_logits(pairs, case):
    """The control for the test above: fewer rows must change what the LLM computes."""
    _, full = handlers(pairs, case, keep=None)
    _, pruned = handlers(pairs, case, keep=8)
    llm = make(pairs, case, full)
    _, a = run(llm, ask())
    llm.chat_handler = pruned
    _, b = run(llm, ask())
    assert not np.array_equal(a[0], b[0])


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("images", [1, 2])
def test_prompt_tokens(pairs, case, images):
    """Plain positions: prompt_tokens counts the kept rows (stock minus the dropped ones). M-RoPE:
    llama-cpp-python counts positions (the image spans n_pos = max(nx, ny) of them, kept rows keep
    theirs), so prompt_tokens equals the stock count and the saving shows in last_selection."""
    stock, trimmed = handlers(pairs, case, keep=10)
    llm = make(pairs, case, stock)
    expected, _ = run(llm, ask(images=images))
    llm.chat_handler = trimmed
    got, _ = run(llm, ask(images=images))
    rows = CASES[case][2]
    assert [(s.rows, s.kept) for s in trimmed.last_selection] == [(rows, 10)] * images
    dropped = 0 if case.startswith("qwen") else (rows - 10) * images
    assert got["usage"]["prompt_tokens"] == expected["usage"]["prompt_tokens"] - dropped
    assert got["choices"][0]["message"]["content"]  # it generated


def test_default_keep_is_a_ninth_of_the_rows(pairs):
    _, trimmed = handlers(pairs, "gemma")
    llm = make(pairs, "gemma", trimmed)
    run(llm, ask())
    assert trimmed.keep == pytest.approx(1 / 9)
    assert trimmed.last_selection[0].kept == round(GEMMA_ROWS / 9)


def _spy_positions(monkeypatch) -> list[tuple[int, ...]]:
    """Records the four position slots of every embedding row trimcpp hands to llama.cpp."""
    seen: list[tuple[int, ...]] = []
    original = llama_cpp.llama_batch_ext_set_pos

    def spy(batch, index, pointer):
        seen.append(tuple(pointer[k] for k in range(4)))
        return original(batch, index, pointer)

    monkeypatch.setattr(llama_cpp, "llama_batch_ext_set_pos", spy)
    return seen


@contextlib.contextmanager
def _image_tokens(llm: Llama, mmproj: str, url: str):
    """libmtmd's image tokens of one picture: own context, own tokenisation, nothing encoded."""
    params = mtmd_cpp.mtmd_context_params_default()
    params.use_gpu, params.warmup = False, False
    ctx = mtmd_cpp.mtmd_init_from_file(mmproj.encode(), llm.model, params)
    data = base64.b64decode(url.split(",", 1)[1])
    bitmap = mtmd_cpp.mtmd_helper_bitmap_init_from_buf(ctx, (ctypes.c_uint8 * len(data)).from_buffer_copy(data),
                                                       len(data), False)
    chunks = mtmd_cpp.mtmd_input_chunks_init()
    try:
        marker = mtmd_cpp.mtmd_default_marker()
        text = mtmd_cpp.mtmd_input_text(marker, len(marker), False, True)
        assert mtmd_cpp.mtmd_tokenize(ctx, chunks, ctypes.byref(text), (ctypes.c_void_p * 1)(bitmap), 1) == 0
        image = next(mtmd_cpp.mtmd_input_chunks_get(chunks, i) for i in range(mtmd_cpp.mtmd_input_chunks_size(chunks))
                     if mtmd_cpp.mtmd_input_chunk_get_type(mtmd_cpp.mtmd_input_chunks_get(chunks, i)) == 1)
        yield mtmd_cpp.mtmd_input_chunk_get_tokens_image(image)
    finally:
        mtmd_cpp.mtmd_input_chunks_free(chunks)
        mtmd_cpp.mtmd_bitmap_free(bitmap)
        mtmd_cpp.mtmd_free(ctx)


def _decoder_positions(llm: Llama, mmproj: str, pos0: int) -> list[tuple[int, int, int]]:
    """(t, x, y) of every row of the test picture, from libmtmd's mtmd_image_tokens_get_decoder_pos."""
    with _image_tokens(llm, mmproj, image_url(0, SIZE)) as tokens:
        assert mtmd_cpp.mtmd_image_tokens_get_n_tokens(tokens) == QWEN_ROWS
        positions = [mtmd_cpp.mtmd_image_tokens_get_decoder_pos(tokens, pos0, i) for i in range(QWEN_ROWS)]
        return [(p.t, p.x, p.y) for p in positions]


@pytest.mark.parametrize("n_batch", [512, 5])
def test_mrope_rows_keep_their_original_positions(pairs, monkeypatch, n_batch):
    _, trimmed = handlers(pairs, "qwen", keep=12)
    llm = make(pairs, "qwen", trimmed, n_batch=n_batch)
    seen = _spy_positions(monkeypatch)
    run(llm, ask())
    # The image starts after the system turn, "<|im_start|>user\n" and <|vision_start|>.
    before = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
              "<|vision_start|>")
    pos0 = len(llm.tokenize(before.encode(), add_bos=False, special=True))
    [selection] = trimmed.last_selection
    kept = selection.indices[0]
    assert len(kept) == 12 and len(seen) == 12
    # Section order as llama.cpp takes it: t, y, x, z; row i of an nx-wide grid sits at (i % nx, i // nx).
    assert seen == [(pos0, pos0 + int(i) // QWEN_NX, pos0 + int(i) % QWEN_NX, 0) for i in kept]
    libmtmd = _decoder_positions(llm, str(pairs["qwen"][1]), pos0)
    assert [(t, x, y) for t, y, x, _ in seen] == [libmtmd[int(i)] for i in kept]
    # The prompt goes on max(nx, ny) positions after the image's first one, as in the stock handler.
    [start, end] = llm.tokenize(b"<|vision_start|><|vision_end|>", add_bos=False, special=True)
    assert llm.input_ids[pos0 - 1] == start and llm.input_ids[pos0 + max(QWEN_NX, QWEN_NY)] == end
    assert end not in llm.input_ids[pos0 : pos0 + max(QWEN_NX, QWEN_NY)]


def test_plain_positions_are_consecutive(pairs, monkeypatch):
    _, trimmed = handlers(pairs, "gemma", keep=12)
    llm = make(pairs, "gemma", trimmed)
    seen = _spy_positions(monkeypatch)
    run(llm, ask())
    start = seen[0][0]
    assert [s[0] for s in seen] == list(range(start, start + 12))


def test_gemma_decodes_image_rows_non_causally(pairs, monkeypatch):
    """Control: the same rows decoded causally give other logits; and attention is causal again
    after the image, also when decoding fails."""
    stock, trimmed = handlers(pairs, "gemma", keep=None, reuse_kv=False)  # every call decodes the picture
    llm = make(pairs, "gemma", stock)
    _, expected = run(llm, ask())
    llm.chat_handler = trimmed
    _, same = run(llm, ask())
    assert np.array_equal(same, expected)
    assert llama_cpp.llama_get_causal_attn(llm.ctx)

    with monkeypatch.context() as patch:
        original = mechanism.attention
        patch.setattr(mechanism, "attention", lambda lctx, causal: original(lctx, True))
        _, causal = run(llm, ask())
    assert not np.allclose(causal[0], expected[0], atol=1e-3)

    def broken(*args, **kwargs):
        assert not llama_cpp.llama_get_causal_attn(llm.ctx)  # the toggle is on while rows go in
        raise RuntimeError("decode failed")

    with monkeypatch.context() as patch:
        patch.setattr(mechanism, "decode_rows", broken)
        with pytest.raises(RuntimeError, match="decode failed"):
            run(llm, ask())
    assert llama_cpp.llama_get_causal_attn(llm.ctx)
    _, again = run(llm, ask())
    assert np.array_equal(again, expected)


def test_gemma_image_must_fit_one_ubatch(pairs):
    """llama.cpp aborts on a non-causal batch larger than n_ubatch: a clear error instead, before
    anything is encoded, and pruning to what fits works."""
    _, trimmed = handlers(pairs, "gemma", keep=None)
    llm = make(pairs, "gemma", trimmed, n_batch=32, n_ubatch=32)
    with pytest.raises(ValueError, match=r"64 rows > n_ubatch 32"):
        run(llm, ask())
    assert trimmed.last_selection == []
    trimmed.keep = 32
    response, _ = run(llm, ask())
    assert trimmed.last_selection[0].kept == 32 and response["choices"][0]["message"]["content"]


@pytest.mark.parametrize("case", ["qwen", "gemma"])
def test_small_batches(pairs, case):
    """n_batch smaller than an image: keep-all equals stock with the same batches (Qwen), pruned rows
    fit (both)."""
    stock, trimmed = handlers(pairs, case, keep=None if case == "qwen" else 16, reuse_kv=False)
    options = dict(n_batch=16, n_ubatch=16)
    llm = make(pairs, case, stock if case == "qwen" else trimmed, **options)
    expected, expected_logits = run(llm, ask())
    llm.chat_handler = trimmed
    got, logits = run(llm, ask())
    assert np.array_equal(logits, expected_logits) and got["usage"] == expected["usage"]


@pytest.mark.parametrize("case", ["qwen", "gemma"])
def test_bad_input_then_a_correct_answer(pairs, case):
    _, trimmed = handlers(pairs, case, keep=8)
    llm = make(pairs, case, trimmed)
    expected, expected_logits = run(llm, ask())
    corrupt = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"not a png").decode()}},
        {"type": "text", "text": "What is in the image?"}]}]
    with pytest.raises(ValueError, match="could not decode an image"):
        run(llm, corrupt)
    got, logits = run(llm, ask())
    assert np.array_equal(logits, expected_logits) and got["usage"] == expected["usage"]


def test_mrope_prompt_over_n_ctx_counts_cells_and_positions(pairs):
    """Qwen keep-all: 48 rows need 48 KV cells though the image spans 8 positions; the check
    counts both and says so."""
    _, trimmed = handlers(pairs, "qwen", keep=None)
    llm = make(pairs, "qwen", trimmed, n_ctx=64)
    with pytest.raises(ValueError, match=r"Prompt exceeds n_ctx: \d+ tokens .*positions \(M-RoPE\) > 64"):
        run(llm, ask())
    trimmed.keep = 8  # now the rows fit
    response, _ = run(llm, ask())
    assert trimmed.last_selection[0].kept == 8 and response["usage"]["completion_tokens"] > 0


# Where rows come from (trimcpp.layout) and the trimcpp command on these families

def _kept_picture(pairs, case, capsys, tmp_path, width, height, keep):
    """Runs `trimcpp show` on a random picture; returns (its kept indices, mask of unchanged pixels)."""
    from PIL import Image

    from trimcpp.cli import main

    from helpers import png

    image = png(tmp_path, width, height)
    out = tmp_path / "kept.png"
    llm, mmproj = (str(p) for p in pairs[case])
    code = main(["show", "--model", llm, "--mmproj", mmproj, "--image", image, "--keep", str(keep), "--out", str(out),
                 "--no-caption", "What is in the image?"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    _, trimmed = handlers(pairs, case, keep=keep)
    llama = make(pairs, case, trimmed)
    with open(image, "rb") as f:
        url = "data:image/png;base64," + base64.b64encode(f.read()).decode()
    llama.create_chat_completion(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is in the image?"}]}],
        max_tokens=1)
    [kept] = trimmed.last_selection[0].indices
    got = np.asarray(Image.open(out).convert("RGB")).astype(int)
    original = np.asarray(Image.open(image)).astype(int)
    same = (got == original).all(axis=2)
    assert (got[~same] < original[~same]).all()
    return kept, same


def test_show_qwen_rows_are_28_pixel_cells(pairs, capsys, tmp_path):
    # 224 x 168 is already a multiple of 28 on both sides: no scaling, no padding, an 8 x 6 grid of
    # 28-pixel cells (2 x 2 patches of 14), row i at column i % 8, line i // 8.
    kept, same = _kept_picture(pairs, "qwen", capsys, tmp_path, 224, 168, 10)
    expected = np.zeros((168, 224), bool)
    for i in kept:
        expected[28 * (i // 8): 28 * (i // 8 + 1), 28 * (i % 8): 28 * (i % 8 + 1)] = True
    assert len(kept) == 10 and np.array_equal(same, expected)


def test_show_gemma_rows_are_pooled_cells_of_the_padded_square(pairs, capsys, tmp_path):
    # 224 x 168 on the 224-pixel square at scale 1, centred: 28 pixels of padding above. Pooling
    # 2 x 2 patches of 14 gives an 8 x 8 grid of 28-pixel cells; line 0 is all padding.
    kept, same = _kept_picture(pairs, "gemma", capsys, tmp_path, 224, 168, 12)
    expected = np.zeros((168, 224), bool)
    for i in kept:
        line, column = i // 8, i % 8
        if line > 0:
            expected[28 * (line - 1): 28 * line, 28 * column: 28 * (column + 1)] = True
    assert np.array_equal(same, expected)


@pytest.mark.parametrize("size", [(150, 100), (97, 203), (30, 500), (224, 168), (20, 20), (2000, 2000),
                                  (3001, 997)])
def test_qwen_canvas_gives_libmtmds_grid(pairs, size):
    """The canvas trimcpp.layout works out (each side a multiple of 28, 8 to 4096 rows) against the
    grid libmtmd makes of the picture (tokenised only: no encode)."""
    from trimcpp.layout import chunk_size, chunks, read_vision

    vision = read_vision(pairs["qwen"][1])
    [part] = chunks(vision, *size)
    llama = Llama(model_path=str(pairs["qwen"][0]), n_ctx=64, verbose=False)
    with _image_tokens(llama, str(pairs["qwen"][1]), image_url(0, size)) as tokens:
        first, last = (mtmd_cpp.mtmd_image_tokens_get_decoder_pos(tokens, 0, i)
                       for i in (0, mtmd_cpp.mtmd_image_tokens_get_n_tokens(tokens) - 1))
        grid = (last.x - first.x + 1, last.y - first.y + 1)
    assert chunk_size(vision, part) == grid


def test_qwen_canvas_by_hand():
    from trimcpp.layout import Vision

    qwen = Vision(560, 14, projector="qwen2.5vl_merger", merge=2)
    assert qwen.canvas(150, 100) == (140, 112)  # round(5.36) x round(3.57) cells of 28
    assert qwen.canvas(30, 500) == (28, 504)
    assert qwen.canvas(2000, 2000) == (1792, 1792)  # 71 x 71 > 4096 rows: scaled to 64 x 64 = 4096
    assert qwen.canvas(20, 20) == (84, 84)  # 1 row < 8: scaled up to ceil(28 * 2.83 / 28) = 3 cells a side


def test_chat_format_of_each_mmproj(pairs, tmp_path):
    from trimcpp.cli import CHAT_FORMATS
    from trimcpp.handlers import HANDLERS
    from trimcpp.layout import chat_format
    from trimcpp.testing import write_pair

    llava15 = write_pair(tmp_path, "tiny", version="1.5")[1]
    llava16 = write_pair(tmp_path, "tiny", version="1.6")[1]
    assert [chat_format(p) for p in (llava15, llava16, pairs["qwen"][1], pairs["gemma"][1])] == [
        "llava-1-5", "llava-1-6", "qwen2.5-vl", "mtmd"]
    assert tuple(HANDLERS) == CHAT_FORMATS


@pytest.mark.parametrize("case", ["qwen", "gemma"])
def test_bench_and_chat_commands(pairs, capsys, tmp_path, monkeypatch, case):
    import json

    from trimcpp.cli import main

    from helpers import png

    encodes = []
    encode = mtmd_cpp.mtmd_encode_chunk
    monkeypatch.setattr(mtmd_cpp, "mtmd_encode_chunk", lambda *args: encodes.append(1) or encode(*args))
    llm, mmproj = (str(p) for p in pairs[case])
    code = main(["bench", "--model", llm, "--mmproj", mmproj, "--keep", "16,8", "--repeat", "1", "--json",
                 "--image", png(tmp_path, 224, 168)])
    result = json.loads(capsys.readouterr().out)
    # Every request encodes the picture, a first question (the image cache is off in this benchmark):
    # the warm-up, the cold stock and trimmed requests, then the three stocks, 16 and 8.
    assert len(encodes) == 8
    monkeypatch.undo()
    assert code == 0 and result["chat_format"] == ("qwen2.5-vl" if case == "qwen" else "mtmd")
    rows = CASES[case][2]
    assert [(e["kept"], e["rows"]) for e in result["results"]] == [(rows, rows)] * 3 + [(16, rows), (8, rows)]
    code = main(["chat", "--model", llm, "--mmproj", mmproj, "--image", png(tmp_path, 224, 168), "--max-tokens", "3",
                 "What is in the image?"])
    out = capsys.readouterr().out
    assert code == 0 and f"image rows kept {round(rows / 9)} / {rows}" in out


def test_bench_synthetic_family_shapes(capsys, tmp_path, monkeypatch):
    from trimcpp.cli import main

    monkeypatch.setenv("TRIMCPP_CACHE", str(tmp_path))
    code = main(["bench", "--family", "gemma3", "--shape", "small"])
    assert code == 2 and "gemma3 shapes are tiny, 4b" in capsys.readouterr().err
    code = main(["bench", "--family", "qwen2.5-vl", "--llava", "1.6", "--shape", "tiny"])
    assert code == 2 and "--llava goes with --family llava" in capsys.readouterr().err


def test_eval_command(pairs, capsys, tmp_path):
    import json

    from trimcpp.cli import main
    from trimcpp.quality import scenes

    folder = scenes.write_split(tmp_path / "data", seed=4, images=2, size=224, per_image=2)
    llm, mmproj = (str(p) for p in pairs["gemma"])
    code = main(["eval", "--model", llm, "--mmproj", mmproj, "--data", str(folder), "--keep", "16,8",
                 "--methods", "none,trimtokenator", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["chat_format"] == "mtmd" and result["questions"] == 4
    assert [(r["method"], r["keep"], r["mean_kept"]) for r in result["results"]] == [
        ("none", None, GEMMA_ROWS), ("trimtokenator", 16, 16), ("trimtokenator", 8, 8)]
