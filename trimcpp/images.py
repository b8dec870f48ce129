"""Images as users hand them over: the bytes of a path, standard input or a ``data:`` URI, and the
chat message that carries one to a handler. Nothing is downloaded."""

from __future__ import annotations

import base64
import io
import sys
from typing import Any

from PIL import Image, UnidentifiedImageError


def read_image(source: str) -> bytes:
    """The image bytes from a path, ``-`` (standard input) or a ``data:`` URI, checked with pillow
    (ValueError naming the problem)."""
    if source.startswith("data:"):
        try:
            data = base64.b64decode(source.split(",", 1)[1], validate=True)
        except (IndexError, ValueError):
            raise ValueError("the image data URI is not base64 (expected data:image/...;base64,...)") from None
    elif "://" in source:
        raise ValueError(f"images are not downloaded ({source!r}); save it and pass the file's path")
    elif source == "-":
        data = sys.stdin.buffer.read()
    else:
        try:
            with open(source, "rb") as f:
                data = f.read()
        except OSError as error:
            raise ValueError(f"cannot read image {source!r}: {error.strerror or error}") from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise ValueError(f"cannot read image {source!r}: not an image pillow can decode ({error})") from None
    return data


def image_messages(image: bytes, question: str) -> list[dict[str, Any]]:
    """One user turn with the image (as a data URI) and the question, as the chat handlers take it."""
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": question}]}]
