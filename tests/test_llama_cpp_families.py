"""patches/llama.cpp on the families beyond LLaVA: llama-mtmd-cli and llama-server prune Qwen2.5-VL
(M-RoPE: each kept row at its own position) and Gemma 3 (non-causal image rows, one batch) row for row
as the Python handlers do; the stage-1 variants reach the tools; and a conversation to llama-server
selects and encodes a picture once (the encoder cache of the patched libmtmd, and the follow-up rule
"keep-rows").

Tiny pairs (trimcpp.testing): Qwen2.5-VL, a 224 x 168 picture -> 8 x 6 = 48 rows over 8 positions;
Gemma 3, 64 rows. The tiny Gemma answers every prompt with newlines, so for Gemma the server tests
compare the first token's top log-probabilities, where the rows show. The tools use each GGUF's own
chat template (--jinja), as MTMDChatHandler does. The Python side runs on the patched build's
libraries, so both encode with the same libmtmd (tests/test_llama_cpp_patches.py: the LLaVA tests).
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_llama_cpp_patches import Server, chat_body, cli_answer, free_port, kept_rows, picture

from trimcpp.testing import write_pair

SIZE = (224, 168)
ROWS = {"qwen": 48, "gemma": 64}
QUESTION = "What is in the image?"
N_PREDICT = 6


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> dict[str, tuple[str, str]]:
    root = tmp_path_factory.mktemp("family-pairs")
    return {family: tuple(map(str, write_pair(root, "tiny", family=name)))
            for family, name in (("qwen", "qwen2.5-vl"), ("gemma", "gemma3"))}


def cli(tools: Path, pair: tuple[str, str], image: Path, *flags: str, question: str = QUESTION) -> dict:
    """One llama-mtmd-cli run with the GGUF's template: answer, the kept rows per pruned chunk, the
    prompt's positions (logged with --image-keep), the log."""
    llm, mmproj = pair
    done = subprocess.run([str(tools / "llama-mtmd-cli"), "-m", llm, "--mmproj", mmproj, "--image", str(image),
                           "-p", question, "--jinja", "-n", str(N_PREDICT), "--temp", "0", "-c", "1024", "-b", "512",
                           "-ub", "512", "-fa", "off", "-t", "2", "--seed", "1", *flags],
                          capture_output=True, text=True, timeout=300)
    counts = re.findall(r"image rows: (\d+) prompt tokens so far", done.stderr)
    return {"code": done.returncode, "log": done.stderr, "kept": kept_rows(done.stderr),
            "answer": cli_answer(done.stdout),
            "positions": int(counts[-1]) if counts else None}


PROBE = r"""
import json, sys
from llama_cpp import Llama
from llama_cpp.llama_chat_format import MTMDChatHandler
from trimcpp import TrimMTMDChatHandler

a = json.loads(sys.stdin.read())
if a["settings"] is None:
    handler = MTMDChatHandler(clip_model_path=a["mmproj"], verbose=False)
else:
    handler = TrimMTMDChatHandler(clip_model_path=a["mmproj"], verbose=False, encoder_flash_attn=False, **a["settings"])
llama = Llama(model_path=a["llm"], chat_handler=handler, n_ctx=1024, n_batch=512, n_threads=2, seed=1, verbose=False,
              logits_all=a["logprobs"])
out = []
for messages in a["conversations"]:
    response = llama.create_chat_completion(messages=messages, max_tokens=a["max_tokens"], temperature=0.0,
                                            logprobs=a["logprobs"], top_logprobs=5 if a["logprobs"] else None)
    selection = getattr(handler, "last_selection", [])
    choice = response["choices"][0]
    out.append({"answer": choice["message"]["content"], "prompt_tokens": response["usage"]["prompt_tokens"],
                "indices": [k.tolist() for s in selection for k in s.indices],
                "top": [(t["token"], float(t["logprob"])) for t in choice["logprobs"]["content"][0]["top_logprobs"]]
                       if a["logprobs"] else None})
print(json.dumps(out))
"""


