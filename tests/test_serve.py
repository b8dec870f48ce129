"""trimcpp serve against a real server process on 127.0.0.1 (the tiny models): answers equal to the
Python handler's, streaming, the rows header and field, usage, HTTP 400 for every client mistake,
a stock model beside a trimmed one, and a reliability run (8 clients x 10 requests).

The reference answers come from the same settings loaded in this process by trimcpp.serve's own
proxy, with a handler that reuses nothing (a fresh prompt each call): the server reuses its KV cache
and image cache between requests and must still answer the same (greedy).
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import math
import os
import subprocess
import sys
import threading
import time

import numpy as np
import openai
import pytest
from PIL import Image

from trimcpp.serve import TrimLlamaProxy, TrimModelSettings
from trimcpp.serve.app import TrimChatCompletionRequest, completion_kwargs
from trimcpp.serve.process import launch

from helpers import ROWS, image_url

KEEP = 8
N_CTX = 1024
QUESTIONS = ["What is in the image?", "What colour is it?"]


def user(url: str, question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": question}]}]


def model_settings(models, **kwargs) -> dict:
    return {"model": models["llm"], "clip_model_path": models["1.5"], "n_ctx": N_CTX, "verbose": False, **kwargs}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The server's image_dir, with a picture in it, and a picture outside it."""
    root = tmp_path_factory.mktemp("serve")
    (root / "images").mkdir()
    for name, seed, where in (("a.png", 11, "images"), ("secret.png", 12, ".")):
        pixels = (np.random.default_rng(seed).random((100, 150, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / where / name)
    return root


@pytest.fixture(scope="module")
def server(models, folder):
    """trimcpp serve with a trimmed model (the default, "trim") and a stock one ("stock")."""
    config = {"models": [model_settings(models, model_alias="trim", chat_format="trim-llava-1-5", keep=KEEP),
                         model_settings(models, model_alias="stock", chat_format="llava-1-5")],
              "image_dir": str(folder / "images"), "max_image_bytes": 200_000, "max_image_pixels": 1_000_000}
    (folder / "config.json").write_text(json.dumps(config))
    with launch("trimcpp.serve", ["--config_file", str(folder / "config.json")], log=str(folder / "server.log"),
                ready_s=120) as started:
        yield started


@pytest.fixture(scope="module")
def reference(models):
    """The Python handler on the same settings, called with the arguments the server derives from the
    request (its sampling defaults): (content, prompt_tokens, rows kept) of a request."""
    proxy = TrimLlamaProxy([TrimModelSettings(**model_settings(models, chat_format="trim-llava-1-5", keep=KEEP,
                                                               reuse_kv=False, image_cache_bytes=0))])
    llama = proxy()
    handler = llama.chat_handler
    answers: dict[str, tuple] = {}

    def answer(messages: list[dict], keep: int = KEEP, max_tokens: int = 6, **options) -> tuple[str, int, list]:
        key = json.dumps([messages, keep, max_tokens, options])
        if key not in answers:
            defaults = {name: getattr(handler, name) for name in options}
            handler.keep = keep
            for name, value in options.items():
                setattr(handler, name, value)
            body = TrimChatCompletionRequest(messages=messages, max_tokens=max_tokens, temperature=0.0)
            result = llama.create_chat_completion(**completion_kwargs(body))
            rows = [{"kept": s.kept, "rows": s.rows} for s in handler.last_selection]
            answers[key] = (result["choices"][0]["message"]["content"], result["usage"]["prompt_tokens"], rows)
            for name, value in defaults.items():
                setattr(handler, name, value)
        return answers[key]

    yield answer
    proxy.free()


def images(extra: dict) -> list[dict]:
    """The ``trimcpp`` field's images without this call's timings: what the rows were."""
    assert all(set(image["seconds"]) == {"encode", "wait", "select", "prefill"} for image in extra["images"]), extra
    return [{k: v for k, v in image.items() if k not in ("seconds", "preloaded")} for image in extra["images"]]


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def test_answers_equal_the_python_handler(server, reference):
    messages = user(image_url(1), QUESTIONS[0])
    content, prompt_tokens, rows = reference(messages)
    assert rows == [{"kept": KEEP, "rows": ROWS}]
    raw = client(server).chat.completions.with_raw_response.create(model="trim", messages=messages, max_tokens=6,
                                                                   temperature=0)
    got = raw.parse()
    assert got.choices[0].message.content == content
    assert got.usage.prompt_tokens == prompt_tokens
    assert raw.headers["x-trimcpp-image-rows"] == f"{KEEP}/{ROWS}"
    assert images(got.model_extra["trimcpp"]) == rows and set(got.model_extra["trimcpp"]) == {"images"}

    chunks = list(client(server).chat.completions.create(model="trim", messages=messages, max_tokens=6, temperature=0,
                                                         stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == content
    assert images(chunks[0].model_extra["trimcpp"]) == rows
    assert chunks[0].model_extra["trimcpp"]["first_token_seconds"] > 0

    # A request's own keep, over the model's; the model's again afterwards.
    content4, prompt4, rows4 = reference(messages, keep=4)
    got = client(server).chat.completions.create(model="trim", messages=messages, max_tokens=6, temperature=0,
                                                 extra_body={"trimcpp": {"keep": 4}})
    assert (got.choices[0].message.content, got.usage.prompt_tokens) == (content4, prompt4)
    assert images(got.model_extra["trimcpp"]) == rows4 == [{"kept": 4, "rows": ROWS}]
    got = client(server).chat.completions.create(model="trim", messages=messages, max_tokens=6, temperature=0)
    assert got.choices[0].message.content == content and got.usage.prompt_tokens == prompt_tokens

    # The stage-1 variants per request (they pick other rows here, so the answer differs).
    variant = {"stage1_ratio": "adaptive", "alignment": "l2"}  # not the default (cosine, 0.8)
    content_v = reference(messages, keep=4, **variant)[0]
    assert content_v != content4
    got = client(server).chat.completions.create(model="trim", messages=messages, max_tokens=6, temperature=0,
                                                 extra_body={"trimcpp": {"keep": 4, **variant}})
    assert got.choices[0].message.content == content_v

    # cdpruner per request: the handler's rows and answer.
    content_c, prompt_c, rows_c = reference(messages, keep=4, method="cdpruner")
    got = client(server).chat.completions.create(model="trim", messages=messages, max_tokens=6, temperature=0,
                                                 extra_body={"trimcpp": {"keep": 4, "method": "cdpruner"}})
    assert (got.choices[0].message.content, got.usage.prompt_tokens) == (content_c, prompt_c)
    assert images(got.model_extra["trimcpp"]) == rows_c == [{"kept": 4, "rows": ROWS}]


def test_stock_model_beside_the_trimmed_one(server, reference):
    messages = user(image_url(1), QUESTIONS[0])
    _, prompt_tokens, _ = reference(messages)
    status, headers, body = server.request("POST", "/v1/chat/completions",
                                           {"model": "stock", "messages": messages, "max_tokens": 6, "temperature": 0})
    assert status == 200 and "x-trimcpp-image-rows" not in headers and "trimcpp" not in json.loads(body)
    # usage counts what the LLM saw: the stock count less the rows pruning dropped.
    assert json.loads(body)["usage"]["prompt_tokens"] - (ROWS - KEEP) == prompt_tokens
    status, _, body = server.request("POST", "/v1/chat/completions", {"model": "stock", "messages": messages,
                                                                      "max_tokens": 2, "trimcpp": {"keep": 4}})
    assert status == 400 and "does not prune images" in json.loads(body)["error"]["message"]
    models = json.loads(server.request("GET", "/v1/models")[2])
    assert [m["id"] for m in models["data"]] == ["trim", "stock"]


def test_file_url_under_the_folder_answers_like_the_same_bytes(server, folder, reference):
    data = (folder / "images" / "a.png").read_bytes()
    content, _, _ = reference(user("data:image/png;base64," + base64.b64encode(data).decode(), QUESTIONS[1]))
    got = client(server).chat.completions.create(model="trim", messages=user((folder / "images" / "a.png").as_uri(),
                                                                             QUESTIONS[1]), max_tokens=6, temperature=0)
    assert got.choices[0].message.content == content


def bad_requests(folder) -> dict[str, tuple[object, str]]:
    """Client mistakes: body (dict, or raw bytes) -> what the 400's message must say."""
    big = np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)  # noise: ~270 KB as PNG
    return {
        "corrupt image": ({"messages": user("data:image/png;base64," + base64.b64encode(b"not a png").decode(), "q")},
                          "not an image"),
        "image over max_image_bytes": ({"messages": user(png_url(big), "q")}, "larger than this server's limit"),
        "image over max_image_pixels": ({"messages": user(png_url(np.zeros((1000, 1200, 3), np.uint8)), "q")},
                                        "1200x1000 pixels"),
        "file outside image_dir": ({"messages": user((folder / "secret.png").as_uri(), "q")}, "outside the folder"),
        "http image": ({"messages": user("http://127.0.0.1:9/a.png", "q")}, "http(s) image URLs are off"),
        "bad keep": ({"messages": user(image_url(1), "q"), "trimcpp": {"keep": 2.5}}, "keep must be 0"),
        "unknown option": ({"messages": user(image_url(1), "q"), "trimcpp": {"kep": 2}}, "trimcpp.kep"),
        "unknown method": ({"messages": user(image_url(1), "q"), "trimcpp": {"method": "best"}}, "unknown method"),
        "bad stage1_ratio": ({"messages": user(image_url(1), "q"), "trimcpp": {"stage1_ratio": 1.5}},
                             "stage1_ratio must be a share in (0, 1] or 'adaptive', got 1.5"),
        "image_max_tokens on LLaVA": ({"messages": user(image_url(1), "q"), "trimcpp": {"image_max_tokens": 16}},
                                      "makes a fixed number of rows per image"),
        "image_max_tokens 0": ({"messages": user(image_url(1), "q"), "trimcpp": {"image_max_tokens": 0}},
                               "trimcpp.image_max_tokens"),
        "image_min_tokens 2**31": ({"messages": user(image_url(1), "q"), "trimcpp": {"image_min_tokens": 2**31}},
                                   "trimcpp.image_min_tokens: Input should be less than or equal to 1048576"),
        "prompt over n_ctx": ({"messages": user(image_url(1), "hi " * 1200), "max_tokens": 4}, "exceeds n_ctx"),
        "streamed prompt over n_ctx": ({"messages": user(image_url(1), "hi " * 1200), "stream": True}, "exceeds n_ctx"),
        "messages not a list": ({"messages": 3}, "messages"),
        "reuse_kv true": ({"messages": user(image_url(1), "q"), "trimcpp": {"reuse_kv": True}}, "trimcpp.reuse_kv"),
        "picture marker in the text": ({"messages": user(image_url(1), "what is <__media__> here?")},
                                       "contains '<__media__>', libmtmd's placeholder for a picture"),
        "not JSON": (b"{\"messages\": [", "JSON"),
    }


def png_url(pixels: np.ndarray) -> str:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


BAD = ("corrupt image", "image over max_image_bytes", "image over max_image_pixels", "file outside image_dir",
       "http image", "bad keep", "unknown option", "unknown method", "bad stage1_ratio", "image_max_tokens on LLaVA",
       "image_max_tokens 0", "image_min_tokens 2**31", "prompt over n_ctx",
       "streamed prompt over n_ctx", "messages not a list", "reuse_kv true", "picture marker in the text", "not JSON")


@pytest.mark.parametrize("case", BAD)
def test_client_mistakes_are_400(server, folder, case):
    cases = bad_requests(folder)
    assert set(cases) == set(BAD)
    body, says = cases[case]
    status, headers, answer = server.request("POST", "/v1/chat/completions", body)
    assert status == 400, answer[:300]
    error = json.loads(answer)["error"]
    assert error["type"] == "invalid_request_error" and says in error["message"]
    if "n_ctx" in case:
        assert error["code"] == "context_length_exceeded"
    status, _, _ = server.request("POST", "/v1/chat/completions", {"messages": user(image_url(1), "q"), "max_tokens": 1})
    assert status == 200  # and the server goes on


def test_preload_route_then_the_question(server, reference):
    url = image_url(31)
    body = {"model": "trim", "image_url": {"url": url}}
    status, _, answer = server.request("POST", "/v1/trimcpp/preload", body)
    result = json.loads(answer)
    assert status == 200 and result["status"] == "ready" and (result["rows"], result["chunk_rows"]) == (ROWS, [ROWS])
    assert result["encode_seconds"] > 0 and not result["cached"] and len(result["digest"]) == 64
    status, _, answer = server.request("POST", "/v1/trimcpp/preload", {"type": "image_url", "image_url": url})
    assert status == 200 and json.loads(answer)["cached"] and json.loads(answer)["encode_seconds"] == 0
    status, _, answer = server.request("POST", "/v1/trimcpp/preload", {"image_url": image_url(32), "wait": False})
    assert status == 202 and json.loads(answer)["status"] in ("encoding", "ready")
    messages = user(url, QUESTIONS[0])
    got = client(server).chat.completions.create(model="trim", messages=messages, max_tokens=6, temperature=0)
    assert got.choices[0].message.content == reference(messages)[0]


def test_preload_prefills_the_conversation_and_the_question_answers_with_every_row(server, reference):
    url = image_url(33)
    conversation = [{"role": "system", "content": "You describe pictures."},
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]
    status, _, answer = server.request("POST", "/v1/trimcpp/preload", {"model": "trim", "messages": conversation})
    result = json.loads(answer)
    assert status == 200 and result["rows"] == ROWS and len(result["images"]) == 1, result
    assert result["prefill"]["state"] in ("encoding", "waiting", "prefilling", "prefilled")
    end = time.monotonic() + 60
    while result["prefill"]["state"] != "prefilled":
        assert time.monotonic() < end and result["prefill"]["state"] in ("encoding", "waiting", "prefilling"), result
        time.sleep(0.05)
        status, _, answer = server.request("GET", "/v1/trimcpp/preload?model=trim")
        result = json.loads(answer)
        assert status == 200
    assert result["prefill"] == {"state": "prefilled", "rows": ROWS, "prefilled_rows": ROWS}
    messages = conversation[:1] + user(url, QUESTIONS[0])
    got = client(server).chat.completions.create(model="trim", messages=messages, max_tokens=6, temperature=0)
    assert images(got.model_extra["trimcpp"]) == [{"kept": ROWS, "rows": ROWS, "path": "full", "prefilled_rows": ROWS}]
    assert got.model_extra["trimcpp"]["images"][0]["preloaded"]
    content, prompt_tokens, _ = reference(messages, keep=None)
    assert (got.choices[0].message.content, got.usage.prompt_tokens) == (content, prompt_tokens)
    status, _, answer = server.request("GET", "/v1/trimcpp/preload")
    assert status == 200 and json.loads(answer)["prefill"] is None  # the question took it


def test_a_route_without_the_handler_stops_the_prefill(models, monkeypatch):
    """In-process: the proxy stops a background prefill before a route that does not go through the
    handler (completions, embeddings, ...) uses the model, and before another model replaces it."""
    from trimcpp.serve import app

    proxy = TrimLlamaProxy([TrimModelSettings(**model_settings(models, model_alias="trim", chat_format="trim-llava-1-5",
                                                               keep=KEEP)),
                            TrimModelSettings(**model_settings(models, model_alias="other",
                                                               chat_format="trim-llava-1-5", keep=KEEP))])
    try:
        llama = proxy("trim")
        handler = llama.chat_handler
        stops = []
        monkeypatch.setattr(type(handler), "cancel_attach", lambda self: stops.append(self))
        assert proxy("trim") is llama and stops == [handler]  # a route without the handler
        token = app._HANDLER_ROUTE.set(True)
        try:
            assert proxy("trim") is llama and stops == [handler]  # the chat and preload routes decide themselves
            proxy("other")  # another model: this one is closed, its prefill stopped first
            assert stops == [handler, handler]
        finally:
            app._HANDLER_ROUTE.reset(token)
    finally:
        proxy.free()


@pytest.mark.parametrize(("body", "says"), [
    ({"image_url": "data:image/png;base64," + base64.b64encode(b"not a png").decode()}, "not an image"),
    ({"image_url": "http://127.0.0.1:9/a.png"}, "http(s) image URLs are off"),
    ({"model": "stock", "image_url": image_url(1)}, "does not prune images: preload is for trim-* chat formats"),
    ({"image_url": image_url(1), "keep": 3}, "keep"),
    ({"type": "text", "image_url": image_url(1)}, "a preload takes an image_url part"),
    ({}, "a preload takes an image_url or messages"),
    ({"image_url": image_url(1), "messages": [{"role": "user", "content": "Hi"}]}, "one of them"),
    ({"messages": [{"role": "user", "content": "Hello"}]}, "has no picture"),
    ({"messages": []}, "ending with the user message"),
])
def test_preload_route_mistakes_are_400(server, body, says):
    status, _, answer = server.request("POST", "/v1/trimcpp/preload", body)
    assert status == 400, answer[:300]
    assert says in json.loads(answer)["error"]["message"]


def test_encoder_settings_per_model_and_per_request(tmp_path):
    from trimcpp.serve.app import TrimOptions, request_options
    from trimcpp.testing import write_pair

    llm, mmproj = (str(p) for p in write_pair(tmp_path, "tiny", family="qwen2.5-vl"))
    settings = TrimModelSettings(model=llm, clip_model_path=mmproj, chat_format="trim-qwen2.5-vl", n_ctx=N_CTX,
                                 verbose=False, encoder_flash_attn="off", encoder_threads=1, image_max_tokens=32)
    proxy = TrimLlamaProxy([settings])
    try:
        llama = proxy()
        handler = llama.chat_handler
        assert (handler.encoder_flash_attn, handler.encoder_threads, handler.image_max_tokens) == (False, 1, 32)
        messages = user(image_url(0, (224, 168)), "q")
        with request_options(handler, TrimOptions(image_max_tokens=16), "default"):
            llama.create_chat_completion(messages=messages, max_tokens=1)
            limited = handler.last_selection[0].rows
            os.rename(mmproj, mmproj + ".away")  # the model's settings come back without reading it again
        os.rename(mmproj + ".away", mmproj)
        assert handler.image_max_tokens == 32
        llama.create_chat_completion(messages=messages, max_tokens=1)
        assert limited < 16 < handler.last_selection[0].rows <= 32
        with pytest.raises(ValueError, match="image_min_tokens 64 > image_max_tokens 32"):
            with request_options(handler, TrimOptions(image_min_tokens=64), "default"):
                pass
        assert handler.image_min_tokens is None
        # min and max together: each alone against the model's max 32 would be refused (40 > 32)
        with request_options(handler, TrimOptions(image_min_tokens=40, image_max_tokens=48), "default"):
            llama.create_chat_completion(messages=messages, max_tokens=1)
            both = handler.last_selection[0].rows
        assert 40 <= both <= 48 and (handler.image_min_tokens, handler.image_max_tokens) == (None, 32)
    finally:
        proxy.free()
    with pytest.raises(ValueError, match="encoder_flash_attn must be one of auto, on, off"):
        TrimModelSettings(model=llm, clip_model_path=mmproj, chat_format="trim-qwen2.5-vl", encoder_flash_attn="yes")
    with pytest.raises(ValueError, match="encoder_threads"):
        TrimModelSettings(model=llm, clip_model_path=mmproj, chat_format="llava-1-5", encoder_threads=2)


def test_client_gone_mid_stream_lets_go_of_the_model(server, reference):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    connection.request("POST", "/v1/chat/completions", body=json.dumps(
        {"messages": user(image_url(2), QUESTIONS[0]), "max_tokens": 200, "stream": True}).encode(),
        headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data:")
    connection.close()  # gone after the first chunk
    messages = user(image_url(1), QUESTIONS[1])
    got = client(server).chat.completions.create(model="trim", messages=messages, max_tokens=6, temperature=0)
    assert got.choices[0].message.content == reference(messages)[0]


def test_cli_refuses_bad_settings(models, tmp_path):
    def serve(*args):
        return subprocess.run([sys.executable, "-m", "trimcpp.cli", "serve", *args], capture_output=True, text=True,
                              timeout=120, cwd=tmp_path, env={k: v for k, v in os.environ.items() if k != "CONFIG_FILE"})

    run = serve("--model", models["llm"], "--clip_model_path", models["1.5"], "--chat_format", "llava-1-5", "--keep", "8")
    assert run.returncode == 2 and "keep: only for the trim-* chat formats" in run.stderr
    run = serve("--model", models["llm"], "--chat_format", "trim-llava-1-5")
    assert run.returncode == 2 and "clip_model_path (the mmproj GGUF) is required" in run.stderr
    run = serve("--model", models["llm"], "--clip_model_path", models["1.5"], "--chat_format", "trim-llava-1-5",
                "--method", "best")
    assert run.returncode == 2 and "unknown method 'best'" in run.stderr
    run = serve("--model", models["llm"], "--clip_model_path", models["1.5"], "--chat_format", "trim-llava-1-5",
                "--stage1_ratio", "often")
    assert run.returncode == 2 and "stage1_ratio must be a share in (0, 1] or 'adaptive', got 'often'" in run.stderr
    (tmp_path / "empty.yaml").write_text("models: []\n")
    run = serve("--config_file", str(tmp_path / "empty.yaml"))
    assert run.returncode == 2 and "lists no models" in run.stderr
    run = serve("--model", models["llm"], "--clip_model_path", models["1.5"], "--chat_format", "trim-llava-1-5",
                "--image_max_tokens", "256")
    assert run.returncode == 2 and "makes a fixed number of rows per image" in run.stderr
    run = serve("--model", str(tmp_path / "missing.gguf"))
    assert run.returncode == 2 and "missing.gguf" in run.stderr


def test_settings_and_options():
    from trimcpp.serve.settings import handler_keep

    assert [handler_keep(v) for v in (0, 0.25, 1, 64.0)] == [None, 0.25, 1, 64]
    for bad in (2.5, 1.5):
        with pytest.raises(ValueError, match="whole row count"):
            handler_keep(bad)
    settings = TrimModelSettings(model="m.gguf", clip_model_path="p.gguf", chat_format="trim-qwen2.5-vl", keep=0.25,
                                 reuse_kv=False)
    assert settings.handler_options() == {"keep": 0.25, "method": "trimtokenator",
                                          "stage1_ratio": 0.8, "alignment": "cosine",  # the default
                                          "follow_ups": "keep-rows", "image_cache_bytes": 256 << 20, "reuse_kv": False,
                                          "encoder_flash_attn": "auto", "encoder_threads": None, "image_min_tokens": None,
                                          "image_max_tokens": None, "attach_policy": "auto"}
    with pytest.raises(ValueError, match="attach_policy must be one of auto, full, pruned"):
        TrimModelSettings(model="m.gguf", clip_model_path="p.gguf", chat_format="trim-mtmd", attach_policy="soon")
    stock = settings.stock()
    assert stock.chat_format == "qwen2.5-vl" and not hasattr(stock, "keep")
    assert "keep" not in TrimModelSettings(model="m.gguf", clip_model_path="p.gguf",
                                           chat_format="trim-mtmd").handler_options()  # the handler's default
    for given, taken in (("adaptive", "adaptive"), ("0.5", 0.5), (1, 1.0)):  # a flag arrives as text
        settings = TrimModelSettings(model="m.gguf", clip_model_path="p.gguf", chat_format="trim-mtmd", stage1_ratio=given)
        assert settings.handler_options()["stage1_ratio"] == taken
    for bad in ("sometimes", 0, 1.5):
        with pytest.raises(ValueError, match=r"stage1_ratio must be a share in \(0, 1\] or 'adaptive'"):
            TrimModelSettings(model="m.gguf", clip_model_path="p.gguf", chat_format="trim-mtmd", stage1_ratio=bad)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


CLIENTS, REQUESTS = 8, 10
MEMORY_BOUND_KIB = 64 << 10  # growth of the server's RSS over both rounds, after a warm-up (seen: 9-22 MiB)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts the server's open files in /proc")
def test_reliability_eight_clients(server, folder, reference):
    """8 clients x 10 requests at once, twice, mixing images, streaming, the openai client, raw HTTP, bad
    input and clients that leave mid-stream: every good answer equals the Python handler's, every bad
    request is a 400, the server logs no exception, ends with the open files it had and within
    MEMORY_BOUND_KIB more memory."""
    pictures = [image_url(seed) for seed in (21, 22, 23)]
    bad = list(bad_requests(folder).items())

    def good(kind: int, i: int) -> None:
        messages = user(pictures[i % len(pictures)], QUESTIONS[i % 2])
        keep = 4 if kind == 2 else KEEP
        content, prompt_tokens, rows = reference(messages, keep=keep)
        options = {"extra_body": {"trimcpp": {"keep": keep}}} if kind == 2 else {}
        if kind == 1:
            chunks = list(client(server).chat.completions.create(model="trim", messages=messages, max_tokens=6,
                                                                 temperature=0, stream=True, **options))
            assert "".join(c.choices[0].delta.content or "" for c in chunks) == content
            assert images(chunks[0].model_extra["trimcpp"]) == rows
        else:
            status, headers, body = server.request("POST", "/v1/chat/completions", {
                "messages": messages, "max_tokens": 6, "temperature": 0, **options.get("extra_body", {})})
            assert status == 200, body[:300]
            answer = json.loads(body)
            assert answer["choices"][0]["message"]["content"] == content
            assert answer["usage"]["prompt_tokens"] == prompt_tokens
            assert headers["x-trimcpp-image-rows"] == f"{rows[0]['kept']}/{ROWS}"

    def one(c: int, r: int) -> str:
        kind = (c + r) % 5
        if kind < 3:
            good(kind, c * REQUESTS + r)
            return "good"
        if kind == 3:
            name, (body, says) = bad[(c * REQUESTS + r) % len(bad)]
            status, _, answer = server.request("POST", "/v1/chat/completions", body)
            assert status == 400 and says in json.loads(answer)["error"]["message"], (name, answer[:300])
            return "bad"
        # streamed and dropped after the first chunk
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
        connection.request("POST", "/v1/chat/completions", body=json.dumps(
            {"messages": user(pictures[r % 3], QUESTIONS[0]), "max_tokens": 50, "stream": True}).encode(),
            headers={"Content-Type": "application/json"})
        assert connection.getresponse().readline().startswith(b"data:")
        connection.close()
        return "dropped"

    for kind in range(5):  # warm-up: one of each, so the caches and pools exist before the baseline
        one(0, kind)
    for picture in pictures:
        for question in QUESTIONS:
            for keep in (KEEP, 4):
                reference(user(picture, question), keep=keep)
    time.sleep(1)
    files, memory = open_files(server.process.pid), rss_kib(server.process.pid)

    outcomes: list[str] = []
    failures: list[BaseException] = []

    def run_client(c: int) -> None:
        for r in range(REQUESTS):
            try:
                outcomes.append(one(c, r))
            except BaseException as error:  # noqa: BLE001 - reported below, with the others
                failures.append(error)

    def round_() -> float:
        threads = [threading.Thread(target=run_client, args=(c,)) for c in range(CLIENTS)]
        began = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        assert not any(t.is_alive() for t in threads), "clients still waiting after 300 s"
        deadline = time.monotonic() + 15
        while open_files(server.process.pid) > files and time.monotonic() < deadline:
            time.sleep(0.2)  # connections the clients closed a moment ago
        return time.monotonic() - began

    seconds = round_()
    after_one = rss_kib(server.process.pid)
    seconds += round_()
    after_two = rss_kib(server.process.pid)
    print(f"\n2 x {CLIENTS}x{REQUESTS} requests in {seconds:.1f} s; open files {files} -> "
          f"{open_files(server.process.pid)}; RSS {memory} KiB, +{after_one - memory} KiB after round 1, "
          f"+{after_two - after_one} KiB in round 2")
    assert not failures, failures[:3]
    assert len(outcomes) == 2 * CLIENTS * REQUESTS and outcomes.count("bad") == 2 * CLIENTS * REQUESTS // 5
    assert server.process.poll() is None
    assert open_files(server.process.pid) <= files
    assert after_two - memory < MEMORY_BOUND_KIB
    with open(server.log, errors="replace") as log:
        assert "Traceback" not in log.read()  # no request ended in an exception (the stock 500 path logs one)


@pytest.mark.parametrize("family, chat_format", [("llava", "llava-1-6"), ("qwen2.5-vl", "qwen2.5-vl"),
                                                 ("gemma3", "mtmd")])
def test_each_family_loads_through_the_proxy(models, tmp_path, family, chat_format):
    """trim-<format> loads the trimmed handler with the model's settings: keep 0 answers as the stock
    format does through the same proxy (chat_template_kwargs applied to both); the default keeps 1/9
    of each image's rows (LLaVA-1.6: 320 or all of a smaller image)."""
    from trimcpp.serve.app import trimmed_handler
    from trimcpp.testing import write_pair

    llm, mmproj = (models["llm"], models["1.6"]) if family == "llava" else write_pair(tmp_path, "tiny", family=family)
    common = {"model": str(llm), "clip_model_path": str(mmproj), "n_ctx": 1024, "verbose": False,
              "chat_template_kwargs": {"unused_by_the_template": 1}}
    messages = user(image_url(4, (200, 150)), QUESTIONS[0])
    answers = {}
    for name, extra in (("stock", {"chat_format": chat_format}), ("every row", {"chat_format": "trim-" + chat_format,
                                                                               "keep": 0})):
        proxy = TrimLlamaProxy([TrimModelSettings(**common, **extra)])
        llama = proxy()
        body = TrimChatCompletionRequest(messages=messages, max_tokens=5, temperature=0.0)
        answers[name] = llama.create_chat_completion(**completion_kwargs(body))["choices"][0]["message"]["content"]
        assert (trimmed_handler(llama) is None) == (name == "stock")
        proxy.free()
    assert answers["every row"] == answers["stock"]

    proxy = TrimLlamaProxy([TrimModelSettings(**common, chat_format="trim-" + chat_format)])
    llama = proxy()
    llama.create_chat_completion(messages=messages, max_tokens=1)
    image = trimmed_handler(llama).last_selection[0]
    assert image.kept == (min(320, image.rows) if family == "llava" else max(1, math.floor(image.rows / 9 + 0.5)))
    proxy.free()


def test_downloads_do_not_hold_the_model(models, folder, reference):
    """With http(s) images allowed, a slow download does not hold back a request sent after it, and
    the downloaded picture answers as its bytes do."""
    import http.server

    data = (folder / "images" / "a.png").read_bytes()

    class Slow(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            time.sleep(3)
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    args = ["--model", models["llm"], "--clip_model_path", models["1.5"], "--chat_format", "trim-llava-1-5",
            "--keep", str(KEEP), "--n_ctx", str(N_CTX), "--verbose", "false", "--allow_http_images", "true"]
    try:
        with launch("trimcpp.serve", args, log=str(folder / "http.log"), ready_s=120) as started:
            slow: dict = {}

            def fetch_slowly():
                body = {"messages": user(f"http://127.0.0.1:{web.server_address[1]}/a.png", QUESTIONS[1]),
                        "max_tokens": 6, "temperature": 0}
                slow["answer"] = started.request("POST", "/v1/chat/completions", body)
                slow["done"] = time.monotonic()

            thread = threading.Thread(target=fetch_slowly)
            thread.start()
            time.sleep(0.5)
            status, _, _ = started.request("POST", "/v1/chat/completions",
                                           {"messages": user(image_url(1), QUESTIONS[0]), "max_tokens": 2})
            fast_done = time.monotonic()
            thread.join(timeout=60)
    finally:
        web.shutdown()
        web.server_close()
    assert status == 200 and fast_done < slow["done"] - 1.0  # answered while the download was still waiting
    status, _, body = slow["answer"]
    assert status == 200
    same_bytes = "data:image/png;base64," + base64.b64encode(data).decode()
    assert json.loads(body)["choices"][0]["message"]["content"] == reference(user(same_bytes, QUESTIONS[1]))[0]


def test_bench_server_command(capsys):
    """trimcpp bench --server on the tiny shape: both servers, both workloads, every request timed."""
    from trimcpp.bench.server import table
    from trimcpp.cli import main

    assert main(["bench", "--server", "--shape", "tiny", "--repeat", "2", "--turns", "2", "--keep", "8", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["servers"]) == {"stock", "trimcpp"} and result["keep"] == 8
    for loads in result["servers"].values():
        assert [len(loads[w]["ttft_s"]) for w in ("new pictures", "follow-ups")] == [2, 2]
        assert all(0 < t < 60 for w in loads.values() for t in w["ttft_s"])
        assert all(w["requests_per_min"] == pytest.approx(60 * 2 / w["wall_s"]) for w in loads.values())
    lines = table(result).splitlines()
    assert len(lines) == 5 and lines[2].startswith("| 2 new pictures (median)")
    assert main(["bench", "--server", "--image", "x.png", "--shape", "tiny"]) == 2
    assert "leave out --image" in capsys.readouterr().err
