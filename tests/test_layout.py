"""The dependency rule of DESIGN.md "Layout", read from the source: entry points import library code, never each
other, and no module imports another module's underscore names."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = frozenset(
    f"agents.{name}"
    for name in (
        "hepo",
        "pretrain",
        "collect",
        "evaluate",
        "ope",
        "ablation",
        "tokenize",
        "sb3_ppo",
        "plots",
        "fit_platform",
        "sweep",
    )
)
"""the ``python -m agents.NAME`` modules: thin command lines over the library"""


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def absolute(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    """The module an ``ImportFrom`` reads from, relative imports resolved against ``importer``."""
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def imports(path: Path, root: Path = ROOT) -> list[tuple[str, str, int]]:
    """Every (module, name, line) a file imports; ``name`` is "" for ``import module``. ``from pkg import mod``
    gives (pkg, mod) and (pkg.mod, ""), so a module imported by its parent's name counts as that module too.
    ``mod._name`` attribute reads on an imported module count as imports of ``_name``."""
    importer, is_package = module_name(path, root), path.name == "__init__.py"
    tree = ast.parse(path.read_text(), str(path))
    found, aliases = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                found.append((a.name, "", node.lineno))
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            module = absolute(node, importer, is_package)
            for a in node.names:
                found += [(module, a.name, node.lineno), (f"{module}.{a.name}", "", node.lineno)]
                aliases[a.asname or a.name] = f"{module}.{a.name}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            found.append((aliases[node.value.id], node.attr, node.lineno))
    return found


def sources() -> list[Path]:
    return sorted([*(ROOT / "agents").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")])


def test_no_module_imports_an_entry_point():
    bad = []
    for path in sources():
        importer = module_name(path)
        for module, _, line in imports(path):
            if module in ENTRY_POINTS and module != importer:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not bad, "entry points are imported only by the command line:\n" + "\n".join(sorted(set(bad)))


def test_no_module_imports_another_modules_underscore_names():
    bad = []
    for path in sources():
        importer = module_name(path)
        for module, name, line in imports(path):
            private = is_private(name) or any(is_private(part) for part in module.split("."))
            if (
                private
                and module != importer
                and module.split(".")[0] in ("agents", "gpr_sim", "envs", "benchmarks")
            ):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}{'.' + name if name else ''}")
    assert not bad, "underscore names stay in their module:\n" + "\n".join(sorted(set(bad)))


def test_the_checks_see_what_they_look_for(tmp_path):
    """The scanner itself: an entry-point import in each spelling, and a private name read two ways."""
    pkg = tmp_path / "agents" / "pretraining"
    pkg.mkdir(parents=True)
    (pkg / "x.py").write_text(
        "from agents import pretrain\nimport agents.hepo as h\nfrom .. import collect\n"
        "from agents.rl.loop import _private\nfrom agents.rl import loop\nloop._step()\n"
    )
    found = imports(pkg / "x.py", root=tmp_path)
    modules = {m for m, _, _ in found}
    assert {"agents.pretrain", "agents.hepo", "agents.collect"} <= modules
    assert ("agents.rl.loop", "_private", 4) in found and ("agents.rl.loop", "_step", 6) in found
