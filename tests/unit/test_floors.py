"""The package's floors (issue 27), read from the source with ast, nothing imported: no import circle, the scoring
floor below evaluation, the report and the encoders, the encoders (encoder_stage, voice_encoder, contrastive) and
report* free of evaluation, the configuration floor (basics < parameters < config), and every module of the package
under the size limit, free of in-function project imports and on no circle."""

import ast
from functools import cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "slf_utils"
MAX_LINES = 650
# what the scoring floor may import: configuration, folds, the store and preprocessing (and what these stand on)
BASE = {"env", "locks", "basics", "results", "parameters", "config", "folds", "store", "preprocessing"}
# the configuration floor: basics and results (the results layout; both import nothing of the project) <- parameters
# <- config (grid files, the CLI)
CONFIG = {"basics": set(), "results": set(), "parameters": {"basics"}, "config": {"basics", "parameters"}}
SCORING = {
    "retrieval",
    "stats",
    "image_metrics",
    "recognisers",
    "references",
    "tables",
    "significance",
    "report_tables",
    "differences",
    "figures",
    "summary",
}
REPORT = {"report", "report_tables", "differences", "figures", "summary", "significance"}
# the known-answer controls read finished grids: the report and the scoring floor, the recipes evaluation scored
# (recipe: which rows are speech) and the encoders' stage names, never the evaluation protocol
CONTROLS = {"controls": BASE | SCORING | REPORT | {"recipe", "voice_encoder", "contrastive"}}
ENCODERS = {"encoder_stage", "voice_encoder", "contrastive"}  # the trained-encoder stages and their shared skeleton
WITHOUT_EVALUATION = ENCODERS | REPORT | set(CONTROLS)
# the modules created or split by the scoring floor's move: under MAX_LINES, no in-function project import, on no
# circle even counting in-function imports; and the rooms split to size since (layout, preprocessing, features, ...)
# the diffusion model's modules (presets and recipes, training data, trainer, training, sampling) and the direct decoder
DIFFUSION = {"recipe", "training_data", "imagen_trainer", "diffusion", "sampling", "face_decoder"}
LIMITED = SCORING | {"evaluation", "report"} | set(CONTROLS) | set(CONFIG) | DIFFUSION | ENCODERS
LIMITED |= {"preprocessing", "parallel", "features", "speech_models", "demo_corpus", "demo_voices", "synthetic"}
LIMITED |= {"grid", "notebook_run", "layout", "constituents"}


def _modules() -> dict[str, Path]:
    """{'store.api': path, 'evaluation': path, ...}: every module of the package, named relative to it."""
    out = {}
    for p in PACKAGE.rglob("*.py"):
        parts = p.relative_to(PACKAGE).with_suffix("").parts
        parts = parts[:-1] if parts[-1] == "__init__" else parts
        if parts:
            out[".".join(parts)] = p
    return out


MODULES = _modules()
# every module now: under MAX_LINES, no hidden project import, on no circle (issue 27's done-when, package-wide)
LIMITED |= set(MODULES)
CHECKED = LIMITED


def _resolve(dotted: str) -> str | None:
    """The package module a dotted name under slf_utils lands in (a name imported from a module: that module)."""
    while dotted and dotted not in MODULES:
        dotted = dotted.rpartition(".")[0]
    return dotted or None