def python(tools: Path, pair: tuple[str, str], conversations: list[list[dict]], settings: dict | None,
           logprobs: bool = False) -> list[dict]:
    """The Python handler (TrimMTMDChatHandler, the GGUF's template; None: the stock MTMDChatHandler) on
    the patched build's libraries, one call per conversation on one Llama: answer, usage.prompt_tokens,
    the kept rows of each image of the prompt; with logprobs the first token's top 5 (token, logprob)."""
    libs = (tools / "llama-mtmd-cli").resolve().parent
    request = {"llm": pair[0], "mmproj": pair[1], "conversations": conversations, "settings": settings,
               "max_tokens": 1 if logprobs else N_PREDICT, "logprobs": logprobs}
    done = subprocess.run([sys.executable, "-c", PROBE], input=json.dumps(request), capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, LLAMA_CPP_LIB_PATH=str(libs), MTMD_CPP_LIB=str(libs)),
                          cwd=libs)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def ask(image: Path, question: str = QUESTION) -> list[dict]:
    return chat_body(image, question)["messages"]


@pytest.fixture
def server(tools, pairs):
    started = []

    def start(family: str, *flags: str) -> Server:
        llm, mmproj = pairs[family]
        started.append(Server(tools, None, llm, mmproj, *flags))
        return started[-1]

    yield start
    for s in started:
        s.stop()


def server_log(s: Server, lines: int = 1) -> str:
    """The server's log once it has at least `lines` "image rows: chunk" lines (it logs from a thread)."""
    deadline = time.monotonic() + 10
    while True:
        s.log.flush()
        s.log.seek(0)
        log = s.log.read()
        if log.count("image rows: chunk") >= lines or time.monotonic() > deadline:
            return log
        time.sleep(0.05)


@pytest.mark.parametrize("family, keep", [("qwen", "8"), ("qwen", "0.25"), ("gemma", "10")])
def test_cli_prunes_the_family_as_the_handler_does(tools, pairs, tmp_path, family, keep):
    """Same rows, same greedy answer and the same prompt length as TrimMTMDChatHandler (Qwen: positions,
    text + 8 per image whatever is kept; Gemma: text + kept rows)."""
    image = picture(tmp_path, *SIZE)
    run = cli(tools, pairs[family], image, "--image-keep", keep)
    assert run["code"] == 0, run["log"][-3000:]
    [want] = python(tools, pairs[family], [ask(image)], {"keep": float(keep) if "." in keep else int(keep)})
    assert run["kept"] == want["indices"] and len(want["indices"][0]) < ROWS[family]
    assert run["answer"] == want["answer"] and run["answer"]
    assert run["positions"] == want["prompt_tokens"]


@pytest.mark.parametrize("family", ["qwen", "gemma"])
def test_cli_without_the_flag_is_the_stock_tool(tools, pairs, tmp_path, family):
    image = picture(tmp_path, *SIZE, seed=3)
    stock = cli(tools, pairs[family], image)
    [want] = python(tools, pairs[family], [ask(image)], None)
    assert stock["code"] == 0 and stock["kept"] == [] and "image rows:" not in stock["log"]
    assert stock["answer"] == want["answer"] and stock["answer"]
    if family == "qwen":  # the control for the equality tests: which rows the LLM sees changes what it says
        answers = {cli(tools, pairs[family], image, "--image-keep", k, *m)["answer"]
                   for k, m in (("1", ()), ("3", ("--image-prune-method", "uniform")), ("40", ()))}
        assert len(answers | {stock["answer"]}) > 1


@pytest.mark.parametrize("family", ["qwen", "gemma"])
def test_cli_variants_select_what_python_selects(tools, pairs, tmp_path, family):
    image = picture(tmp_path, *SIZE, seed=5)
    flags = ("--image-keep", "6", "--image-alignment", "cosine", "--image-stage1-ratio", "adaptive")
    run = cli(tools, pairs[family], image, *flags)
    assert run["code"] == 0, run["log"][-3000:]
    [want] = python(tools, pairs[family], [ask(image)], {"keep": 6, "alignment": "cosine", "stage1_ratio": "adaptive"})
    assert run["kept"] == want["indices"]
    assert run["answer"] == want["answer"]
    paper = cli(tools, pairs[family], image, "--image-keep", "6", "--image-alignment", "l2", "--image-stage1-ratio", "0.8")
    assert paper["kept"] != run["kept"]  # the variant changes the rows here


def test_cli_cdpruner_selects_what_python_selects(tools, pairs, tmp_path):
    image = picture(tmp_path, *SIZE, seed=5)
    run = cli(tools, pairs["qwen"], image, "--image-keep", "6", "--image-prune-method", "cdpruner")
    assert run["code"] == 0, run["log"][-3000:]
    [want] = python(tools, pairs["qwen"], [ask(image)], {"keep": 6, "method": "cdpruner"})
    assert run["kept"] == want["indices"] and run["answer"] == want["answer"]
    assert run["kept"] != cli(tools, pairs["qwen"], image, "--image-keep", "6")["kept"]  # not the default method's rows


