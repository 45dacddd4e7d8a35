"""Imports only go down (issue 14): every ``mdkd_det`` module imports from its own layer or a
lower one, and no two modules import each other (directly or through a chain).

The checker reads the source with :mod:`ast` (nothing is imported), so it also sees the imports
inside functions, and resolves relative imports. The layer order is written down in
``docs/architecture.md``; a module's layer is its top-level folder unless :data:`MODULE_LAYER`
says otherwise.
"""

from __future__ import annotations

import ast
import os
import textwrap
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Sequence, Tuple

#: Layers from the ground up: a module may import from its own layer and the layers before it.
#: ``entry`` is the console-script entry points (detectron2 keeps these in ``tools/``).
LAYERS: Tuple[str, ...] = ("utils", "config", "model_zoo", "data", "modeling", "solver", "evaluation",
                           "tasks", "engine", "distill", "pipeline", "d2", "entry")

#: Modules whose concept sits in another layer than their folder; kept where they are so that
#: users' imports keep working. Exact module names.
MODULE_LAYER: Dict[str, str] = {
    "mdkd_det": "utils",  # the package root holds only __version__
    # deprecated alias of mdkd_det.utils.comm (detectron2 keeps comm in utils)
    "mdkd_det.engine.comm": "utils",
    # detectron2.checkpoint's role: state-dict I/O, imports only utils; used by evaluation.fsd
    "mdkd_det.engine.checkpointer": "utils",
    # forward hooks on any nn.Module (no project imports); used by Stage 1 and the t-SNE tool
    "mdkd_det.distill.taps": "modeling",
    # pure schedules of the iteration (lambda(rho), cf, T, beta), the LR schedules' kind
    "mdkd_det.distill.schedules": "solver",
    # the mdkd-train console script: dispatches to the KD trainer and the pipeline
    "mdkd_det.engine.cli": "entry",
}

#: (importing module, imported module) pairs that may break the order. Keep it empty or short,
#: each with the reason.
ALLOWED: Tuple[Tuple[str, str], ...] = ()

_ROOT = Path(__file__).resolve().parents[1]


