"""The images of a chat request, fetched and checked before the request waits for the model.

llama-cpp-python's handlers hand any image URL that is not ``data:`` to ``urllib.request.urlopen``
(no timeout, no size limit, any scheme: ``file://`` reads the server's files) while the request holds
the model. Here every image URL of a request is resolved first, under the operator's
:class:`ImagePolicy`, and replaced by a ``data:`` URI of the checked bytes, so the handler never
opens anything:

- ``data:`` URIs (base64): always;
- ``http(s)``: only with ``allow_http``, within ``timeout`` seconds in all, at most ``max_bytes``;
  redirects are followed only to http(s), never from https down to http;
- ``file:``: only under ``directory`` (symbolic links resolved first);
- anything else is refused.

The bytes must be a picture pillow decodes of at most ``max_pixels``; formats libmtmd cannot read
(WebP, TIFF, ...) are handed over as PNG. A refusal is an :class:`ImageRefused` (a ValueError) that
says what to do instead.
"""

from __future__ import annotations

import base64
import binascii
import copy
import dataclasses
import io
import os
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from typing import Any, Optional

from PIL import Image, UnidentifiedImageError

from ..handlers.mechanism import image_parts, part_url

# What libmtmd's decoder (stb_image) reads as is; other pillow formats are converted to PNG.
LIBMTMD_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "GIF": "image/gif", "BMP": "image/bmp"}


class ImageRefused(ValueError):
    """An image URL the server will not use, and why."""


@dataclasses.dataclass(frozen=True)
class ImagePolicy:
    """Where a request's images may come from, and how big they may be."""

    allow_http: bool = False
    directory: Optional[str] = None
    timeout: float = 10.0
    max_bytes: int = 20 << 20
    max_pixels: int = 40_000_000

    @classmethod
    def from_settings(cls, settings: Any) -> ImagePolicy:
        """The policy of a :class:`trimcpp.serve.settings.TrimServerSettings`."""
        return cls(allow_http=settings.allow_http_images, directory=settings.image_dir, timeout=settings.image_timeout,
                   max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels)


def localise(messages: list[Any], policy: ImagePolicy) -> list[Any]:
    """A copy of `messages` whose image URLs are ``data:`` URIs of checked bytes (ImageRefused if not)."""
    messages = copy.deepcopy(messages)
    for i, (_, part) in enumerate(image_parts(messages)):
        url = part_url(part)
        if url is None:
            raise ImageRefused(f"image {i + 1}: image_url must be a URL string or {{\"url\": ...}}")
        try:
            local = resolve(url, policy)
        except ImageRefused as error:
            raise ImageRefused(f"image {i + 1}: {error}") from None
        if isinstance(part["image_url"], dict):
            part["image_url"]["url"] = local
        else:
            part["image_url"] = local
    return messages


