"""Benchmarks that print numbers: time to first token through the handlers (:mod:`.ttft`, the
``trimcpp bench`` command) and the selection core against NumPy (:mod:`.selection`,
``python -m trimcpp.bench_select``). Both compare only what they run side by side in one process."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from typing import Any

import numpy as np

from ..selection import cpu_kernels, gpu_devices


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        llama_version = metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        llama_version = None
    return {"cpu": cpu, "cores": os.cpu_count(), "system": platform.platform(), "python": platform.python_version(),
            "numpy": np.__version__, "llama_cpp_python": llama_version, "kernels": cpu_kernels(),
            "gpus": gpu_devices()}
