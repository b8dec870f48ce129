"""trimcpp serve's chat page (trimcpp/serve/page) in a real headless Chromium against a real server
process on the tiny LLaVA-1.5 pair: it loads with no request to another host and no console error;
attaching a picture encodes it once, before Send, and the answer does not encode it again; the
streamed answer equals the openai client's for the same request; the overlay shows the kept patches
the response names; a corrupt file shows the server's error and the chat goes on; model text is
shown as text, never run.

Chromium and its driver come from the system (Debian: ``chromium``, ``chromium-driver``), Selenium
from ``.[test]``; without them these tests skip (fail with ``TRIMCPP_REQUIRE_BUILDS=1``, as in CI).
Nothing here downloads a browser or a driver.

``python tests/test_page.py --out PNG`` takes README's screenshot with the bundled mini VLM.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trimcpp.handlers.mechanism import ImageSelection
from trimcpp.layout import chunks, pixel_rows
from trimcpp.serve.overlay import LONGEST, image_overlays
from trimcpp.serve.process import launch
from trimcpp.show import masks, picture_vision

KEEP = 8
MAX_TOKENS = 24
WHITE = (84, 84)  # the tiny mmproj's own size: no padding, one 6 x 6 grid of patches


def png_bytes(size=WHITE, colour=(255, 255, 255)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, "PNG")
    return out.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def browser_paths() -> tuple[str, str]:
    """Chromium and chromedriver from the system; skip (or fail, under TRIMCPP_REQUIRE_BUILDS=1) without."""
    found = (next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None),
             shutil.which("chromedriver"))
    missing = [name for name, path in zip(("chromium", "chromedriver"), found) if path is None]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install '.[test]')")
    if missing:
        why = f"no {', '.join(missing)}: the chat page's browser tests need them (Debian: chromium chromium-driver)"
        if os.environ.get("TRIMCPP_REQUIRE_BUILDS") == "1":
            pytest.fail(why)
        pytest.skip(why)
    return found  # type: ignore[return-value]


def open_browser(width: int = 1200, height: int = 900):
    from selenium import webdriver

    chromium, driver = browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}", "--no-first-run", "--disable-background-networking"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    """A trimmed tiny LLaVA-1.5 whose preloads only encode (attach_policy "pruned"): with "auto" the
    answer takes every row or the kept ones depending on how far the background prefill got."""
    folder = tmp_path_factory.mktemp("page")
    config = {"models": [{"model": models["llm"], "clip_model_path": models["1.5"], "n_ctx": 4096, "verbose": False,
                          "model_alias": "trim", "chat_format": "trim-llava-1-5", "keep": KEEP,
                          "attach_policy": "pruned"},
                         {"model": models["llm"], "clip_model_path": models["1.5"], "n_ctx": 1024, "verbose": False,
                          "model_alias": "stock", "chat_format": "llava-1-5"}]}
    (folder / "config.json").write_text(json.dumps(config))
    with launch("trimcpp.serve", ["--config_file", str(folder / "config.json")], log=str(folder / "server.log"),
                ready_s=120) as started:
        yield started


@pytest.fixture(scope="module")
def browser():
    driver = open_browser()
    yield driver
    driver.quit()


@pytest.fixture
def page(server, browser):
    """The page, loaded afresh (answers of at most MAX_TOKENS), its logs emptied; yields the driver."""
    browser.get(server.url + "/")
    wait(browser, "document.body.dataset.ready === 'yes'")
    browser.execute_script(f"document.getElementById('max-tokens').value = {MAX_TOKENS};")
    browser.get_log("browser")
    browser.get_log("performance")
    return browser


def wait(driver, condition: str, timeout: float = 60):
    """Until the JavaScript expression `condition` is truthy; its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = driver.execute_script(f"return ({condition});")
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {condition}; page text:\n"
                                 + driver.execute_script("return document.body.innerText;")[-2000:])
        time.sleep(0.05)


def requests_sent(driver) -> list[tuple[str, str]]:
    """(method, URL) of every request the page made since the last call (the performance log)."""
    sent = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            sent.append((message["params"]["request"]["method"], message["params"]["request"]["url"]))
    return sent


