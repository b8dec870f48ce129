"""Patch geometry (trimcpp.layout) and the kept-patch picture (trimcpp.show), checked by hand.

The tiny test mmproj has a side of 84 pixels and patches of 14: a 6 x 6 grid of rows per chunk.
Expected pixel blocks below are worked out from libmtmd's preprocessing, not from the code.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image

from trimcpp.layout import Vision, chunks, pixel_rows, read_vision
from trimcpp.show import masks, render
from trimcpp.testing import SHAPES, pinpoints, write_mmproj

V15 = Vision(84, 14)
_flat = pinpoints(84)
V16 = Vision(84, 14, tuple(zip(_flat[0::2], _flat[1::2])))  # (84,168) (168,84) (168,168) (252,84) (84,252)


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """Random pixels in 100..255, so that dimming makes every channel strictly darker."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(100, 256, (height, width, 3), dtype=np.uint8))


def bright(out: Image.Image, image: Image.Image, box: tuple[int, int, int, int]) -> np.ndarray:
    """Mask of output pixels (inside `box` of the output) equal to the input; asserts the rest are darker."""
    left, top, right, bottom = box
    got = np.asarray(out)[top:bottom, left:right].astype(int)
    original = np.asarray(image).astype(int)
    same = (got == original).all(axis=2)
    assert (got[~same] < original[~same]).all()
    return same


def blocks(height: int, width: int, *spans: tuple[slice, slice]) -> np.ndarray:
    mask = np.zeros((height, width), bool)
    for rows, cols in spans:
        mask[rows, cols] = True
    return mask


def test_read_vision(tmp_path):
    v15 = read_vision(write_mmproj(tmp_path / "a.gguf", SHAPES["tiny"], version="1.5"))
    v16 = read_vision(write_mmproj(tmp_path / "b.gguf", SHAPES["tiny"], version="1.6"))
    assert (v15.image_size, v15.patch_size, v15.pinpoints, v15.version) == (84, 14, (), "1.5")
    assert v16.pinpoints == V16.pinpoints and v16.version == "1.6"
    assert v15.class_token and not read_vision(write_mmproj(tmp_path / "d.gguf", SHAPES["tiny"], class_token=False)).class_token
    (tmp_path / "c.gguf").write_bytes(b"not a gguf")
    with pytest.raises(ValueError, match="mmproj"):
        read_vision(tmp_path / "c.gguf")


def test_square_image_maps_patches_to_equal_blocks():
    # 168 x 168 scales by 1/2 to fill the square: each patch is a 28 x 28 block of the original.
    image = picture(168, 168)
    out = render(image, V15, [np.array([0, 7, 35])])
    assert out.size == image.size
    expected = blocks(168, 168, (slice(0, 28), slice(0, 28)), (slice(28, 56), slice(28, 56)),
                      (slice(140, 168), slice(140, 168)))
    assert np.array_equal(bright(out, image, (0, 0, 168, 168)), expected)


def test_class_token_shifts_rows_by_one_patch():
    # With a class token libmtmd's row r carries patch r + 1; patch 0 is in no row, row 35 is the
    # class token (llama.cpp issue #25814).
    image = picture(168, 168)
    out = render(image, dataclasses.replace(V15, class_token=True), [np.array([0, 7, 35])])
    expected = blocks(168, 168, (slice(0, 28), slice(28, 56)), (slice(28, 56), slice(56, 84)))
    assert np.array_equal(bright(out, image, (0, 0, 168, 168)), expected)


