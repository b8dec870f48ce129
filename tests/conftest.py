"""Fixtures shared by the test modules."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import trimcpp
from trimcpp.testing import write_pair


@pytest.fixture(params=trimcpp.available_backends())
def backend(request):
    """Every selection backend usable here (GPU ones only on a machine with a GPU)."""
    return request.param


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """The tiny random-weight pair (trimcpp.testing): one LLM, a LLaVA-1.5 and a LLaVA-1.6 mmproj."""
    root = tmp_path_factory.mktemp("models")
    llm, mm15 = write_pair(root, "tiny", version="1.5")
    _, mm16 = write_pair(root, "tiny", version="1.6")
    return {"llm": str(llm), "1.5": str(mm15), "1.6": str(mm16), "root": root}


@pytest.fixture(scope="module")
def tools() -> Path:
    """The folder of the patched llama.cpp tools (patches/build-llama-cpp.sh), TRIMCPP_LLAMA_BIN."""
    folder = os.environ.get("TRIMCPP_LLAMA_BIN")
    if not folder:
        if os.environ.get("TRIMCPP_REQUIRE_BUILDS") == "1":
            pytest.fail("TRIMCPP_LLAMA_BIN is not set (build the tools with patches/build-llama-cpp.sh, see .ci/run)")
        pytest.skip("TRIMCPP_LLAMA_BIN not set: patched llama.cpp tools not built")
    path = Path(folder)
    for tool in ("llama-mtmd-cli", "llama-server"):
        assert (path / tool).exists(), f"{path / tool} missing"
    return path
