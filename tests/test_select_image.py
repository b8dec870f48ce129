"""One image's selection as patched llama.cpp's tools make it (csrc/image.cpp, `_core.select_image`)
equals the trimmed handlers' (trimcpp.handlers.mechanism.select_image: resolve_keep, split_budget
and prune from Python), so the tools and the handlers keep the same rows of the same encoded image."""

from __future__ import annotations

import numpy as np
import pytest

from trimcpp import _core
from trimcpp.handlers.mechanism import image_target, select_image

D = 24


def image(seed: int, sizes: list[int]) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.normal(size=D)  # rows share a direction, as projector rows do, so weights differ
    return [(base * rng.uniform(0.2, 2.0) + rng.normal(size=(n, D))).astype(np.float32) for n in sizes]


def core_keep(keep) -> tuple[int, float]:
    if keep is None:
        return 0, 0.0
    return (keep, 0.0) if isinstance(keep, int) else (0, keep)


@pytest.mark.parametrize("sizes", [[576], [144, 144, 144, 144, 144], [30, 7, 50], [5]])
@pytest.mark.parametrize("keep", [64, 3, 1, 0.25, 1.0, None, 10_000])
@pytest.mark.parametrize("method", ["trimtokenator", "divprune", "cdpruner", "align", "uniform", "random"])
@pytest.mark.parametrize("with_text", [True, False])
def test_core_equals_the_handlers_composition(sizes, keep, method, with_text):
    chunks = image(len(sizes) * 7 + sum(sizes), sizes)
    text = np.random.default_rng(5).normal(size=(9, D)).astype(np.float32) if with_text else None
    want = select_image(chunks, text, keep, method=method, stage1_ratio=0.8, alignment="l2", backend="cpu")  # the core's default
    got = _core.select_image(chunks, text, *core_keep(keep), getattr(_core.Method, method), 0.8, 0)
    assert [list(g) for g in got] == [list(w) for w in want]
    kept = sum(len(g) for g in got)
    assert kept == image_target(keep, method, sum(sizes), len(sizes))
    assert all(len(g) >= 1 for g in got)  # every chunk keeps a row
    assert all(list(g) == sorted(set(g)) and (len(g) == 0 or 0 <= g[0] and g[-1] < n) for g, n in zip(got, sizes))


@pytest.mark.parametrize("alignment, stage1", [("cosine", 0.8), ("l2", "adaptive"), ("cosine", "adaptive")])
@pytest.mark.parametrize("sizes, keep", [([576], 64), ([144, 144, 144, 144, 144], 40), ([30, 7, 50], 0.25)])
@pytest.mark.parametrize("method", ["trimtokenator", "align"])
def test_core_takes_the_stage1_variants_as_the_handlers_do(sizes, keep, method, alignment, stage1):
    """The tools' --image-alignment and --image-stage1-ratio adaptive select what the handlers select
    with alignment= and stage1_ratio="adaptive"; and the variant changes the rows (the control)."""
    chunks = image(len(sizes) * 3 + sum(sizes), sizes)
    text = np.random.default_rng(6).normal(size=(9, D)).astype(np.float32)
    want = select_image(chunks, text, keep, method=method, stage1_ratio=stage1, alignment=alignment, backend="cpu")
    ratio, core_stage1 = (0.8, _core.Stage1.adaptive) if stage1 == "adaptive" else (stage1, _core.Stage1.ratio)
    got = _core.select_image(chunks, text, *core_keep(keep), getattr(_core.Method, method), ratio, 0,
                             alignment=getattr(_core.Alignment, alignment), stage1=core_stage1)
    assert [list(g) for g in got] == [list(w) for w in want]
    paper = _core.select_image(chunks, text, *core_keep(keep), getattr(_core.Method, method), 0.8, 0)
    if method == "trimtokenator" or alignment == "cosine":
        assert [list(g) for g in got] != [list(p) for p in paper]


def test_multi_chunk_budgets_follow_diversity():
    """A chunk of near-duplicate rows gets a smaller share of the budget than an equally large diverse one."""
    rng = np.random.default_rng(1)
    dull = np.tile(rng.normal(size=D), (100, 1)) + 0.01 * rng.normal(size=(100, D))
    lively = rng.normal(size=(100, D))
    got = _core.select_image([dull.astype(np.float32), lively.astype(np.float32)], None, 40, 0.0,
                             _core.Method.divprune, 0.8, 0)
    assert len(got[0]) + len(got[1]) == 40 and len(got[0]) < len(got[1])


@pytest.mark.parametrize("count, share, message", [(-1, 0.0, "keep must be >= 1"), (0, 1.5, r"share must be in \(0, 1\]"),
                                                   (0, -0.1, r"share must be in \(0, 1\]")])
def test_bad_keep_is_a_value_error(count, share, message):
    with pytest.raises(ValueError, match=message):
        _core.select_image(image(0, [10]), None, count, share, _core.Method.trimtokenator, 0.8, 0)


def test_diversity_weight_matches_its_definition():
    rows = np.random.default_rng(2).normal(size=(50, D))
    u = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    mean_cos = ((u @ u.T).sum() - 50) / (50 * 49)
    sq = float(np.sum(u.sum(axis=0) ** 2))
    assert _core.diversity_weight(50, sq) == pytest.approx(50 * (1 - mean_cos), rel=1e-12)
    assert _core.diversity_weight(1, 1.0) == 1.0