def test_wide_image_is_padded_top_and_bottom():
    # 168 x 84 scales to 84 x 42, centred at y = 21 of the 84 x 84 square: patch row 0 and 5 are
    # padding, patch row 1 covers original rows 0..13 (canvas 21.25..27.75), row 2 rows 14..41,
    # row 3 rows 42..69, row 4 rows 70..83; columns are 28 pixels wide.
    image = picture(168, 84)
    assert [p.offset_y for p in chunks(V15, 168, 84)] == [21]
    rows = pixel_rows(V15, chunks(V15, 168, 84)[0], 168, 84)
    assert set(np.unique(rows) // 6) == {1, 2, 3, 4}
    out = render(image, V15, [np.array([0, 6, 13, 27, 35])])  # 0 and 35 lie in the padding
    expected = blocks(84, 168, (slice(0, 14), slice(0, 28)), (slice(14, 42), slice(28, 56)),
                      (slice(70, 84), slice(84, 112)))
    assert np.array_equal(bright(out, image, (0, 0, 168, 84)), expected)


def test_llava16_slices_then_overview():
    # 168 x 84 fits the (168, 84) pinpoint exactly: two 84 x 84 slices (left, right) at scale 1,
    # then the overview, the whole picture stretched to 84 x 84 (28 x 14 pixels per patch).
    image = picture(168, 84)
    parts = chunks(V16, 168, 84)
    assert [p.name for p in parts] == ["slice 1,1", "slice 1,2", "overview"]
    out = render(image, V16, [np.array([0]), np.array([0, 35]), np.array([7])])
    assert out.size == (2 * 168 + 8, 84)
    slices = blocks(84, 168, (slice(0, 14), slice(0, 14)), (slice(0, 14), slice(84, 98)),
                    (slice(70, 84), slice(154, 168)))
    overview = blocks(84, 168, (slice(14, 28), slice(28, 56)))
    assert np.array_equal(bright(out, image, (0, 0, 168, 84)), slices)
    assert np.array_equal(bright(out, image, (176, 0, 344, 84)), overview)


@pytest.mark.parametrize(("size", "expected"), [
    ((80, 60), ["overview"]),  # fits in 84 x 84: no slices
    ((100, 200), ["slice 1,1", "slice 2,1", "overview"]),  # best pinpoint (84, 168): no waste
    ((300, 300), ["slice 1,1", "slice 1,2", "slice 2,1", "slice 2,2", "overview"]),
    ((500, 100), ["slice 1,1", "slice 1,2", "slice 1,3", "overview"]),
])
def test_llava16_slice_choice(size, expected):
    assert [p.name for p in chunks(V16, *size)] == expected


def test_every_pixel_belongs_to_one_patch_of_a_slice():
    # Slices tile the padded canvas; the picture lies inside it, so each pixel is in exactly one slice.
    width, height = 100, 200  # scaled by 0.84 to 84 x 168 on the (84, 168) canvas
    parts = chunks(V16, width, height)[:-1]
    covered = sum((pixel_rows(V16, p, width, height) >= 0).astype(int) for p in parts)
    assert (covered == 1).all()


def test_caption_adds_a_strip_below():
    image = picture(168, 84)
    out = render(image, V15, [np.arange(36)], caption="Q: what colour is the square?\nkept 36 of 36")
    assert out.size[0] == 360 and out.size[1] > 84
    assert np.array_equal(np.asarray(out)[:84, :168], np.asarray(image))


def test_wrong_chunk_count_is_refused():
    with pytest.raises(ValueError, match="cuts into 3"):
        render(picture(168, 84), V16, [np.array([0])])


@pytest.mark.parametrize("size, out", [((168, 84), (37, 19)), ((300, 133), (300, 133)), ((500, 400), (512, 410))])
def test_a_sampled_map_takes_the_row_under_each_cells_centre(size, out):
    """pixel_rows(out=...) / masks(out=...): cell (i, j) of a w x h sample is the original pixel whose
    area holds the cell's centre, at ((j + 0.5) W / w, (i + 0.5) H / h)."""
    width, height = size
    xs = np.floor((np.arange(out[0]) + 0.5) * width / out[0]).astype(int)
    ys = np.floor((np.arange(out[1]) + 0.5) * height / out[1]).astype(int)
    for vision in (V15, V16):
        for chunk in chunks(vision, width, height):
            full = pixel_rows(vision, chunk, width, height)
            assert np.array_equal(pixel_rows(vision, chunk, width, height, out), full[np.ix_(ys, xs)])
    kept = [np.array([i, 7 + i, 20 + i]) for i in range(len(chunks(V16, width, height)))]
    for (_, whole), (_, sampled) in zip(masks(V16, width, height, kept), masks(V16, width, height, kept, out=out)):
        assert sampled.shape == out[::-1] and np.array_equal(sampled, whole[np.ix_(ys, xs)])


def test_chunk_rows_other_than_the_layout_are_refused():
    with pytest.raises(RuntimeError, match=r"chunks of \[36, 36\] rows; the layout expected \[36\]"):
        masks(V15, 84, 84, [np.array([0])], chunk_rows=[36, 36])
