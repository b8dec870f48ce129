"""patches/llama.cpp: llama.cpp's own tools (llama-mtmd-cli, llama-server) with trimcpp's row
selection, checked against the Python handlers on the tiny random-weight pair (trimcpp.testing).

The tools come from patches/build-llama-cpp.sh; TRIMCPP_LLAMA_BIN names the folder that holds them.
The Python side runs llama-cpp-python on the same build's libraries (LLAMA_CPP_LIB_PATH), so that both
sides encode with the same libmtmd (class-token fix included) and compute the same floats: greedy
answers compare token for token. Without TRIMCPP_LLAMA_BIN these tests skip, unless
TRIMCPP_REQUIRE_BUILDS=1 (CI), which fails them.
"""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from llama_cpp.llama_chat_format import Llava15ChatHandler, Llava16ChatHandler
from PIL import Image

from trimcpp.testing import cache_dir

from helpers import ROWS

# The prompts llama-cpp-python's handlers render for one user turn (image first), as templates that
# llama.cpp's tools accept (their message is the media marker followed by the question).
TEMPLATES = {
    "1.5": Llava15ChatHandler.DEFAULT_SYSTEM_MESSAGE + "{% for message in messages %}{% if message.role == 'user' %}"
           "\nUSER: {{ message.content }}{% endif %}{% endfor %}{% if add_generation_prompt %}\nASSISTANT: {% endif %}",
    "1.6": Llava16ChatHandler.DEFAULT_SYSTEM_MESSAGE + "{% for message in messages %}{% if message.role == 'user' %}"
           "{{ message.content | replace('<__media__>', '<__media__>\n') }}{% endif %}{% endfor %}"
           "{% if add_generation_prompt %}Answer:{% endif %}",
}
QUESTION = "What is in the image?"
N_PREDICT = 6


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> str:
    """The LLaVA-1.5 template as a file (llama-server reads templates from files)."""
    path = tmp_path_factory.mktemp("template") / "llava15.jinja"
    path.write_text(TEMPLATES["1.5"])
    return str(path)


