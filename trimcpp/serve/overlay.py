"""What the LLM saw of each picture of a chat request, for the chat page: per image, the picture
with the patches whose rows reached the LLM as they are and the others dimmed
(:func:`trimcpp.show.panels`: libmtmd's geometry run backwards), scaled to at most LONGEST pixels a
side, as a JPEG ``data:`` URL.

The server draws it from the bytes libmtmd decoded, so it shows the picture as the encoder got it
(libmtmd, like PIL, does not apply a JPEG's EXIF rotation; a browser would), and the geometry stays
in Python, in one place.
"""

from __future__ import annotations

import base64
import functools
import io
from typing import Any

from PIL import Image

from ..handlers.mechanism import ImageSelection
from ..layout import Vision
from ..show import panels, picture_vision

LONGEST = 512  # pixels a side, at most (a smaller picture: its own size)
QUALITY = 85  # JPEG


@functools.lru_cache(maxsize=8)
def _vision(mmproj_path: str) -> Vision:
    return picture_vision(mmproj_path)


def jpeg_url(picture: Image.Image) -> str:
    out = io.BytesIO()
    picture.save(out, "JPEG", quality=QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode()


def image_overlays(mmproj_path: str, pictures: list[bytes], selections: list[ImageSelection]) -> list[dict[str, Any]]:
    """Per image of a call (`selections`, the handler's ``last_selection``; `pictures`, the bytes of
    the prompt's pictures in prompt order): ``indices``, the kept rows of each of libmtmd's chunks, and
    ``overlay``, ``[{"title", "url"}]`` (one panel; a LLaVA-1.6 picture cut into slices: the slices,
    then the overview), or ``"overlay": None`` and ``overlay_error`` where the layout cannot draw it
    (a projector it does not know, libmtmd cut the picture otherwise)."""
    out = []
    for selection in selections:
        drawn: dict[str, Any] = {"indices": [rows.tolist() for rows in selection.indices]}
        try:
            with Image.open(io.BytesIO(pictures[selection.image])) as image:
                views = panels(image, _vision(mmproj_path), selection.indices, chunk_rows=selection.chunk_rows,
                               longest=LONGEST)
            drawn["overlay"] = [{"title": title, "url": jpeg_url(view)} for title, view in views]
        except Exception as error:  # noqa: BLE001 - the answer stands; the picture says why it has no overlay
            drawn.update(overlay=None, overlay_error=f"{type(error).__name__}: {error}")
        out.append(drawn)
    return out
