"""The layers point downwards only (DESIGN.md): cli -> sweep -> experiments -> (lego, twolayer, spectrum, theory) ->
_native; no two modules import each other, not even through imports inside functions; every module imports alone
in a fresh interpreter; ``import physai`` loads no subpackage and no heavy optional dependency."""
import ast
import pathlib
import subprocess
import sys

import pytest

import physai

ROOT = pathlib.Path(physai.__file__).parent

# Which packages each package may import (besides itself and the private leaf modules physai._*).
ALLOWED = {
    "lego": set(),
    "theory": set(),
    "spectrum": set(),
    "twolayer": {"spectrum"},
    "cuda": {"twolayer"},
    "experiments": {"lego", "twolayer", "spectrum", "theory"},
    "sweep": {"experiments"},
    "cli": {"experiments", "sweep", "lego"},
}


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), path


def _imports(name, path):
    """Every physai module ``name`` imports, at module level or inside a function."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {m for m in found if m == "physai" or m.startswith("physai.")}


MODULES = dict(_modules())


def _layer(module: str) -> str:
    """The top-level subpackage or module of physai that ``module`` lies in ("" for physai itself or an attribute
    of it, such as ``physai.native_info``)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and ".".join(parts[:2]) in MODULES else ""


def test_layers_point_downwards():
    wrong = []
    for name, path in MODULES.items():
        layer = _layer(name)
        if layer.startswith("_") or layer in ("", "__main__"):
            continue
        for target in _imports(name, path):
            other = _layer(target)
            if other and other != layer and not other.startswith("_") and other not in ALLOWED[layer]:
                wrong.append(f"{name} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_private_leaf_modules_import_no_subpackage():
    for name, path in MODULES.items():
        if _layer(name).startswith("_") and not _layer(name).startswith("__") and name.count(".") == 1:
            targets = {_layer(t) for t in _imports(name, path)} - {""}
            assert all(t.startswith("_") for t in targets), f"{name} imports {targets}"


def test_no_module_pair_imports_each_other():
    graph = {name: {t for t in _imports(name, path) if t in MODULES and t != name} for name, path in MODULES.items()}
    cycles = [(a, b) for a in graph for b in graph[a] if a in graph.get(b, ()) and a < b
              and not (a == "physai" or b == "physai")]
    assert not cycles, cycles


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m not in ("physai.__main__",)))
def test_every_module_imports_alone_in_a_fresh_interpreter(module):
    if module == "physai.cuda" and not physai.cuda_available():
        pytest.skip("physai.cuda needs the CUDA module")
    result = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)
    if "No module named 'torch'" in result.stderr:
        pytest.skip("needs torch")
    assert result.returncode == 0, result.stderr


def test_import_physai_is_light():
    code = ("import sys, physai; heavy = {'torch', 'xarray', 'zarr', 'dask', 'matplotlib', 'scipy', 'physai.lego', "
            "'physai.twolayer', 'physai.spectrum', 'physai.theory', 'physai.experiments', 'physai.sweep'}; "
            "print(sorted(heavy & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_subpackages_are_attributes_of_physai():
    code = "import physai; print(physai.lego.LegoTask(6).n_vars, physai.theory.critical_point('relu').C_W)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    # C_W = K / <sigma^2>_K by quadrature: 2 to rounding (the last bit differs between numpy's SIMD paths)
    assert out[0] == "6" and abs(float(out[1]) - 2.0) <= 1e-12
