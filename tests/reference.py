"""A float64 NumPy reference of ALGORITHM.md (the repository root), written from the text, not from the C++.

Each greedy method is a *checker*: it replays the method step by step in float64 and compares
each pick of a backend (given in pick order) with the reference's pick. The two must agree until
the first step where they differ; there the two candidates' objective values must be within 1e-5
relative of each other (a near-tie, ALGORITHM.md "Ties and numerics"), after which the runs may
legitimately diverge and the check stops.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

REL = 1e-5
MASK64 = (1 << 64) - 1


class Mismatch(AssertionError):
    pass


def round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def resolve_keep(keep, n: int) -> int:
    if isinstance(keep, float):
        return max(1, round_half_up(keep * n))
    return keep


def alignment(v: np.ndarray, t: np.ndarray, kind: str = "l2") -> np.ndarray:
    """l2: a_i = -(1/M) sum_j ||v_i - t_j||^2, literally (one text row at a time). cosine: the same of
    the unit rows, -(1/M) sum_j ||v^_i - t^_j||^2 = 2 cos_i - 2 with cos_i = (1/M) sum_j cos(v_i, t_j)
    (mean_cosine), the value ALGORITHM.md judges the cosine's near-ties on."""
    if kind == "cosine":
        v, t = normalized(v), normalized(t)
    v = v.astype(np.float64)
    total = np.zeros(v.shape[0])
    for row in t.astype(np.float64):
        total += ((v - row) ** 2).sum(axis=1)
    return -total / t.shape[0]


def mean_cosine(v: np.ndarray, t: np.ndarray) -> np.ndarray:
    """(1/M) sum_j cos(v_i, t_j), literally."""
    return (normalized(v) @ normalized(t).T).mean(axis=1)


def stage1_size(n: int, keep: int, stage1_ratio) -> int:
    """K1: clamp(round(r1 n), K, N), or for "adaptive" clamp(round(sqrt(K N)), K, N)."""
    x = math.sqrt(keep * n) if stage1_ratio == "adaptive" else stage1_ratio * n
    return min(max(round_half_up(x), keep), n)