def imports(module: str, in_functions: bool = True, source: str | None = None) -> dict[str, list[int]]:
    """{imported package module: [line numbers]} of one module (or of `source` read as that module);
    in_functions=False: module-level imports only."""
    tree = ast.parse(MODULES[module].read_text() if source is None else source)
    nodes = ast.walk(tree) if in_functions else tree.body
    found = {}
    for node in nodes:
        targets = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
            targets = [_resolve(n.removeprefix("slf_utils.")) for n in names if n.startswith("slf_utils.")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "slf_utils":
            base = node.module.removeprefix("slf_utils").lstrip(".")
            for a in node.names:
                full = f"{base}.{a.name}".lstrip(".")
                targets.append(full if full in MODULES else _resolve(base))
        for t in targets:
            if t and t != module:
                found.setdefault(t, []).append(node.lineno)
    return found


@cache
def graph(in_functions: bool = True) -> dict[str, set[str]]:
    return {m: set(imports(m, in_functions)) for m in MODULES}


def circles(g: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan): each holds an import circle."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                part.append(w)
                if w == v:
                    break
            if len(part) > 1:
                found.append(sorted(part))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def reachable(g: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for w in g.get(todo.pop(), ()):
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def _floor(module: str) -> str:
    return module.split(".")[0]  # store.api is the store


def test_the_graph_is_read_from_the_source():
    """The graph builder sees what it must: the modules of this floor, top-level and in-function imports apart."""
    assert set(CHECKED) <= set(MODULES) and "store.api" in MODULES
    assert "retrieval" in imports("tables") and "stats" in imports("tables")
    assert {"retrieval", "stats", "tables"} <= set(imports("contrastive"))
    top, every = graph(in_functions=False), graph()
    assert all(top[m] <= every[m] for m in MODULES)
    source = (
        "import slf_utils.store.api\nfrom slf_utils import config, stats\nfrom slf_utils.tables import at_split\n"
        "def f():\n    from slf_utils import diffusion\n"
    )
    assert imports("report", source=source) == {
        "store.api": [1],
        "config": [2],
        "stats": [2],
        "tables": [3],
        "diffusion": [5],
    }
    assert "diffusion" not in imports("report", in_functions=False, source=source)
    # a circle of two is found, a chain is not
    assert circles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]] and circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle():
    """No circle among module-level imports anywhere in the package, and none through a module of CHECKED even
    counting the imports made inside functions."""
    assert circles(graph(in_functions=False)) == []
    through = [c for c in circles(graph()) if set(c) & CHECKED]
    assert through == []


def test_the_scoring_floor_imports_only_the_floors_below_it():
    """Retrieval, statistics, significance, image metrics, references, recognisers and the tables import only each
    other and config/folds/store/preprocessing-level modules: never evaluation, the report, diffusion or an
    encoder."""
    wrong = {m: sorted(t for t in imports(m) if _floor(t) not in BASE | SCORING) for m in SCORING if m in MODULES}
    assert {m: t for m, t in wrong.items() if t} == {}


@pytest.mark.parametrize("module", sorted(CONTROLS))
def test_modules_above_the_report_import_only_what_they_are_allowed(module):
    wrong = sorted(t for t in imports(module) if _floor(t) not in CONTROLS[module])
    assert wrong == []


@pytest.mark.parametrize("module", sorted(CONFIG))
def test_the_configuration_floor_imports_only_below_it(module):
    """basics, parameters and config stand under every other module: config.main no longer imports the grid."""
    assert set(imports(module)) <= CONFIG[module]


@pytest.mark.parametrize("module", sorted(WITHOUT_EVALUATION))
def test_encoders_and_report_import_nothing_from_evaluation(module):
    """Not directly, nor through anything they import (module level: what `import` of them loads)."""
    assert "evaluation" not in imports(module)
    assert "evaluation" not in reachable(graph(in_functions=False), module)


@pytest.mark.parametrize("module", sorted(LIMITED))
def test_split_modules_are_under_the_line_limit(module):
    n = len(MODULES[module].read_text().splitlines())
    assert n <= MAX_LINES, f"slf_utils/{module.replace('.', '/')}.py has {n} lines (limit {MAX_LINES})"


@pytest.mark.parametrize("module", sorted(CHECKED))
def test_no_project_import_hides_in_a_function(module):
    """A project module imported inside a function hides an arrow of the graph (a heavy optional third-party
    dependency may still be imported there)."""
    top = imports(module, in_functions=False)
    hidden = {t: lines for t, lines in imports(module).items() if set(lines) - set(top.get(t, []))}
    assert hidden == {}