@pytest.mark.parametrize("flags, message", [(("--image-alignment", "manhattan"), "unknown alignment"),
                                            (("--image-stage1-ratio", "sometimes"), "--image-stage1-ratio"),
                                            (("--image-stage1-ratio", "1.5"), "--image-stage1-ratio")])
def test_cli_refuses_bad_variants(tools, pairs, tmp_path, flags, message):
    run = cli(tools, pairs["qwen"], picture(tmp_path, *SIZE), "--image-keep", "6", *flags)
    assert run["code"] != 0 and message in run["log"]


def test_cli_gemma_rows_beyond_the_ubatch_are_an_error_not_an_abort(tools, pairs, tmp_path):
    image = picture(tmp_path, *SIZE)
    run = cli(tools, pairs["gemma"], image, "--image-keep", "40", "-b", "32", "-ub", "32")
    assert run["code"] == 1 and "decoded in one batch: 40 kept rows > the physical batch size 32" in run["log"]
    assert cli(tools, pairs["gemma"], image, "--image-keep", "30", "-b", "32", "-ub", "32")["code"] == 0


# llama-server


def top_logprobs(reply: dict) -> list[tuple[str, float]]:
    return [(t["token"], t["logprob"]) for t in reply["choices"][0]["logprobs"]["content"][0]["top_logprobs"]]


def same_top(server: list[tuple[str, float]], python: list[tuple[str, float]]) -> bool:
    """The same most likely token, and each of llama-cpp-python's top tokens (which it keys by their text,
    so tokens that print alike collapse) among the server's with the same log-probability."""
    seen = {}
    for token, logprob in server:
        seen.setdefault(token, logprob)
    return server[0][0] == python[0][0] and all(token in seen and abs(seen[token] - logprob) < 1e-3
                                                for token, logprob in python if token)


@pytest.mark.parametrize("family", ["qwen", "gemma"])
def test_server_prunes_the_family_as_the_handler_does(server, tools, pairs, tmp_path, family):
    """A chat request with "image_keep" picks the handler's rows and gives its answer and first-token
    log-probabilities; without it, the stock ones; other rows give other log-probabilities (the control).
    usage.prompt_tokens is llama-server's count (KV cells: text + kept rows) for both."""
    image = picture(tmp_path, *SIZE, seed=2)
    s = server(family)
    replies = {}
    for name, extra in (("every", {}), ("pruned", {"image_keep": 9}),
                        ("other", {"image_keep": 9, "image_prune_method": "uniform"})):
        for kind, more in (("answer", {"max_tokens": N_PREDICT}), ("top", {"max_tokens": 1, "logprobs": True,
                                                                           "top_logprobs": 5})):
            code, replies[name, kind] = s.chat(chat_body(image, QUESTION, **extra, **more))
            assert code == 200, replies[name, kind]
    stock, trimmed = (python(tools, pairs[family], [ask(image)], settings)[0] for settings in (None, {"keep": 9}))
    stock_top, trimmed_top = (python(tools, pairs[family], [ask(image)], settings, logprobs=True)[0]["top"]
                              for settings in (None, {"keep": 9}))
    assert kept_rows(server_log(s, 4))[:2] == trimmed["indices"] * 2
    assert replies["every", "answer"]["choices"][0]["message"]["content"] == stock["answer"]
    assert replies["pruned", "answer"]["choices"][0]["message"]["content"] == trimmed["answer"]
    assert same_top(top_logprobs(replies["every", "top"]), stock_top)
    assert same_top(top_logprobs(replies["pruned", "top"]), trimmed_top)
    assert not same_top(top_logprobs(replies["other", "top"]), trimmed_top)  # the control: rows show
    assert replies["every", "answer"]["usage"]["prompt_tokens"] - replies["pruned", "answer"]["usage"]["prompt_tokens"] \
        == ROWS[family] - 9


def conversation(image: Path, turns: list[tuple[str, str | None]]) -> list[dict]:
    """User turns (the picture with the first) and the assistant's answers between them."""
    messages = ask(image, turns[0][0])
    for (_, answer), (question, _) in zip(turns, turns[1:]):
        messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": question}]
    return messages


