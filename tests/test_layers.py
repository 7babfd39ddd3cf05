"""The house in layers: every import inside ``wanstream`` goes downward, and the core loads no torch.

Layers, lowest first (``docs/architecture.md``): core → io → models → engine → pipeline → api → bench → eval →
server → cli. A module may import its own package and any lower one. ``__main__`` modules are entry points that
nothing imports; they may call the command line.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "wanstream"
LAYERS = ["core", "io", "models", "engine", "pipeline", "api", "bench", "eval", "server", "cli"]
RANK = {name: i for i, name in enumerate(LAYERS)}
TOP_MODULES = {"__init__", "__main__"}        # the only modules allowed beside the packages


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, int]]:
    """Every wanstream module a file imports (at any depth in the file: lazy imports count too)."""
    tree = ast.parse(path.read_text(), str(path))
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name == "wanstream":                     # from wanstream import x
                out += [(f"wanstream.{a.name}", node.lineno) for a in node.names]
            elif name.startswith("wanstream."):
                out.append((name, node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.startswith("wanstream.")]
    return out


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _files():
    return sorted(p for p in ROOT.rglob("*.py") if "__pycache__" not in p.parts)


def test_top_of_the_package_holds_packages_only():
    modules = {p.stem for p in ROOT.glob("*.py")}
    assert modules <= TOP_MODULES, f"modules at the top of wanstream/: {sorted(modules - TOP_MODULES)}"
    packages = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages == set(LAYERS), f"packages {sorted(packages)} != layers {LAYERS}"


def test_imports_only_go_downward():
    bad = []
    for path in _files():
        here = _layer(_module_name(path))
        if path.stem == "__main__":
            continue
        for target, line in _imports(path):
            there = _layer(target)
            if there not in RANK:
                bad.append(f"{path.relative_to(ROOT.parent)}:{line} imports {target} (no such layer)")
            elif RANK[there] > RANK[here]:
                bad.append(f"{path.relative_to(ROOT.parent)}:{line} ({here}) imports {target} ({there}): upward")
    assert not bad, "\n".join(bad)


def test_no_folder_level_cycle():
    """Folders (packages and sub-packages) form a DAG: no folder imports a folder that imports it back."""
    edges: dict[str, set[str]] = {}
    for path in _files():
        if path.stem == "__main__":
            continue
        src = ".".join(_module_name(path).split(".")[:2])
        for target, _ in _imports(path):
            dst = ".".join(target.split(".")[:2])
            if dst != src:
                edges.setdefault(src, set()).add(dst)
    seen: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        if seen.get(node) == 1:
            raise AssertionError(f"folder cycle: {' -> '.join(trail + [node])}")
        if seen.get(node) == 2:
            return
        seen[node] = 1
        for nxt in sorted(edges.get(node, ())):
            visit(nxt, trail + [node])
        seen[node] = 2

    for node in sorted(edges):
        visit(node, [])


def test_no_argparse_below_the_command_line():
    bad = [str(p.relative_to(ROOT.parent)) for p in _files()
           if _layer(_module_name(p)) != "cli" and p.stem != "__main__" and "argparse" in
           {a.name for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.Import) for a in n.names}]
    assert not bad, f"argparse outside wanstream/cli: {bad}"


@pytest.mark.parametrize("module", ["wanstream.core.schedule", "wanstream.core.scheduler",
                                    "wanstream.core.chunking", "wanstream.core.block_scheduler",
                                    "wanstream.core.config", "wanstream.core.geometry",
                                    "wanstream.core.plan", "wanstream.core.planner"])
def test_the_core_loads_no_torch(module):
    code = f"import sys, {module}; print(sorted(m for m in ('torch', 'numpy', 'diffusers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"{module} loaded {out.strip()}"