def resolve(url: str, policy: ImagePolicy) -> str:
    """A ``data:`` URI of the checked image `url` names (`url` itself when it is one already)."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        data = _from_data_uri(url, policy)
    elif scheme in ("http", "https"):
        if not policy.allow_http:
            raise ImageRefused("http(s) image URLs are off on this server (its operator can allow them with "
                               "--allow_http_images true); send the image as a data: URI")
        data = _download(url, policy)
    elif scheme == "file":
        data = _from_file(url, policy)
    else:
        raise ImageRefused(f"unsupported image URL {_short(url)}: send a data:image/...;base64 URI")
    mime, converted = _checked(data, policy)
    if scheme == "data" and converted is None:
        return url
    return f"data:{mime};base64," + base64.b64encode(converted or data).decode()


def _short(url: str) -> str:
    return repr(url if len(url) <= 80 else url[:77] + "...")


def _from_data_uri(url: str, policy: ImagePolicy) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or not header.lower().endswith(";base64"):
        raise ImageRefused("a data: image URI must be base64 (data:image/png;base64,...)")
    if len(payload) > (policy.max_bytes + 2) // 3 * 4 + 4096:  # base64 of max_bytes, line breaks allowed
        raise ImageRefused(f"image is larger than this server's limit of {policy.max_bytes} bytes")
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except binascii.Error:
        raise ImageRefused("the data: URI is not valid base64") from None
    if len(data) > policy.max_bytes:
        raise ImageRefused(f"image is larger than this server's limit of {policy.max_bytes} bytes")
    return data


class _HttpRedirects(urllib.request.HTTPRedirectHandler):
    """Redirects to http(s) only, and never from https to http."""

    def http_error_302(self, req, fp, code, msg, headers):
        location = headers.get("location") or headers.get("uri")
        if location:
            self._check(req.full_url, urllib.parse.urljoin(req.full_url, location))
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        self._check(req.full_url, newurl)
        return super().redirect_request(req, fp, code, msg, headers, newurl)

    @staticmethod
    def _check(old_url: str, new_url: str) -> None:
        old, new = urllib.parse.urlsplit(old_url).scheme.lower(), urllib.parse.urlsplit(new_url).scheme.lower()
        if new not in ("http", "https") or (old == "https" and new == "http"):
            raise ImageRefused(f"the image URL redirects to {_short(new_url)}; only http(s) redirects are followed, "
                               "never from https to http")


def _download(url: str, policy: ImagePolicy) -> bytes:
    opener = urllib.request.build_opener(_HttpRedirects)
    deadline = time.monotonic() + policy.timeout
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "trimcpp-serve"})
        with opener.open(request, timeout=policy.timeout) as response:
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > policy.max_bytes:
                raise ImageRefused(f"the image at {_short(url)} is {length} bytes, over this server's limit of "
                                   f"{policy.max_bytes}")
            data = bytearray()
            while len(data) <= policy.max_bytes:
                if time.monotonic() > deadline:
                    raise ImageRefused(f"downloading {_short(url)} took over {policy.timeout:g} s")
                block = response.read1(min(1 << 16, policy.max_bytes + 1 - len(data)))  # what has come
                if not block:
                    break
                data += block
    except urllib.error.HTTPError as error:
        raise ImageRefused(f"the image URL {_short(url)} answered HTTP {error.code}") from None
    except (urllib.error.URLError, OSError, ValueError) as error:
        if isinstance(error, ImageRefused):
            raise
        reason = getattr(error, "reason", error)
        raise ImageRefused(f"cannot download {_short(url)}: {reason}") from None
    if len(data) > policy.max_bytes:
        raise ImageRefused(f"the image at {_short(url)} is over this server's limit of {policy.max_bytes} bytes")
    return bytes(data)


def _from_file(url: str, policy: ImagePolicy) -> bytes:
    if policy.directory is None:
        raise ImageRefused("file: image URLs are off on this server (its operator can serve a folder with "
                           "--image_dir); send the image as a data: URI")
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise ImageRefused(f"file: image URLs name files on this machine, not on {parts.netloc!r}")
    root = os.path.realpath(policy.directory)
    path = os.path.realpath(urllib.request.url2pathname(parts.path))
    if os.path.commonpath([root, path]) != root:
        raise ImageRefused(f"{_short(url)} is outside the folder this server serves images from")
    try:
        with open(path, "rb") as f:
            data = f.read(policy.max_bytes + 1)
    except OSError as error:
        raise ImageRefused(f"cannot read {_short(url)}: {error.strerror or error}") from None
    if len(data) > policy.max_bytes:
        raise ImageRefused(f"{_short(url)} is over this server's limit of {policy.max_bytes} bytes")
    return data


def _checked(data: bytes, policy: ImagePolicy) -> tuple[str, Optional[bytes]]:
    """(MIME type, None) for an image libmtmd reads as is, ("image/png", PNG bytes) for one it does not."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > policy.max_pixels:
                    raise ImageRefused(f"image is {width}x{height} pixels, over this server's limit of "
                                       f"{policy.max_pixels}")
                image.load()
                if image.format in LIBMTMD_FORMATS and image.mode != "CMYK":
                    return LIBMTMD_FORMATS[image.format], None
                out = io.BytesIO()
                image.convert("RGBA" if "A" in image.getbands() else "RGB").save(out, format="PNG")
                return "image/png", out.getvalue()
    except ImageRefused:
        raise
    except UnidentifiedImageError:
        raise ImageRefused("not an image: pillow recognises no picture format in these bytes") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning,
            Image.DecompressionBombError) as error:
        raise ImageRefused(f"the image cannot be decoded: {error}") from None
