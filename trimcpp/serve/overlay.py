"""What the LLM saw of each picture of a chat request, for the chat page: per image, a mask of the
picture's pixels whose patches reached the LLM (:func:`trimcpp.show.masks`, libmtmd's geometry run
backwards), as a small black-and-white PNG with the picture's aspect ratio (white: kept).

The page lays the mask over the picture it sent; the geometry stays in Python, in one place.
"""

from __future__ import annotations

import base64
import functools
import io
from typing import Any

from PIL import Image

from ..handlers.mechanism import ImageSelection, image_parts
from ..layout import Vision
from ..show import masks, picture_vision

LONGEST = 512  # a mask's longest side in pixels, at most (a picture smaller than this: its own size)


@functools.lru_cache(maxsize=8)
def _vision(mmproj_path: str) -> Vision:
    return picture_vision(mmproj_path)


def png_url(mask: Any) -> str:
    """A bool array as a 1-bit PNG ``data:`` URL."""
    out = io.BytesIO()
    Image.fromarray(mask).convert("1").save(out, "PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def image_masks(mmproj_path: str, messages: list[Any], selections: list[ImageSelection],
                picture: Any) -> list[dict[str, Any]]:
    """Per image of the call (`selections`, the handler's ``last_selection``): ``indices`` (the kept
    rows of each of libmtmd's chunks) and ``masks``, ``[{"title", "png"}...]`` (one panel, or the
    slices and the overview of a LLaVA-1.6 picture), or ``"masks": None`` and ``mask_error`` where
    the layout does not follow libmtmd's cut. `picture(url)` gives the bytes of an ``image_url`` of `messages`."""
    parts = image_parts(messages)
    out = []
    for selection in selections:
        url = parts[selection.image][1]["image_url"]
        with Image.open(io.BytesIO(picture(url if isinstance(url, str) else url["url"]))) as image:
            width, height = image.size
        scale = min(1.0, LONGEST / max(width, height))
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        drawn: dict[str, Any] = {"indices": [rows.tolist() for rows in selection.indices]}
        try:
            panels = masks(_vision(mmproj_path), width, height, selection.indices, chunk_rows=selection.chunk_rows, out=size)
            drawn["masks"] = [{"title": title, "png": png_url(mask)} for title, mask in panels]
        except RuntimeError as error:
            drawn.update(masks=None, mask_error=str(error))
        out.append(drawn)
    return out


