"""Helpers shared by several test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import base64
import functools
import io

import numpy as np
from PIL import Image

from trimcpp.selection import CPU_ONLY, DEFAULT_ALIGNMENT, METHODS

import reference as ref

ROWS = 36  # image rows per chunk of the tiny test mmproj (84 px, patch 14)
SCORED = ("trimtokenator", "align", "divprune")  # the methods every backend scores (cdpruner: the CPU)


@functools.lru_cache(maxsize=None)
def embeddings(n: int, d: int, m: int, seed: int = 0):
    """Rows with a shared offset (as real projector outputs have), so cosines are not all ~0."""
    rng = np.random.default_rng([n, d, m, seed])
    offset = rng.standard_normal(d)
    v = (rng.standard_normal((n, d)) + 0.7 * offset).astype(np.float32)
    t = (rng.standard_normal((m, d)) + 0.3 * offset).astype(np.float32) if m else None
    return v, t


def check(method, picks, v, t, keep, stage1_ratio=0.8, seed=0, alignment=DEFAULT_ALIGNMENT):
    """Asserts that `picks` (in pick order) are what ALGORITHM.md prescribes for `method` (reference.py).
    `alignment`: the Python API's default; the core's own default (and the GPU plan's) is "l2"."""
    if method == "trimtokenator":
        ref.check_trimtokenator(picks, v, t, keep, stage1_ratio, alignment_kind=alignment)
    elif method == "align":
        ref.check_align(picks, v, t, keep, alignment_kind=alignment)
    elif method == "divprune":
        ref.check_divprune(picks, v, keep)
    elif method == "cdpruner":
        ref.check_cdpruner(picks, v, t, keep)
    elif method == "uniform":
        assert list(picks) == ref.uniform(v.shape[0], ref.resolve_keep(keep, v.shape[0]))
    elif method == "random":
        assert list(picks) == ref.random_draws(v.shape[0], ref.resolve_keep(keep, v.shape[0]), seed)
    else:
        assert list(picks) == list(range(v.shape[0]))


def methods_on(backend) -> list[str]:
    """The methods a backend runs (the GPU backends do not run cdpruner)."""
    return [m for m in METHODS if backend in (None, "cpu") or m not in CPU_ONLY]


def check_duplicate_ties(method, pick, alignment=DEFAULT_ALIGNMENT) -> None:
    """Distinct rows are far apart, so every tie is an exact tie between copies: pick(v, t, keep)
    (indices in pick order) must break it as the reference does (the lower index), step for step."""
    rng = np.random.default_rng(7)
    base = rng.standard_normal((12, 64)).astype(np.float32)
    v = base[rng.integers(0, 12, size=90)]
    t = rng.standard_normal((5, 64)).astype(np.float32)
    for keep in (1, 5, 12, 20, 60):
        picks = pick(v, t, keep)
        if method == "trimtokenator":
            ref.check_trimtokenator(picks, v, t, keep, exact=True, alignment_kind=alignment)
        elif method == "align":
            ref.check_align(picks, v, t, keep, exact=True, alignment_kind=alignment)
        elif method == "cdpruner":
            # Past the 12 distinct rows every d2 is under the floor: the rest go by index, exactly.
            ref.check_cdpruner(picks, v, t, keep, exact=True)
        else:
            # Past the 12 distinct rows every candidate is ~0 from S: rounding, not ties, decides.
            ref.check_divprune(picks, v, keep, exact=keep <= 12)


def image_url(seed: int = 0, size: tuple[int, int] = (150, 100), fmt: str = "PNG") -> str:
    """A data URI of a seeded random picture."""
    pixels = (np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def png(tmp_path, width=168, height=84, seed=0, name="image.png") -> str:
    """A seeded random picture written as a PNG file; its path."""
    pixels = np.random.default_rng(seed).integers(100, 256, (height, width, 3), dtype=np.uint8)
    path = tmp_path / name
    Image.fromarray(pixels).save(path)
    return str(path)


# The encoder settings of llama-cpp-python's stock handlers on a Llama with its default flash_attn
# (off): keep-all trimmed handlers given these are bit-identical to the stock handler.
STOCK_ENCODER = {"encoder_flash_attn": False}
