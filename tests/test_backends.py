"""Backend choice: what available_backends() lists, backend=None's choice by size, the fall-back to
the CPU when a GPU fails, and (on a machine with a GPU) every GPU backend against the CPU one."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import trimcpp
from trimcpp import _core, selection

from helpers import check, embeddings

GPUS = ("cuda", "metal")


def test_cpu_is_listed_first_and_gpus_only_when_usable():
    listed = trimcpp.available_backends()
    assert listed[0] == "cpu"
    assert set(listed) <= {"cpu", *GPUS}
    assert ("cuda" in listed) == _core.cuda_available()
    assert ("metal" in listed) == _core.metal_available()
    for name in GPUS:
        assert isinstance(getattr(_core, f"{name}_device")(), str)


class FakeCore:
    """_core with a 'cuda' backend that is listed as usable but fails with `error` when it runs."""

    def __init__(self, error: Exception):
        self.error, self.calls = error, []

    def __getattr__(self, name):
        return getattr(_core, name)

    def _maybe_fail(self, backend):
        self.calls.append(backend.name)
        if backend == _core.Backend.cuda:
            raise self.error

    def select(self, *args, **variant):
        self._maybe_fail(args[-1])
        return _core.select(*args, **variant)

    def alignment_scores(self, *args, **variant):
        self._maybe_fail(args[-1])
        return _core.alignment_scores(*args, **variant)


@pytest.fixture
def failing_gpu(monkeypatch):
    def install(error: Exception) -> FakeCore:
        fake = FakeCore(error)
        monkeypatch.setattr(selection, "_core", fake)
        monkeypatch.setitem(selection._AVAILABLE, "cuda", lambda: True)
        return fake

    return install


def test_none_picks_the_cpu_below_the_crossover_and_the_gpu_above(failing_gpu):
    failing_gpu(RuntimeError("unused"))
    assert trimcpp.available_backends() == ["cpu", "cuda"]
    assert selection.backend_for(selection.GPU_MIN_ROWS - 1) == "cpu"
    assert selection.backend_for(selection.GPU_MIN_ROWS) == "cuda"
    assert selection.backend_for(2880) == "cuda"


def test_a_failing_gpu_falls_back_to_the_cpu_with_a_warning(failing_gpu):
    fake = failing_gpu(RuntimeError("CUDA kernel launch: device lost"))
    v, t = embeddings(2880, 33, 40)
    with pytest.warns(RuntimeWarning, match=r"^prune: the cuda backend failed \(CUDA kernel launch: device lost\); "
                                            r"selecting on the CPU instead"):
        picks = trimcpp.prune(v, t, 64)
    assert fake.calls == ["cuda", "cpu"]
    assert list(picks) == list(trimcpp.prune(v, t, 64, backend="cpu"))
    with pytest.warns(RuntimeWarning, match="^alignment_scores: the cuda backend failed"):
        scores = trimcpp.alignment_scores(v, t)
    np.testing.assert_array_equal(scores, trimcpp.alignment_scores(v, t, backend="cpu"))


def test_small_inputs_never_touch_the_gpu(failing_gpu):
    fake = failing_gpu(RuntimeError("must not run"))
    v, t = embeddings(selection.GPU_MIN_ROWS - 1, 33, 40)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trimcpp.prune(v, t, 16)
    assert fake.calls == ["cpu"]


def test_an_explicit_gpu_that_fails_raises(failing_gpu):
    failing_gpu(RuntimeError("CUDA kernel launch: device lost"))
    v, t = embeddings(31, 33, 40)
    with pytest.raises(RuntimeError, match=r"^prune: CUDA kernel launch: device lost$"):
        trimcpp.prune(v, t, 8, backend="cuda")


def test_bad_input_is_not_hidden_by_the_fall_back(failing_gpu):
    failing_gpu(ValueError("visual contains NaN or inf"))
    v, t = embeddings(2880, 33, 40)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="^prune: visual contains NaN or inf$"):
            trimcpp.prune(v, t, 64)


@pytest.mark.parametrize("gpu", GPUS)
def test_gpu_matches_the_reference_and_the_cpu(gpu):
    if gpu not in trimcpp.available_backends():
        pytest.skip(f"no usable {gpu} device here ({getattr(_core, f'{gpu}_device')()})")
    same = total = 0
    for n, d, m in [(31, 33, 1), (577, 4096, 40), (2880, 4096, 40), (2880, 1024, 0)]:
        v, t = embeddings(n, d, m)
        np.testing.assert_allclose(trimcpp.alignment_scores(v, t, backend=gpu) if m else 0,
                                   trimcpp.alignment_scores(v, t, backend="cpu") if m else 0, rtol=1e-5)
        for method in ("trimtokenator", "align", "divprune"):
            for keep in (1, 64, 320):
                picks = selection.pick_order(v, t, keep, method=method, backend=gpu)
                check(method, picks, v, t, keep)
                cpu = selection.pick_order(v, t, keep, method=method, backend="cpu")
                same += np.array_equal(picks, cpu)
                total += 1
    assert same >= 0.9 * total, f"{gpu} and cpu picked differently in {total - same} of {total} cases"
