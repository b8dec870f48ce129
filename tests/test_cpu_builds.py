"""The CPU backend built outside the Python module (tests/cpu_driver.cpp): for aarch64 with GCC and
Clang, run under qemu-user; with AddressSanitizer + UndefinedBehaviorSanitizer; with ThreadSanitizer;
under valgrind. Every build's picks are checked against the float64 reference (ALGORITHM.md's
near-tie rule) and against this machine's Python module (the x86-64 build).

This is Linux on arm64 under emulation: it proves the vector code compiles to NEON and computes the
same selections, not that anything builds or runs on macOS (no Apple toolchain here).

The tools come from Debian (`.ci/run` installs them): g++-aarch64-linux-gnu, qemu-user, clang,
valgrind. A build whose tools are missing skips, unless TRIMCPP_REQUIRE_BUILDS=1 (set by CI), which
makes it fail instead.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import trimcpp
from trimcpp import _core
from trimcpp.selection import METHODS, pick_order, resolve_keep

import reference as ref
from helpers import check, check_duplicate_ties, embeddings

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["tests/cpu_driver.cpp", "csrc/select.cpp", "csrc/image.cpp", "csrc/cpu/select.cpp", "csrc/cpu/kernels.cpp",
           "csrc/cpu/peers.cpp", "csrc/cuda/no_cuda.cpp", "csrc/metal/no_metal.cpp"]
AVX2 = ["csrc/cpu/kernels_avx2.cpp"]  # on x86-64, as CMakeLists.txt builds the module
MODE = {"select": 0, "scores": 1, "sum": 2}
SYSROOT = "/usr/aarch64-linux-gnu"
X86 = platform.machine() in ("x86_64", "AMD64")

# name -> (compiler, flags, runner prefix, the tools it needs)
BUILDS = {
    "aarch64-gcc": ("aarch64-linux-gnu-g++", ["-O3"], ["qemu-aarch64", "-L", SYSROOT], ["qemu-aarch64"]),
    # Clang finds the GNU cross toolchain's headers, libraries and linker.
    "aarch64-clang": ("clang++", ["-O3", "--target=aarch64-linux-gnu"], ["qemu-aarch64", "-L", SYSROOT],
                      ["qemu-aarch64", "aarch64-linux-gnu-g++"]),
    "asan-ubsan": ("c++", ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
                           "-fno-sanitize-recover=all"], [], []),
    "tsan": ("c++", ["-O1", "-g", "-fsanitize=thread"], [], []),
    "valgrind": ("c++", ["-O1", "-g"], ["valgrind", "-q", "--error-exitcode=9", "--leak-check=full",
                                         "--errors-for-leak-kinds=definite"], ["valgrind"]),
}
ARM = ("aarch64-gcc", "aarch64-clang")
HEAVY = ("valgrind", "tsan")  # slow: they run the smaller cases only


def missing(tools: list[str]) -> list[str]:
    return [tool for tool in tools if shutil.which(tool) is None]


_BUILT: dict[str, list[str]] = {}


def compile_driver(name: str, tmp_path_factory) -> list[str]:
    """The command that runs the driver built as `name` (compiled once per test session)."""
    if name in _BUILT:
        return _BUILT[name]
    compiler, flags, runner, tools = BUILDS[name]
    absent = missing([compiler, *tools])
    if absent:
        message = f"{name}: {', '.join(absent)} not installed (Debian: see .ci/run)"
        if os.environ.get("TRIMCPP_REQUIRE_BUILDS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    folder = tmp_path_factory.mktemp(name)
    exe = folder / "cpu_driver"
    native_x86 = X86 and name not in ARM
    objects = []
    for source in SOURCES + (AVX2 if native_x86 else []):  # kernels_avx2.cpp alone gets -mavx2 -mfma
        obj = folder / (source.replace("/", "_") + ".o")
        extra = (["-DTRIM_HAVE_AVX2=1"] if native_x86 else []) + (["-mavx2", "-mfma"] if source in AVX2 else [])
        done = subprocess.run([compiler, "-std=c++17", "-Wall", "-Wextra", "-Wno-psabi", *flags, *extra,
                               "-I", str(ROOT / "csrc"), "-c", str(ROOT / source), "-o", str(obj)],
                              capture_output=True, text=True)
        assert done.returncode == 0, f"{name}: {source} does not compile:\n{done.stderr}"
        objects.append(str(obj))
    done = subprocess.run([compiler, *flags, *objects, "-pthread", "-o", str(exe)], capture_output=True, text=True)
    assert done.returncode == 0, f"{name}: link failed:\n{done.stderr}"
    _BUILT[name] = [*runner, str(exe)]
    return _BUILT[name]


@pytest.fixture(params=list(BUILDS))
def build(request, tmp_path_factory):
    """(name, command) of every build."""
    return request.param, compile_driver(request.param, tmp_path_factory)


@pytest.fixture(params=[name for name in BUILDS if name != "valgrind"])
def quick_build(request, tmp_path_factory):
    """(name, command) of every build but valgrind's (each of its runs costs about a second)."""
    return request.param, compile_driver(request.param, tmp_path_factory)


