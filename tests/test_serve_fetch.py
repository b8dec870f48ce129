"""trimcpp serve's image policy (trimcpp.serve.fetch), without a model: data: URIs, file: under a
folder, http(s) from a local server started here, and every refusal."""

from __future__ import annotations

import base64
import http.server
import io
import os
import threading
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from trimcpp.serve.fetch import ImagePolicy, ImageRefused, localise, resolve

from helpers import image_url


def encoded(fmt: str = "PNG", size=(40, 30), seed: int = 0, mode: str = "RGB") -> bytes:
    pixels = (np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(out, fmt)
    return out.getvalue()


def decoded(url: str) -> np.ndarray:
    assert url.startswith("data:image/")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))


def test_data_uri_kept_as_sent_and_refusals():
    url = image_url(3)
    assert resolve(url, ImagePolicy()) == url  # the handler sees exactly what the client sent
    with pytest.raises(ImageRefused, match="base64"):
        resolve("data:image/png,rawbytes", ImagePolicy())
    with pytest.raises(ImageRefused, match="not valid base64"):
        resolve("data:image/png;base64,@@@@", ImagePolicy())
    with pytest.raises(ImageRefused, match="not an image"):
        resolve("data:image/png;base64," + base64.b64encode(b"hello world").decode(), ImagePolicy())
    truncated = encoded()[:200]
    with pytest.raises(ImageRefused, match="cannot be decoded"):
        resolve("data:image/png;base64," + base64.b64encode(truncated).decode(), ImagePolicy())
    big = encoded(size=(300, 200))
    with pytest.raises(ImageRefused, match="larger than this server's limit"):
        resolve("data:image/png;base64," + base64.b64encode(big).decode(), ImagePolicy(max_bytes=len(big) - 1))
    assert resolve("data:image/png;base64," + base64.b64encode(big).decode(), ImagePolicy(max_bytes=len(big)))
    with pytest.raises(ImageRefused, match="300x200 pixels"):
        resolve("data:image/png;base64," + base64.b64encode(big).decode(), ImagePolicy(max_pixels=300 * 200 - 1))


@pytest.mark.parametrize("url", ["ftp://example.com/a.png", "gopher://x/", "picture.png", "/etc/passwd",
                                 "javascript:alert(1)", ""])
def test_other_schemes_refused(url):
    with pytest.raises(ImageRefused, match="unsupported image URL"):
        resolve(url, ImagePolicy(allow_http=True, directory="/"))


@pytest.mark.parametrize("fmt, mode", [("WEBP", "RGB"), ("TIFF", "RGB"), ("JPEG", "CMYK")])
def test_formats_libmtmd_cannot_read_become_png(fmt, mode):
    data = encoded(fmt, mode=mode)
    url = resolve(f"data:image/{fmt.lower()};base64," + base64.b64encode(data).decode(), ImagePolicy())
    assert url.startswith("data:image/png;base64,")
    want = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert np.array_equal(decoded(url), want)


def test_file_urls_only_under_the_folder(tmp_path):
    served, outside = tmp_path / "served", tmp_path / "outside"
    served.mkdir()
    outside.mkdir()
    (served / "a.png").write_bytes(encoded(seed=1))
    (outside / "b.png").write_bytes(encoded(seed=2))
    os.symlink(outside / "b.png", served / "link.png")
    policy = ImagePolicy(directory=str(served))
    with pytest.raises(ImageRefused, match="file: image URLs are off"):
        resolve((served / "a.png").as_uri(), ImagePolicy())
    got = resolve((served / "a.png").as_uri(), policy)
    assert got == "data:image/png;base64," + base64.b64encode(encoded(seed=1)).decode()
    for escape in [(outside / "b.png").as_uri(), f"file://{served}/../outside/b.png", (served / "link.png").as_uri(),
                   "file:///etc/passwd"]:
        with pytest.raises(ImageRefused, match="outside the folder"):
            resolve(escape, policy)
    with pytest.raises(ImageRefused, match="not on 'otherhost'"):
        resolve(f"file://otherhost{served}/a.png", policy)
    with pytest.raises(ImageRefused, match="cannot read"):
        resolve((served / "missing.png").as_uri(), policy)
    with pytest.raises(ImageRefused, match="over this server's limit"):
        resolve((served / "a.png").as_uri(), ImagePolicy(directory=str(served), max_bytes=100))


