"""The trimcpp command (bench, chat, show) on the tiny random-weight models (36 rows per image).

Subcommands run in-process through trimcpp.cli.main (one test runs the installed console script).
No timing assertions: only structure, counts, exit codes and pixels.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import shutil
import subprocess

import llama_cpp.mtmd_cpp as mtmd_cpp
import numpy as np
import pytest
from llama_cpp import Llama
from llama_cpp.llama_chat_format import Llava15ChatHandler
from PIL import Image

import trimcpp.handlers.mechanism
from trimcpp import TrimLlava15ChatHandler, TrimLlava16ChatHandler
from trimcpp.bench import ttft
from trimcpp.cli import main
from trimcpp.images import image_messages
from trimcpp.testing import SHAPES, write_mmproj

from helpers import ROWS, png

COLUMNS = ["image rows", "encode s", "select ms", "prefill s", "first token s", "vs stock", "vs same encoder"]
STOCKS = ["stock-plain", "stock", "stock-encoder"]


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def files(models, version="1.5") -> list[str]:
    return ["--model", models["llm"], "--mmproj", models[version]]


# bench

def test_bench_default_models_go_to_the_user_cache(capsys, tmp_path, monkeypatch):
    cache, work = tmp_path / "cache", tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("TRIMCPP_CACHE", str(cache))
    monkeypatch.chdir(work)
    code, out, _ = cli(capsys, "bench", "--shape", "tiny", "--repeat", "2", "--keep", "16,8", "--json")
    assert code == 0
    assert sorted(p.name for p in (cache / "models").iterdir()) == ["llm-tiny.gguf", "mmproj-tiny-llava1.5.gguf"]
    assert list(work.iterdir()) == []
    result = json.loads(out)
    assert result["shape"] == "tiny" and result["repeat"] == 2 and result["chat_format"] == "llava-1-5"
    assert result["image"] == {"source": "synthetic", "width": 640, "height": 480}
    assert [(e["handler"], e["keep"], e["rows"], e["kept"]) for e in result["results"]] == [
        *((name, None, ROWS, ROWS) for name in STOCKS), ("trimmed", 16, ROWS, 16), ("trimmed", 8, ROWS, 8)]
    stock, same = result["results"][1]["ttft_s"], result["results"][2]["ttft_s"]
    for entry in result["results"]:
        assert len(entry["runs"]) == 2
        for key in ("encode_s", "prefill_s", "ttft_s"):
            assert entry[key] > 0
            assert entry[key] == pytest.approx(np.median([run[key] for run in entry["runs"]]))
        assert entry["ttft_s"] == pytest.approx(np.median([r["encode_s"] + r["select_ms"] / 1e3 + r["prefill_s"]
                                                           for r in entry["runs"]]))
        assert entry["speedup"] == pytest.approx(stock / entry["ttft_s"])
        assert entry["speedup_same_settings"] == pytest.approx(same / entry["ttft_s"])
    assert [e["select_ms"] == 0 for e in result["results"]] == [True] * 3 + [False] * 2
    assert result["plain_threads"] == max(os.cpu_count() // 2, 1) and result["threads"] == os.cpu_count()
    assert result["encoder"] == {"flash_attn": "auto", "threads": None, "image_min_tokens": None, "image_max_tokens": None}
    cold = result["cold"]
    assert cold["keep"] == 8 and cold["stock_warm_s"] == stock and cold["trimmed_warm_s"] == result["results"][-1]["ttft_s"]
    assert cold["stock_s"] > 0 and cold["trimmed_s"] > 0
    assert result["machine"]["cores"] >= 1


def test_bench_table_on_the_users_files(capsys, models, tmp_path):
    image = png(tmp_path)
    code, out, _ = cli(capsys, "bench", *files(models), "--image", image, "--prompt", "What color is the square?",
                       "--repeat", "1", "--keep", "20")
    assert code == 0
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if "vs stock" in line)
    assert [c for c in COLUMNS if c in lines[header]] == COLUMNS
    plain, stock, same, trimmed = (line.split() for line in lines[header + 1: header + 5])
    assert plain[:3] == ["stock,", "plain", "Llama()"] and plain[3:6] == ["36", "of", "36"]
    assert stock[:4] == ["stock", "36", "of", "36"] and stock[-2] == "1.00x"
    assert same[:3] == ["stock,", "our", "encoder"] and same[-1] == "1.00x"
    assert trimmed[:4] == ["trimmed", "20", "of", "36"] and trimmed[-1].endswith("x") and len(trimmed) == 10
    assert "first request of a fresh handler (cold)" in out
    assert "168x84" in out and "What color is the square?" in out


def test_bench_llava16(capsys, models, tmp_path):
    code, out, _ = cli(capsys, "bench", *files(models, "1.6"), "--image", png(tmp_path), "--repeat", "1",
                       "--keep", "30", "--json")
    assert code == 0
    result = json.loads(out)
    assert result["chat_format"] == "llava-1-6"
    *stocks, trimmed = result["results"]
    assert [s["rows"] for s in stocks] == [3 * ROWS] * 3 and (trimmed["rows"], trimmed["kept"]) == (3 * ROWS, 30)


@pytest.mark.parametrize("args", [
    ["--keep", "0"], ["--keep", "12,x"], ["--repeat", "0"], ["--shape", "13b"], ["--method", "best"],
])
def test_bench_bad_arguments_exit_2(capsys, args):
    with pytest.raises(SystemExit) as stop:
        main(["bench", *args])
    assert stop.value.code == 2
    assert "error" in capsys.readouterr().err


def test_bench_model_needs_mmproj_and_files_must_exist(capsys, models, tmp_path):
    code, _, err = cli(capsys, "bench", "--model", models["llm"])
    assert code == 2 and "--model and --mmproj go together" in err
    code, _, err = cli(capsys, "bench", "--model", tmp_path / "none.gguf", "--mmproj", models["1.5"])
    assert code == 2 and "does not exist" in err


def test_timed_stock_handler_gives_the_stock_logits(models, tmp_path):
    """bench times the stock handler's encode by calling libmtmd's two halves of its image step."""
    llama = Llama(model_path=models["llm"], n_ctx=1024, logits_all=True, verbose=False, seed=1,
                  chat_handler=Llava15ChatHandler(clip_model_path=models["1.5"], verbose=False))
    messages = image_messages(open(png(tmp_path), "rb").read(), "What is in the image?")

    def answer():
        response = llama.create_chat_completion(messages=messages, max_tokens=4, temperature=0.0)
        n, generated = response["usage"]["prompt_tokens"], response["usage"]["completion_tokens"]
        return response["choices"][0]["message"]["content"], np.array(llama.scores[n - 1: n - 1 + generated])

    expected, expected_logits = answer()
    timed = ttft.timed_stock("llava-1-5", models["1.5"], verbose=False)
    sample = ttft.request(llama, timed, messages)  # also makes `timed` the Llama's handler
    assert (sample.rows, sample.kept, sample.select_s) == (ROWS, ROWS, 0.0) and sample.encode_s > 0
    got, logits = answer()
    assert got == expected and logits.shape == (4, llama.n_vocab())
    assert np.array_equal(logits, expected_logits)


# chat

def chat_line(out: str) -> str:
    return next(line for line in out.splitlines() if line.startswith("[trimcpp]"))


@pytest.mark.parametrize(("keep", "value", "kept"), [("8", 8, 8), ("0.25", 0.25, 9), ("all", None, ROWS)])
def test_chat_streams_the_answer_and_counts(capsys, models, tmp_path, keep, value, kept):
    image = png(tmp_path)
    code, out, _ = cli(capsys, "chat", *files(models), "--image", image, "--keep", keep, "--max-tokens", "6",
                       "What is in the image?")
    assert code == 0
    line = chat_line(out)
    assert f"image rows kept {kept} / {ROWS} (trimtokenator)" in line and "time to first token" in line
    # The streamed text is what the same handler answers without streaming.
    handler = TrimLlava15ChatHandler(clip_model_path=models["1.5"], keep=value, verbose=False)
    threads = os.cpu_count()  # as the command
    llama = Llama(model_path=models["llm"], chat_handler=handler, n_ctx=4096, n_threads=threads,
                  n_threads_batch=threads, verbose=False)
    answer = llama.create_chat_completion(messages=image_messages(open(image, "rb").read(), "What is in the image?"),
                                          max_tokens=6, temperature=0.0, seed=0)
    assert out[: out.index("\n[trimcpp]")] == answer["choices"][0]["message"]["content"]


def test_chat_reads_data_uris_and_detects_llava16(capsys, models, tmp_path):
    data = "data:image/png;base64," + base64.b64encode(open(png(tmp_path), "rb").read()).decode()
    code, out, _ = cli(capsys, "chat", *files(models, "1.6"), "--image", data, "--keep", "30", "--max-tokens", "2",
                       "What is in the image?")
    assert code == 0
    assert f"image rows kept 30 / {3 * ROWS}" in chat_line(out)


@pytest.mark.parametrize(("image", "message"), [
    ("missing.png", "cannot read image"),
    ("not-an-image.png", "not an image pillow can decode"),
    ("https://example.com/a.png", "images are not downloaded"),
    ("data:image/png;base64,@@@", "not base64"),
])
def test_chat_image_errors(capsys, models, tmp_path, image, message):
    (tmp_path / "not-an-image.png").write_text("hello")
    source = image if "://" in image or image.startswith("data:") else str(tmp_path / image)
    code, _, err = cli(capsys, "chat", *files(models), "--image", source, "hi")
    assert code == 2 and message in err and err.startswith("trimcpp chat: error:")


def test_chat_argument_errors(capsys, models, tmp_path):
    image = png(tmp_path)
    code, _, err = cli(capsys, "chat", *files(models), "--image", image, "--keep", "1.5", "hi")
    assert code == 2 and "keep" in err
    code, _, err = cli(capsys, "chat", "--model", tmp_path / "no.gguf", "--mmproj", models["1.5"], "--image", image, "hi")
    assert code == 2 and "model" in err and "does not exist" in err
    code, _, err = cli(capsys, "chat", "--model", models["llm"], "--mmproj", models["llm"], "--image", image, "hi")
    assert code == 2 and "is not an mmproj" in err
    for args in (["--keep", "many"], ["--method", "best"]):
        with pytest.raises(SystemExit) as stop:
            main(["chat", *files(models), "--image", image, *args, "hi"])
        assert stop.value.code == 2
    capsys.readouterr()


def test_chat_without_a_question_encodes_while_it_is_read(capsys, models, tmp_path, monkeypatch):
    image = png(tmp_path)
    code, expected, _ = cli(capsys, "chat", *files(models), "--image", image, "--max-tokens", "4", "What is in the image?")
    assert code == 0
    encodes = []
    encode = mtmd_cpp.mtmd_encode_chunk
    monkeypatch.setattr(mtmd_cpp, "mtmd_encode_chunk", lambda *args: encodes.append(1) or encode(*args))
    monkeypatch.setattr("sys.stdin", io.StringIO("What is in the image?\n"))
    code, out, _ = cli(capsys, "chat", *files(models), "--image", image, "--max-tokens", "4")
    assert code == 0 and len(encodes) == 1
    # 64 kept of 36 rows: every row either way, so the background prefill is finished (attach_policy auto)
    assert "image rows kept 36 / 36 (every row, prefilled while you typed:" in chat_line(out)
    assert out[: out.index("\n[trimcpp]")] == expected[: expected.index("\n[trimcpp]")]
    monkeypatch.setattr("sys.stdin", io.StringIO("What is in the image?\n"))
    code, out, _ = cli(capsys, "chat", *files(models), "--image", image, "--max-tokens", "4", "--keep", "8",
                       "--attach-policy", "pruned")
    assert code == 0 and len(encodes) == 2
    assert "image rows kept 8 / 36 (trimtokenator, the picture was encoded before the question)" in chat_line(out)
    monkeypatch.setattr("sys.stdin", io.StringIO("  \n"))
    code, _, err = cli(capsys, "chat", *files(models), "--image", image)
    assert code == 2 and "no question" in err
    code, _, err = cli(capsys, "chat", *files(models), "--image", "-")
    assert code == 2 and "give the question as an argument" in err


def test_encoder_options_errors(capsys, models, tmp_path):
    image = png(tmp_path)
    code, _, err = cli(capsys, "chat", *files(models), "--image", image, "--image-max-tokens", "64", "hi")
    assert code == 2 and "makes a fixed number of rows per image" in err
    code, _, err = cli(capsys, "bench", *files(models), "--image", image, "--image-max-tokens", "64")
    assert code == 2 and "makes a fixed number of rows per image" in err
    for args in (["--encoder-flash-attn", "maybe"], ["--encoder-threads", "0"], ["--image-max-tokens", "x"],
                 ["--attach-lead", "-1"]):
        with pytest.raises(SystemExit) as stop:
            main(["bench", *files(models), *args])
        assert stop.value.code == 2
    capsys.readouterr()


def test_bench_attach_lead_times_each_policy_per_lead(capsys, models, tmp_path):
    plot = tmp_path / "lead.png"
    code, out, _ = cli(capsys, "bench", *files(models), "--image", png(tmp_path, 336, 336), "--repeat", "1", "--keep",
                       "8", "--attach-lead", "0,0.3", "--encoder-flash-attn", "off", "--plot", str(plot), "--json")
    assert code == 0
    result = json.loads(out)
    assert [e["lead_s"] for e in result["leads"]] == [0, 0.3] and result["keep"] == 8
    costs = result["batch_costs_s_per_row"]
    assert set(costs) == {"8", "16", "32", "64", "128", "512"} and all(cost > 0 for cost in costs.values())
    for entry in result["leads"]:
        assert entry["stock_s"] > 0 and entry["stock-plain_s"] > 0 and entry["stock-encoder_s"] > 0
        assert entry["pruned"]["paths"] == ["pruned"] and entry["pruned"]["kept"] == [8]
        assert entry["full"]["paths"] == ["full"] and entry["full"]["kept"] == [ROWS]
        assert entry["full"]["first_token_as_stock"] == [True]  # every row: stock's answer (same encoder settings)
        assert entry["auto"]["paths"][0] in ("full", "pruned")
        best = min(entry["pruned"]["ttft_s"], entry["full"]["ttft_s"])
        assert entry["auto_over_best"] == pytest.approx(entry["auto"]["ttft_s"] / best)
    image = Image.open(plot)
    assert image.size == (720, 440) and len(image.convert("RGB").getcolors(1 << 16)) > 4  # the axes, the lines and their dots
    for args in (["--plot", str(plot)], ["--attach-lead", "5,-1"], ["--attach-lead", "soon"]):
        with pytest.raises(SystemExit) as stop:
            main(["bench", *files(models), *args])
        assert stop.value.code == 2
    capsys.readouterr()
# show

def kept_by_handler(models, version, image_path, question, keep):
    """The rows the trimmed handler keeps for this request, per chunk (selection is deterministic)."""
    kind = TrimLlava16ChatHandler if version == "1.6" else TrimLlava15ChatHandler
    handler = kind(clip_model_path=models[version], keep=keep, verbose=False)
    llama = Llama(model_path=models["llm"], chat_handler=handler, n_ctx=4096, verbose=False)
    llama.create_chat_completion(messages=image_messages(open(image_path, "rb").read(), question), max_tokens=1)
    [selection] = handler.last_selection
    return selection.indices


def test_show_brightens_exactly_the_kept_patches(capsys, models, tmp_path):
    # 168 x 168 fills the 84-pixel square at scale 1/2: patch p is the 28 x 28 block (p // 6, p % 6).
    # The tiny mmproj has a class token, so libmtmd's row r is patch r + 1 and row 35 is the class
    # token (llama.cpp issue #25814; test_rows_carry_the_patches_layout_says checks this).
    image = png(tmp_path, 168, 168)
    out_path = tmp_path / "kept.png"
    code, out, _ = cli(capsys, "show", *files(models), "--image", image, "--keep", "10", "--out", out_path,
                       "--no-caption", "What is in the image?")
    assert code == 0 and "kept 10 of 36" in out
    [kept] = kept_by_handler(models, "1.5", image, "What is in the image?", 10)
    expected = np.zeros((168, 168), bool)
    for p in kept[kept < 35] + 1:
        expected[28 * (p // 6): 28 * (p // 6 + 1), 28 * (p % 6): 28 * (p % 6 + 1)] = True
    written, original = Image.open(out_path), np.asarray(Image.open(image)).astype(int)
    assert written.size == (168, 168)
    got = np.asarray(written.convert("RGB")).astype(int)
    same = (got == original).all(axis=2)
    assert np.array_equal(same, expected)
    assert (got[~same] < original[~same]).all()


def test_show_caption_and_llava16_panels(capsys, models, tmp_path):
    image = png(tmp_path, 336, 168)  # libmtmd: the (168, 84) pinpoint, two slices, then the overview
    out_path = tmp_path / "kept16.png"
    code, _, _ = cli(capsys, "show", *files(models, "1.6"), "--image", image, "--keep", "20", "--out", out_path,
                     "What is in the image?")
    assert code == 0
    written = Image.open(out_path)
    assert written.size[0] == 2 * 336 + 8 and written.size[1] > 168  # slices | overview, then the caption
    assert len(kept_by_handler(models, "1.6", image, "What is in the image?", 20)) == 3


def test_show_needs_model_and_mmproj(capsys, tmp_path):
    with pytest.raises(SystemExit) as stop:
        main(["show", "--image", png(tmp_path), "hi"])
    assert stop.value.code == 2
    capsys.readouterr()


@pytest.fixture
def encoded_rows(monkeypatch):
    """encoded_rows(llama, pixels): the image rows, per chunk, that a trimmed handler hands to
    trimcpp.prune for one request with that picture (prune runs as usual)."""
    seen = []
    real = trimcpp.handlers.mechanism.prune
    monkeypatch.setattr(trimcpp.handlers.mechanism, "prune",
                        lambda rows, *a, **k: seen.append(np.array(rows)) or real(rows, *a, **k))

    def encode(llama: Llama, pixels: np.ndarray) -> list[np.ndarray]:
        seen.clear()
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "PNG")
        llama.create_chat_completion(messages=image_messages(buffer.getvalue(), "hi"), max_tokens=1)
        return list(seen)

    return encode


def test_layout_matches_libmtmd_chunks(models, encoded_rows):
    """The chunks libmtmd makes for LLaVA-1.6: the count per image size, and the order (slices left to
    right, then the overview): slice 1's rows equal the rows of its own 84 x 84 picture."""
    from trimcpp.layout import chunks, read_vision

    vision = read_vision(models["1.6"])
    handler = TrimLlava16ChatHandler(clip_model_path=models["1.6"], keep=3, verbose=False)
    llama = Llama(model_path=models["llm"], chat_handler=handler, n_ctx=4096, verbose=False)
    rng = np.random.default_rng(5)
    left, right = (rng.integers(0, 256, (84, 84, 3), dtype=np.uint8) for _ in range(2))

    def encode(pixels: np.ndarray) -> list[np.ndarray]:
        rows = encoded_rows(llama, pixels)
        [selection] = handler.last_selection
        parts = chunks(vision, pixels.shape[1], pixels.shape[0])
        assert selection.chunk_rows == [ROWS] * len(parts)
        return rows

    for width, height in ((80, 60), (100, 200), (300, 300), (500, 100)):
        encode(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    both = encode(np.concatenate([left, right], axis=1))
    assert len(both) == 3
    assert np.array_equal(both[0], encode(left)[0]) and np.array_equal(both[1], encode(right)[0])


@pytest.mark.parametrize("class_token", [True, False])
def test_rows_carry_the_patches_layout_says(models, tmp_path, encoded_rows, class_token):
    """With a one-layer mmproj (libmtmd runs all layers but the last: none) each row depends on one
    patch only: brightening one patch of a grey picture must change exactly the row that
    trimcpp.layout assigns to that patch's pixels."""
    from trimcpp.layout import chunks, pixel_rows, read_vision

    shape = dataclasses.replace(SHAPES["tiny"], v_layer=1)
    mmproj = str(write_mmproj(tmp_path / "mm.gguf", shape, class_token=class_token))
    handler = TrimLlava15ChatHandler(clip_model_path=mmproj, keep=3, verbose=False)
    llama = Llama(model_path=models["llm"], chat_handler=handler, n_ctx=1024, verbose=False)

    def rows(pixels: np.ndarray) -> np.ndarray:
        return encoded_rows(llama, pixels)[0]

    vision = read_vision(mmproj)
    grey = np.full((84, 84, 3), 128, np.uint8)
    layout = pixel_rows(vision, chunks(vision, 84, 84)[0], 84, 84)
    base = rows(grey)
    for py, px in ((0, 0), (0, 1), (2, 3), (5, 5)):
        pixels = grey.copy()
        pixels[14 * py: 14 * py + 14, 14 * px: 14 * px + 14] = 250
        changed = np.flatnonzero(np.abs(rows(pixels) - base).max(axis=1) > 1e-4)
        expected = np.unique(layout[14 * py: 14 * py + 14, 14 * px: 14 * px + 14])
        assert list(changed) == [r for r in expected if r >= 0]
    if class_token:
        assert layout[0, 0] == -1 and layout[0, 14] == 0  # patch 0 is in no row


def test_class_token_last_says_what_this_libmtmd_does():
    """llama-cpp-python's own libmtmd (no class-token fix): the row of patch p is p - 1, as the test above
    finds; tests/test_llama_cpp_patches.py checks the answer for a libmtmd with the fix."""
    from trimcpp.layout import class_token_last

    assert class_token_last() is True


def test_console_script_is_installed():
    script = shutil.which("trimcpp")
    assert script is not None
    done = subprocess.run([script, "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and all(c in done.stdout for c in ("bench", "chat", "show"))


def test_eval_has_one_option_per_meaning(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["eval", "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert "--methods" in out and "--method " not in out