def run(build, v, t=None, keep=64, method="trimtokenator", ratio=0.8, seed=0, mode="select", threads=None, busy=None,
        cpus=None):
    """The driver's output for one case; ValueError with its message when the core rejects the input.
    `busy`: milliseconds another thread of the driver spins while it selects (see cpu_driver.cpp)."""
    _, command = build
    if busy is not None:
        command = [*command, "--busy", str(busy)]
    n, d = v.shape
    t = np.zeros((0, d), np.float32) if t is None else t
    k = resolve_keep("run", keep, n)
    head = np.array([n, d, t.shape[0], k, getattr(_core.Method, method).value, MODE[mode], seed % 2**63], np.int64)
    data = head.tobytes() + np.float64(ratio).tobytes() + v.astype(np.float32).tobytes() + t.astype(np.float32).tobytes()
    env = dict(os.environ, TRIMCPP_NUM_THREADS=str(threads)) if threads else None
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    done = subprocess.run(command, input=data, capture_output=True, env=env, preexec_fn=pin)
    if done.returncode == 3:
        raise ValueError(done.stderr.decode().strip())
    assert done.returncode == 0 and not done.stderr, f"exit {done.returncode}:\n{done.stderr.decode()[-3000:]}"
    out = done.stdout
    if mode == "scores":
        return np.frombuffer(out, np.float32)
    if mode == "sum":
        return float(np.frombuffer(out, np.float64)[0])
    count = int(np.frombuffer(out[:8], np.int64)[0])
    return np.frombuffer(out[8:], np.int64, count)


# (n, d, m, budgets): odd sizes; the large case with LLaVA-like budgets only (it is slow under qemu).
CASES = [(1, 1, 0, (1, 3)), (2, 33, 1, (1, 4)), (31, 33, 40, (1, 7, 9, 33)), (97, 4099, 5, (1, 7, 29, 99)),
         (577, 33, 40, (1, 7, 173, 579)), (577, 4096, 40, (7, 64))]
HEAVY_CASES = [(2, 33, 1, (1,)), (31, 33, 40, (7,)), (97, 4099, 5, (7,))]  # TSan and valgrind


def test_every_method_against_the_reference_and_the_x86_module(build):
    """Every build within the reference's near-tie rule; the aarch64 builds (-O3, as the module) also
    pick exactly what the x86-64 module picks. The -O1 builds may part from the module at a near-tie
    (seen: divprune, pick 43 of 173), which ALGORITHM.md allows."""
    name = build[0]
    for n, d, m, budgets in HEAVY_CASES if name in HEAVY else CASES:
        v, t = embeddings(n, d, m)
        rng = np.random.default_rng([n, d, m])
        for method in METHODS:
            for keep in budgets:
                seed = int(rng.integers(0, 2**62))
                picks = run(build, v, t, keep, method, seed=seed)
                check(method, picks, v, t, keep, 0.8, seed, alignment="l2")
                if name in ARM:
                    expected = pick_order(v, t, keep, method=method, seed=seed, alignment="l2", backend="cpu")
                    assert np.array_equal(picks, expected), (n, d, m, method, keep)


