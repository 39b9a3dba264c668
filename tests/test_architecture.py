"""The shape of the code: imports point one way, and the command line starts without heavy imports."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "kernels")
HEAVY = ("torch", "zarr", "dask", "distributed", "pyarrow", "matplotlib", "numpy", "PIL", "scipy", "sklearn")

# Stages may import from stages below them, never above (a package imports itself freely).
NEVER_IMPORTS = {
    "kernels": ("engine",),
    "engine.inputs": ("engine.features", "engine.models", "engine.scan", "engine.distributed", "engine.report",
                      "engine.evaluation", "engine.demo", "engine.bench", "engine.cli", "engine.api"),
    "engine.features": ("engine.inputs", "engine.models", "engine.scan", "engine.distributed", "engine.report",
                        "engine.evaluation", "engine.demo", "engine.bench", "engine.cli", "engine.api"),
    "engine.models": ("engine.scan", "engine.distributed", "engine.report", "engine.evaluation",
                      "engine.demo", "engine.bench", "engine.cli", "engine.api"),
    "engine.scan": ("engine.distributed", "engine.report", "engine.evaluation", "engine.demo", "engine.bench", "engine.cli",
                    "engine.api"),
    "engine.distributed": ("engine.report", "engine.evaluation", "engine.demo", "engine.bench", "engine.cli", "engine.api"),
    "engine.report": ("engine.distributed", "engine.demo", "engine.bench", "engine.cli", "engine.api"),
    "engine.evaluation": ("engine.scan", "engine.distributed", "engine.report", "engine.demo", "engine.bench", "engine.cli",
                          "engine.api"),
    "engine.demo": ("engine.bench", "engine.cli"),
    "engine.bench": ("engine.cli",),
    "engine.timing": ("engine.inputs", "engine.features", "engine.models", "engine.scan", "engine.distributed",
                      "engine.report", "engine.evaluation", "engine.demo", "engine.bench", "engine.cli", "engine.api"),
}  # fmt: skip


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """Internal modules that `name` imports anywhere in its file (module level, functions, TYPE_CHECKING)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    resolved = set()
    for target in targets:
        while target and target not in modules:  # `import a.b.c` of a name inside a.b
            target = target.rpartition(".")[0]
        if target and target != name:
            resolved.add(target)
    return resolved


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, name, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return out


def test_the_graph_sees_the_known_arrows() -> None:
    graph = _graph()
    assert "engine.scan.writer" in graph["engine.scan.loop"]
    assert "engine.models.registry" in graph["engine.scan.job"]  # an import inside a function counts
    assert "engine.artifact" in graph["engine.models.base"]
    assert "kernels.knn_stream" in graph["kernels.knn"]


def test_no_import_cycles_in_engine_or_kernels() -> None:
    assert _cycles(_graph()) == []


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_stages_import_only_downwards() -> None:
    wrong = []
    for name, targets in _graph().items():
        for stage, forbidden in NEVER_IMPORTS.items():
            if name == stage or name.startswith(stage + "."):
                wrong += [f"{name} -> {t}" for t in targets if any(t == f or t.startswith(f + ".") for f in forbidden)]
    assert wrong == []


_PARSE_ONLY = """
import json, sys
from engine.cli.main import build_parser
parser = build_parser()
for argv in (["scan", "m", "s", "--out", "o", "--workers", "2"], ["fit", "d", "--out", "m"],
             ["eval", "m", "d"], ["report", "o"], ["demo"], ["bench"], ["bench", "m", "s", "--workers", "2", "--sweep"]):
    parser.parse_args(argv)
try:
    parser.parse_args(["scan", "m"])  # a usage error
except SystemExit:
    pass
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in %r)))
"""


def test_parsing_the_command_line_imports_nothing_heavy() -> None:
    code = _PARSE_ONLY % (HEAVY,)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_help_answers_without_heavy_imports() -> None:
    code = "import sys, runpy\nsys.argv = ['vade', 'scan', '--help']\ntry:\n    runpy.run_module('engine.cli', run_name='__main__')\n" \
           "except SystemExit:\n    pass\nprint(sorted(m for m in sys.modules if m.split('.')[0] in %r))" % (HEAVY,)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "--resume" in done.stdout and done.stdout.strip().endswith("[]"), done.stdout + done.stderr