def picture(tmp_path: Path, width: int = 84, height: int = 84, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    path = tmp_path / f"picture-{width}x{height}-{seed}.png"
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


@dataclasses.dataclass
class CliRun:
    answer: str
    prompt_tokens: int | None  # logged with --image-keep only
    kept: list[list[int]]  # per pruned image chunk
    log: str


def cli_args(tools: Path, llm: str, mmproj: str, image: Path, question: str = QUESTION, version: str = "1.5") -> list[str]:
    return [str(tools / "llama-mtmd-cli"), "-m", llm, "--mmproj", mmproj, "--image", str(image), "-p", question,
            "--jinja", "--chat-template", TEMPLATES[version], "-n", str(N_PREDICT), "--temp", "0", "-c", "1024",
            "-b", "512", "-ub", "512", "-fa", "off", "-t", "2", "--seed", "1"]


def run_cli(tools: Path, llm: str, mmproj: str, image: Path, *flags: str, question: str = QUESTION,
            version: str = "1.5") -> CliRun:
    done = subprocess.run(cli_args(tools, llm, mmproj, image, question, version) + list(flags), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    counts = re.findall(r"image rows: (\d+) prompt tokens so far", done.stderr)
    return CliRun(cli_answer(done.stdout), int(counts[-1]) if counts else None, kept_rows(done.stderr), done.stderr)


def kept_rows(log: str) -> list[list[int]]:
    """The rows each pruned image chunk kept, as the tools log them."""
    return [[int(x) for x in rows.split()] for rows in re.findall(r"image rows: chunk \d+ keeps \d+ of \d+: ([\d ]+)", log)]


def cli_answer(stdout: str) -> str:
    """llama-mtmd-cli's answer as the handlers' text: the tool frames it with newlines and prints control
    tokens (LLaVA's <unusedN>, </s>; Qwen's <|unused_N|>), which the handlers' text omits."""
    return re.sub(r"<\|?unused_?\d+\|?>|</?s>", "", stdout.removeprefix("\n").removesuffix("\n\n"))


HANDLER_PROBE = r"""
import json, sys
from llama_cpp import Llama
from llama_cpp.llama_chat_format import Llava15ChatHandler, Llava16ChatHandler
from trimcpp import TrimLlava15ChatHandler, TrimLlava16ChatHandler
from trimcpp.images import image_messages

a = json.loads(sys.argv[1])
if a["keep"] is None:
    handler = {"1.5": Llava15ChatHandler, "1.6": Llava16ChatHandler}[a["version"]](clip_model_path=a["mmproj"], verbose=False)
else:
    handler = {"1.5": TrimLlava15ChatHandler, "1.6": TrimLlava16ChatHandler}[a["version"]](
        clip_model_path=a["mmproj"], keep=a["keep"], verbose=False)
llama = Llama(model_path=a["llm"], chat_handler=handler, n_ctx=1024, n_batch=512, n_threads=2, seed=1, verbose=False)
response = llama.create_chat_completion(messages=image_messages(open(a["image"], "rb").read(), a["question"]),
                                        max_tokens=a["max_tokens"], temperature=0.0)
selection = getattr(handler, "last_selection", [])
print(json.dumps({"answer": response["choices"][0]["message"]["content"], "prompt_tokens": response["usage"]["prompt_tokens"],
                  "indices": [[k.tolist() for k in s.indices] for s in selection]}))
"""


def patched_python(tools: Path, **request) -> dict:
    """The Python handler's answer, prompt length and kept rows (one image), with llama-cpp-python running on
    the patched build's libraries (LLAMA_CPP_LIB_PATH, MTMD_CPP_LIB): the same encoder (class-token fix
    included) and the same floats as the tools. keep=None: the stock handler."""
    libs = (tools / "llama-mtmd-cli").resolve().parent
    request = {"question": QUESTION, "max_tokens": N_PREDICT, **request}
    done = subprocess.run([sys.executable, "-c", HANDLER_PROBE, json.dumps(request)], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, LLAMA_CPP_LIB_PATH=str(libs), MTMD_CPP_LIB=str(libs)),
                          cwd=libs)  # not the clone's root, whose trimcpp/ has no _core

    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("version, size, keep", [("1.5", (84, 84), "8"), ("1.5", (84, 84), "0.25"),
                                                 ("1.6", (336, 168), "20")])
def test_cli_keeps_the_handlers_rows_and_answers_the_same(tools, models, tmp_path, version, size, keep):
    image = picture(tmp_path, *size)
    run = run_cli(tools, models["llm"], models[version], image, "--image-keep", keep, version=version)
    python = patched_python(tools, version=version, llm=models["llm"], mmproj=models[version], image=str(image),
                            keep=float(keep) if "." in keep else int(keep))
    [indices] = python["indices"]
    assert run.kept == indices  # the same rows, chunk by chunk, in order
    assert sum(map(len, indices)) < ROWS * len(indices)
    assert run.prompt_tokens == python["prompt_tokens"]  # text + kept rows: what the LLM saw
    assert run.answer == python["answer"] and run.answer


def test_cli_prompt_counts_text_plus_kept_rows(tools, models, tmp_path):
    image = picture(tmp_path)
    stock = patched_python(tools, version="1.5", llm=models["llm"], mmproj=models["1.5"], image=str(image), keep=None)
    pruned = run_cli(tools, models["llm"], models["1.5"], image, "--image-keep", "5")
    assert pruned.prompt_tokens == stock["prompt_tokens"] - ROWS + 5
    assert [len(k) for k in pruned.kept] == [5]


def test_cli_same_picture_twice_is_two_images(tools, models, tmp_path):
    """Two copies of one picture (one id) in a prompt are two images, each with its own budget."""
    image = picture(tmp_path)
    run = run_cli(tools, models["llm"], models["1.5"], image, "--image", str(image), "--image-keep", "5")
    assert len(run.kept) == 2 and run.kept[0] == run.kept[1] and len(run.kept[0]) == 5


@pytest.mark.parametrize("version, size", [("1.5", (84, 84)), ("1.6", (336, 168))])
def test_cli_without_the_flag_is_the_stock_tool(tools, models, tmp_path, version, size):
    """No --image-keep: every row, no selection log, and the stock Python handler's prompt and answer."""
    image = picture(tmp_path, *size)
    run = run_cli(tools, models["llm"], models[version], image, version=version)
    stock = patched_python(tools, version=version, llm=models["llm"], mmproj=models[version], image=str(image),
                           keep=None)
    assert run.kept == [] and "image rows:" not in run.log and run.prompt_tokens is None
    assert run.answer == stock["answer"] and run.answer


def test_cli_fewer_rows_change_the_answer_control(tools, models, tmp_path):
    """The control for the equality tests: the answer depends on which rows the LLM sees."""
    image = picture(tmp_path, seed=3)
    answers = {run_cli(tools, models["llm"], models["1.5"], image, "--image-keep", k).answer
               for k in ("1", "36")}
    answers.add(run_cli(tools, models["llm"], models["1.5"], image, "--image-keep", "3",
                        "--image-prune-method", "uniform").answer)
    assert len(answers) > 1


@pytest.mark.parametrize("flags, message", [(("--image-keep", "-3"), "--image-keep"),
                                            (("--image-keep", "lots"), "--image-keep"),
                                            (("--image-keep", "1.5"), "--image-keep"),
                                            (("--image-keep", "8", "--image-prune-method", "best"), "unknown method"),
                                            (("--image-keep", "8", "--image-stage1-ratio", "0"), "--image-stage1-ratio")])
def test_cli_refuses_bad_settings_with_a_message(tools, models, tmp_path, flags, message):
    done = subprocess.run(cli_args(tools, models["llm"], models["1.5"], picture(tmp_path)) + list(flags),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert message in done.stderr


# llama-server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """llama-server on 127.0.0.1, started by the test and stopped after it."""

    def __init__(self, tools: Path, template: str | None, llm: str, mmproj: str, *flags: str, env: dict | None = None):
        """template: a chat template file; None: the GGUF's own."""
        self.port = free_port()
        self.log = tempfile.TemporaryFile("w+")  # a pipe nobody reads could fill up and stall the server
        self.process = subprocess.Popen(
            [str(tools / "llama-server"), "-m", llm, "--mmproj", mmproj, "--host", "127.0.0.1", "--port",
             str(self.port), "--jinja", *(["--chat-template-file", template] if template else []), "-c", "1024",
             "-np", "1", "-t", "2", "-fa", "off", *flags], stdout=self.log, stderr=subprocess.STDOUT, text=True,
            env=dict(os.environ, **(env or {})))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.seek(0)
                raise AssertionError(f"llama-server exited ({self.process.returncode}): {self.log.read()[-3000:]}")
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise AssertionError("llama-server did not become healthy within 120 s")

    def get(self, path: str):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as response:
            return response.status, response.read()

    def chat(self, body: dict) -> tuple[int, dict]:
        return self.post("/v1/chat/completions", body)

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}",
                                         data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def chat_body(image: Path, question: str, **extra) -> dict:
    url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": question}]}],
            "max_tokens": 4, "temperature": 0, **extra}