@pytest.mark.parametrize("method", ["trimtokenator", "divprune", "cdpruner"])
def test_several_threads(build, method):
    """TRIMCPP_NUM_THREADS=3 on rows enough for three threads: the barrier and the per-thread sums."""
    v, t = embeddings(211, 4096, 40)
    for keep in (1, 64):
        picks = run(build, v, t, keep, method, threads=3)
        check(method, picks, v, t, keep, alignment="l2")
        if build[0] in ARM:
            assert np.array_equal(picks, pick_order(v, t, keep, method=method, alignment="l2", backend="cpu"))


@pytest.mark.parametrize("method", ["trimtokenator", "align", "divprune"])
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the busy-core detection reads Linux's /proc")
def test_busy_cores_change_nothing_in_the_picks(build, method):
    """A thread of the process spinning on one of two CPUs (as llama.cpp's after the encoder): the
    selection starts on the caller alone, calls in its threads when the spinner stops (after 1 or
    5 ms) or never (the spinner outlasts it); the picks are exactly those of a free machine."""
    v, t = embeddings(211, 4096, 40)
    free = run(build, v, t, 64, method, threads=3)
    for ms in (1, 5, 10_000):
        assert np.array_equal(run(build, v, t, 64, method, threads=3, busy=ms), free), ms
    np.testing.assert_array_equal(run(build, v, t, mode="scores", busy=10_000), run(build, v, t, mode="scores"))


@pytest.mark.parametrize("method", ["trimtokenator", "divprune"])
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pins processes to CPUs with sched_setaffinity")
def test_a_team_that_waits_too_long_leaves_the_caller_alone(build, method):
    """Three threads on two CPUs shared with another process spinning (which the driver cannot see
    in its own /proc): the team starts, its waits exceed its work, the helpers leave and the caller
    finishes alone. The picks are exactly those of a free machine."""
    two = set(sorted(os.sched_getaffinity(0))[:2])
    v, t = embeddings(211, 4096, 40)
    free = run(build, v, t, 64, method, threads=3)
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"], preexec_fn=lambda: os.sched_setaffinity(0, two))
    try:
        for _ in range(3):
            assert np.array_equal(run(build, v, t, 64, method, threads=3, cpus=two), free)
    finally:
        spinner.kill()
        spinner.wait()


@pytest.mark.parametrize("method", ["trimtokenator", "align", "divprune", "cdpruner"])
def test_duplicate_rows_ties_go_to_the_lower_index(quick_build, method):
    check_duplicate_ties(method, lambda v, t, keep: run(quick_build, v, t, keep, method), alignment="l2")


def test_stage1_ratio_extremes(quick_build):
    build = quick_build
    v, t = embeddings(97, 33, 40)
    for ratio in (1.0, 0.5, 1e-6):
        for keep in (1, 7, 40):
            ref.check_trimtokenator(run(build, v, t, keep, ratio=ratio), v, t, keep, ratio)


def test_scores_and_sums_match_the_x86_module(quick_build):
    build = quick_build
    v, t = embeddings(97, 4099, 5)
    np.testing.assert_allclose(run(build, v, t, mode="scores"), trimcpp.alignment_scores(v, t, alignment="l2"), rtol=1e-5)
    np.testing.assert_allclose(run(build, v, mode="sum"), _core.normalized_sum_sqnorm(v), rtol=1e-6)


