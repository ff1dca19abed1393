"""The library never imports its experiments or benchmarks (``attnprune.experiments``, ``attnprune.bench``).

Core modules: everything under ``src/attnprune`` except ``experiments/``, ``bench/``, ``commands/``,
``cli.py`` and ``__main__.py`` (the command line may run experiments), and a moved experiment's former
home when it is only an alias of the new module. Every import counts, also the ones inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import attnprune

PKG = Path(attnprune.__file__).resolve().parent
OUTSIDE_CORE = ("experiments", "bench", "commands", "cli.py", "__main__.py")
FORBIDDEN = ("attnprune.experiments", "attnprune.bench")
# former homes of moved experiments, kept as aliases of the new module (no code of their own)
ALIASES = ("translation.py",)


def module_name(path: Path) -> str:
    parts = ["attnprune", *path.relative_to(PKG).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, module: str, is_package: bool) -> set[str]:
    """Absolute names of every module ``source`` (the text of ``module``) imports, ``from x import y``
    counted as both ``x`` and ``x.y`` (y may be a submodule)."""
    package = module if is_package else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names.add(target)
            names.update(f"{target}.{a.name}" for a in node.names)
    return names


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    return sorted(n for n in imported_modules(source, module, is_package)
                  if any(n == f or n.startswith(f + ".") for f in FORBIDDEN))


def is_alias(source: str) -> bool:
    """Only a docstring, imports and ``sys.modules[__name__] = <module>``."""
    body = ast.parse(source).body
    alias = [n for n in body if isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) == "sys.modules[__name__]"]
    rest = [n for n in body if not isinstance(n, (ast.Import, ast.ImportFrom)) and n not in alias
            and not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
    return len(alias) == 1 and not rest


def core_files() -> list[Path]:
    files = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG)
        if rel.parts[0] in OUTSIDE_CORE or (str(rel) in ALIASES and is_alias(path.read_text())):
            continue
        files.append(path)
    return files


def test_the_checker_sees_relative_absolute_and_function_level_imports():
    assert violations("from .experiments import sweep", "attnprune.report") == ["attnprune.experiments",
                                                                                  "attnprune.experiments.sweep"]
    assert violations("def f():\n    from ..bench.model import run\n", "attnprune.data.inputs") == [
        "attnprune.bench.model", "attnprune.bench.model.run"]
    assert violations("import attnprune.bench.kernels as bm", "attnprune.kernels.layout") == ["attnprune.bench.kernels"]
    assert violations("from . import bench", "attnprune", is_package=True) == ["attnprune.bench"]
    assert violations("from .kernels import layout\nfrom ..benchmarks import x", "attnprune.backends.triton") == []
    assert is_alias('"""moved"""\nimport sys\nfrom .experiments import t as _t\nsys.modules[__name__] = _t\n')
    assert not is_alias("import sys\nfrom .experiments import t\nsys.modules[__name__] = t\ndef run(): t.go()\n")


def test_no_core_module_imports_an_experiment_or_a_benchmark():
    files = core_files()
    assert PKG / "observe.py" in files and PKG / "report.py" in files and PKG / "data" / "inputs.py" in files
    assert not any("experiments" in p.parts or p.name == "cli.py" for p in files)
    bad = {}
    for path in files:
        found = violations(path.read_text(), module_name(path), path.name == "__init__.py")
        if found:
            bad[str(path.relative_to(PKG))] = found
    assert not bad, f"core modules import experiments / benchmarks: {bad}"


def test_block_sparse_backends_share_one_factory_and_register_plainly():
    """flex stands on the shared factory (backends/_block_sparse.py), not on triton.py; both register in
    BACKENDS when imported; triton.py re-exports the factory's names (and its one warned-set)."""
    import subprocess
    import sys

    code = ("import sys\n"
            "import attnprune.backends as b\n"
            "import attnprune.backends.flex as f\n"
            "assert 'attnprune.backends.triton' not in sys.modules, 'flex imported triton.py'\n"
            "assert b.BACKENDS.get('flex') is f.flex_backend\n"
            "import attnprune.backends.triton as t, attnprune.backends._block_sparse as s\n"
            "assert b.BACKENDS.get('triton') is t.triton_backend\n"
            "assert t._warned is s._warned and t.split_attn_mask is s.split_attn_mask\n"
            "assert t.block_sparse_backend is s.block_sparse_backend\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    for name in ("triton.py", "flex.py"):
        text = (PKG / "backends" / name).read_text()
        assert "_REG" not in text and "BACKENDS.add(" in text, name  # no guarded registration