@pytest.fixture
def server(tools, template, models):
    started = []

    def start(*flags: str, mmproj: str = "1.5", env: dict | None = None) -> Server:
        started.append(Server(tools, template, models["llm"], models[mmproj], *flags, env=env))
        return started[-1]

    yield start
    for s in started:
        s.stop()


def test_server_image_keep_sets_the_prompt_length(server, tmp_path):
    image = picture(tmp_path)
    s = server()
    code, stock = s.chat(chat_body(image, QUESTION))
    assert code == 200
    for keep, kept in ((8, 8), (0.25, 9), ("5", 5), (0, ROWS)):
        code, pruned = s.chat(chat_body(image, QUESTION, image_keep=keep))
        assert code == 200, pruned
        assert pruned["usage"]["prompt_tokens"] == stock["usage"]["prompt_tokens"] - ROWS + kept


def test_server_llava16_counts_kept_rows_over_its_chunks(server, tmp_path):
    image = picture(tmp_path, 336, 168)  # two slices and the overview: 3 x 36 rows
    s = server(mmproj="1.6")
    _, every = s.chat(chat_body(image, QUESTION, image_keep=0))
    _, pruned = s.chat(chat_body(image, QUESTION, image_keep=20))
    assert every["usage"]["prompt_tokens"] - pruned["usage"]["prompt_tokens"] == 3 * ROWS - 20


