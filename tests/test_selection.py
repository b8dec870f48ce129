"""Every selection method against the float64 reference of ALGORITHM.md (tests/reference.py)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import trimcpp
from trimcpp.selection import DEFAULT_ALIGNMENT, pick_order

import reference as ref
from helpers import SCORED, check, check_duplicate_ties, embeddings, methods_on


@pytest.mark.parametrize("n", [1, 2, 31, 577, 2880])
@pytest.mark.parametrize("d", [1, 33, 4096])
@pytest.mark.parametrize("m", [0, 1, 40])
@pytest.mark.parametrize("method", ["trimtokenator", "align"])
def test_text_methods_grid(backend, method, n, d, m):
    v, t = embeddings(n, d, m)
    for keep in (1, 64, 0.3, n + 5):
        picks = pick_order(v, t, keep, method=method, backend=backend)
        check(method, picks, v, t, keep)


@pytest.mark.parametrize("n", [1, 2, 31, 577, 2880])
@pytest.mark.parametrize("d", [1, 33, 4096])
def test_divprune_grid(backend, n, d):
    v, _ = embeddings(n, d, 0)
    for keep in (1, 64, n):
        check("divprune", pick_order(v, None, keep, method="divprune", backend=backend), v, None, keep)


@pytest.mark.parametrize("n", [1, 2, 31, 577, 2880])
@pytest.mark.parametrize("d", [1, 33, 4096])
@pytest.mark.parametrize("m", [0, 1, 40])
def test_cdpruner_grid(n, d, m):
    v, t = embeddings(n, d, m)
    for keep in (1, 64, 0.3, n):
        check("cdpruner", pick_order(v, t, keep, method="cdpruner"), v, t, keep)


def test_the_default_stage1_is_the_cosine():
    """The numbers chose it (RESULTS.md, Quality): every default of the Python side is it."""
    import inspect

    from trimcpp.cli import _parser
    from trimcpp.handlers.mechanism import Trimming
    from trimcpp.serve import TrimModelSettings

    assert (trimcpp.selection.DEFAULT_ALIGNMENT, trimcpp.selection.DEFAULT_STAGE1_RATIO) == ("cosine", 0.8)
    for func in (trimcpp.prune, pick_order, trimcpp.alignment_scores, Trimming.__init__):
        assert inspect.signature(func).parameters["alignment"].default == "cosine", func
    for command in ("chat", "show"):
        args = _parser().parse_args([command, "--model", "m", "--mmproj", "p", "--image", "i", "q"])
        assert (args.alignment, args.stage1_ratio) == ("cosine", 0.8)
    assert TrimModelSettings.model_fields["alignment"].default == "cosine"


def test_cdpruner_uses_the_question_and_the_gpus_refuse_it(monkeypatch):
    v, t = embeddings(300, 64, 6)
    _, other = embeddings(300, 64, 6, seed=1)
    with_text = trimcpp.prune(v, t, 24, method="cdpruner")
    assert list(with_text) != list(trimcpp.prune(v, other, 24, method="cdpruner"))
    assert list(with_text) != list(trimcpp.prune(v, None, 24, method="cdpruner"))
    args = (v, t, 24, trimcpp._core.Method.cdpruner, 0.8, 0)
    for gpu in (trimcpp._core.Backend.cuda, trimcpp._core.Backend.metal):
        with pytest.raises(ValueError, match="cdpruner runs on the CPU backend only"):
            trimcpp._core.select(*args, gpu)
    monkeypatch.setattr(trimcpp.selection, "check_backend", lambda func, backend: None)  # as if a GPU were here
    with pytest.raises(ValueError, match="prune: method 'cdpruner' runs on the CPU backend only, not 'cuda'"):
        trimcpp.prune(v, t, 24, method="cdpruner", backend="cuda")
    bad = v.copy()
    bad[0] = np.nan  # the CPU-only check comes first, before anything reads the rows
    with pytest.raises(ValueError, match="cdpruner runs on the CPU backend only"):
        trimcpp._core.select(bad, t, 1000, trimcpp._core.Method.cdpruner, 0.8, 0, trimcpp._core.Backend.cuda)
    with pytest.raises(ValueError, match="keep must be >= 1"):
        trimcpp._core.select(v, t, 0, trimcpp._core.Method.cdpruner, 0.8, 0, trimcpp._core.Backend.cpu)
    monkeypatch.setattr(trimcpp.selection, "backend_for", lambda rows: "cuda" if rows else "cpu")
    assert list(trimcpp.prune(v, t, 24, method="cdpruner")) == list(with_text)  # backend=None: the CPU


@pytest.mark.parametrize("case", range(40))
def test_random_cases_all_methods(backend, case):
    rng = np.random.default_rng(1000 + case)
    n, d, m = int(rng.integers(1, 700)), int(rng.integers(1, 300)), int(rng.integers(0, 50))
    v, t = embeddings(n, d, m, seed=case)
    keep = int(rng.integers(1, n + 3)) if case % 3 else float(rng.uniform(0.01, 1.0))
    ratio = float(rng.uniform(0.05, 1.0))
    seed = int(rng.integers(0, 2**63))
    for method in methods_on(backend):
        picks = pick_order(v, t, keep, method=method, stage1_ratio=ratio, seed=seed, backend=backend)
        check(method, picks, v, t, keep, ratio, seed)
        result = trimcpp.prune(v, t, keep, method=method, stage1_ratio=ratio, seed=seed, backend=backend)
        assert result.dtype == np.int64
        assert list(result) == sorted(picks)


@pytest.mark.parametrize("ratio", [1.0, 0.5, 1e-6])
def test_stage1_ratio_extremes(backend, ratio):
    v, t = embeddings(577, 33, 40)
    for keep in (1, 64, 400):
        picks = pick_order(v, t, keep, stage1_ratio=ratio, backend=backend)
        ref.check_trimtokenator(picks, v, t, keep, ratio, alignment_kind=DEFAULT_ALIGNMENT)


def test_tiny_stage1_ratio_is_pure_alignment(backend):
    # K1 = clamp(round(r1 N), K, N) = K: stage 2 has nothing to drop, so trimtokenator == align as a set.
    v, t = embeddings(577, 33, 40)
    a = trimcpp.prune(v, t, 64, stage1_ratio=1e-6, backend=backend)
    b = trimcpp.prune(v, t, 64, method="align", backend=backend)
    assert list(a) == list(b)


@pytest.mark.parametrize("method", [*SCORED, "cdpruner"])
def test_duplicate_rows_ties_go_to_the_lower_index(backend, method):
    if method not in methods_on(backend):
        with pytest.raises(ValueError, match="CPU backend only"):
            pick_order(*embeddings(40, 8, 2), 5, method=method, backend=backend)
        return
    check_duplicate_ties(method, lambda v, t, keep: pick_order(v, t, keep, method=method, backend=backend))


def test_all_identical_rows_keep_the_first_k(backend):
    v = np.tile(np.arange(1, 34, dtype=np.float32), (50, 1))
    t = np.ones((3, 33), np.float32)
    for method in [m for m in ("trimtokenator", "align", "divprune", "cdpruner") if m in methods_on(backend)]:
        assert list(trimcpp.prune(v, t, 7, method=method, backend=backend)) == list(range(7))


def test_checker_catches_a_wrong_pick():
    # The reference must be able to fail: a reversed greedy order is not a near-tie.
    v, t = embeddings(200, 64, 10)
    picks = pick_order(v, t, 30)
    ref.check_trimtokenator(picks, v, t, 30, alignment_kind=DEFAULT_ALIGNMENT)
    with pytest.raises(ref.Mismatch):
        ref.check_trimtokenator(picks[::-1], v, t, 30, alignment_kind=DEFAULT_ALIGNMENT)
    dp = pick_order(v, None, 30, method="divprune")
    with pytest.raises(ref.Mismatch):
        ref.check_divprune(np.roll(dp, 1), v, 30)
    cd = pick_order(v, t, 30, method="cdpruner")
    ref.check_cdpruner(cd, v, t, 30)
    with pytest.raises(ref.Mismatch):
        ref.check_cdpruner(np.roll(cd, 1), v, t, 30)
    with pytest.raises(ref.Mismatch):  # the question matters to the reference too
        ref.check_cdpruner(cd, v, None, 30, exact=True)


def test_keep_semantics():
    v, t = embeddings(576, 33, 4)
    assert len(trimcpp.prune(v, t, 64)) == 64
    assert len(trimcpp.prune(v, t, 0.5)) == 288
    assert len(trimcpp.prune(v, t, 1e-9)) == 1  # max(1, round(r N))
    assert len(trimcpp.prune(v, t, 1.0)) == 576
    assert list(trimcpp.prune(v, t, 10_000)) == list(range(576))
    assert len(trimcpp.prune(v, t, np.int32(5))) == 5
    assert len(trimcpp.prune(v[:5], t, 0.5)) == 3  # round half up: 2.5 -> 3


def test_random_method_properties():
    v, _ = embeddings(300, 8, 0)
    a = trimcpp.prune(v, keep=40, method="random", seed=1)
    assert len(set(a)) == 40 and list(a) == sorted(a) and a.min() >= 0 and a.max() < 300
    assert list(a) == list(trimcpp.prune(v, keep=40, method="random", seed=1))
    assert list(a) != list(trimcpp.prune(v, keep=40, method="random", seed=2))


@pytest.mark.parametrize("dtype", [np.float16, np.float64, np.int32])
def test_dtypes_match_float32(dtype):
    v, t = embeddings(200, 40, 8)
    v, t = v.astype(dtype), t.astype(dtype)
    v32, t32 = v.astype(np.float32), t.astype(np.float32)
    for method in trimcpp.selection.METHODS:
        assert list(trimcpp.prune(v, t, 20, method=method)) == list(trimcpp.prune(v32, t32, 20, method=method))


def test_non_contiguous_inputs():
    v, t = embeddings(300, 40, 8)
    wide = np.zeros((300, 80), np.float32)
    wide[:, ::2] = v
    fortran = np.asfortranarray(t)
    assert list(trimcpp.prune(wide[:, ::2], fortran, 32)) == list(trimcpp.prune(v, t, 32))
    lists = trimcpp.prune(v[:20].tolist(), t.tolist(), 5)
    assert list(lists) == list(trimcpp.prune(v[:20], t, 5))


def test_alignment_scores_match_reference():
    for n, d, m in [(1, 1, 1), (31, 33, 40), (577, 4096, 40), (50, 7, 1)]:
        v, t = embeddings(n, d, m)
        for kind in ("l2", "cosine"):
            got = trimcpp.alignment_scores(v, t, alignment=kind)
            assert got.dtype == np.float32 and got.shape == (n,)
            np.testing.assert_allclose(got, ref.alignment(v, t, kind), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(trimcpp.alignment_scores(v, t),
                                      trimcpp.alignment_scores(v, t, alignment=DEFAULT_ALIGNMENT))


def test_split_budget_matches_reference():
    rng = np.random.default_rng(3)
    for _ in range(30):
        count = int(rng.integers(1, 7))
        images = []
        for _ in range(count):
            m, d = int(rng.integers(1, 200)), int(rng.integers(1, 40))
            spread = float(rng.choice([0.0, 0.2, 1.0, 5.0]))
            images.append((rng.standard_normal(d) + spread * rng.standard_normal((m, d))).astype(np.float32))
        total = int(rng.integers(count, sum(x.shape[0] for x in images) + 20))
        got = trimcpp.split_budget(images, total)
        assert got == ref.split_budget(images, total)
        assert sum(got) == min(total, sum(x.shape[0] for x in images))
        assert all(1 <= b <= x.shape[0] for b, x in zip(got, images))


def test_split_budget_llava_next():
    rng = np.random.default_rng(4)
    same = [rng.standard_normal((576, 64)).astype(np.float32)] * 5
    assert trimcpp.split_budget(same, 320) == [64] * 5
    varied = [(rng.standard_normal(64) + s * rng.standard_normal((576, 64))).astype(np.float32) for s in (0.1, 0.3, 1, 3, 9)]
    budgets = trimcpp.split_budget(varied, 320)
    assert sum(budgets) == 320 and budgets == sorted(budgets)  # more diverse images get more rows
    assert budgets == ref.split_budget(varied, 320)


def test_threads_and_repeat_calls_agree():
    v, t = embeddings(577, 512, 40)
    expected = trimcpp.prune(v, t, 64)
    results = [None] * 6

    def work(i):
        results[i] = trimcpp.prune(v, t, 64)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for r in results:
        assert list(r) == list(expected)


def test_available_backends():
    backends = trimcpp.available_backends()
    assert backends[0] in ("cpu", "cuda", "metal") and "cpu" in backends


@pytest.mark.parametrize("n,d,m", [(2, 33, 1), (31, 1, 40), (577, 33, 40), (577, 4096, 1), (2880, 33, 40)])
@pytest.mark.parametrize("alignment", ["l2", "cosine"])
@pytest.mark.parametrize("stage1_ratio", [0.8, "adaptive"])
def test_stage1_variants_grid(backend, n, d, m, alignment, stage1_ratio):
    """The variants of stage 1 (ALGORITHM.md, ours): the cosine score and the adaptive K1."""
    v, t = embeddings(n, d, m)
    for keep in (1, 16, 64, 0.3, n + 5):
        for method in ("trimtokenator", "align"):
            picks = pick_order(v, t, keep, method=method, stage1_ratio=stage1_ratio, alignment=alignment, backend=backend)
            check(method, picks, v, t, keep, stage1_ratio, alignment=alignment)
    # divprune reads no text: the variants change nothing
    assert list(pick_order(v, t, 8, method="divprune", alignment=alignment, stage1_ratio=stage1_ratio,
                           backend=backend)) == list(pick_order(v, t, 8, method="divprune", backend=backend))


def test_variants_change_the_selection():
    """Rows of different norms: L2 ranks mostly by norm, cosine by direction; adaptive keeps fewer."""
    rng = np.random.default_rng(5)
    direction = rng.standard_normal(64)
    v = (rng.standard_normal((256, 64)) + 0.3 * direction) * rng.uniform(0.2, 5.0, (256, 1))
    t = direction[None, :] + 0.1 * rng.standard_normal((4, 64))
    v, t = v.astype(np.float32), t.astype(np.float32)
    l2 = trimcpp.alignment_scores(v, t, alignment="l2")
    cosine = trimcpp.alignment_scores(v, t, alignment="cosine")
    literal = ref.mean_cosine(v, t)
    np.testing.assert_allclose(cosine, 2 * literal - 2, atol=1e-5)
    assert np.corrcoef(l2, -np.linalg.norm(v, axis=1))[0, 1] > 0.9  # L2 ranks these rows mostly by their norm
    align = {a: set(trimcpp.prune(v, t, 32, method="align", alignment=a)) for a in ("l2", "cosine")}
    assert len(align["l2"] & align["cosine"]) < 24
    assert trimcpp.selection._core.adaptive_stage1_count(256, 32) == 91  # round(sqrt(8192)) = round(90.5...)


def test_adaptive_stage1_count_is_exact():
    import math

    count = trimcpp.selection._core.adaptive_stage1_count
    for n in (1, 2, 3, 7, 31, 256, 576, 2880, 10**6 + 3):
        for k in (1, 2, 3, 16, 32, 64, 320, n):
            if k > n:
                continue
            s = math.isqrt(k * n)
            want = min(max(s + (k * n > s * s + s), k), n)  # floor(sqrt(kn) + 1/2), in integers
            assert count(n, k) == want == ref.stage1_size(n, k, "adaptive"), (n, k)


def test_variant_arguments():
    v, t = embeddings(31, 8, 3)
    with pytest.raises(ValueError, match="prune: unknown alignment 'dot'"):
        trimcpp.prune(v, t, 4, alignment="dot")
    with pytest.raises(TypeError, match="prune: stage1_ratio must be a float in \\(0, 1\\] or 'adaptive', got 'auto'"):
        trimcpp.prune(v, t, 4, stage1_ratio="auto")
    with pytest.raises(ValueError, match="alignment_scores: unknown alignment"):
        trimcpp.alignment_scores(v, t, alignment="dot")
    bad = v.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="visual contains NaN or inf"):
        trimcpp.prune(bad, t, 4, alignment="cosine")
    big = np.full((31, 8), 3e30, np.float32)  # squared norms overflow float32: the cosine works on unit rows
    assert len(trimcpp.prune(big + embeddings(31, 8, 0)[0], t, 4, method="align", alignment="cosine")) == 4