def test_server_conversation_encodes_a_picture_once(server, tools, pairs, tmp_path):
    """Three turns, the client resending the history each time: turns 2-3 select from the encoder cache
    (no encode), reuse the prompt cache through the picture (its rows were chosen with the first
    question, the rule "keep-rows"), and answer as a fresh server and the Python handler do."""
    image = picture(tmp_path, *SIZE, seed=4)
    questions = ["What is in the image?", "Describe the colours.", "Is there a cat?"]
    s = server("qwen")
    answers: list[str] = []
    replies = []
    for turn in range(len(questions)):
        messages = conversation(image, list(zip(questions[: turn + 1], answers + [None])))
        code, reply = s.chat({"messages": messages, "max_tokens": N_PREDICT, "temperature": 0, "image_keep": 7})
        assert code == 200, reply
        replies.append(reply)
        answers.append(reply["choices"][0]["message"]["content"])
    log = server_log(s, 3)
    assert len(re.findall(r"image rows: chunk \d+ keeps \d+ of \d+: [\d ]+; encoded in", log)) == 1
    assert len(re.findall(r"image rows: chunk \d+ keeps \d+ of \d+: [\d ]+; from the encoder cache", log)) == 2
    kept = kept_rows(log)
    assert len(kept) == 3 and kept[0] == kept[1] == kept[2]  # the first question's rows, every turn
    for reply, previous in zip(replies[1:], replies):
        assert reply["timings"]["cache_n"] >= previous["usage"]["prompt_tokens"]  # history and picture reused

    final = conversation(image, list(zip(questions, answers)))
    fresh = server("qwen")
    code, again = fresh.chat({"messages": final, "max_tokens": N_PREDICT, "temperature": 0, "image_keep": 7})
    assert code == 200 and again["choices"][0]["message"]["content"] == answers[2]
    [handler] = python(tools, pairs["qwen"], [final], {"keep": 7})
    assert handler["answer"] == answers[2]
    assert handler["indices"] == kept[:1]


def test_server_selects_each_picture_with_the_user_text_up_to_its_message(server, tools, pairs, tmp_path):
    """Two pictures in two turns: the first with the first question, the second with both questions
    (the handlers' follow_ups="keep-rows"), row for row as TrimMTMDChatHandler. Cosine alignment, where
    the text moves the rows of these random models more than the paper's L2 does."""
    first, second = picture(tmp_path, *SIZE, seed=8), picture(tmp_path, *SIZE, seed=9)
    messages = ask(first, "What is in the image?") + [{"role": "assistant", "content": "a cat"}]
    messages += [{"role": "user", "content": ask(second, "red green blue yellow")[0]["content"]}]
    s = server("qwen")
    code, _ = s.chat({"messages": messages, "max_tokens": 2, "image_keep": 5, "image_alignment": "cosine"})
    assert code == 200
    [want] = python(tools, pairs["qwen"], [messages], {"keep": 5, "alignment": "cosine"})
    assert kept_rows(server_log(s, 2)) == want["indices"] and len(want["indices"]) == 2
    [everything] = python(tools, pairs["qwen"], [messages], {"keep": 5, "alignment": "cosine", "follow_ups": "reselect"})
    assert everything["indices"][0] != want["indices"][0]  # the control: the first picture's text matters


def test_server_anthropic_route_selects_as_the_chat_route(server, tmp_path):
    """/v1/messages (converted to a chat request inside the server) gives each picture the same text."""
    first, second = picture(tmp_path, *SIZE, seed=8), picture(tmp_path, *SIZE, seed=9)
    s = server("qwen", "--image-keep", "5", "--image-alignment", "cosine")

    def image(path: Path) -> dict:
        return {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                            "data": base64.b64encode(path.read_bytes()).decode()}}

    messages = [{"role": "user", "content": [image(first), {"type": "text", "text": "What is in the image?"}]},
                {"role": "assistant", "content": "a cat"},
                {"role": "user", "content": [image(second), {"type": "text", "text": "red green blue yellow"}]}]
    code, reply = s.post("/v1/messages", {"model": "m", "max_tokens": 2, "messages": messages})
    assert code == 200, reply
    chat = ask(first, "What is in the image?") + [{"role": "assistant", "content": "a cat"}]
    chat += [{"role": "user", "content": ask(second, "red green blue yellow")[0]["content"]}]
    assert s.chat({"messages": chat, "max_tokens": 2})[0] == 200
    rows = kept_rows(server_log(s, 4))
    assert len(rows) == 4 and rows[:2] == rows[2:]