def test_server_completion_endpoint_takes_image_keep(server, tmp_path):
    image = picture(tmp_path)
    s = server()
    marker = json.loads(s.get("/props")[1])["media_marker"]
    prompt = {"prompt_string": marker + QUESTION, "multimodal_data": [base64.b64encode(image.read_bytes()).decode()]}
    counts = {}
    for keep in (0, 5):
        code, body = s.post("/completion", {"prompt": prompt, "n_predict": 2, "temperature": 0, "image_keep": keep})
        assert code == 200, body
        counts[keep] = body["tokens_evaluated"]
    assert counts[0] - counts[5] == ROWS - 5
    code, body = s.post("/completion", {"prompt": prompt, "n_predict": 2, "image_keep": "half"})
    assert code == 400 and "image_keep" in json.dumps(body)


@pytest.mark.parametrize("version, size", [("1.5", (84, 84)), ("1.6", (336, 168))])
def test_server_token_count_endpoint_counts_kept_rows(server, tmp_path, version, size):
    """/v1/chat/completions/input_tokens (no encoding) says what a chat request's usage.prompt_tokens says."""
    image = picture(tmp_path, *size)
    s = server("--image-keep", "7", mmproj=version)
    for extra in ({}, {"image_keep": 0}, {"image_keep": 20}, {"image_keep": 0.5}):
        body = chat_body(image, QUESTION, **extra)
        code, counted = s.post("/v1/chat/completions/input_tokens", body)
        assert code == 200, counted
        assert counted["input_tokens"] == s.chat(body)[1]["usage"]["prompt_tokens"]
    code, error = s.post("/v1/chat/completions/input_tokens", chat_body(image, QUESTION, image_keep=-2))
    assert code == 400 and "image_keep" in json.dumps(error)


@pytest.mark.parametrize("how", ["flag", "env"])
def test_server_default_keep_and_request_override(server, tmp_path, how):
    image = picture(tmp_path)
    s = server("--image-keep", "6") if how == "flag" else server(env={"LLAMA_ARG_IMAGE_KEEP": "6"})
    _, default = s.chat(chat_body(image, QUESTION))
    _, every = s.chat(chat_body(image, QUESTION, image_keep=0))
    assert every["usage"]["prompt_tokens"] - default["usage"]["prompt_tokens"] == ROWS - 6


def test_server_never_reuses_rows_chosen_for_another_question(server, tools, tmp_path, models):
    """Two questions about one image that select different rows (checked with the Python handler): on a
    server that just answered the first, the second reuses the prompt cache up to the image and no
    further, and answers as a fresh server does. The control: asking the first again reuses the image."""
    image = picture(tmp_path, seed=7)
    first, second = "cat", "Describe the image."
    kept = [patched_python(tools, version="1.5", llm=models["llm"], mmproj=models["1.5"], image=str(image), keep=6,
                           question=question)["indices"] for question in (first, second)]
    assert kept[0] != kept[1]  # the premise: the questions choose different rows

    warm = server()
    rendered = warm.post("/apply-template", chat_body(image, first))[1]["prompt"]
    before_image = len(warm.post("/tokenize", {"content": rendered.split("<__media_")[0], "add_special": True})[1]["tokens"])
    assert warm.chat(chat_body(image, first, image_keep=6))[0] == 200
    _, again = warm.chat(chat_body(image, first, image_keep=6))
    assert again["timings"]["cache_n"] >= before_image + 6  # same rows: the image is reused
    code, reused = warm.chat(chat_body(image, second, image_keep=6))
    assert code == 200
    assert reused["timings"]["cache_n"] <= before_image  # other rows: not reused
    warm.stop()
    _, expected = server().chat(chat_body(image, second, image_keep=6))
    assert reused["choices"][0]["message"]["content"] == expected["choices"][0]["message"]["content"]
    assert reused["usage"]["prompt_tokens"] == expected["usage"]["prompt_tokens"]


