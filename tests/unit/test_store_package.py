"""The store as a package (issue 27): small modules, imports only downward, one format-1 builder."""

import ast

from slf_utils.basics import ROOT

PKG = ROOT / "slf_utils" / "store"
# floors, lowest first: a module imports only store modules on floors below it
FLOORS = ["files", "index", "labels", "caches", "check", "api", "migration", "cli", "__init__", "__main__"]


def _imports(path):
    """(module-level project imports, project imports inside functions) of a file."""
    tree = ast.parse(path.read_text())
    top, inner = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("slf_utils"):
            (top.add(node.module) if node in tree.body else inner.append(node.module))
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("slf_utils")]
            (top.update(names) if node in tree.body else inner.extend(names))
    return top, inner


def test_store_modules_are_small_and_import_only_downward():
    files = sorted(PKG.glob("*.py"))
    assert sorted(p.stem for p in files) == sorted(FLOORS)
    for p in files:
        assert len(p.read_text().splitlines()) < 650, p
        top, inner = _imports(p)
        assert inner == [], f"{p.name}: in-function imports of project modules {inner}"
        below = {f"slf_utils.store.{m}" for m in FLOORS[: FLOORS.index(p.stem)]}
        for m in top:
            if m.startswith("slf_utils.store"):
                assert m in below, f"{p.name} imports {m}, not on a floor below it"
            else:  # the rest of the package sits above the store, but for modules that import nothing of it
                assert m in ("slf_utils.basics", "slf_utils.locks", "slf_utils.results"), f"{p.name} imports {m}"
    top, inner = _imports(ROOT / "slf_utils" / "locks.py")
    assert top == set() and inner == []  # house-wide: imports nothing of the project


def test_the_format1_builder_is_defined_once():
    schema = "status TEXT NOT NULL, reason TEXT, updated REAL NOT NULL, PRIMARY KEY (clip_id, stage));"  # no seq
    where = [
        p.relative_to(ROOT).as_posix()
        for d in ("slf_utils", "tests", "benchmarks")
        for p in (ROOT / d).rglob("*.py")
        if schema in p.read_text() and p.name != "test_store_package.py"
    ]
    assert where == ["slf_utils/store/migration.py"]
