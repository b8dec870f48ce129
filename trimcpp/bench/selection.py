"""Selection benchmark: trimcpp.prune against a plain NumPy float32 implementation of the same
algorithm, timed side by side (interleaved) in one run.

    python -m trimcpp.bench_select [--repeat 50] [--json]

Cases: LLaVA-1.5 (N=576, D=4096, K=64, M=40) and LLaVA-NeXT (5 images of 576 rows sharing a
budget of 320, split with split_budget, each image pruned with its own budget). Then every available
backend (CPU, CUDA, Metal) on one call of N = 576, 1152 and 2880 rows (K=64), timed from host rows
to host indices (uploads included): where a GPU overtakes the CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from functools import partial
from typing import Callable

import numpy as np

from ..selection import apportion, available_backends, diversity_weight, prune, split_budget
from . import machine


def numpy_trimtokenator(v: np.ndarray, t: np.ndarray, keep: int, stage1_ratio: float = 0.8) -> np.ndarray:
    """TrimTokenator in NumPy float32: centroid stage 1, then the greedy stage with a running sum."""
    n = v.shape[0]
    tbar = t.mean(axis=0)
    diff = v - tbar
    d2 = np.einsum("ij,ij->i", diff, diff)
    k1 = min(max(math.floor(stage1_ratio * n + 0.5), keep), n)
    survivors = np.sort(np.argsort(d2, kind="stable")[:k1])
    u = v[survivors]
    u = u / np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-12)
    s = u.sum(axis=0)
    taken = np.zeros(k1, bool)
    picks = []
    for step in range(keep):
        scores = u @ s
        scores[taken] = np.inf
        j = int(np.argmin(scores))
        picks.append(survivors[j])
        taken[j] = True
        s = u[j].copy() if step == 0 else s + u[j]
    return np.sort(np.asarray(picks, dtype=np.int64))


def numpy_split_budget(images: list[np.ndarray], total: int) -> list[int]:
    """The several-images weights in NumPy (the integer apportionment is microseconds of arithmetic)."""
    sizes, weights = [], []
    for x in images:
        u = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        sizes.append(x.shape[0])
        weights.append(diversity_weight(x.shape[0], float(np.sum(u.sum(axis=0, dtype=np.float64) ** 2))))
    return apportion(sizes, weights, total)


def _data(n: int, d: int, m: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    offset = rng.standard_normal(d)
    v = (rng.standard_normal((n, d)) + 0.7 * offset).astype(np.float32)
    t = (rng.standard_normal((m, d)) + 0.3 * offset).astype(np.float32)
    return v, t


def interleaved(calls: list[Callable[[], object]], repeat: int) -> list[float]:
    """Median seconds of each call, run in turn so that all see the same machine load."""
    for call in calls:
        call()
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(repeat):
        for call, spent in zip(calls, times):
            start = time.perf_counter()
            call()
            spent.append(time.perf_counter() - start)
    return [statistics.median(spent) for spent in times]


def backend_sweep(repeat: int, sizes: tuple[int, ...] = (576, 1152, 2880)) -> list[dict]:
    """Median ms of prune(N x 4096, K=64, M=40) on each available backend, for each N."""
    backends = available_backends()
    rows = []
    for n in sizes:
        v, t = _data(n, 4096, 40, n)
        ms = interleaved([lambda b=b, v=v, t=t: prune(v, t, 64, backend=b) for b in backends], repeat)
        rows.append({"rows": n, **{f"{b}_ms": x * 1e3 for b, x in zip(backends, ms)}})
    return rows


def run(repeat: int = 50) -> dict:
    results: dict = {"machine": machine(), "cases": []}

    paper = partial(prune, alignment="l2", stage1_ratio=0.8)  # the form numpy_trimtokenator computes
    v, t = _data(576, 4096, 40, 0)
    same = bool(np.array_equal(paper(v, t, 64), numpy_trimtokenator(v, t, 64)))
    ours, theirs = interleaved([lambda: paper(v, t, 64), lambda: numpy_trimtokenator(v, t, 64)], repeat)
    results["cases"].append(
        {"case": "llava-1.5: N=576 D=4096 K=64 M=40", "trimcpp_ms": ours * 1e3, "numpy_ms": theirs * 1e3,
         "speedup": theirs / ours, "same_selection": same}
    )

    images = [_data(576, 4096, 40, seed)[0] for seed in range(1, 6)]

    def ours_next():
        return [paper(x, t, b) for x, b in zip(images, split_budget(images, 320))]

    def numpy_next():
        return [numpy_trimtokenator(x, t, b) for x, b in zip(images, numpy_split_budget(images, 320))]

    same = all(np.array_equal(a, b) for a, b in zip(ours_next(), numpy_next()))
    ours, theirs = interleaved([ours_next, numpy_next], max(5, repeat // 5))
    results["cases"].append(
        {"case": "llava-next: 5 x 576 rows, D=4096, total 320, M=40", "trimcpp_ms": ours * 1e3,
         "numpy_ms": theirs * 1e3, "speedup": theirs / ours, "same_selection": same,
         "budgets": split_budget(images, 320)}
    )
    results["backends"] = backend_sweep(max(5, repeat // 5))
    calls = {"trimtokenator+l2": ("trimtokenator", "l2"), "trimtokenator+cosine": ("trimtokenator", "cosine"),
             "align+cosine": ("align", "cosine"), "divprune": ("divprune", "l2"), "cdpruner": ("cdpruner", "l2")}
    ms = interleaved([lambda m=m, a=a: prune(v, t, 64, method=m, alignment=a, backend="cpu") for m, a in calls.values()],
                     repeat)
    results["methods"] = [{"method": spec, "ms": x * 1e3} for spec, x in zip(calls, ms)]
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trimcpp.bench_select", description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=50, help="timed runs per case (NeXT: a fifth)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    results = run(args.repeat)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    m = results["machine"]
    print(f"machine: {m['cores']} cpus, {m['cpu']}, trimcpp kernels: {m['kernels']}, numpy {m['numpy']}")
    print(f"{'case':52} {'trimcpp ms':>11} {'numpy ms':>9} {'speedup':>8}  same selection")
    for c in results["cases"]:
        print(f"{c['case']:52} {c['trimcpp_ms']:11.2f} {c['numpy_ms']:9.2f} {c['speedup']:7.2f}x  {c['same_selection']}")
    print(f"\nprune(N x 4096, K=64, M=40) per backend, ms (host rows in, indices out); GPUs: {m['gpus']}")
    sweep = results["backends"]
    names = [k for k in sweep[0] if k != "rows"]
    print(f"{'rows':>6} " + " ".join(f"{k[:-3]:>9}" for k in names))
    for row in sweep:
        print(f"{row['rows']:6d} " + " ".join(f"{row[k]:9.2f}" for k in names))
    print("\nprune(576 x 4096, K=64, M=40) per method on the CPU, ms")
    for row in results["methods"]:
        print(f"{row['method']:22} {row['ms']:9.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
