"""Where each image row comes from: libmtmd's LLaVA preprocessing, run backwards.

libmtmd (llama.cpp ``tools/mtmd``, projector ``mlp``) turns a W x H picture into chunks of
``(image_size / patch_size)^2`` rows, one row per patch, row-major:

- LLaVA-1.5 (no grid pinpoints in the mmproj): one chunk. The picture is scaled by
  ``min(S/W, S/H)`` to ``ceil`` sizes and centred on an S x S square (``PAD_CEIL``).
- LLaVA-1.6 (grid pinpoints): a picture no larger than S x S on both sides is one chunk, stretched
  to S x S. A larger one is scaled and centred (as above) on the best pinpoint resolution
  (``select_best_resolution``: most effective pixels, then least waste), cut into S x S slices
  left to right, top to bottom; the overview (the whole picture stretched to S x S) comes last.

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

import gguf
import numpy as np


@dataclasses.dataclass(frozen=True)
class Vision:
    """The mmproj settings that decide the layout."""

    image_size: int  # S: side of the encoder's square input
    patch_size: int
    pinpoints: tuple[tuple[int, int], ...] = ()  # (width, height) candidates; LLaVA-1.6 only
    class_token: bool = False  # the mmproj has v.class_embd (and libmtmd puts it last): row r is patch r + 1

    @property
    def grid(self) -> int:
        """Patches per side of one chunk."""
        return self.image_size // self.patch_size

    @property
    def version(self) -> str:
        """"1.6" when the mmproj has grid pinpoints (llava_uhd slicing), else "1.5"."""
        return "1.6" if self.pinpoints else "1.5"


def read_vision(mmproj_path: os.PathLike | str) -> Vision:
    """The layout settings of an mmproj GGUF (ValueError if it is not a LLaVA ``mlp`` mmproj)."""
    try:
        reader = gguf.GGUFReader(os.fspath(mmproj_path), "r")
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read mmproj {os.fspath(mmproj_path)!r}: {error}") from None

    def value(key: str):
        field = reader.get_field(key)
        return None if field is None else field.contents()

    projector = value("clip.projector_type")
    size, patch = value("clip.vision.image_size"), value("clip.vision.patch_size")
    if projector != "mlp" or not size or not patch:
        raise ValueError(
            f"{os.fspath(mmproj_path)!r} is not a LLaVA mmproj (projector {projector!r}, image size {size}, "
            f"patch {patch}); trimcpp handles projector 'mlp'"
        )
    flat = value("clip.vision.image_grid_pinpoints") or []
    return Vision(int(size), int(patch), tuple((int(w), int(h)) for w, h in zip(flat[0::2], flat[1::2])),
                  class_token=any(t.name == "v.class_embd" for t in reader.tensors))


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
    """One encoded square: original pixel x maps to ``(x + 0.5) * scale_x + offset_x - left`` in it."""

    name: str
    scale_x: float
    scale_y: float
    offset_x: int  # where the scaled picture starts on its canvas
    offset_y: int
    left: int  # where this square starts on the canvas (slices)
    top: int


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
        new_w, new_h = _scaled_size(width, height, side, side)
        return [Chunk("image", new_w / width, new_h / height, (side - new_w) // 2, (side - new_h) // 2, 0, 0)]
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


def pixel_rows(vision: Vision, chunk: Chunk, width: int, height: int) -> np.ndarray:
    """height x width int64: the row of `chunk` that carries the patch covering each pixel's centre,
    -1 if none (padding, or patch 0 when the mmproj has a class token)."""
    side, size = vision.image_size, vision.patch_size
    x = (np.arange(width) + 0.5) * chunk.scale_x + chunk.offset_x - chunk.left
    y = (np.arange(height) + 0.5) * chunk.scale_y + chunk.offset_y - chunk.top
    px = np.where((x >= 0) & (x < side), np.floor(x / size), -1).astype(np.int64)
    py = np.where((y >= 0) & (y < side), np.floor(y / size), -1).astype(np.int64)
    rows = py[:, None] * vision.grid + px[None, :] - vision.class_token  # libmtmd's shift, see above
    return np.where((py[:, None] >= 0) & (px[None, :] >= 0) & (rows >= 0), rows, -1)