def test_server_without_the_encoder_cache_encodes_every_turn(server, tmp_path):
    """The control for the count above: --image-cache-mib 0 encodes the picture again each turn."""
    image = picture(tmp_path, *SIZE, seed=4)
    s = server("qwen", "--image-cache-mib", "0", "--image-keep", "7")
    messages = ask(image, "What is in the image?")
    assert s.chat({"messages": messages, "max_tokens": 2})[0] == 200
    messages += [{"role": "assistant", "content": "a cat"}, {"role": "user", "content": "Which colour?"}]
    assert s.chat({"messages": messages, "max_tokens": 2})[0] == 200
    log = server_log(s, 2)
    assert len(re.findall(r"image rows: chunk \d+ keeps \d+ of \d+: [\d ]+; encoded in", log)) == 2
    assert "from the encoder cache" not in log


@pytest.mark.parametrize("family", ["qwen", "gemma"])
def test_server_variants_per_request_and_by_flag(server, tools, pairs, tmp_path, family):
    image = picture(tmp_path, *SIZE, seed=6)
    variant = {"alignment": "cosine", "stage1_ratio": "adaptive"}
    [want] = python(tools, pairs[family], [ask(image)], {"keep": 6, **variant})
    s = server(family)
    code, _ = s.chat(chat_body(image, QUESTION, image_keep=6, image_alignment="cosine", image_stage1_ratio="adaptive"))
    assert code == 200
    flagged = server(family, "--image-keep", "6", "--image-alignment", "cosine", "--image-stage1-ratio", "adaptive")
    assert flagged.chat(chat_body(image, QUESTION))[0] == 200
    assert kept_rows(server_log(s)) == kept_rows(server_log(flagged)) == want["indices"]


@pytest.mark.parametrize("extra, message", [({"image_alignment": "manhattan"}, "unknown alignment"),
                                            ({"image_alignment": 3}, "image_alignment"),
                                            ({"image_stage1_ratio": 0}, "image_stage1_ratio"),
                                            ({"image_stage1_ratio": "sometimes"}, "image_stage1_ratio"),
                                            ({"image_prune_method": "best"}, "unknown method"),
                                            ({"image_keep": 40}, "40 kept rows > the physical batch size")])
def test_server_bad_settings_are_400s_and_it_goes_on(server, tmp_path, extra, message):
    image = picture(tmp_path, *SIZE)
    s = server("gemma", "-b", "32", "-ub", "32")
    code, error = s.chat(chat_body(image, QUESTION, **{"image_keep": 6, **extra}))
    assert code == 400 and message in json.dumps(error)
    code, good = s.chat(chat_body(image, QUESTION, image_keep=20))
    assert code == 200 and good["choices"][0]["message"]["content"] is not None


def test_server_completion_refuses_malformed_chat_route_fields(server, tmp_path):
    """The chat route's own per-image texts, sent malformed to the completion endpoint: a 400, and on."""
    image = picture(tmp_path, *SIZE)
    s = server("qwen")
    marker = json.loads(s.get("/props")[1])["media_marker"]
    prompt = {"prompt_string": marker + QUESTION,
              "multimodal_data": [base64.b64encode(image.read_bytes()).decode()]}
    body = {"prompt": prompt, "n_predict": 1, "image_keep": 5}
    code, error = s.post("/completion", dict(body, image_prune_texts=5, image_prune_user_texts=[]))
    assert code == 400 and "image_prune_texts" in json.dumps(error)
    assert s.post("/completion", body)[0] == 200


def test_server_token_count_refuses_bad_settings(server, tmp_path):
    s = server("qwen")
    for extra, message in (({"image_prune_method": "best"}, "unknown method"),
                           ({"image_alignment": "manhattan"}, "unknown alignment")):
        code, error = s.post("/v1/chat/completions/input_tokens", chat_body(picture(tmp_path, *SIZE), QUESTION,
                                                                             image_keep=5, **extra))
        assert code == 400 and message in json.dumps(error)


def test_server_refuses_bad_variant_flags_at_startup(tools, pairs):
    llm, mmproj = pairs["qwen"]
    for flags, message in ((("--image-alignment", "manhattan"), "unknown alignment"),
                           (("--image-stage1-ratio", "2"), "--image-stage1-ratio")):
        done = subprocess.run([str(tools / "llama-server"), "-m", llm, "--mmproj", mmproj, "--port", str(free_port()),
                               *flags], capture_output=True, text=True, timeout=120)
        assert done.returncode != 0 and message in done.stdout + done.stderr
