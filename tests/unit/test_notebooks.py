"""Notebooks are committed without outputs and follow papermill's conventions (one `parameters` cell)."""

from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "notebooks").glob("*.ipynb"))


def test_every_grid_step_has_its_notebook():
    from slf_utils import grid

    names = [p.name for p in NOTEBOOKS]
    assert set(grid.NOTEBOOK.values()) <= set(names)
    for n in ("01_preprocess", "02_extract_features", "03_train", "04_evaluate", "05_report", "06_voice_encoder"):
        assert f"{n}.ipynb" in names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_has_no_outputs_and_one_parameters_cell(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    dirty = [i for i, c in enumerate(code) if c.outputs or c.execution_count is not None]
    assert not dirty, f"{path.name}: code cells {dirty} have outputs; clear them before committing"
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: needs exactly one cell tagged 'parameters'"
    for name in ("params_file", "system", "overrides"):
        assert f"{name} =" in tagged[0].source, f"{path.name}: parameters cell must define {name}"
