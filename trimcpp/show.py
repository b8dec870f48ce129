"""A picture of what the LLM still sees: kept patches bright, dropped patches dimmed.

The patches are mapped back onto the original picture with :mod:`trimcpp.layout` (libmtmd's own
geometry), so the picture lines up with the user's image whatever its size or aspect ratio. A
LLaVA-1.6 image that libmtmd slices is drawn as two panels: the slices (together they tile the
picture) and the overview.
"""

from __future__ import annotations

import textwrap
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .layout import Chunk, Vision, chunks, pixel_rows

DIM = 0.3  # a dropped patch keeps this share of its brightness
GAP = 8  # pixels between panels
BACKGROUND = (24, 24, 24)


def kept_mask(vision: Vision, parts: Sequence[Chunk], kept: Sequence[np.ndarray], width: int, height: int) -> np.ndarray:
    """height x width bool: pixels whose patch (in any of `parts`) is among that part's kept rows."""
    mask = np.zeros((height, width), bool)
    for part, rows_kept in zip(parts, kept):
        rows = pixel_rows(vision, part, width, height)
        mask |= (rows >= 0) & np.isin(rows, np.asarray(rows_kept, dtype=np.int64))
    return mask


def panels(image: Image.Image, vision: Vision, kept: Sequence[np.ndarray]) -> list[tuple[str, Image.Image]]:
    """(title, picture) per panel: the original with kept patches as they are and the rest dimmed.

    `kept` holds the kept row indices of each of libmtmd's chunks, in chunk order."""
    rgb = image.convert("RGB")
    width, height = rgb.size
    parts = chunks(vision, width, height)
    if len(kept) != len(parts):
        raise ValueError(f"{len(kept)} chunks of kept rows for a {width}x{height} image that libmtmd cuts into {len(parts)}")
    pixels = np.asarray(rgb)
    dimmed = (pixels * DIM).astype(np.uint8)
    groups = [("image", parts, kept)]
    if len(parts) > 1:  # LLaVA-1.6 slices + overview
        groups = [(f"{len(parts) - 1} slices", parts[:-1], kept[:-1]), ("overview", parts[-1:], kept[-1:])]
    out = []
    for title, group, rows in groups:
        mask = kept_mask(vision, group, rows, width, height)
        out.append((title, Image.fromarray(np.where(mask[..., None], pixels, dimmed))))
    return out


def render(image: Image.Image, vision: Vision, kept: Sequence[np.ndarray], caption: Optional[str] = None) -> Image.Image:
    """The panels side by side (left-aligned, the picture's own size each), `caption` below them.
    Without a caption and with one panel the result has exactly the picture's size."""
    pictures = panels(image, vision, kept)
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