def give_file(driver, name: str, data: bytes, how: str = "drop", folder: Path | None = None) -> None:
    """The page gets a file as a user gives it: dropped on the page, pasted, or picked (from `folder`)."""
    if how == "pick":
        path = folder / name
        path.write_bytes(data)
        field = driver.find_element("id", "file")
        driver.execute_script("arguments[0].hidden = false;", field)
        field.send_keys(str(path))
        return
    driver.execute_script("""
        const [name, b64, how] = arguments;
        const file = new File([Uint8Array.from(atob(b64), (c) => c.charCodeAt(0))], name, {type: "image/png"});
        const data = new DataTransfer();
        data.items.add(file);
        const event = how === "paste" ? new ClipboardEvent("paste", {clipboardData: data, bubbles: true, cancelable: true})
                                      : new DragEvent("drop", {dataTransfer: data, bubbles: true, cancelable: true});
        document.body.dispatchEvent(event);
    """, name, base64.b64encode(data).decode(), how)


def ask(driver, question: str, at_once: bool = False) -> dict:
    """Types the question, sends it (`at_once`: in the page's current task, before any file read or
    preload of the pictures just given can finish), waits for every answer of the turn; the turn's
    last answer."""
    turns = driver.execute_script("return document.querySelectorAll('.turn').length;")
    if at_once:
        driver.execute_script("document.getElementById('question').value = arguments[0];"
                              "document.getElementById('composer').requestSubmit();", question)
    else:
        driver.find_element("id", "question").send_keys(question)
        driver.find_element("id", "send").click()
    wait(driver, f"document.querySelectorAll('.turn').length > {turns} && "
                 "[...document.querySelectorAll('.turn')].pop().querySelector('.answer') && "
                 "!document.getElementById('send').disabled && "
                 "[...[...document.querySelectorAll('.turn')].pop().querySelectorAll('.answer')]"
                 ".every((a) => a.dataset.drawn === 'yes')", timeout=120)
    return driver.execute_script("""
        const answers = [...[...document.querySelectorAll('.turn')].pop().querySelectorAll('.answer')];
        return answers.map((a) => ({state: a.dataset.state, label: a.querySelector('h2').textContent,
            text: a.querySelector('.answer-text').textContent, info: a.querySelector('.info').innerText,
            kept: [...a.querySelectorAll('.rows')].map((r) => Number(r.dataset.kept)),
            rows: [...a.querySelectorAll('.rows')].map((r) => Number(r.dataset.rows))}));
    """)[-1]


def encoded(server) -> int:
    status, _, body = server.request("GET", "/v1/trimcpp/preload")
    assert status == 200
    return json.loads(body)["images_encoded"]


def client_answer(server, messages: list, **body) -> dict:
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
    answer = client.chat.completions.create(model="trim", messages=messages, extra_body={"trimcpp": {"overlay": True}},
                                            **body)
    return {"text": answer.choices[0].message.content, **answer.model_extra["trimcpp"]}


def picture_of(url: str) -> np.ndarray:
    """A data: URL's picture as an RGB array."""
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))


def test_page_is_served_with_a_policy_and_loads_nothing_from_elsewhere(server, browser):
    status, headers, body = server.request("GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html") and b"page/app.js" in body
    policy = headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy and "connect-src 'self'" in policy
    for name in ("app.js", "style.css"):
        assert server.request("GET", f"/page/{name}")[0] == 200
    assert server.request("GET", "/page/app.py")[0] == 404  # the page's three files only
    browser.get_log("performance")
    browser.get(server.url + "/")
    wait(browser, "document.body.dataset.ready === 'yes'")
    sent = requests_sent(browser)
    assert sent and all(url.startswith(server.url + "/") for _, url in sent), sent
    assert ("GET", server.url + "/v1/models") in sent
    models = browser.execute_script("return [...document.querySelectorAll('#model option')].map((o) => o.value);")
    assert models == ["trim", "stock"]
    methods = browser.execute_script("return [...document.querySelectorAll('#method option')].map((o) => o.value);")
    assert methods[0] == "" and "trimtokenator" in methods and "divprune" in methods
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []


def test_attach_encodes_once_before_send_and_the_answer_equals_the_clients(models, server, page, tmp_path):
    before = encoded(server)
    picture = png_bytes()
    give_file(page, "white.png", picture, how="pick", folder=tmp_path)
    wait(page, "document.querySelector('.chip') && document.querySelector('.chip').dataset.status === 'ready'")
    assert encoded(server) == before + 1  # encoded on attach, before the question
    assert [m for m, url in requests_sent(page) if url.endswith("/v1/trimcpp/preload")] == ["POST"]
    question = "What is in the picture?"
    answer = ask(page, question)
    assert answer["state"] == "done", answer
    assert encoded(server) == before + 1  # the question found the rows: no second encode
    assert "encoded before you asked" in answer["info"]
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(picture)}},
                                             {"type": "text", "text": question}]}]
    expected = client_answer(server, messages, temperature=0, max_tokens=MAX_TOKENS)
    assert answer["text"] == expected["text"]
    assert answer["kept"] == [image["kept"] for image in expected["images"]] == [KEEP]
    assert answer["rows"] == [36]

    # The overlay (drawn by the server): a white picture, so a kept patch is bright, a dropped one dim.
    url = page.execute_script("return document.querySelector('.turn img.overlay').src;")
    pixels = picture_of(url).mean(axis=2)
    assert pixels.shape == WHITE[::-1]
    cells = pixels.reshape(6, 14, 6, 14).mean(axis=(1, 3))
    assert np.all((abs(cells - 255) < 8) | (abs(cells - 255 * 0.3) < 8)), cells  # each patch wholly one or the other
    bright = {int(i) for i in np.flatnonzero(cells.ravel() > 160)}
    [indices] = expected["images"][0]["indices"]
    vision = picture_vision(models["1.5"])
    rows = pixel_rows(vision, chunks(vision, *WHITE)[0], *WHITE)[7::14, 7::14].ravel()  # each patch's row
    assert bright == {cell for cell, row in enumerate(rows) if row in indices}
    pixelless = [row for row in indices if row not in rows]  # a kept row no patch of the picture shows (class token)
    assert len(bright) + len(pixelless) == answer["kept"][0], (bright, pixelless)

    # A stream gives the overlay in a last chunk without choices, after the answer.
    chunks_ = [chunk for _, chunk in server.stream({"model": "trim", "messages": messages, "max_tokens": 4,
                                                    "temperature": 0, "trimcpp": {"overlay": True}})]
    assert "overlay" not in chunks_[0]["trimcpp"]["images"][0] and chunks_[0]["trimcpp"]["first_token_seconds"] > 0
    assert chunks_[-1]["choices"] == [] and chunks_[-1]["trimcpp"]["images"][0]["overlay"][0]["title"] == "image"
    assert [e for e in page.get_log("browser") if e["level"] == "SEVERE"] == []
    page.save_screenshot(str(tmp_path / "page.png"))


def test_compare_asks_with_every_row_and_with_the_keep_side_by_side(server, page):
    give_file(page, "grey.png", png_bytes(colour=(90, 120, 150)), how="drop")
    wait(page, "document.querySelector('.chip').dataset.status === 'ready'")
    page.find_element("id", "compare").click()
    page.execute_script("document.getElementById('keep-kind').value = 'count';"
                        "document.getElementById('keep-kind').dispatchEvent(new Event('change'));")
    page.find_element("id", "keep-value").clear()
    page.find_element("id", "keep-value").send_keys("4")
    ask(page, "Describe it.")
    answers = page.execute_script("""return [...[...document.querySelectorAll('.turn')].pop().querySelectorAll('.answer')]
        .map((a) => [a.querySelector('h2').textContent, Number(a.querySelector('.rows').dataset.kept), a.dataset.state]);""")
    assert answers == [["every row", 36, "done"], ["keep 4", 4, "done"]]
    # A follow-up in the same conversation: the picture of the first turn is still there, kept as chosen.
    page.find_element("id", "compare").click()
    follow = ask(page, "And its colour?")
    assert follow["state"] == "done" and follow["kept"] == [4]


