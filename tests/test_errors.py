"""Bad input gives a Python exception whose message starts with the function's name."""

from __future__ import annotations

import numpy as np
import pytest

import trimcpp
from trimcpp.selection import METHODS

rng = np.random.default_rng(0)
V = rng.standard_normal((50, 16)).astype(np.float32)
T = rng.standard_normal((4, 16)).astype(np.float32)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(visual=V[0]), ValueError, "visual must be 2-D"),
        (dict(visual=V[None]), ValueError, "visual must be 2-D"),
        (dict(text=T[0]), ValueError, "text must be 2-D"),
        (dict(text=T[:, :8]), ValueError, "text has D = 8"),
        (dict(visual=V[:0]), ValueError, "N = 0"),
        (dict(visual=np.zeros((5, 0), np.float32), text=None), ValueError, "D = 0"),
        (dict(keep=0), ValueError, "keep must be >= 1, got 0"),
        (dict(keep=-3), ValueError, "keep must be >= 1"),
        (dict(keep=0.0), ValueError, "(0, 1]"),
        (dict(keep=1.5), ValueError, "(0, 1]"),
        (dict(keep=float("nan")), ValueError, "(0, 1]"),
        (dict(keep="64"), TypeError, "keep must be an int or a float"),
        (dict(keep=True), TypeError, "keep must be an int or a float"),
        (dict(keep=None), TypeError, "keep must be an int or a float"),
        (dict(stage1_ratio=0.0), ValueError, "stage1_ratio must be in (0, 1]"),
        (dict(stage1_ratio=1.01), ValueError, "stage1_ratio must be in (0, 1]"),
        (dict(stage1_ratio=float("nan")), ValueError, "stage1_ratio"),
        (dict(stage1_ratio="0.8"), TypeError, "stage1_ratio must be a float"),
        (dict(method="bogus"), ValueError, "unknown method 'bogus'"),
        (dict(method=3), TypeError, "method must be a string"),
        (dict(seed=1.5), TypeError, "seed must be an int"),
        (dict(visual=np.array([["a", "b"]])), TypeError, "visual must be a numeric array"),
        (dict(visual=np.ones((4, 4), bool)), TypeError, "visual must be a numeric array"),
        (dict(visual=np.ones((4, 4), complex)), TypeError, "visual must be a numeric array"),
        (dict(visual=np.array([[object()]])), TypeError, "visual must be a numeric array"),
        (dict(text=[["x"] * 16]), TypeError, "text must be a numeric array"),
        (dict(visual=[[1.0, 2.0], [3.0]]), TypeError, "visual must be a numeric array"),
        (dict(backend="tpu"), ValueError, "unknown backend 'tpu'"),
        (dict(backend=0), TypeError, "backend must be a string"),
    ],
)
def test_prune_argument_errors(kwargs, error, words):
    args = dict(visual=V, text=T, keep=8)
    args.update(kwargs)
    with pytest.raises(error) as info:
        trimcpp.prune(args.pop("visual"), args.pop("text"), args.pop("keep"), **args)
    message = str(info.value)
    assert message.startswith("prune: ") and words in message, message


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("where", ["visual", "text"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("keep", [8, 500])
def test_non_finite_values(method, where, bad, keep):
    v, t = V.copy(), T.copy()
    (v if where == "visual" else t)[3, 5] = bad
    with pytest.raises(ValueError, match=f"^prune: {where} contains NaN or inf"):
        trimcpp.prune(v, t, keep, method=method)


@pytest.mark.parametrize("method", ["trimtokenator", "divprune", "cdpruner"])
def test_bad_rows_seen_by_a_later_thread(method):
    """Rows enough for several threads (300 x 4096): a bad row in the last thread's share."""
    big = np.random.default_rng(3).standard_normal((300, 4096)).astype(np.float32)
    text = np.random.default_rng(4).standard_normal((4, 4096)).astype(np.float32)
    for value, words in ((np.nan, "contains NaN or inf"), (1e30, "has values too large")):
        bad = big.copy()
        bad[290] = value
        with pytest.raises(ValueError, match=f"^prune: visual {words}"):
            trimcpp.prune(bad, text, 16, method=method, alignment="l2")
    assert len(trimcpp.prune(big, text, 16, method=method)) == 16  # and the core goes on


def test_float64_overflowing_float32_is_reported():
    v = V.astype(np.float64)
    v[1, 1] = 1e300
    with pytest.raises(ValueError, match="^prune: visual contains NaN or inf"):
        trimcpp.prune(v, T, 8)


@pytest.mark.parametrize("method", ["trimtokenator", "align", "divprune", "cdpruner"])
def test_huge_finite_values_are_an_error_not_a_crash(method):
    v = V.copy()
    v[2] = 1e30  # finite, but its squared norm overflows float32 (the cosine score divides in double first)
    with pytest.raises(ValueError, match="^prune: visual has values too large"):
        trimcpp.prune(v, T, 8, method=method, alignment="l2")
    if method in ("trimtokenator", "align"):  # the cosine (the default) divides by the norm in double first
        assert len(trimcpp.prune(v, T, 8, method=method)) == 8


def test_unavailable_backend_is_a_runtime_error():
    missing = [b for b in ("cuda", "metal") if b not in trimcpp.available_backends()]
    if not missing:
        pytest.skip("every backend is available on this machine")
    with pytest.raises(RuntimeError, match=f"^prune: backend '{missing[0]}' is not available"):
        trimcpp.prune(V, T, 8, backend=missing[0])


def test_alignment_scores_errors():
    with pytest.raises(ValueError, match="^alignment_scores: text has no rows"):
        trimcpp.alignment_scores(V, T[:0])
    with pytest.raises(ValueError, match="^alignment_scores: text is required"):
        trimcpp.alignment_scores(V, None)
    with pytest.raises(ValueError, match="^alignment_scores: text has D = 8"):
        trimcpp.alignment_scores(V, T[:, :8])
    bad = V.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="^alignment_scores: visual contains NaN or inf"):
        trimcpp.alignment_scores(bad, T)


def test_split_budget_errors():
    with pytest.raises(ValueError, match="^split_budget: images must be a non-empty list"):
        trimcpp.split_budget([], 10)
    with pytest.raises(ValueError, match="^split_budget: total must be at least the number of images"):
        trimcpp.split_budget([V, V, V], 2)
    with pytest.raises(TypeError, match="^split_budget: total must be an int"):
        trimcpp.split_budget([V], 2.5)
    with pytest.raises(ValueError, match=r"^split_budget: images\[1\] is empty"):
        trimcpp.split_budget([V, V[:0]], 10)
    with pytest.raises(ValueError, match=r"^split_budget: images\[0\] must be 2-D"):
        trimcpp.split_budget([V[0]], 10)
    bad = V.copy()
    bad[4, 4] = np.inf
    with pytest.raises(ValueError, match=r"^split_budget: images\[1\] contains NaN or inf"):
        trimcpp.split_budget([V, bad], 10)


def test_errors_leave_the_module_usable():
    for _ in range(3):
        with pytest.raises(ValueError):
            trimcpp.prune(np.full((10, 4), np.nan, np.float32), None, 2)
    assert len(trimcpp.prune(V, T, 8)) == 8