def test_server_concurrent_requests_prune_while_others_decode(server, tmp_path):
    """Two slots, eight requests at once (pruned and not, two pictures): the server encodes pruned images
    on its HTTP threads while its loop encodes and decodes others; every answer is the one the same
    request gets alone."""
    images = [picture(tmp_path, seed=s) for s in (1, 2)]
    bodies = [chat_body(images[i % 2], QUESTION, image_keep=[0, 5, 9, "0.5"][i % 4]) for i in range(8)]
    s = server("-np", "2", "-c", "2048")
    alone = [s.chat(dict(body, cache_prompt=False)) for body in bodies]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda body: s.chat(dict(body, cache_prompt=False)), bodies))
    for (code_a, a), (code_b, b) in zip(alone, together):
        assert code_a == code_b == 200
        assert a["usage"] == b["usage"]
        assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]


@pytest.mark.parametrize("keep", [-1, 1.5, "lots", True, [8], 0.0])
def test_server_bad_image_keep_is_a_400_and_it_goes_on(server, tmp_path, keep):
    image = picture(tmp_path)
    s = server()
    code, error = s.chat(chat_body(image, QUESTION, image_keep=keep))
    assert code == 400
    assert "image_keep" in json.dumps(error)
    code, good = s.chat(chat_body(image, QUESTION, image_keep=4))
    assert code == 200 and good["usage"]["prompt_tokens"] > 4