def test_a_corrupt_file_shows_the_servers_error_and_the_chat_goes_on(server, page):
    give_file(page, "broken.png", b"not a png at all", how="paste")
    status = wait(page, "document.querySelector('.chip').dataset.status === 'failed' && "
                        "document.querySelector('.chip .status').textContent")
    assert "not an image" in status, status
    answer = ask(page, "Hello?")
    assert answer["state"] == "done" and answer["kept"] == []  # sent without the broken picture
    give_file(page, "white.png", png_bytes(), how="drop")
    wait(page, "document.querySelector('.chip') && document.querySelector('.chip').dataset.status === 'ready'")
    assert ask(page, "And now?")["kept"] == [KEEP]


def test_model_text_is_shown_as_text_and_runs_nothing(server, page):
    evil = '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2">'
    grammar = 'root ::= "' + evil.replace('"', '\\"') + '"'
    page.find_element("css selector", "details summary").click()
    page.find_element("id", "extra").send_keys(json.dumps({"grammar": grammar, "max_tokens": 200}))
    answer = ask(page, "Say something.")
    assert answer["state"] == "done" and answer["text"] == evil
    # The markup never became elements (a <script> set through innerHTML would not run either, and the
    # policy blocks inline handlers: the element count is the check that matters).
    assert page.execute_script("return window.pwned === undefined && document.querySelectorAll('#log img[src=x], "
                               "#log script').length === 0;")
    assert [e for e in page.get_log("browser") if e["level"] == "SEVERE"] == []


def test_bad_keep_is_the_servers_400_in_the_turn(server, page):
    page.execute_script("document.getElementById('keep-kind').value = 'count';"
                        "document.getElementById('keep-kind').dispatchEvent(new Event('change'));")
    page.find_element("id", "keep-value").clear()
    page.find_element("id", "keep-value").send_keys("2.5")
    answer = ask(page, "Hello?")
    assert answer["state"] == "failed" and "keep must be 0" in answer["info"], answer
    assert page.execute_script("return document.getElementById('question').value;") == "Hello?"  # given back


def start_a_long_answer(page) -> None:
    """Sends a question whose answer a grammar makes about 3000 tokens long (seconds to stream whole),
    and waits for its first text."""
    long = "root ::= " + " ".join(['"word "'] * 1500)
    page.execute_script("document.getElementById('extra').value = arguments[0];",
                        json.dumps({"grammar": long, "max_tokens": 3500}))
    page.find_element("id", "question").send_keys("Talk.")
    page.find_element("id", "send").click()
    wait(page, "document.querySelector('.answer-text') && document.querySelector('.answer-text').textContent.length > 0")


def test_stop_ends_the_answer_and_the_chat_goes_on(server, page):
    page.find_element("id", "compare").click()  # stopped, the turn's second answer never starts
    start_a_long_answer(page)
    page.find_element("id", "stop").click()
    wait(page, "document.querySelector('.answer').dataset.state === 'stopped' && !document.getElementById('send').disabled")
    stopped = page.execute_script("return document.querySelector('.answer-text').textContent;")
    assert stopped.startswith("word ") and len(stopped) < 1500 * 5
    assert page.execute_script("return document.querySelectorAll('.answer').length;") == 1
    page.find_element("id", "compare").click()
    page.execute_script("document.getElementById('extra').value = '';")
    assert ask(page, "Hello?")["state"] == "done"