def normalized(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _dedup(v: np.ndarray):
    """(normalised unique rows, inverse, counts): values computed on unique rows are bit-identical
    for copies, so exact ties stay exact ties (BLAS may round copies differently)."""
    uniq, inverse, counts = np.unique(v, axis=0, return_inverse=True, return_counts=True)
    return normalized(uniq), inverse.reshape(-1), counts


def _near(a: float, b: float, scale: float) -> bool:
    return abs(a - b) <= REL * max(abs(a), abs(b), scale)


def _argbest(values: np.ndarray, allowed: np.ndarray, lowest: bool = True) -> int:
    """Index of the lowest (or highest) allowed value, ties to the lowest index."""
    masked = np.where(allowed, values if lowest else -values, np.inf)
    return int(np.argmin(masked))  # np.argmin returns the first of equal minima


def _run(steps, count: int) -> list[int]:
    """The reference's own picks: feed the step generator its own argmins."""
    picks, state = [], steps()
    values, allowed, lowest, _ = next(state)
    for _ in range(count):
        picks.append(_argbest(values, allowed, lowest))
        try:
            values, allowed, lowest, _ = state.send(picks[-1])
        except StopIteration:
            break
    return picks


def _check_sequence(picks, steps, what: str) -> None:
    """steps yields (values, allowed, lowest, scale) per step and receives the pick."""
    state = steps()
    values, allowed, lowest, scale = next(state)
    for t, pick in enumerate(picks):
        pick = int(pick)
        ref = _argbest(values, allowed, lowest)
        if pick != ref:
            if not allowed[pick]:
                raise Mismatch(f"{what}: step {t} picked {pick}, which is not selectable")
            if _near(values[pick], values[ref], scale):
                return  # a near-tie: the runs may part here
            raise Mismatch(
                f"{what}: step {t} picked {pick} (objective {values[pick]!r}), "
                f"reference picks {ref} (objective {values[ref]!r})"
            )
        try:
            values, allowed, lowest, scale = state.send(pick)
        except StopIteration:
            return


def _finish(picks, steps, what: str, exact: bool) -> None:
    """exact: the picks must be the reference's, step for step (no near-tie allowance)."""
    if exact:
        expected = _run(steps, len(picks))
        if [int(p) for p in picks] != expected:
            raise Mismatch(f"{what}: picks {list(map(int, picks))} != reference {expected}")
    else:
        _check_sequence(picks, steps, what)


def _keeps_all(picks, n: int, keep: int) -> bool:
    """True (after checking the answer) when K >= N; else checks K distinct picks and says False."""
    if keep >= n:
        assert list(picks) == list(range(n))
        return True
    assert len(picks) == keep and len(set(map(int, picks))) == keep
    return False


def stage1_survivors(v, t, keep: int, stage1_ratio, kind: str = "l2"):
    """(K1, survivors ascending, a) of stage 1; all rows when there is no text."""
    n = v.shape[0]
    if t is None or t.shape[0] == 0:
        return n, np.arange(n), None
    k1 = stage1_size(n, keep, stage1_ratio)
    a = alignment(v, t, kind)
    order = np.lexsort((np.arange(n), -a))  # highest a first, ties to the lower index
    return k1, np.sort(order[:k1]), a


def check_trimtokenator(picks, v, t, keep, stage1_ratio=0.8, exact=False, alignment_kind="l2") -> None:
    n = v.shape[0]
    keep = resolve_keep(keep, n)
    if _keeps_all(picks, n, keep):
        return
    k1, survivors, a = stage1_survivors(v, t, keep, stage1_ratio, alignment_kind)
    inside = np.zeros(n, bool)
    inside[survivors] = True
    outside = [int(p) for p in picks if not inside[int(p)]]
    if outside:
        if exact:
            raise Mismatch(f"trimtokenator: picks {outside} did not survive stage 1")
        boundary = np.sort(a)[::-1][k1 - 1]
        for p in outside:
            if not _near(a[p], boundary, 0.0):
                raise Mismatch(f"trimtokenator: pick {p} did not survive stage 1 (a={a[p]!r}, boundary {boundary!r})")
        return  # the survivor sets part at a near-tie in stage 1
    if keep >= k1:
        assert sorted(map(int, picks)) == list(survivors)
        return
    uu, inverse, _ = _dedup(v)
    u = uu[inverse]

    def steps():
        allowed = inside.copy()
        total = u[survivors].sum(axis=0)
        # First pick: argmin u_i . sum_U u; objective scale ||sum_U u||.
        pick = yield (uu @ total)[inverse], allowed, True, float(np.linalg.norm(total))
        s = np.zeros(v.shape[1])
        while True:
            allowed[pick] = False
            s = s + u[pick]
            pick = yield (uu @ s)[inverse], allowed, True, float(np.linalg.norm(s))

    _finish(picks, steps, "trimtokenator", exact)


def check_align(picks, v, t, keep, exact=False, alignment_kind="l2") -> None:
    n = v.shape[0]
    keep = resolve_keep(keep, n)
    if keep >= n:
        assert list(picks) == list(range(n))
        return
    if t is None or t.shape[0] == 0:  # all scores tie: the first K rows
        assert list(picks) == list(range(keep))
        return
    a = alignment(v, t, alignment_kind)

    def steps():
        allowed = np.ones(n, bool)
        while True:
            pick = yield a, allowed, False, 0.0
            allowed[pick] = False

    assert len(picks) == keep
    _finish(picks, steps, "align", exact)


def check_divprune(picks, v, keep, exact=False) -> None:
    n = v.shape[0]
    keep = resolve_keep(keep, n)
    if _keeps_all(picks, n, keep):
        return
    uu, inverse, counts = _dedup(v)
    dist = 1.0 - uu @ uu.T
    self_dist = 1.0 - np.einsum("ij,ij->i", uu, uu)
    np.fill_diagonal(dist, np.inf)
    nearest = dist.min(axis=1)  # cosine distance to the nearest other row
    nearest = np.where(counts > 1, np.minimum(nearest, self_dist), nearest)[inverse]

    def steps():
        allowed = np.ones(n, bool)
        pick = yield nearest, allowed, False, 1.0
        mind = np.full(n, np.inf)
        while True:
            allowed[pick] = False
            mind = np.minimum(mind, (1.0 - uu @ uu[inverse[pick]])[inverse])
            pick = yield mind, allowed, False, 1.0

    _finish(picks, steps, "divprune", exact)


CDPRUNER_FLOOR = 1e-4  # a d2 at or under this counts as 0 (ALGORITHM.md)
CDPRUNER_FLAT = 1e-6  # a relevance spread at or under this: every row equally relevant


def cdpruner_relevance(u, t) -> np.ndarray:
    """q of ALGORITHM.md for the unit rows u: the mean cosine to the text rows scaled to [0, 1]; all
    ones without text or when every row scores the same."""
    if t is None or t.shape[0] == 0:
        return np.ones(u.shape[0])
    r = (u @ normalized(t).T).mean(axis=1)
    spread = r.max() - r.min()
    return (r - r.min()) / spread if spread > CDPRUNER_FLAT else np.ones(u.shape[0])




def check_cdpruner(picks, v, t, keep, exact=False) -> None:
    """CDPruner's greedy MAP inference, literally: the kernel L = diag(q) S diag(q) built whole."""
    n = v.shape[0]
    keep = resolve_keep(keep, n)
    if _keeps_all(picks, n, keep):
        return
    uu, inverse, _ = _dedup(v)  # copies get bit-identical kernel values, so their ties stay exact
    q = cdpruner_relevance(uu, t)[inverse]
    kernel = q[:, None] * (uu @ uu.T)[np.ix_(inverse, inverse)] * q[None, :]
    norms = np.linalg.norm(v.astype(np.float64), axis=1)
    self_similarity = np.where(norms >= 1e-12, 1.0, norms**2 * 1e24)  # exactly 1 but for a (near) zero row
    np.fill_diagonal(kernel, q**2 * self_similarity)

    def steps():
        allowed = np.ones(n, bool)
        d2 = np.diag(kernel).copy()
        columns = []
        while True:
            pick = yield np.where(d2 > CDPRUNER_FLOOR, d2, 0.0), allowed, False, 1.0
            allowed[pick] = False
            if d2[pick] > CDPRUNER_FLOOR:
                e = (kernel[pick] - sum(c[pick] * c for c in columns)) / math.sqrt(d2[pick])
                columns.append(e)
                d2 = d2 - e**2

    _finish(picks, steps, "cdpruner", exact)


def uniform(n: int, keep: int) -> list[int]:
    if keep >= n:
        return list(range(n))
    if keep == 1:
        return [0]
    return [math.floor(Fraction(i * (n - 1), keep - 1) + Fraction(1, 2)) for i in range(keep)]


def _splitmix64(state: int):
    while True:
        state = (state + 0x9E3779B97F4A7C15) & MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        yield z ^ (z >> 31)


def random_draws(n: int, keep: int, seed: int) -> list[int]:
    """README's generator: splitmix64(seed), partial Fisher-Yates, j = i + floor(x (n - i) / 2^64)."""
    if keep >= n:
        return list(range(n))
    perm = list(range(n))
    draws = _splitmix64(seed & MASK64)
    for i in range(keep):
        j = i + ((next(draws) * (n - i)) >> 64)
        perm[i], perm[j] = perm[j], perm[i]
    return perm[:keep]


def split_budget(images, total: int) -> list[int]:
    """ALGORITHM.md's several-images rule with README's reading of "proportional, in [1, m_k]":
    real budgets q_k = clamp(lambda w_k, 1, m_k) summing to B = min(total, sum m_k), then floors
    and the remaining units to the largest fractional parts (ties to the lower image)."""
    sizes = [x.shape[0] for x in images]
    weights = []
    for x in images:
        m = x.shape[0]
        sq = float(np.sum(normalized(x).sum(axis=0) ** 2))
        d_intra = 1.0 - (sq - m) / (m * (m - 1)) if m > 1 else 1.0
        weights.append(max(m * max(d_intra, 0.0), 1e-6 * m))
    budget = min(total, sum(sizes))
    if budget == sum(sizes):
        return sizes

    def q(lam):
        return [min(max(lam * w, 1.0), m) for w, m in zip(weights, sizes)]

    # f(lambda) = sum q is piecewise linear; find the piece where it reaches the budget, solve in it.
    points = sorted({1.0 / w for w in weights} | {m / w for w, m in zip(weights, sizes)})
    lo = 0.0
    for hi in points:
        if sum(q(hi)) >= budget:
            break
        lo = hi
    mid = (lo + hi) / 2
    free = [1.0 < mid * w < m for w, m in zip(weights, sizes)]
    pinned = sum(m if mid * w >= m else 1.0 for w, m, f in zip(weights, sizes, free) if not f)
    free_w = sum(w for w, f in zip(weights, free) if f)
    lam = (budget - pinned) / free_w if free_w > 0 else mid
    quotas = [lam * w if f else (1.0 if mid * w <= 1.0 else float(m)) for w, m, f in zip(weights, sizes, free)]
    out = [min(max(math.floor(x), 1), m) for x, m in zip(quotas, sizes)]
    order = sorted(range(len(out)), key=lambda k: (-(quotas[k] - math.floor(quotas[k])), k))
    while sum(out) < budget:
        for k in order:
            if sum(out) < budget and out[k] < sizes[k]:
                out[k] += 1
    return out
