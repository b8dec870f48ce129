"""The package's architecture (trimcpp/README.md): what `import trimcpp` loads, which way imports
run, where llama-cpp-python's private names may be used, and the configuration that rebuilds the
bundled mini VLM."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import trimcpp
from trimcpp.quality.minivlm.stages import STAGES

PACKAGE = Path(trimcpp.__file__).resolve().parent
MODULES = sorted(PACKAGE.rglob("*.py"))
# llama-cpp-python's private names that trimcpp needs: confined to this one module.
LLAMA_PRIVATE = ("_mtmd_cpp", "_init_mtmd_context", "_create_bitmap_from_bytes", "_obj", "_logger", "_utils",
                 "_stack")
GLUE = PACKAGE / "llamacpp.py"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(absolute module, names) for every import in `path`, relative imports resolved."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((module, [alias.name for alias in node.names]))
    return found


def test_the_package_has_the_modules_these_tests_read():
    names = {module_name(p) for p in MODULES}
    assert {"trimcpp.cli", "trimcpp.llamacpp", "trimcpp.handlers.mechanism", "trimcpp.quality.minivlm.train"} <= names


def test_import_trimcpp_loads_no_llama_cpp_and_no_torch():
    code = ("import sys, trimcpp; print(sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('llama_cpp', 'torch', 'gguf', 'PIL')))")
    done = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_no_module_imports_the_cli():
    for path in MODULES:
        for module, names in imports(path):
            assert module != "trimcpp.cli" and not (module == "trimcpp" and "cli" in names), path


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_no_private_name_is_imported_across_modules(path):
    """`from x import _name` and `import x._y` nowhere, except the sanctioned crossings: `_core` in
    the selection API and in trimcpp/llamacpp.py (the C abort callback it hands llama.cpp), and
    llama-cpp-python's internals in trimcpp/llamacpp.py."""
    for module, names in imports(path):
        private_module = [part for part in module.split(".") if part.startswith("_") and not part.startswith("__")]
        private_names = [n for n in names if n.startswith("_") and not n.startswith("__")]
        if module.startswith("llama_cpp") and path == GLUE:
            continue
        if module == "trimcpp" and private_names == ["_core"] and path.name in ("selection.py", "llamacpp.py"):
            continue
        assert not private_module and not private_names, f"{module_name(path)} imports {module} {names}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_llama_cpp_private_names_only_in_the_glue_module(path):
    if path == GLUE:
        return
    used = {node.attr for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Attribute)}
    used |= {node.id for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Name)}
    assert not used & set(LLAMA_PRIVATE), f"{module_name(path)} uses {sorted(used & set(LLAMA_PRIVATE))}"


def test_only_the_trainer_and_the_vllm_plugin_import_torch():
    allowed = {"model.py", "train.py", "agree.py", "__main__.py"}  # __main__: a guarded check, see there
    plugin = {PACKAGE / "vllm" / "models.py", PACKAGE / "testing" / "hf.py"}  # trimcpp[vllm]'s
    for path in MODULES:
        if any(module.split(".")[0] == "torch" for module, _ in imports(path)):
            assert (path.parent.name == "minivlm" and path.name in allowed) or path in plugin, path


def test_only_the_vllm_plugin_imports_vllm():
    for path in MODULES:
        if any(module.split(".")[0] == "vllm" for module, _ in imports(path)):
            assert path.parent == PACKAGE / "vllm", path


def test_import_trimcpp_vllm_loads_no_vllm_and_no_torch():
    """vLLM imports the plugin's package in every process; its models load only in register()."""
    code = ("import sys, trimcpp.vllm, trimcpp.vllm.settings, trimcpp.vllm.question; print(sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('vllm', 'torch', 'transformers', 'llama_cpp')))")
    done = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_only_the_server_imports_its_extra():
    """fastapi, uvicorn, sse-starlette and llama-cpp-python's server live behind trimcpp[server]."""
    extra = ("fastapi", "uvicorn", "sse_starlette", "starlette", "llama_cpp.server", "pydantic", "pydantic_settings")
    for path in MODULES:
        for module, _ in imports(path):
            if module.startswith(extra):
                assert path.parent.name == "serve", path


def test_training_stages_form_one_chain():
    names = list(STAGES)
    for i, (name, stage) in enumerate(STAGES.items()):
        assert stage.name == name
        if stage.start is None:
            assert i == 0 and not stage.from_checkpoint
        else:
            assert stage.start == names[i - 1]  # each goes on from the one before
        assert stage.minutes > 0 and stage.lr > 0
        assert stage.steps is None or stage.steps > 0
    assert STAGES[names[-1]].readout == ("colour", "kind", "side", "height", "count")