def test_several_pictures_in_a_turn_and_a_new_chat_forgets_them(server, page):
    for seed, how in ((1, "drop"), (2, "paste")):
        give_file(page, f"p{seed}.png", png_bytes(colour=(40 * seed, 200, 90)), how=how)
    # Sent at once, before either picture is read: the turn waits for both.
    answer = ask(page, "Compare them.", at_once=True)
    assert answer["kept"] == [KEEP, KEEP]
    assert page.execute_script("return document.querySelectorAll('.turn img.overlay').length;") == 2
    assert ask(page, "Which is greener?")["kept"] == [KEEP, KEEP]  # a follow-up: both pictures are still there
    page.find_element("id", "new-chat").click()
    assert page.execute_script("return document.querySelectorAll('.turn').length;") == 0
    give_file(page, "p3.png", png_bytes(colour=(10, 20, 30)))
    wait(page, "document.querySelector('.chip').dataset.status === 'ready'")
    assert ask(page, "And this one?")["kept"] == [KEEP]  # a new conversation: one picture


def test_a_picture_attached_during_an_answer_waits_for_the_next_turn(server, page):
    start_a_long_answer(page)
    give_file(page, "later.png", png_bytes(colour=(0, 128, 0)))
    assert page.execute_script("return document.querySelector('.chip').dataset.status;") == "queued"
    page.find_element("id", "stop").click()
    wait(page, "document.querySelector('.answer').dataset.state === 'stopped' && "
               "document.querySelector('.chip') && document.querySelector('.chip').dataset.status === 'ready'")
    page.execute_script("document.getElementById('extra').value = '';")
    assert page.execute_script("return document.querySelector('.turn .user img') === null;")  # not in the first turn
    assert ask(page, "What is it?")["kept"] == [KEEP]


def test_a_new_chat_during_an_answer_leaves_nothing_of_it(server, page):
    give_file(page, "a.png", png_bytes(colour=(0, 0, 255)))
    wait(page, "document.querySelector('.chip').dataset.status === 'ready'")
    start_a_long_answer(page)
    page.find_element("id", "new-chat").click()
    wait(page, "!document.getElementById('send').disabled")
    assert page.execute_script("return document.querySelectorAll('.turn').length;") == 0
    page.execute_script("document.getElementById('extra').value = '';")
    give_file(page, "b.png", png_bytes(colour=(255, 0, 0)))
    wait(page, "document.querySelector('.chip').dataset.status === 'ready'")
    assert ask(page, "And this one?")["kept"] == [KEEP]  # only b.png: the interrupted turn and its picture are gone


def test_the_api_key_is_asked_once_and_kept_in_memory(models, tmp_path, browser):
    from selenium.webdriver.common.keys import Keys

    args = ["--model", models["llm"], "--clip_model_path", models["1.5"], "--chat_format", "trim-llava-1-5",
            "--n_ctx", "512", "--verbose", "False", "--api_key", "sesame"]
    with launch("trimcpp.serve", args, log=str(tmp_path / "server.log"), ready_s=120, api_key="sesame") as locked:
        assert locked.request("GET", "/v1/models", key=False)[0] == 401
        browser.get(locked.url + "/")
        wait(browser, "document.getElementById('key-dialog').open")
        browser.find_element("id", "key").send_keys(Keys.ESCAPE)  # no key: the page still loads, without models
        wait(browser, "document.body.dataset.ready === 'yes'")
        assert browser.execute_script("return document.querySelectorAll('#model option').length;") == 0
        give_file(browser, "white.png", png_bytes())  # the preload needs the key: asked again
        wait(browser, "document.getElementById('key-dialog').open")
        browser.find_element("id", "key").send_keys("sesame")
        browser.find_element("css selector", "#key-form button[value=ok]").click()
        wait(browser, "document.querySelector('.chip').dataset.status === 'ready'")
        assert ask(browser, "Hello?")["state"] == "done"
        assert not browser.execute_script("return document.getElementById('key-dialog').open;")  # asked once
        assert browser.execute_script("return localStorage.length + sessionStorage.length + document.cookie.length;") == 0


def test_a_stock_model_answers_on_the_page_without_an_overlay(server, page):
    page.execute_script("document.getElementById('model').value = 'stock';")
    give_file(page, "white.png", png_bytes())
    status = wait(page, "['attached', 'ready', 'failed'].includes(document.querySelector('.chip').dataset.status) && "
                        "document.querySelector('.chip .status').textContent")
    assert status.startswith("attached") and "does not prune images" in status, status  # preloads: trimmed models
    answer = ask(page, "What is it?")
    assert answer["state"] == "done" and answer["kept"] == []
    assert page.execute_script("return document.querySelectorAll('.turn img.overlay').length;") == 0


