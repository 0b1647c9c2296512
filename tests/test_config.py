import pytest

from slf_utils.config import ParamsError, atomic_write_text, load_params, params_hash, provenance, resolve


def _write(tmp_path, text):
    p = tmp_path / "grid.yaml"
    p.write_text(text)
    return p


def test_defaults_overrides_and_paths(tmp_path):
    cfg = load_params(
        _write(tmp_path, "name: g\ntrain: {steps: 10}\nsystems: [full_input]\n"), {"train": {"lr": 0.001}}
    )
    assert cfg["train"]["steps"] == 10 and cfg["train"]["lr"] == 0.001 and cfg["train"]["batch_size"] == 16
    assert cfg["results"] == str(resolve("results/g"))
    assert cfg["layout"].endswith("params/layout.yaml") and cfg["layout"].startswith("/")


@pytest.mark.parametrize(
    "text, message",
    [
        ("train: {stepz: 10}\n", "unknown key 'train.stepz'"),
        ("train: {steps: many}\n", "train.steps must be int"),
        ("train: {lr: true}\n", "train.lr must be float"),
        ("evaluate: 3\n", "evaluate must be a mapping"),
        ("system_overrides: {full_input: {train: {stepz: 1}}}\n", "system_overrides.full_input.train.stepz"),
        ("train: [1, 2\n", "not valid YAML"),
        ("report: {differences: [[full_input, pure_sr, bicubic]]}\n", "report.differences must be a list of"),
        ("report: {differences: full_input}\n", "report.differences must be list"),
        ("report: {guide_top1_min: 1.5}\n", "report.guide_top1_min must be in [0, 1]"),
    ],
)
def test_bad_params_name_file_and_key(tmp_path, text, message):
    p = _write(tmp_path, text)
    with pytest.raises(ParamsError) as e:
        load_params(p)
    assert message in str(e.value) and str(p) in str(e.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ParamsError, match="nope.yaml: file not found"):
        load_params(tmp_path / "nope.yaml")


def test_params_hash_is_stable_and_sensitive():
    assert params_hash({"a": 1, "b": [1, 2]}) == params_hash({"b": [1, 2], "a": 1})
    assert params_hash({"a": 1}) != params_hash({"a": 2})


def test_provenance_has_versions_and_revision():
    p = provenance({"seed": 3})
    assert p["seed"] == 3 and p["packages"]["torch"].startswith("2.14") and p["packages"]["deepface"] == "0.0.103"
    assert p["git_revision"]


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    from slf_utils.config import atomic_write

    f = tmp_path / "x.txt"
    atomic_write_text(f, "old")

    def boom(tmp):
        open(tmp, "w").write("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(f, boom)
    assert f.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["x.txt"]


def test_paper_grid_reads_the_118_clip_evaluation_list_from_the_repository():
    """Issue 11: params/paper.yaml points at data/slf_eval_set.txt inside the repository (tracked despite data/ being
    ignored), resolved against the project root: the authors' 118 clips, one `id/ytid/clip` a line."""
    import re
    import subprocess

    from slf_utils.config import ROOT

    cfg = load_params(ROOT / "params" / "paper.yaml")
    path = resolve(cfg["data"]["test_list"])
    assert path == ROOT / "data" / "slf_eval_set.txt" and path.is_file()
    lines = path.read_text().splitlines()
    assert len(lines) == 118 and len(set(lines)) == 118
    bad = [ln for ln in lines if not re.fullmatch(r"id\d{5}/[A-Za-z0-9_-]{11}/\d{5}", ln)]
    assert not bad, bad[:3]
    ignored = subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=ROOT, capture_output=True)
    assert ignored.returncode != 0, "data/slf_eval_set.txt is git-ignored: it must be tracked"


def test_model_sources_are_hub_ids_unless_they_name_a_folder(tmp_path):
    (tmp_path / "ecapa").mkdir()
    grid = tmp_path / "g.yaml"
    grid.write_text(
        f"features: {{speaker_source: speechbrain/spkrec-ecapa-voxceleb, language_source: {tmp_path / 'ecapa'}}}\n"
    )
    cfg = load_params(grid)
    assert cfg["features"]["speaker_source"] == "speechbrain/spkrec-ecapa-voxceleb"  # a hub id stays one
    assert cfg["features"]["language_source"] == str(tmp_path / "ecapa")
