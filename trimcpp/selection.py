"""The selection API: which image rows to keep (ALGORITHM.md), on the best available backend."""

from __future__ import annotations

import math
import warnings
from functools import partial
from typing import Optional, Sequence, Union

import numpy as np
from numpy.typing import ArrayLike

from . import _core

BACKENDS = ("cpu", "cuda", "metal")
METHODS = ("trimtokenator", "align", "divprune", "cdpruner", "uniform", "random", "none")
CPU_ONLY = ("cdpruner",)  # methods the GPU backends do not run (backend=None runs them on the CPU)
ALIGNMENTS = ("l2", "cosine")  # stage 1's score: the paper's L2, or (ours) the cosine (ALGORITHM.md)
ADAPTIVE = "adaptive"  # stage1_ratio: K1 = round(sqrt(K N)) instead of a share of N (ours, ALGORITHM.md)

Keep = Union[int, float]
Stage1 = Union[float, str]

# TrimTokenator's stage 1 by default, everywhere a default exists (ALGORITHM.md says why).
DEFAULT_ALIGNMENT = "cosine"
DEFAULT_STAGE1_RATIO: Stage1 = 0.8
KEEP_SHARE = 1 / 9  # default share of an image's rows where the count varies: the paper's 64 of 576

# backend=None runs on a GPU from this many image rows up, on the CPU below. An estimate, not yet a
# measurement (no GPU has run this code so far): under it the CPU selects in a few ms and a GPU
# would spend about as long uploading the rows and launching 2 kernels per kept row. See README.
GPU_MIN_ROWS = 1024

_AVAILABLE = {"cpu": _core.cpu_available, "cuda": _core.cuda_available, "metal": _core.metal_available}


def available_backends() -> list[str]:
    """The backends usable on this machine: ``"cpu"`` first, then any GPU backend that this build
    has and that finds a working device at run time (``["cpu"]`` on a machine without a GPU)."""
    return [name for name in BACKENDS if _AVAILABLE[name]()]


def cpu_kernels() -> str:
    """Which build of the CPU inner loops runs here ("avx2" or "generic")."""
    return _core.cpu_isa()


def gpu_devices() -> dict[str, str]:
    """Each GPU backend's device name, or why there is none (e.g. "not built (TRIMCPP_CUDA=OFF)")."""
    return {"cuda": _core.cuda_device(), "metal": _core.metal_device()}


def backend_for(rows: int) -> str:
    """The backend ``backend=None`` picks for `rows` image rows: a usable GPU from GPU_MIN_ROWS up,
    else the CPU."""
    gpus = [name for name in available_backends() if name != "cpu"]
    return gpus[0] if gpus and rows >= GPU_MIN_ROWS else "cpu"


def _run_on(func: str, backend: Optional[str], rows: int, call):
    """call(backend name) on `backend`, or for None on backend_for(rows), falling back to the CPU
    with a RuntimeWarning when the GPU fails (no device, driver or runtime error)."""
    chosen = backend_for(rows) if backend is None else backend
    try:
        return call(chosen)
    except RuntimeError as error:
        if backend is not None or chosen == "cpu":
            raise RuntimeError(f"{func}: {error}") from None
        warnings.warn(f"{func}: the {chosen} backend failed ({error}); selecting on the CPU instead",
                      RuntimeWarning, stacklevel=3)
        return call("cpu")