class _Handler(http.server.BaseHTTPRequestHandler):
    picture = encoded(seed=5)

    def log_message(self, *args):
        pass

    def do_GET(self):
        routes = {
            "/ok.png": lambda: self._send(self.picture),
            "/big.png": lambda: self._send(self.picture, length=10 << 20),
            "/unsized.png": self._unsized,
            "/slow.png": self._slow,
            "/to-file": lambda: self._redirect("file:///etc/passwd"),
            "/to-ok": lambda: self._redirect("/ok.png"),
        }
        routes.get(self.path, lambda: self.send_error(404))()

    def _send(self, body, length=None):
        self.send_response(200)
        self.send_header("Content-Length", str(length or len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _unsized(self):  # no Content-Length: the body ends when the connection closes
        self.send_response(200)
        self.end_headers()
        self.wfile.write(bytes(5000))
        self.close_connection = True

    def _slow(self):
        self.send_response(200)
        self.send_header("Content-Length", "100000")
        self.end_headers()
        for _ in range(40):
            self.wfile.write(bytes(100))
            self.wfile.flush()
            time.sleep(0.1)

    def _redirect(self, location):
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture(scope="module")
def web():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.protocol_version = "HTTP/1.0"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_only_when_allowed_within_limits(web):
    with pytest.raises(ImageRefused, match="http\\(s\\) image URLs are off"):
        resolve(web + "/ok.png", ImagePolicy())
    policy = ImagePolicy(allow_http=True, max_bytes=4096, timeout=1.0)
    want = "data:image/png;base64," + base64.b64encode(_Handler.picture).decode()
    assert resolve(web + "/ok.png", policy) == want
    assert resolve(web + "/to-ok", policy) == want  # http -> http redirects are followed
    with pytest.raises(ImageRefused, match="redirects to 'file:///etc/passwd'"):
        resolve(web + "/to-file", policy)
    with pytest.raises(ImageRefused, match="10485760 bytes, over"):
        resolve(web + "/big.png", policy)
    with pytest.raises(ImageRefused, match="over this server's limit of 4096"):
        resolve(web + "/unsized.png", policy)
    began = time.monotonic()
    with pytest.raises(ImageRefused, match="took over 1 s"):
        resolve(web + "/slow.png", ImagePolicy(allow_http=True, timeout=1.0))
    assert time.monotonic() - began < 3
    with pytest.raises(ImageRefused, match="answered HTTP 404"):
        resolve(web + "/missing.png", policy)
    with pytest.raises(ImageRefused, match="cannot download"):
        resolve("http://127.0.0.1:9/none.png", policy)  # nothing listens on the discard port


def test_https_is_never_redirected_down_to_http():
    from trimcpp.serve.fetch import _HttpRedirects

    request = urllib.request.Request("https://example.com/a.png")
    with pytest.raises(ImageRefused, match="never from https to http"):
        _HttpRedirects().redirect_request(request, None, 302, "Found", {}, "http://example.com/a.png")
    assert _HttpRedirects().redirect_request(request, None, 302, "Found", {}, "https://example.org/b.png") is not None


def test_localise_rewrites_every_image_of_every_user_message(tmp_path):
    (tmp_path / "a.png").write_bytes(encoded(seed=7))
    first, second = image_url(1), (tmp_path / "a.png").as_uri()
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": first}}, {"type": "text", "text": "q"}]},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": [{"type": "image_url", "image_url": second}, {"type": "text", "text": "q2"}]},
    ]
    got = localise(messages, ImagePolicy(directory=str(tmp_path)))
    assert got[1]["content"][0]["image_url"]["url"] == first
    assert got[3]["content"][0]["image_url"] == "data:image/png;base64," + base64.b64encode(encoded(seed=7)).decode()
    assert messages[3]["content"][0]["image_url"] == second  # the request's own messages are not changed
    bad = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": first}},
                                        {"type": "image_url", "image_url": {"url": "file:///x.png"}}]}]
    with pytest.raises(ImageRefused, match="^image 2: file: image URLs are off"):
        localise(bad, ImagePolicy())
    with pytest.raises(ImageRefused, match="image_url must be"):
        localise([{"role": "user", "content": [{"type": "image_url", "image_url": {"uri": first}}]}], ImagePolicy())