def test_page_can_be_turned_off(models, tmp_path):
    args = ["--model", models["llm"], "--clip_model_path", models["1.5"], "--chat_format", "trim-llava-1-5",
            "--n_ctx", "512", "--verbose", "False", "--page", "False"]
    with launch("trimcpp.serve", args, log=str(tmp_path / "server.log"), ready_s=120) as off:
        assert off.request("GET", "/")[0] == 404
        assert off.request("GET", "/page/app.js")[0] == 404


def test_overlays_of_a_sliced_picture_are_the_slices_and_the_overview(models):
    """trimcpp.serve.overlay on a LLaVA-1.6 selection (no browser): one JPEG per panel, at most LONGEST a
    side, bright where trimcpp.show.masks (sampled at that size) keeps; what it cannot draw, it says."""
    big = png_bytes((1200, 500), (200, 10, 10))  # wider than 84 px: slices of 36 rows, then the overview
    vision = picture_vision(models["1.6"])
    n = len(chunks(vision, 1200, 500))
    indices = [np.array([0, 5, 35 - i]) for i in range(n)]
    selection = ImageSelection(image=0, rows=36 * n, kept=3 * n, chunk_rows=[36] * n, indices=indices)
    [drawn] = image_overlays(models["1.6"], [big], [selection])
    assert drawn["indices"] == [list(map(int, rows)) for rows in indices]
    expected = masks(vision, 1200, 500, indices, out=(LONGEST, round(500 * LONGEST / 1200)))
    assert [panel["title"] for panel in drawn["overlay"]] == [title for title, _ in expected] == [f"{n - 1} slices", "overview"]
    for panel, (_, mask) in zip(drawn["overlay"], expected):
        red = picture_of(panel["url"])[..., 0]
        assert red.shape == (213, LONGEST) and 0 < mask.sum() < mask.size
        assert np.mean((red > 130) == mask) > 0.98  # 200 kept, 60 dimmed; JPEG blurs the edges of blocks
    selection.chunk_rows = [36]  # libmtmd cut it otherwise than the layout: no overlay, and why
    [drawn] = image_overlays(models["1.6"], [big], [selection])
    assert drawn["overlay"] is None and "the layout expected" in drawn["overlay_error"]
    [drawn] = image_overlays(str(Path(models["1.6"]).with_suffix(".missing")), [big], [selection])
    assert drawn["overlay"] is None and drawn["overlay_error"]  # a projector the layout cannot read: said, no 500


def screenshot(out: str) -> None:
    """README's screenshot: the bundled mini VLM answers about a picture of the quality benchmark."""
    from trimcpp.quality.evaluate import DATA

    scenes, minivlm = DATA / "scenes-test", DATA / "minivlm"
    question = json.loads((scenes / "questions.json").read_text())[0]
    args = ["--model", str(minivlm / "llm.gguf"), "--clip_model_path", str(minivlm / "mmproj.gguf"),
            "--chat_format", "trim-llava-1-5", "--keep", "32", "--n_ctx", "1024", "--verbose", "False",
            "--model_alias", "minivlm"]
    with tempfile.TemporaryDirectory() as logs, launch("trimcpp.serve", args, log=f"{logs}/server.log", ready_s=120) as started:
        driver = open_browser(1000, 860)
        try:
            driver.get(started.url + "/")
            wait(driver, "document.body.dataset.ready === 'yes'")
            give_file(driver, question["image"], (scenes / question["image"]).read_bytes())
            wait(driver, "document.querySelector('.chip').dataset.status === 'ready'")
            driver.find_element("id", "compare").click()
            answer = ask(driver, question["question"])
            print(f"{question['question']} -> {answer['text']!r} (label {question['answer']!r})")
            driver.save_screenshot(out)
        finally:
            driver.quit()


if __name__ == "__main__":
    screenshot(sys.argv[sys.argv.index("--out") + 1] if "--out" in sys.argv else "page.png")
