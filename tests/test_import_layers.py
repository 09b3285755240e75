"""Imports point one way (STYLE.md §15, docs/ARCHITECTURE.md): a module imports only its own package,
the shared bottom (types, errors, config) and lower layers — at module level and inside functions.
Siblings in one layer stay independent, except: the top layer's entry points may use each other, and
planner/admission.py may build cache.policy's Decision (a torch-free module, imported lazily there,
because importing it runs zipmoe/cache/__init__, which imports torch). The pure layers import no torch."""

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "zipmoe"
LAYERS = [{"types", "errors", "config"}, {"codec"}, {"store"}, {"scheduler"}, {"cache", "planner"},
          {"engine"}, {"models"}, {"convert", "report", "checkpoint", "generation", "demo", "serve", "cli", "bench",
                                   ""}]  # "" = the zipmoe facade (__init__.py: lazy convert / load)
RANK = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}
ALLOWED = {("planner", "zipmoe.cache.policy")}  # sibling exception, see the docstring
PURE = ("codec", "store", "planner", "scheduler")


def _imports(tree: ast.AST, module_level: bool):
    """(line, imported module) for every absolute import; module_level skips function bodies and
    `if TYPE_CHECKING:` blocks, which do not run at import time."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"line {node.lineno}: use absolute imports"
            yield node.lineno, node.module
        skip = isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or (
            isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test))
        stack.extend([] if module_level and skip else ast.iter_child_nodes(node))


def _module(path: Path) -> str:
    return ".".join(path.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__")


def _pkg(module: str) -> str:
    return module.split(".")[1] if "." in module else ""  # zipmoe.codec.planes -> codec; zipmoe -> ""


def test_imports_point_one_way() -> None:
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        rel, src = path.relative_to(SRC.parent), _pkg(_module(path))
        assert src in RANK, f"{rel}: package {src!r} has no layer; add it to LAYERS (and docs/ARCHITECTURE.md)"
        tree = ast.parse(path.read_text(), str(path))
        for line, mod in sorted(_imports(tree, module_level=False)):
            dst = _pkg(mod)
            if mod.split(".")[0] != "zipmoe" or dst == src or (src, mod) in ALLOWED:
                continue
            if RANK[dst] > RANK[src] or (RANK[dst] == RANK[src] and RANK[src] not in (0, len(LAYERS) - 1)):
                bad.append(f"{rel}:{line}: {src or 'zipmoe'} (layer {RANK[src]}) imports {mod} (layer {RANK[dst]})")
        if src in PURE:
            bad += [f"{rel}:{line}: imports {mod}" for line, mod in _imports(tree, module_level=True)
                    if mod.split(".")[0] == "torch"]
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_pure_layers_import_no_torch_transitively() -> None:
    """Importing every module of the pure layers leaves torch unloaded (catches imports through a package)."""
    mods = [_module(p) for pkg in PURE for p in sorted((SRC / pkg).rglob("*.py"))]
    code = "import sys\n" + "".join(f"import {m}\n" for m in mods) + "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False", f"importing {mods} loads torch"