def test_bad_input_is_an_error_not_a_crash(build):
    v, t = embeddings(31, 33, 3)
    bad = v.copy()
    bad[7, 3] = np.nan
    for method in ("trimtokenator", "divprune", "uniform"):
        with pytest.raises(ValueError, match="^visual contains NaN or inf$"):
            run(build, bad, t, 4, method)
    with pytest.raises(ValueError, match="^text contains NaN or inf$"):
        run(build, v, np.full_like(t, np.inf), 4)
    with pytest.raises(ValueError, match="^visual has values too large"):
        run(build, v * np.float32(1e30), None, 4, "divprune")


@pytest.mark.parametrize("name", ARM)
def test_arm_kernels_are_neon_vector_code(name, tmp_path_factory):
    """The 8-lane vector type compiles to NEON (128-bit .4s operations) on aarch64."""
    command = compile_driver(name, tmp_path_factory)
    assert subprocess.run([*command, "--isa"], capture_output=True, text=True, check=True).stdout.strip() == "generic"
    objdump = shutil.which("aarch64-linux-gnu-objdump")
    assert objdump, "binutils-aarch64-linux-gnu comes with g++-aarch64-linux-gnu"
    code = subprocess.run([objdump, "-d", command[-1]], capture_output=True, text=True, check=True).stdout
    assert "fmla\tv" in code or "fmul\tv" in code
    assert ".4s" in code


LIBRARY_USER = r"""
#include <cstdio>
#include <vector>
#include "trim.h"
// Reads n, d, n x d floats, m, m x d floats from stdin; prints the 8 rows trimtokenator keeps.
int main() {
  long n, d, m;
  if (std::scanf("%ld %ld", &n, &d) != 2) return 2;
  std::vector<float> v(n * d);
  for (auto& x : v) std::scanf("%f", &x);
  std::scanf("%ld", &m);
  std::vector<float> t(m * d);
  for (auto& x : t) std::scanf("%f", &x);
  auto kept = trim::select_image({v.data()}, {n}, d, t.data(), m, trim::Keep{8, 0.0}, trim::Method::trimtokenator,
                                 0.8, 0);
  for (long i : kept[0]) std::printf("%ld ", i);
  std::printf("\n");
}
"""


def test_csrc_builds_alone_as_the_library_llama_cpp_links(tmp_path):
    """csrc/CMakeLists.txt on its own (as patched llama.cpp adds it): trimcpp_core builds, and a program
    linking it selects the rows the Python module selects."""
    if missing(["cmake", "c++"]):
        if os.environ.get("TRIMCPP_REQUIRE_BUILDS") == "1":
            pytest.fail("cmake or c++ not installed (Debian: see .ci/run)")
        pytest.skip("cmake or c++ not installed")
    build = tmp_path / "build"
    for step in (["cmake", "-S", str(ROOT / "csrc"), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release"],
                 ["cmake", "--build", str(build), "--target", "trimcpp_core", "-j2"]):
        done = subprocess.run(step, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    library = build / "libtrimcpp_core.a"
    assert library.exists()
    (tmp_path / "user.cpp").write_text(LIBRARY_USER)
    exe = tmp_path / "user"
    done = subprocess.run(["c++", "-std=c++17", "-O1", "-I", str(ROOT / "csrc"), str(tmp_path / "user.cpp"),
                           str(library), "-pthread", "-o", str(exe)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    rng = np.random.default_rng(4)
    v = (rng.normal(size=(40, 12)) + 0.5).astype(np.float32)
    t = rng.normal(size=(3, 12)).astype(np.float32)
    text = f"40 12 {' '.join(map(repr, v.ravel().tolist()))} 3 {' '.join(map(repr, t.ravel().tolist()))}"
    out = subprocess.run([str(exe)], input=text, capture_output=True, text=True, check=True).stdout.split()
    assert [int(i) for i in out] == list(trimcpp.prune(v, t, 8, alignment="l2"))  # the core's default Variant