def check_backend(func: str, backend: Optional[str]) -> None:
    """Raises unless `backend` is None (chosen per call) or a known backend usable here."""
    if backend is None:
        return
    available = available_backends()
    if not isinstance(backend, str):
        raise TypeError(f"{func}: backend must be a string or None, got {type(backend).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"{func}: unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend not in available:
        raise RuntimeError(
            f"{func}: backend {backend!r} is not available here (available: {', '.join(available)})"
        )


def _rows(func: str, name: str, x: ArrayLike) -> np.ndarray:
    """x as a C-contiguous float32 matrix, converted (copied) at most once."""
    try:
        array = np.asarray(x)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{func}: {name} must be a numeric array ({error})") from None
    if array.dtype.kind not in "fiu":
        raise TypeError(f"{func}: {name} must be a numeric array, got dtype {array.dtype}")
    if array.ndim != 2:
        raise ValueError(f"{func}: {name} must be 2-D (rows x dim), got shape {array.shape}")
    with np.errstate(over="ignore"):  # values beyond float32 become inf, reported as such by the core
        return np.ascontiguousarray(array, dtype=np.float32)


def _visual_text(func: str, visual: ArrayLike, text: Optional[ArrayLike]) -> tuple[np.ndarray, Optional[np.ndarray]]:
    v = _rows(func, "visual", visual)
    if v.shape[0] == 0:
        raise ValueError(f"{func}: visual has no rows (N = 0)")
    if v.shape[1] == 0:
        raise ValueError(f"{func}: visual has no columns (D = 0)")
    if text is None:
        return v, None
    t = _rows(func, "text", text)
    if t.shape[1] != v.shape[1]:
        raise ValueError(f"{func}: text has D = {t.shape[1]} columns but visual has D = {v.shape[1]}")
    return v, (t if t.shape[0] > 0 else None)


def _is_int(x: object) -> bool:
    """An int or NumPy integer, not a bool."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_real(x: object) -> bool:
    return _is_int(x) or isinstance(x, (float, np.floating))


def resolve_keep(func: str, keep: Keep, n: int) -> int:
    """K for n rows: an int >= 1 as is, a float r in (0, 1] as max(1, round(r * n)) (half up)."""
    if _is_int(keep):
        if keep < 1:
            raise ValueError(f"{func}: keep must be >= 1, got {keep}")
        return int(keep)
    if isinstance(keep, (float, np.floating)):
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"{func}: a float keep is a share of the rows and must be in (0, 1], got {keep}")
        return max(1, math.floor(float(keep) * n + 0.5))
    raise TypeError(f"{func}: keep must be an int or a float, got {type(keep).__name__}")


def check_keep(func: str, keep: object) -> Optional[Keep]:
    """`keep` as a handler stores it: None (every row), an int count, or a float share, after
    resolve_keep's checks."""
    if keep is None:
        return None
    resolve_keep(func, keep, 1)  # type: ignore[arg-type]
    return int(keep) if _is_int(keep) else float(keep)  # type: ignore[arg-type]


def diversity_weight(rows: int, sum_sqnorm: float) -> float:
    """An image's weight in split_budget: `rows` times its mean pairwise cosine distance, from the
    squared norm of the sum of its normalised rows (ALGORITHM.md, several images)."""
    return float(_core.diversity_weight(int(rows), float(sum_sqnorm)))


def check_method(func: str, method: str, stage1_ratio: Stage1, alignment: str = DEFAULT_ALIGNMENT) -> None:
    """Raises unless `method` and `alignment` are known and `stage1_ratio` is in (0, 1] or "adaptive"."""
    if not isinstance(method, str):
        raise TypeError(f"{func}: method must be a string, got {type(method).__name__}")
    if method not in METHODS:
        raise ValueError(f"{func}: unknown method {method!r}; expected one of {', '.join(METHODS)}")
    if alignment not in ALIGNMENTS:
        raise ValueError(f"{func}: unknown alignment {alignment!r}; expected one of {', '.join(ALIGNMENTS)}")
    if stage1_ratio == ADAPTIVE:
        return
    if isinstance(stage1_ratio, str):
        raise TypeError(f"{func}: stage1_ratio must be a float in (0, 1] or {ADAPTIVE!r}, got {stage1_ratio!r}")
    if not _is_real(stage1_ratio):
        raise TypeError(f"{func}: stage1_ratio must be a float, got {type(stage1_ratio).__name__}")
    if not 0.0 < stage1_ratio <= 1.0:
        raise ValueError(f"{func}: stage1_ratio must be in (0, 1], got {stage1_ratio}")


def check_cpu_only(func: str, method: str, backend: Optional[str]) -> None:
    """Raises for a method the GPU backends do not run (:data:`CPU_ONLY`) on an explicit GPU backend."""
    if method in CPU_ONLY and backend not in (None, "cpu"):
        raise ValueError(f"{func}: method {method!r} runs on the CPU backend only, not {backend!r}")


def stage1_from_text(value: Union[str, float]) -> Stage1:
    """A stage1_ratio as a flag or a setting gives it (text or a number): "adaptive" or a float; not
    range-checked (:func:`check_method` does that). ValueError for text that is neither."""
    return ADAPTIVE if value == ADAPTIVE else float(value)


def _core_call(func: str, call, *args):
    try:
        return call(*args)
    except ValueError as error:
        raise ValueError(f"{func}: {error}") from None


def pick_order(
    visual: ArrayLike,
    text: Optional[ArrayLike] = None,
    keep: Keep = 64,
    *,
    method: str = "trimtokenator",
    stage1_ratio: Stage1 = DEFAULT_STAGE1_RATIO,
    alignment: str = DEFAULT_ALIGNMENT,
    seed: int = 0,
    backend: Optional[str] = None,
    _func: str = "pick_order",
) -> np.ndarray:
    """Like :func:`prune`, but the indices come in the order the method picked them.

    For the greedy methods this is the greedy order, for ``align`` the descending score order,
    for ``random`` the draw order; keeping everything gives the ascending order.
    """
    func = _func
    check_method(func, method, stage1_ratio, alignment)
    if not _is_int(seed):
        raise TypeError(f"{func}: seed must be an int, got {type(seed).__name__}")
    check_backend(func, backend)
    v, t = _visual_text(func, visual, text)
    k = resolve_keep(func, keep, v.shape[0])
    adaptive = stage1_ratio == ADAPTIVE
    args = (v, t, k, getattr(_core.Method, method), 1.0 if adaptive else float(stage1_ratio), int(seed) % 2**64)
    variant = {"alignment": getattr(_core.Alignment, alignment),
               "stage1": _core.Stage1.adaptive if adaptive else _core.Stage1.ratio}
    check_cpu_only(func, method, backend)
    rows = 0 if method in CPU_ONLY else v.shape[0]  # backend=None: the CPU for these
    order = _run_on(func, backend, rows,
                    lambda name: _core_call(func, partial(_core.select, **variant), *args, getattr(_core.Backend, name)))
    return np.asarray(order, dtype=np.int64)


def prune(
    visual: ArrayLike,
    text: Optional[ArrayLike] = None,
    keep: Keep = 64,
    *,
    method: str = "trimtokenator",
    stage1_ratio: Stage1 = DEFAULT_STAGE1_RATIO,
    alignment: str = DEFAULT_ALIGNMENT,
    seed: int = 0,
    backend: Optional[str] = None,
) -> np.ndarray:
    """Indices (int64, ascending) of the image rows to keep.

    Args:
        visual: N x D image embeddings after the projector, in decode order (any real dtype).
        text: M x D text-token embeddings of the question, or None (stage 1 is then skipped).
        keep: how many rows to keep (int >= 1; K >= N keeps all), or a share of N in (0, 1].
        method: "trimtokenator" (default), "align", "divprune", "cdpruner" (a conditional DPP, CPU
            backend only), "uniform", "random" or "none".
        stage1_ratio: share of N that survives the alignment stage, in (0, 1], or "adaptive":
            round(sqrt(K N)) rows (ours; ALGORITHM.md).
        alignment: stage 1's score: "l2" (the paper's) or "cosine" (ours; ALGORITHM.md).
        seed: seed of the "random" method.
        backend: "cpu", "cuda", "metal", or None: a usable GPU from GPU_MIN_ROWS rows up, else
            the CPU; a GPU that fails then falls back to the CPU with a RuntimeWarning.

    Raises:
        ValueError: bad shapes or values (NaN/inf included); TypeError: non-numeric input;
        RuntimeError: an explicit backend that is not available here or fails.
    """
    order = pick_order(
        visual, text, keep, method=method, stage1_ratio=stage1_ratio, alignment=alignment, seed=seed, backend=backend,
        _func="prune"
    )
    return np.sort(order)


def alignment_scores(visual: ArrayLike, text: ArrayLike, *, alignment: str = DEFAULT_ALIGNMENT,
                     backend: Optional[str] = None) -> np.ndarray:
    """The stage-1 scores (float32, one per visual row): ``a_i = -(1/M) sum_j ||v_i - t_j||^2``, or for
    ``alignment="cosine"`` the same of the unit rows, ``2 (1/M) sum_j cos(v_i, t_j) - 2``.

    Computed with the centroid identity in O((N + M) D); text must have at least one row.
    `backend` as for :func:`prune`.
    """
    func = "alignment_scores"
    if text is None:
        raise ValueError(f"{func}: text is required")
    if alignment not in ALIGNMENTS:
        raise ValueError(f"{func}: unknown alignment {alignment!r}; expected one of {', '.join(ALIGNMENTS)}")
    check_backend(func, backend)
    v, t = _visual_text(func, visual, text)
    if t is None:
        raise ValueError(f"{func}: text has no rows (M = 0); the scores need at least one")
    return _run_on(func, backend, v.shape[0],
                   lambda name: _core_call(func, partial(_core.alignment_scores, alignment=getattr(_core.Alignment, alignment)),
                                           v, t, getattr(_core.Backend, name)))


def apportion(sizes: Sequence[int], weights: Sequence[float], total: int) -> list[int]:
    """split_budget's integer step: budgets in [1, sizes[k]] proportional to `weights`, summing to
    min(total, sum(sizes)), by largest remainder (ALGORITHM.md)."""
    return _core_call("apportion", _core.split_budget, list(sizes), list(weights), int(total))


def split_budget(images: Sequence[ArrayLike], total: int) -> list[int]:
    """Per-image budgets for several images sharing ``total`` kept rows (ALGORITHM.md).

    Each image k (an N_k x D array) gets b_k in [1, N_k], proportional to N_k times its mean
    pairwise cosine distance, by largest remainder; the budgets sum to min(total, sum N_k).
    """
    func = "split_budget"
    if not _is_int(total):
        raise TypeError(f"{func}: total must be an int, got {type(total).__name__}")
    if isinstance(images, np.ndarray) or not isinstance(images, Sequence) or len(images) == 0:
        raise ValueError(f"{func}: images must be a non-empty list of N_k x D arrays")
    if total < len(images):
        raise ValueError(f"{func}: total must be at least the number of images ({len(images)}), got {total}")
    sizes, weights = [], []
    for k, image in enumerate(images):
        x = _rows(func, f"images[{k}]", image)
        m = x.shape[0]
        if m == 0 or x.shape[1] == 0:
            raise ValueError(f"{func}: images[{k}] is empty (shape {x.shape})")
        try:
            sq = _core.normalized_sum_sqnorm(x)
        except ValueError as error:
            raise ValueError(f"{func}: images[{k}] {error}") from None
        sizes.append(m)
        weights.append(diversity_weight(m, sq))
    return _core_call(func, _core.split_budget, sizes, weights, int(total))
