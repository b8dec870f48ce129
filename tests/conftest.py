"""Fixtures shared by the test modules."""

from __future__ import annotations

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
