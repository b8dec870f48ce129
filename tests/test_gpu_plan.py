"""The GPU backends' logic, checked on any machine: tests/gpu_emulator.cpp runs the kernel plan
(csrc/gpu/plan.h) and the kernels' arithmetic (csrc/gpu/arith.h, which the CUDA and Metal kernels
include) on the CPU, and its picks are compared with the float64 reference of ALGORITHM.md.
On a machine with a GPU, test_selection.py's `backend` fixture also runs the real kernels."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import trimcpp

import reference as ref
from helpers import SCORED, check, check_duplicate_ties, embeddings

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["tests/gpu_emulator.cpp", "csrc/select.cpp", "csrc/cpu/select.cpp", "csrc/cpu/kernels.cpp", "csrc/cpu/peers.cpp",
           "csrc/cuda/no_cuda.cpp", "csrc/metal/no_metal.cpp"]
METHOD = {"trimtokenator": 0, "align": 1, "divprune": 2}
ALIGNMENT = {"l2": 0, "cosine": 1}


@pytest.fixture(scope="module")
def compiler():
    found = shutil.which(os.environ.get("CXX", "c++"))
    if found is None:
        pytest.skip("no C++ compiler to build tests/gpu_emulator.cpp or parse the Metal kernels")
    return found


@pytest.fixture(scope="module")
def emulator(compiler, tmp_path_factory):
    exe = tmp_path_factory.mktemp("emulator") / "gpu_emulator"
    subprocess.run([compiler, "-O2", "-std=c++17", "-I", str(ROOT / "csrc"), *(str(ROOT / s) for s in SOURCES),
                    "-pthread", "-o", str(exe)], check=True, capture_output=True)
    return exe


def run(exe, v, t, k=0, method="trimtokenator", ratio=0.8, scores=False, alignment="l2", adaptive=False):
    """(picks in pick order, or the scores) from the emulator; ValueError with its message on rejection."""
    n, d = v.shape
    t = np.zeros((0, d), np.float32) if t is None else t
    head = np.array([n, d, t.shape[0], k, METHOD[method], int(scores), ALIGNMENT[alignment], int(adaptive)],
                    np.int64).tobytes()
    data = head + np.float64(ratio).tobytes() + v.astype(np.float32).tobytes() + t.astype(np.float32).tobytes()
    done = subprocess.run([str(exe)], input=data, capture_output=True)
    if done.returncode == 3:
        raise ValueError(done.stderr.decode().strip())
    assert done.returncode == 0, done.stderr.decode()
    count = int(np.frombuffer(done.stdout[:8], np.int64)[0])
    return np.frombuffer(done.stdout[8:], np.float32 if scores else np.int64)[: n if scores else count]


CASES = [(n, d, m) for n in (2, 31, 577) for d in (1, 33, 4096) for m in (0, 1, 40)] + [(2880, 33, 40), (2880, 33, 0)]


@pytest.mark.parametrize("n,d,m", CASES)
@pytest.mark.parametrize("method", ["trimtokenator", "align"])
def test_text_methods(emulator, method, n, d, m):
    v, t = embeddings(n, d, m)
    for keep in sorted({1, min(64, n - 1), max(1, int(0.3 * n))}):
        check(method, run(emulator, v, t, keep, method), v, t, keep, alignment="l2")


@pytest.mark.parametrize("n,d", [(2, 1), (31, 33), (577, 33), (200, 4096)])
def test_divprune(emulator, n, d):
    v, _ = embeddings(n, d, 0)
    for keep in sorted({1, min(16, n - 1), n - 1}):
        ref.check_divprune(run(emulator, v, None, keep, "divprune"), v, keep)


@pytest.mark.parametrize("ratio", [1.0, 0.5, 1e-6])
def test_stage1_ratio(emulator, ratio):
    """Ratio 1 keeps every row for stage 2; 1e-6 leaves exactly K rows, so stage 2 is skipped."""
    v, t = embeddings(97, 33, 40)
    for keep in (1, 7, 40):
        ref.check_trimtokenator(run(emulator, v, t, keep, "trimtokenator", ratio), v, t, keep, ratio)


@pytest.mark.parametrize("method", SCORED)
def test_duplicate_rows_ties_go_to_the_lower_index(emulator, method):
    check_duplicate_ties(method, lambda v, t, keep: run(emulator, v, t, keep, method), alignment="l2")


def test_alignment_scores_match_the_cpu_backend(emulator):
    v, t = embeddings(577, 4096, 40)
    got = run(emulator, v, t, scores=True)
    np.testing.assert_allclose(got, trimcpp.alignment_scores(v, t, alignment="l2"), rtol=1e-5)
    np.testing.assert_allclose(got, ref.alignment(v, t), rtol=1e-4)


def test_bad_rows_are_reported(emulator):
    v, t = embeddings(31, 33, 1)
    bad = v.copy()
    bad[7, 3] = np.nan
    with pytest.raises(ValueError, match="^visual contains NaN or inf$"):
        run(emulator, bad, t, 4)
    with pytest.raises(ValueError, match="^visual has values too large"):
        run(emulator, v * np.float32(1e30), None, 4, "divprune")


def test_metal_kernels_parse(compiler):
    """No Xcode here: select.metal (with arith.h's Metal branch) at least parses as C++ with a shim
    of the Metal names (tests/metal_shim); Apple's compiler and the host code are unchecked here."""
    done = subprocess.run([compiler, "-std=c++17", "-fsyntax-only", "-Wall", "-Wno-attributes", "-Wno-unused-parameter",
                           "-D__METAL_VERSION__=300", "-x", "c++", "-I", str(ROOT / "tests" / "metal_shim"),
                           "-I", str(ROOT / "csrc"), "-include", "metal_stdlib", str(ROOT / "csrc/metal/select.metal")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("alignment", ["l2", "cosine"])
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("n,d,m", [(31, 33, 40), (577, 33, 40), (577, 4096, 1)])
def test_stage1_variants(emulator, alignment, adaptive, n, d, m):
    """The GPU plan under each variant of stage 1, as trim::select hands it over (variant_input)."""
    v, t = embeddings(n, d, m)
    ratio = "adaptive" if adaptive else 0.8
    for keep in (k for k in (1, 16, 64) if k < n):  # trim::select keeps every row itself when K >= N
        for method in ("trimtokenator", "align"):
            picks = run(emulator, v, t, keep, method, 0.8, alignment=alignment, adaptive=adaptive)
            check(method, picks, v, t, keep, ratio, alignment=alignment)
    scores = run(emulator, v, t, scores=True, alignment=alignment)
    np.testing.assert_allclose(scores, ref.alignment(v, t, alignment), rtol=1e-4, atol=1e-5)
