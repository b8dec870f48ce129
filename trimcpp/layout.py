"""Where each image row comes from: libmtmd's preprocessing, run backwards.

LLaVA (projector ``mlp``): libmtmd turns a W x H picture into chunks of
``(image_size / patch_size)^2`` rows, one row per patch, row-major:

- LLaVA-1.5 (no grid pinpoints in the mmproj): one chunk. The picture is scaled by
  ``min(S/W, S/H)`` to ``ceil`` sizes and centred on an S x S square (``PAD_CEIL``).
- LLaVA-1.6 (grid pinpoints): a picture no larger than S x S on both sides is one chunk, stretched
  to S x S. A larger one is scaled and centred (as above) on the best pinpoint resolution
  (``select_best_resolution``: most effective pixels, then least waste), cut into S x S slices
  left to right, top to bottom; the overview (the whole picture stretched to S x S) comes last.

Gemma 3 (``gemma3``): one chunk; the picture scaled and centred on S x S as for LLaVA-1.5, and one
row per ``merge x merge`` patches (average pooling; 4 x 4 at 896 px: 16 x 16 rows), row-major.
Qwen2-VL / Qwen2.5-VL (``qwen2vl_merger``, ``qwen2.5vl_merger``): one chunk on a canvas that
follows the picture (each side rounded to a multiple of 28 pixels, between 8 and 4096 rows:
``calc_size_preserved_ratio``), scaled and centred on it, one row per 2 x 2 patches, row-major
(the order of libmtmd's M-RoPE positions: row i at x = i % nx, y = i // nx).

The arithmetic below mirrors ``mtmd-image.cpp`` (float32 scales, ``ceil``/truncation where it
has them), so the chunk count and rows per chunk equal libmtmd's; :func:`pixel_rows` maps every
pixel of the original picture (by its centre) to the row of each chunk that covers it.

Rows and patches: with an mmproj that has CLIP's class embedding (every real LLaVA one), the
libmtmd of llama-cpp-python 0.3.36 puts the class token after the patches but still takes rows
1..n of the encoder's output (llama.cpp issue #25814, fix in PR #25844, not merged): row r carries
patch r + 1, patch 0 reaches the LLM in no row, and the last row is the class token. The mapping
below follows what libmtmd does (``Vision.class_token``), checked against it in the tests. A libmtmd
with the fix (patches/llama.cpp 0001) gives patch r in row r: :func:`class_token_last` tells which.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import tempfile
from typing import Optional

import gguf
import numpy as np

QWEN_PROJECTORS = ("qwen2vl_merger", "qwen2.5vl_merger")
QWEN_ROWS = (8, 4096)  # libmtmd's limits on a Qwen2/2.5-VL image's rows (set_limit_image_tokens)


@dataclasses.dataclass(frozen=True)
class Vision:
    """The mmproj settings that decide the layout."""

    image_size: int  # S: side of the encoder's square input (Qwen: unused, the canvas follows the picture)
    patch_size: int
    pinpoints: tuple[tuple[int, int], ...] = ()  # (width, height) candidates; LLaVA-1.6 only
    class_token: bool = False  # the mmproj has v.class_embd (and libmtmd puts it last): row r is patch r + 1
    projector: str = "mlp"
    merge: int = 1  # patches per side that make one row (Qwen: 2; Gemma 3: its pooling)

    @property
    def cell(self) -> int:
        """Pixels per side of the square one row covers (on the encoder's canvas)."""
        return self.patch_size * self.merge

    @property
    def grid(self) -> int:
        """Rows per side of one square chunk (LLaVA, Gemma 3)."""
        return self.image_size // self.cell

    @property
    def version(self) -> str:
        """"1.6" when the mmproj has grid pinpoints (llava_uhd slicing), else "1.5"."""
        return "1.6" if self.pinpoints else "1.5"

    @property
    def chat_format(self) -> str:
        """llama-cpp-python's chat format for this projector (see :func:`chat_format`)."""
        return _format(self.projector, bool(self.pinpoints))

    def canvas(self, width: int, height: int) -> tuple[int, int]:
        """The encoder's input size for a `width` x `height` picture (one chunk)."""
        if self.projector not in QWEN_PROJECTORS:
            return self.image_size, self.image_size
        align = self.cell
        least, most = QWEN_ROWS[0] * align * align, QWEN_ROWS[1] * align * align
        w_bar = max(align, math.floor(_f32(width / align) + 0.5) * align)  # std::round: half away from 0
        h_bar = max(align, math.floor(_f32(height / align) + 0.5) * align)
        if w_bar * h_bar > most:
            beta = _f32(math.sqrt(_f32(float(height) * width / most)))
            h_bar = max(align, math.floor(_f32(height / beta) / align) * align)
            w_bar = max(align, math.floor(_f32(width / beta) / align) * align)
        elif w_bar * h_bar < least:
            beta = _f32(math.sqrt(_f32(least / _f32(float(height) * width))))
            h_bar = math.ceil(_f32(height * beta) / align) * align
            w_bar = math.ceil(_f32(width * beta) / align) * align
        return w_bar, h_bar


def _format(projector: str, pinpoints: bool) -> str:
    if projector == "mlp":
        return "llava-1-6" if pinpoints else "llava-1-5"
    if projector in QWEN_PROJECTORS:
        return "qwen2.5-vl"
    return "mtmd"


def _read(mmproj_path: os.PathLike | str):
    try:
        reader = gguf.GGUFReader(os.fspath(mmproj_path), "r")
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read mmproj {os.fspath(mmproj_path)!r}: {error}") from None

    def value(key: str):
        field = reader.get_field(key)
        return None if field is None else field.contents()

    return reader, value


def chat_format(mmproj_path: os.PathLike | str) -> str:
    """The llama-cpp-python chat format (a key of trimcpp.handlers.HANDLERS) that serves an mmproj:
    ``llava-1-5``/``llava-1-6`` for LLaVA's ``mlp`` projector (1.6 with grid pinpoints),
    ``qwen2.5-vl`` for Qwen2/2.5-VL's, ``mtmd`` (the LLM GGUF's own chat template) for any other."""
    _, value = _read(mmproj_path)
    projector = value("clip.projector_type") or value("clip.vision.projector_type")
    if not projector:
        raise ValueError(f"{os.fspath(mmproj_path)!r} is not an mmproj (no clip.projector_type)")
    return _format(str(projector), bool(value("clip.vision.image_grid_pinpoints")))


def read_vision(mmproj_path: os.PathLike | str) -> Vision:
    """The layout settings of an mmproj GGUF (ValueError unless its projector is one whose layout
    this module knows: LLaVA ``mlp``, ``gemma3``, ``qwen2vl_merger``, ``qwen2.5vl_merger``)."""
    reader, value = _read(mmproj_path)
    projector = value("clip.projector_type")
    size, patch = value("clip.vision.image_size"), value("clip.vision.patch_size")
    known = ("mlp", "gemma3", *QWEN_PROJECTORS)
    if projector not in known or not size or not patch:
        raise ValueError(
            f"{os.fspath(mmproj_path)!r} has projector {projector!r} (image size {size}, patch {patch}); trimcpp "
            f"maps rows to patches for {', '.join(known)}"
        )
    merge = 1
    if projector == "gemma3":
        merge = int(value("clip.vision.projector.scale_factor") or 4)
    elif projector in QWEN_PROJECTORS:
        merge = int(value("clip.vision.spatial_merge_size") or 2)
    flat = value("clip.vision.image_grid_pinpoints") or []
    return Vision(int(size), int(patch), tuple((int(w), int(h)) for w, h in zip(flat[0::2], flat[1::2])),
                  class_token=any(t.name == "v.class_embd" for t in reader.tensors), projector=str(projector),
                  merge=merge)


@functools.lru_cache(maxsize=None)
def class_token_last() -> bool:
    """Whether the libmtmd in use puts CLIP's class token last (llama.cpp #25814, stock llama-cpp-python
    0.3.36): row r then carries patch r + 1. False for a libmtmd with the fix. Found out once per process
    with a tiny one-layer mmproj, whose rows each depend on one patch only: brightening patch 1 changes
    row 0 in stock libmtmd and row 1 with the fix (about a second)."""
    from .llamacpp import encode_image, load_llama, silenced
    from .testing import SHAPES, write_llm, write_mmproj

    shape = dataclasses.replace(SHAPES["tiny"], n_layer=1, v_layer=1)
    grid = shape.image_size // shape.patch_size
    with tempfile.TemporaryDirectory() as folder:
        llm = write_llm(os.path.join(folder, "llm.gguf"), shape)
        mmproj = str(write_mmproj(os.path.join(folder, "mmproj.gguf"), shape, class_token=True))
        with silenced(False):
            llama = load_llama(str(llm), None, n_ctx=64, threads=1)
            grey = np.full((shape.image_size, shape.image_size, 3), 128, np.uint8)
            bright = grey.copy()
            bright[: shape.patch_size, shape.patch_size: 2 * shape.patch_size] = 250  # patch 1
            [base], [changed] = encode_image(llama, mmproj, grey), encode_image(llama, mmproj, bright)
            del llama
    rows = np.flatnonzero(np.abs(changed - base).max(axis=1) > 1e-4).tolist()
    if rows not in ([0], [1]) or base.shape[0] != grid * grid:
        raise RuntimeError(f"libmtmd's LLaVA rows follow neither known layout (patch 1 changed rows {rows})")
    return rows == [0]


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One encoded picture: original pixel x maps to ``(x + 0.5) * scale_x + offset_x - left`` in it."""

    name: str
    scale_x: float
    scale_y: float
    offset_x: int  # where the scaled picture starts on its canvas
    offset_y: int
    left: int  # where this chunk starts on the canvas (slices)
    top: int
    width: int = 0  # the chunk's size in pixels on the canvas; 0: the vision's square image_size
    height: int = 0


def chunk_size(vision: Vision, chunk: Chunk) -> tuple[int, int]:
    """Rows across and down of `chunk`: it has their product."""
    width, height = chunk.width or vision.image_size, chunk.height or vision.image_size
    return width // vision.cell, height // vision.cell


def _f32(x: float) -> float:
    return float(np.float32(x))


def _scaled_size(width: int, height: int, target_w: int, target_h: int) -> tuple[int, int]:
    """img_tool::resize with PAD_CEIL: the scaled picture's size before padding."""
    scale = min(_f32(np.float32(target_w) / np.float32(width)), _f32(np.float32(target_h) / np.float32(height)))
    return (min(math.ceil(_f32(np.float32(width) * np.float32(scale))), target_w),
            min(math.ceil(_f32(np.float32(height) * np.float32(scale))), target_h))


def _best_resolution(width: int, height: int, candidates: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """select_best_resolution: most effective pixels, then least wasted area, first on a tie."""
    best, best_effective, best_waste = candidates[0], 0, None
    for cw, ch in candidates:
        scale = min(_f32(np.float32(cw) / np.float32(width)), _f32(np.float32(ch) / np.float32(height)))
        tw, th = int(_f32(np.float32(width) * np.float32(scale))), int(_f32(np.float32(height) * np.float32(scale)))
        effective = min(tw * th, width * height)
        waste = cw * ch - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (cw, ch), effective, waste
    return best


def chunks(vision: Vision, width: int, height: int) -> list[Chunk]:
    """libmtmd's chunks for a `width` x `height` picture, in the order their rows reach the LLM."""
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    side = vision.image_size
    stretched = Chunk("overview", side / width, side / height, 0, 0, 0, 0)
    if not vision.pinpoints:
        canvas_w, canvas_h = vision.canvas(width, height)
        new_w, new_h = _scaled_size(width, height, canvas_w, canvas_h)
        return [Chunk("image", new_w / width, new_h / height, (canvas_w - new_w) // 2, (canvas_h - new_h) // 2, 0, 0,
                      canvas_w, canvas_h)]
    if width <= side and height <= side:
        return [stretched]
    canvas_w, canvas_h = _best_resolution(width, height, vision.pinpoints)
    if canvas_w % side or canvas_h % side:
        raise ValueError(f"pinpoint {canvas_w}x{canvas_h} is not a multiple of the image size {side}")
    new_w, new_h = _scaled_size(width, height, canvas_w, canvas_h)
    ox, oy = (canvas_w - new_w) // 2, (canvas_h - new_h) // 2
    slices = [Chunk(f"slice {top // side + 1},{left // side + 1}", new_w / width, new_h / height, ox, oy, left, top)
              for top in range(0, canvas_h, side) for left in range(0, canvas_w, side)]
    return slices + [stretched]


def pixel_rows(vision: Vision, chunk: Chunk, width: int, height: int, out: Optional[tuple[int, int]] = None) -> np.ndarray:
    """height x width int64: the row of `chunk` that carries the patch covering each pixel's centre,
    -1 if none (padding, or patch 0 when the mmproj has a class token). With `out` (w, h), a w x h
    sample of that map: each cell takes the row of the original pixel under the cell's centre."""
    size = vision.cell
    across, down = chunk_size(vision, chunk)
    out_w, out_h = out or (width, height)
    x = (np.floor((np.arange(out_w) + 0.5) * width / out_w) + 0.5) * chunk.scale_x + chunk.offset_x - chunk.left
    y = (np.floor((np.arange(out_h) + 0.5) * height / out_h) + 0.5) * chunk.scale_y + chunk.offset_y - chunk.top
    px = np.where((x >= 0) & (x < across * size), np.floor(x / size), -1).astype(np.int64)
    py = np.where((y >= 0) & (y < down * size), np.floor(y / size), -1).astype(np.int64)
    rows = py[:, None] * across + px[None, :] - vision.class_token  # libmtmd's shift, see above
    return np.where((py[:, None] >= 0) & (px[None, :] >= 0) & (rows >= 0), rows, -1)