def module_files(root: Path, package: str) -> Dict[str, Tuple[Path, bool]]:
    """``{dotted module name: (file, is_package)}`` for every ``.py`` file under ``root/package``."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        out[".".join(parts)] = (path, is_pkg)
    return out


def imports_of(module: str, is_pkg: bool, tree: ast.AST, known: Mapping[str, object],
               package: str) -> Iterator[Tuple[str, int]]:
    """``(imported module, line)`` of every import of ``package`` in ``tree`` (any depth, relative
    imports resolved; ``from X import name`` counts as ``X.name`` when that is a module)."""
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".") if is_pkg else module.split(".")[:-1]
                parts = parts[:len(parts) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for t in targets:
            if t == package or t.startswith(package + "."):
                while t not in known and "." in t:  # "import pkg.mod.attr" style
                    t = t.rsplit(".", 1)[0]
                yield t, node.lineno


def layer_of(module: str, module_layer: Mapping[str, str]) -> str:
    """The layer of ``module``: its :data:`MODULE_LAYER` entry, else its top-level folder."""
    return module_layer.get(module) or module.split(".")[1]


def check_imports(root: Path, package: str, layers: Sequence[str], module_layer: Mapping[str, str],
                  allowed: Sequence[Tuple[str, str]] = ()) -> List[str]:
    """Every upward import, unknown layer and import cycle of ``root/package``, one message each
    (``file:line: ...``); empty when the package is clean."""
    mods = module_files(root, package)
    rank = {name: i for i, name in enumerate(layers)}
    problems, edges = [], {}
    for mod, (path, is_pkg) in mods.items():
        rel = path.relative_to(root)
        src_layer = layer_of(mod, module_layer)
        if src_layer not in rank:
            problems.append(f"{rel}:1: {mod} is in layer {src_layer!r}, which is not in {list(layers)}")
            continue
        for tgt, line in imports_of(mod, is_pkg, ast.parse(path.read_text(), str(path)), mods, package):
            if tgt == mod:
                continue
            edges.setdefault(mod, {}).setdefault(tgt, f"{rel}:{line}")
            tgt_layer = layer_of(tgt, module_layer)
            if rank.get(tgt_layer, -1) > rank[src_layer] and (mod, tgt) not in allowed:
                problems.append(f"{rel}:{line}: upward import: {mod} ({src_layer}) imports {tgt} ({tgt_layer})")
    for cycle in _cycles(edges):
        where = ", ".join(f"{edges[a][b]} ({a} -> {b})" for a, b in zip(cycle, cycle[1:] + cycle[:1]))
        problems.append(f"import cycle: {where}")
    return problems


def _cycles(edges: Mapping[str, Mapping[str, str]]) -> List[List[str]]:
    """One cycle (list of modules) per strongly connected component with more than one module
    (Tarjan), each found by a depth-first walk inside the component."""
    index, low, stack, on_stack, comps = {}, {}, [], set(), []

    def visit(v):  # recursion depth <= number of modules (~150)
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(comp)

    for v in sorted(edges):
        if v not in index:
            visit(v)
    cycles = []
    for comp in comps:
        start = min(comp)
        path, seen = [start], {start}
        while True:  # walk inside the component until we come back to a visited module
            nxt = sorted(w for w in edges.get(path[-1], {}) if w in comp)
            back = [w for w in nxt if w in seen]
            if back:
                cycles.append(path[path.index(back[0]):])
                break
            path.append(nxt[0])
            seen.add(nxt[0])
    return cycles


def test_mdkd_det_imports_only_go_down():
    problems = check_imports(_ROOT, "mdkd_det", LAYERS, MODULE_LAYER, ALLOWED)
    assert not problems, "\n".join(problems)


def test_every_layer_override_names_a_module_and_a_layer():
    mods = module_files(_ROOT, "mdkd_det")
    for name, layer in MODULE_LAYER.items():
        assert name in mods, f"MODULE_LAYER names {name}, which is not a module"
        assert layer in LAYERS, f"MODULE_LAYER gives {name} the unknown layer {layer!r}"


def _write(root: Path, files: Mapping[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text))


def test_checker_reports_planted_upward_import_and_cycle(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/low/__init__.py": "",
        "pkg/low/a.py": """\
            import os


            def f():
                from ..high import b  # line 5: upward, inside a function
                return b
            """,
        "pkg/low/c.py": "from . import d\n",
        "pkg/low/d.py": "import pkg.low.c\n",
        "pkg/high/__init__.py": "",
        "pkg/high/b.py": "from ..low.a import f\nfrom pkg.low import c\n",
    })
    problems = check_imports(tmp_path, "pkg", ("pkg", "low", "high"), {"pkg": "pkg"})
    up = [p for p in problems if "upward" in p]
    cyc = [p for p in problems if "cycle" in p]
    assert up == [f"{Path('pkg/low/a.py')}:5: upward import: pkg.low.a (low) imports pkg.high.b (high)"]
    # a -> b -> a (through the function-level import) and c <-> d
    assert len(cyc) == 2, problems
    assert any(f"{Path('pkg/low/c.py')}:1" in p and f"{Path('pkg/low/d.py')}:1" in p for p in cyc), cyc
    assert any(f"{Path('pkg/high/b.py')}:1" in p and f"{Path('pkg/low/a.py')}:5" in p for p in cyc), cyc
    # the planted violations gone: clean
    _write(tmp_path, {"pkg/low/a.py": "import os\n", "pkg/low/d.py": "X = 1\n"})
    assert check_imports(tmp_path, "pkg", ("pkg", "low", "high"), {"pkg": "pkg"}) == []


def test_checker_reports_module_outside_the_layers(tmp_path):
    _write(tmp_path, {"pkg/__init__.py": "", "pkg/extra/__init__.py": "", "pkg/extra/m.py": "X = 1\n"})
    problems = check_imports(tmp_path, "pkg", ("pkg", "low"), {"pkg": "pkg"})
    assert len(problems) == 2 and all("not in" in p for p in problems), problems


def test_architecture_doc_lists_the_layers_in_order():
    import re

    text = (_ROOT / "docs" / "architecture.md").read_text()
    rows = re.findall(r"^\| (\d+) \| (\w+) \|", text, flags=re.M)
    assert [name for _, name in rows] == list(LAYERS)
    for mod in MODULE_LAYER:
        if mod != "mdkd_det":
            assert mod.split(".", 1)[1].replace(".", "/") + ".py" in text, mod


def test_deprecated_aliases_are_the_new_objects():
    import importlib
    import warnings

    from mdkd_det.modeling import META_ARCH_REGISTRY
    from mdkd_det.modeling.meta_arch.multi_head import MultiHeadModel
    from mdkd_det.utils import comm

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert importlib.import_module("mdkd_det.engine.comm") is comm
        from mdkd_det.modeling import DETECTOR_REGISTRY
        from mdkd_det.modeling.meta_arch.multi_head import MultiHeadFasterRCNN
        from mdkd_det.modeling.registry import DETECTOR_REGISTRY as reg2
    assert DETECTOR_REGISTRY is META_ARCH_REGISTRY and reg2 is META_ARCH_REGISTRY
    assert MultiHeadFasterRCNN is MultiHeadModel
    assert sum(issubclass(w.category, DeprecationWarning) for w in caught) >= 2
