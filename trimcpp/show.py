"""A picture of what the LLM still sees: kept patches bright, dropped patches dimmed.

The patches are mapped back onto the original picture with :mod:`trimcpp.layout` (libmtmd's own
geometry), so the picture lines up with the user's image whatever its size or aspect ratio. A
LLaVA-1.6 image that libmtmd slices is drawn as two panels: the slices (together they tile the
picture) and the overview.
"""

from __future__ import annotations

import dataclasses
import textwrap
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .layout import Chunk, Vision, chunk_size, chunks, class_token_last, pixel_rows, read_vision

DIM = 0.3  # a dropped patch keeps this share of its brightness
GAP = 8  # pixels between panels
BACKGROUND = (24, 24, 24)


def kept_mask(vision: Vision, parts: Sequence[Chunk], kept: Sequence[np.ndarray], width: int, height: int,
              out: Optional[tuple[int, int]] = None) -> np.ndarray:
    """height x width bool (or `out`'s size, a sample of it): pixels whose patch (in any of `parts`)
    is among that part's kept rows."""
    out_w, out_h = out or (width, height)
    mask = np.zeros((out_h, out_w), bool)
    for part, rows_kept in zip(parts, kept):
        rows = pixel_rows(vision, part, width, height, out)
        mask |= (rows >= 0) & np.isin(rows, np.asarray(rows_kept, dtype=np.int64))
    return mask


def picture_vision(mmproj_path: str) -> Vision:
    """The mmproj's layout settings, as the libmtmd in use places CLIP's class token."""
    vision = read_vision(mmproj_path)
    if vision.class_token:  # row r is patch r + 1 only in a libmtmd without the class-token fix
        vision = dataclasses.replace(vision, class_token=class_token_last())
    return vision


def masks(vision: Vision, width: int, height: int, kept: Sequence[np.ndarray], *, chunk_rows: Optional[Sequence[int]] = None,
          out: Optional[tuple[int, int]] = None) -> list[tuple[str, np.ndarray]]:
    """(title, mask) per panel of a `width` x `height` picture (:func:`kept_mask`): one for a picture
    libmtmd encodes whole, two for LLaVA-1.6 slices (the slices together, then the overview).

    `kept` holds the kept row indices of each of libmtmd's chunks, in chunk order; `chunk_rows`, if
    given, the rows of each (an :class:`~trimcpp.handlers.ImageSelection`'s): RuntimeError if the
    layout cuts the picture otherwise."""
    parts = chunks(vision, width, height)
    expected = [a * b for a, b in (chunk_size(vision, part) for part in parts)]
    if chunk_rows is not None and list(chunk_rows) != expected:
        raise RuntimeError(f"libmtmd cut the {width}x{height} image into chunks of {list(chunk_rows)} rows; the layout "
                           f"expected {expected} (unsupported preprocessing)")
    if len(kept) != len(parts):
        raise ValueError(f"{len(kept)} chunks of kept rows for a {width}x{height} image that libmtmd cuts into {len(parts)}")
    groups = [("image", parts, kept)]
    if len(parts) > 1:  # LLaVA-1.6 slices + overview
        groups = [(f"{len(parts) - 1} slices", parts[:-1], kept[:-1]), ("overview", parts[-1:], kept[-1:])]
    return [(title, kept_mask(vision, group, rows, width, height, out)) for title, group, rows in groups]


def panels(image: Image.Image, vision: Vision, kept: Sequence[np.ndarray], *, chunk_rows: Optional[Sequence[int]] = None,
           longest: Optional[int] = None) -> list[tuple[str, Image.Image]]:
    """(title, picture) per panel (:func:`masks`): the original with kept patches as they are and the
    rest dimmed; with `longest`, scaled down to at most that many pixels a side first."""
    width, height = image.size
    scale = 1.0 if longest is None else min(1.0, longest / max(width, height))
    out = (max(1, round(width * scale)), max(1, round(height * scale)))
    rgb = image.convert("RGB")
    pixels = np.asarray(rgb if out == image.size else rgb.resize(out, Image.Resampling.LANCZOS))
    dimmed = (pixels * DIM).astype(np.uint8)
    return [(title, Image.fromarray(np.where(mask[..., None], pixels, dimmed)))
            for title, mask in masks(vision, width, height, kept, chunk_rows=chunk_rows, out=out)]


def render(image: Image.Image, vision: Vision, kept: Sequence[np.ndarray], caption: Optional[str] = None, *,
           chunk_rows: Optional[Sequence[int]] = None) -> Image.Image:
    """The panels side by side (left-aligned, the picture's own size each), `caption` below them.
    Without a caption and with one panel the result has exactly the picture's size."""
    pictures = panels(image, vision, kept, chunk_rows=chunk_rows)
    width, height = image.size
    canvas_w, lines = len(pictures) * width + (len(pictures) - 1) * GAP, []
    if caption is not None:
        if len(pictures) > 1:
            caption = "panels: " + " | ".join(title for title, _ in pictures) + "\n" + caption
        canvas_w = max(canvas_w, 360)
        chars = max(20, (canvas_w - 16) // 8)
        lines = [wrapped for line in caption.splitlines() for wrapped in textwrap.wrap(line, chars) or [""]]
    canvas = Image.new("RGB", (canvas_w, height + (12 + 18 * len(lines) if lines else 0)), BACKGROUND)
    for i, (_, picture) in enumerate(pictures):
        canvas.paste(picture, (i * (width + GAP), 0))
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default(size=14)
    for i, line in enumerate(lines):
        draw.text((8, height + 6 + 18 * i), line, fill=(235, 235, 235), font=font)
    return canvas
