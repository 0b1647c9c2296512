"""Findings pages generated from a finished grid's report (issue 28 item 3), and the README as a front door."""

import json
import re
from pathlib import Path

import pytest

from slf_utils import findings, report

ROOT = Path(__file__).resolve().parents[2]


def _finished_grid(tmp_path, recall="0.512", rev="abc1234"):
    res = tmp_path / "results" / "g"
    (res / "report").mkdir(parents=True)
    (res / "runs").mkdir()
    (res / "full_input" / "eval").mkdir(parents=True)
    (res / "report" / "summary.md").write_text(
        f"# Report: g\n\n## Headline\n\n| system | recall@1 |\n|---|---|\n| Full Input | {recall} |\n"
    )
    (res / "report" / "controls.md").write_text("# Controls\n\nsensitivity: passes\n")
    (res / "report" / "provenance.json").write_text(json.dumps({"git_revision": rev}))
    (res / "full_input" / "eval" / "provenance.json").write_text(json.dumps({"git_revision": "def5678"}))
    (res / "runs" / "05_report.json").write_text(json.dumps({"ended": 1.8e9, "status": "done"}))
    (res / "runs" / "05_report.parameters.json").write_text(json.dumps({"params_file": "/x/params/g.yaml"}))
    return res


def test_a_finding_carries_its_commits_command_and_the_reports_tables(tmp_path):
    res = _finished_grid(tmp_path)
    page = findings.write(res, tmp_path / "docs" / "g.md").read_text()
    assert page.startswith("# Findings: g\n")
    assert "python -m slf_utils.grid run params/g.yaml" in page and "report at abc1234" in page
    assert "evaluations at def5678" in page
    assert "findings results/g` from" in page and str(tmp_path) not in page  # not the clone's absolute path
    assert "| Full Input | 0.512 |" in page and "### Headline" in page  # the report's headings one level down
    assert page.index("Headline") < page.index("sensitivity: passes")  # summary first, then the controls


def test_a_rerun_refreshes_the_numbers_and_keeps_what_a_reader_wrote(tmp_path):
    res = _finished_grid(tmp_path)
    out = findings.write(res, tmp_path / "g.md")
    out.write_text(out.read_text() + "\nWhat this means: the link is found.\n")
    (res / "report" / "summary.md").write_text("# Report: g\n\n| Full Input | 0.537 |\n")
    page = findings.write(res, out).read_text()
    assert "0.537" in page and "0.512" not in page
    assert page.count(findings.BEGIN) == 1 and page.endswith("What this means: the link is found.\n")


def test_an_unfinished_grid_is_refused_naming_the_missing_report(tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"report/summary.md does not exist: run the grid's report first"):
        report.main(["findings", str(tmp_path / "results" / "nothing")])


def test_the_readme_is_a_front_door_linking_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    linked = set(re.findall(r"\]\((docs/[^)#]+)\)", readme))
    pages = {str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md")}
    assert pages <= linked, f"docs pages the README does not link: {sorted(pages - linked)}"
    assert all((ROOT / p).exists() for p in linked), (
        f"README links to missing pages: {[p for p in linked if not (ROOT / p).exists()]}"
    )
    assert "make test-all" in readme and "make test" in readme
    assert not re.search(r"recall@1 (of|=|is) 0\.\d", readme)  # no measured figures on the front door
