"""csrc/metal/metal.cmake: Metal never breaks the install. Its probe's every branch is configured
here (no Xcode: a stand-in `xcrun` on PATH plays the part of a broken toolchain), in a small CMake
project that includes metal.cmake next to a dummy `trimcpp_core` target. What runs on a Mac itself (the
real probe passing, the backend building) cannot be checked on this machine."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from trimcpp.selection import gpu_devices

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def configure(tmp_path):
    """configure(*cmake_args, xcrun=None) -> (exit code, output, the reason no_metal.cpp reports or None)."""
    if shutil.which("cmake") is None:
        if os.environ.get("TRIMCPP_REQUIRE_BUILDS") == "1":
            pytest.fail("cmake not installed (Debian: see .ci/run)")
        pytest.skip("cmake not installed")
    project = tmp_path / "project"
    project.mkdir()
    (project / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.18)\nproject(probe LANGUAGES CXX)\n"
        f'add_library(trimcpp_core STATIC "{ROOT}/csrc/select.cpp")\ninclude("{ROOT}/csrc/metal/metal.cmake")\n')

    def run(*args: str, xcrun: str | None = None):
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir(exist_ok=True)
        path = os.environ["PATH"]
        if xcrun is not None:
            script = bin_dir / "xcrun"
            script.write_text("#!/bin/sh\n" + xcrun)
            script.chmod(0o755)
            path = f"{bin_dir}{os.pathsep}{path}"
        build = tmp_path / f"build{len(list(tmp_path.glob('build*')))}"
        done = subprocess.run(["cmake", "-S", str(project), "-B", str(build), *args], capture_output=True, text=True,
                              env=dict(os.environ, PATH=path))
        reason = None
        if (build / "trimcpp_metal_off.h").exists():  # the C string no_metal.cpp will report
            main = build / "reason.cpp"
            main.write_text('#include <cstdio>\n#include "trimcpp_metal_off.h"\n'
                            "int main() { std::puts(TRIMCPP_METAL_OFF_REASON); }\n")
            subprocess.run(["c++", "-I", str(build), str(main), "-o", str(build / "reason")], check=True)
            reason = subprocess.run([str(build / "reason")], capture_output=True, text=True, check=True).stdout.strip()
        return done.returncode, " ".join((done.stdout + done.stderr).split()), reason  # CMake wraps its messages

    return run


@pytest.mark.skipif(sys.platform == "darwin", reason="off Apple systems only")
def test_off_apple_metal_is_simply_off(configure):
    code, out, reason = configure()
    assert code == 0 and reason == "not an Apple system" and "Warning" not in out


def test_off_is_off(configure):
    code, out, reason = configure("-DTRIMCPP_METAL=OFF", "-DTRIMCPP_METAL_PROBE=ON")
    assert code == 0 and reason == "TRIMCPP_METAL=OFF" and "Warning" not in out


def test_no_metal_compiler_warns_and_builds_the_stub(configure):
    code, out, reason = configure("-DTRIMCPP_METAL_PROBE=ON", xcrun="exit 1\n")
    assert code == 0
    assert reason.startswith("probe failed: no Metal compiler")
    assert "building WITHOUT the Metal backend" in out and "Please report this" in out


def test_kernels_that_do_not_compile_warn_with_the_compiler_error(configure):
    fake = 'if [ "$3" = "-f" ]; then echo /fake/metal; exit 0; fi\necho "select.metal:12:3: error: \\"boom\\" here" >&2\nexit 1\n'
    code, out, reason = configure("-DTRIMCPP_METAL_PROBE=ON", xcrun=fake)
    assert code == 0
    assert reason.startswith("probe failed: the kernels (select.metal) do not compile") and '"boom"' in reason
    assert "building WITHOUT the Metal backend" in out


def test_host_code_that_does_not_compile_warns(configure):
    """xcrun compiles the kernels (a stand-in that writes its output file): the probe reaches the
    Objective-C++ host, which cannot compile without Apple's SDK."""
    fake = ('if [ "$3" = "-f" ]; then echo /fake/metal; exit 0; fi\n'
            'for a in "$@"; do if [ "$prev" = "-o" ]; then : > "$a"; fi; prev="$a"; done\nexit 0\n')
    code, out, reason = configure("-DTRIMCPP_METAL_PROBE=ON", xcrun=fake)
    assert code == 0
    assert reason in ("probe failed: no Objective-C++ compiler",) or reason.startswith(
        "probe failed: the host code (select.mm) does not compile")
    assert "building WITHOUT the Metal backend" in out


def test_metal_on_fails_loudly(configure):
    code, out, reason = configure("-DTRIMCPP_METAL=ON", xcrun="exit 1\n")
    assert code != 0 and "TRIMCPP_METAL=ON, but the Metal backend cannot be built here: no Metal compiler" in out


def test_a_bad_setting_is_an_error(configure):
    code, out, _ = configure("-DTRIMCPP_METAL=maybe")
    assert code != 0 and "TRIMCPP_METAL must be AUTO, ON or OFF, got 'maybe'" in out


@pytest.mark.skipif(sys.platform == "darwin", reason="off Apple systems only")
def test_the_module_says_why_it_has_no_metal():
    assert gpu_devices()["metal"] in ("not built (not an Apple system)", "not built (TRIMCPP_METAL=OFF)")
