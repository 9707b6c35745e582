"""The package layout's import rules (train/__init__.py), checked on the source: every import statement counts,
module-level and inside functions alike, so a rule cannot be dodged by importing late."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("data_prep", "train", "launch")
# The only packages train/ may import inside a function: optional and heavy, needed by one command each.
LATE_OK = {"onnx", "onnxruntime", "wandb", "timm"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, bool]]:
    """(imported module, at module level?) for every import in the file; ``from pkg import mod`` names the module."""
    tree = ast.parse(path.read_text(), str(path))
    functions = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
    late = {id(n) for f in ast.walk(tree) if isinstance(f, functions) for n in ast.walk(f)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, id(node) not in late) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((sub if sub in MODULES else base, id(node) not in late))
    return out


def _project_edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        deps = set()
        for target, _ in _imports(name, path):
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            # A package's __init__ (docstring only) is imported on the way to any of its modules: not a dependency.
            if target and target != name and MODULES[target].name != "__init__.py":
                deps.add(target)
        edges[name] = deps
    return edges


EDGES = _project_edges()


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _violations(sources: str, forbidden: tuple[str, ...]) -> list[str]:
    """``module -> dependency`` for every project import from ``sources`` into any of ``forbidden``."""
    return sorted(
        f"{m} -> {d}"
        for m, deps in EDGES.items()
        if _within(m, sources)
        for d in deps
        if any(_within(d, f) for f in forbidden) and not _within(d, sources)
    )


def _third_party(sources: str, forbidden: str) -> list[str]:
    return sorted(
        f"{m} -> {t}"
        for m, path in MODULES.items()
        if _within(m, sources)
        for t, _ in _imports(m, path)
        if _within(t, forbidden)
    )


def test_the_layout_is_what_the_rules_are_about():
    for package in ("data", "models", "loop", "run", "formats", "use", "hardware"):
        assert any(_within(m, f"train.{package}") and m != f"train.{package}" for m in MODULES), package
    assert len(EDGES) > 60  # the whole project was read, not an empty folder


def test_no_import_cycle_inside_the_project():
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in EDGES[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in EDGES:
        if v not in index:
            visit(v)
    assert cycles == []


@pytest.mark.parametrize(
    ("sources", "forbidden"),
    [
        ("data_prep", ("train", "launch")),  # the base layer: formats on disk, CPU counts, atomic writes
        ("train", ("launch",)),
        ("train.use", ("train.run", "train.loop")),  # using a model needs neither a training run nor its loop
        ("train.run", ("train.use",)),  # the training run never imports the tools
        ("train.data", ("train.models", "train.loop", "train.run", "train.use", "train.formats")),
        ("train.models", ("train.data", "train.loop", "train.run", "train.use", "train.formats")),
        ("train.loop", ("train.data", "train.run", "train.use", "train.formats", "train.models")),
        ("train.formats", ("train.loop", "train.run", "train.use", "train.hardware")),
        ("train.hardware", ("train.data", "train.models", "train.loop", "train.run", "train.use", "train.formats")),
        ("train.config", ("train",)),
        (
            "train.config_io",
            tuple(f"train.{p}" for p in ("data", "models", "loop", "run", "use", "formats", "hardware")),
        ),
        ("train.metrics", ("train",)),
        ("train.plots", ("train",)),
    ],
)
def test_a_package_never_imports_what_its_rule_forbids(sources, forbidden):
    assert _violations(sources, forbidden) == []


@pytest.mark.parametrize("sources", ["train.data", "train.models", "train.formats", "train.use.classifier"])
def test_data_models_and_formats_never_import_accelerate(sources):
    assert _third_party(sources, "accelerate") == []


def test_nothing_imports_the_command_line_tools():
    tools = ("train.use.predict", "train.use.evaluate", "train.use.export", "train.use.report", "train.__main__")
    importers = sorted(f"{m} -> {d}" for m, deps in EDGES.items() for d in deps if d in tools)
    assert importers == []


def test_image_and_feature_runs_are_siblings_sharing_one_rule_and_one_layout():
    images, features = "train.run.images", "train.run.features"
    assert features not in EDGES[images] and images not in EDGES[features]
    for run in (images, features):
        assert {"train.run.selection", "train.formats.rundir"} <= EDGES[run], run
    # The rule and the layout exist once: no other module of the run decides the best checkpoint or names step dirs.
    assert EDGES["train.run.main"] >= {images, features}


def test_imports_in_train_are_at_the_top_except_optional_heavy_packages():
    late = sorted(
        f"{m}: {t}"
        for m, path in MODULES.items()
        if _within(m, "train")
        for t, at_top in _imports(m, path)
        if not at_top and t.split(".")[0] not in LATE_OK
    )
    assert late == []