def test_server_refuses_a_bad_default_at_startup(tools, template, models):
    done = subprocess.run([str(tools / "llama-server"), "-m", models["llm"], "--mmproj", models["1.5"], "--port",
                           str(free_port()), "--image-keep", "8", "--image-prune-method", "best"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "unknown method" in done.stdout + done.stderr


# The class-token fix (0001), seen through llama-cpp-python running on the patched libraries.

CLASS_TOKEN_PROBE = r"""
import dataclasses, io, json, sys
import numpy as np
from PIL import Image
from llama_cpp import Llama
import trimcpp.handlers.mechanism as mechanism
from trimcpp import TrimLlava15ChatHandler
from trimcpp.images import image_messages
from trimcpp.testing import SHAPES, write_mmproj

llm, folder = sys.argv[1], sys.argv[2]
mmproj = str(write_mmproj(folder + "/one-layer.gguf", dataclasses.replace(SHAPES["tiny"], v_layer=1), class_token=True))
seen = []
real = mechanism.prune
mechanism.prune = lambda rows, *a, **k: seen.append(np.array(rows)) or real(rows, *a, **k)
llama = Llama(model_path=llm, chat_handler=TrimLlava15ChatHandler(clip_model_path=mmproj, keep=3, verbose=False),
              n_ctx=1024, verbose=False)

def rows(pixels):
    seen.clear()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    llama.create_chat_completion(messages=image_messages(buffer.getvalue(), "hi"), max_tokens=1)
    return seen[0]

grey = np.full((84, 84, 3), 128, np.uint8)
base = rows(grey)
changed = {}
for py, px in ((0, 0), (0, 1), (2, 3), (5, 5)):
    pixels = grey.copy()
    pixels[14 * py: 14 * py + 14, 14 * px: 14 * px + 14] = 250
    changed[f"{py},{px}"] = np.flatnonzero(np.abs(rows(pixels) - base).max(axis=1) > 1e-4).tolist()
from trimcpp.layout import class_token_last
print(json.dumps({"rows": int(base.shape[0]), "changed": changed, "class_token_last": class_token_last()}))
"""


def test_class_token_fix_gives_patches_in_raster_order(tools, models, tmp_path):
    """With 0001, a one-layer mmproj's row r carries patch r (raster order) and no row is the class
    token; unpatched libmtmd gives patch r + 1 in row r (tests/test_cli.py checks that), and
    trimcpp.layout.class_token_last tells the two apart."""
    libs = (tools / "llama-mtmd-cli").resolve().parent
    env = dict(os.environ, LLAMA_CPP_LIB_PATH=str(libs), MTMD_CPP_LIB=str(libs))
    done = subprocess.run([sys.executable, "-c", CLASS_TOKEN_PROBE, models["llm"], str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["rows"] == ROWS
    assert result["changed"] == {"0,0": [0], "0,1": [1], "2,3": [15], "5,5": [35]}
    assert result["class_token_last"] is False  # so `trimcpp show` maps row r to patch r here


# patches/build-llama-cpp.sh: its failures say what went wrong. It runs from a copy of patches/ with
# the sdist the CI build downloaded, so nothing is fetched and nothing is built.

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def script_copy(tools, tmp_path):
    """(copy of build-llama-cpp.sh in a copied patches/, an --out folder, environment with a downloads
    folder that holds the sdist)."""
    downloads = Path(os.environ.get("TRIMCPP_DOWNLOADS") or cache_dir() / "downloads")
    sdist = next(downloads.glob("llama_cpp_python-*.tar.gz"), None)
    if sdist is None:
        message = f"no llama-cpp-python sdist in {downloads}, where patches/build-llama-cpp.sh keeps it"
        if os.environ.get("TRIMCPP_REQUIRE_BUILDS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    (tmp_path / "patches").mkdir()
    for path in (ROOT / "patches").rglob("*"):
        target = tmp_path / "patches" / path.relative_to(ROOT / "patches")
        if path.is_dir():
            target.mkdir(exist_ok=True)
        else:
            target.write_bytes(path.read_bytes())
            target.chmod(path.stat().st_mode)
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / sdist.name).symlink_to(sdist)
    env = dict(os.environ, TRIMCPP_DOWNLOADS=str(tmp_path / "downloads"))
    return tmp_path / "patches" / "build-llama-cpp.sh", tmp_path / "out", env


def test_build_script_names_a_patch_that_does_not_apply(script_copy):
    script, out, env = script_copy
    broken = next(script.parent.glob("llama.cpp/0002-*.patch"))
    lines = broken.read_text().split("\n")
    hunk = next(i for i, line in enumerate(lines) if line.startswith("@@"))
    context = next(i for i in range(hunk + 1, len(lines)) if lines[i].startswith(" ") and lines[i].strip())
    lines[context] = " // a line llama.cpp does not have"  # the hunk's context no longer matches
    broken.write_text("\n".join(lines))
    done = subprocess.run(["bash", str(script), "--out", str(out)], capture_output=True, text=True, timeout=300,
                          env=env)
    assert done.returncode != 0
    assert f"{broken.name} does not apply" in done.stderr
    assert "applied 0001-" in done.stdout  # the patch before it did apply


def test_build_script_checks_the_sdist(script_copy):
    script, out, env = script_copy
    sdist = next(Path(env["TRIMCPP_DOWNLOADS"]).iterdir())
    sdist.unlink()
    sdist.write_bytes(b"not the sdist")
    done = subprocess.run(["bash", str(script), "--out", str(out)], capture_output=True, text=True, timeout=300,
                          env=env)
    assert done.returncode != 0
    assert "expected 832db069" in done.stderr and "delete it to download again" in done.stderr
