"""The grid runner end to end on a tiny grid: report, resume, a failing system, and a Dask LocalCluster."""

import json
import shutil
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from slf_utils import config, grid
from slf_utils.basics import ROOT, atomic_write_json
from slf_utils.notebook_run import kernel_environ, run_notebook

pytestmark = pytest.mark.slow


def tiny_grid(tmp_path, manifest, name="tiny", **extra):
    cfg = {
        "name": name,
        "results": str(tmp_path / "results" / name),
        "data": {"kind": "manifest", "manifest": str(manifest), "root": str(Path(manifest).parent)},
        "preprocess": {"audio_seconds": 3, "face_size": 32},
        "systems": ["full_input", "speaker_embeddings_only"],
        "model": {"preset": "tiny"},
        "train": {"steps": 4, "batch_size": 4, "checkpoint_every": 2},
        "evaluate": {"scales": [0, 3], "sampling_steps": 3, "face_model": "eigenfaces", "bootstrap": 50},
        "grid": {"scheduler": "sequential"},
        **extra,
    }
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def records(results: Path) -> dict:
    return {
        str(p.relative_to(results)): json.loads(p.read_text())
        for p in results.rglob("runs/*.json")
        if not p.name.endswith(".parameters.json")
    }


@pytest.fixture(scope="module")
def finished_grid(tmp_path_factory, demo_corpus_small):
    tmp = tmp_path_factory.mktemp("grid")
    p = tiny_grid(tmp, demo_corpus_small)
    # first run stops after one system (as if killed there): --only runs 01, 02 and that system
    grid.run(p, only="full_input")
    first = records(tmp / "results" / "tiny")
    table = grid.run(p)
    return tmp, p, first, table


def test_tiny_grid_runs_end_to_end_and_writes_the_report(finished_grid):
    tmp, p, _, table = finished_grid
    assert (table["status"] == "done").all(), table
    results = tmp / "results" / "tiny"
    assert (results / "report" / "recall_vs_scale.png").stat().st_size > 0
    m = pd.read_csv(results / "speaker_embeddings_only" / "eval" / "metrics.csv")
    assert set(m["scale"].dropna()) == {0, 3} and "recall@1" in set(m["metric"])  # chance rows have no scale
    for step in ("01_preprocess", "03_train", "04_evaluate"):
        assert list(results.rglob(f"runs/{step}.ipynb")), step
        assert list(results.rglob(f"runs/{step}.log")), step


def test_rerun_skips_finished_steps(finished_grid):
    tmp, p, first, _ = finished_grid
    after = records(tmp / "results" / "tiny")
    # the steps done by the interrupted first run were not run again by the second
    for key, rec in first.items():
        assert rec["status"] == "done"
        assert after[key]["started"] == rec["started"], key
    # and a third run changes nothing at all
    grid.run(p)
    assert records(tmp / "results" / "tiny") == after
    st = grid.status(p)
    assert (st["status"] == "done").all()


def test_a_failing_system_is_reported_and_the_other_completes(tmp_path, finished_grid):
    tmp, p, _, _ = finished_grid
    # reuse the finished store (a resumed grid) and break one system's training
    src = tmp / "results" / "tiny"
    dst = tmp_path / "results" / "broken"
    shutil.copytree(src / "store", dst / "store")
    shutil.copytree(src / "runs", dst / "runs")
    q = tiny_grid(
        tmp_path,
        yaml.safe_load(p.read_text())["data"]["manifest"],
        name="broken",
        system_overrides={"full_input": {"model": {"preset": "no_such_preset"}}},
    )
    table = grid.run(q).set_index(["step", "system"])
    assert table.loc[("train", "full_input"), "status"] == "failed"
    assert "no_such_preset" in table.loc[("train", "full_input"), "error"]
    assert table.loc[("evaluate", "full_input"), "status"] == "skipped"
    assert table.loc[("evaluate", "speaker_embeddings_only"), "status"] == "done"
    assert table.loc[("report", ""), "status"] == "done"
    assert (dst / "speaker_embeddings_only" / "eval" / "metrics.csv").exists()


def test_local_cluster_gives_the_same_metrics_as_sequential(tmp_path, finished_grid):
    from dask.distributed import Client, LocalCluster

    tmp, p, _, _ = finished_grid
    src = tmp / "results" / "tiny"
    dst = tmp_path / "results" / "tiny"
    shutil.copytree(src / "store", dst / "store")  # 01/02 resume from the finished store; 03-05 run on the cluster
    shutil.copytree(src / "runs", dst / "runs")
    q = tiny_grid(tmp_path, yaml.safe_load(p.read_text())["data"]["manifest"])
    # one worker: the order the scheduler picks shows (every training first, then the evaluations)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with Client(cluster) as client:
            table = grid.run(q, client=client)
    assert (table["status"] == "done").all(), table
    started = {(r["step"], r["system"]): r["started"] for r in records(dst).values()}
    assert max(t for (step, _), t in started.items() if step == "train") < min(
        t for (step, _), t in started.items() if step == "evaluate"
    )
    for system in ("full_input", "speaker_embeddings_only"):
        a = pd.read_csv(src / system / "eval" / "metrics.csv").sort_values(["scale", "metric"])
        b = pd.read_csv(dst / system / "eval" / "metrics.csv").sort_values(["scale", "metric"])
        pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True))


def test_dry_run_and_set_overrides(finished_grid, capsys):
    tmp, p, _, _ = finished_grid
    assert grid.main(["run", str(p), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count(" skip") == 7 and " run" not in out  # 01, 02, 2 x (03, 04), 05: all done already
    assert config.parse_set(["train.steps=7", "evaluate.scales=[0,2]"]) == {
        "train": {"steps": 7},
        "evaluate": {"scales": [0, 2]},
    }
    # a changed training parameter makes train, evaluate and report stale, not preprocessing
    st = grid.status(p, {"train": {"steps": 5}}).set_index(["step", "system"])["status"]
    assert st[("preprocess", "")] == "done" and st[("train", "full_input")] == "stale"
    with pytest.raises(SystemExit, match="--set steps: expected KEY=VALUE"):
        config.parse_set(["steps"])


def _hashes(p, overrides=None) -> dict:
    return {s.name: s.hash for s in grid.plan(p, overrides)[1]}


def test_step_hashes_cover_the_files_they_read_and_dry_run_says_what_changed(tmp_path, capsys):
    """Issue 19: a step's hash covered the manifest's path, not its contents, so a clip added to the manifest changed
    no step and the resumed grid skipped it; the same for the model presets. Every file a step reads now enters its
    hash: a change reruns the steps that read it and those downstream, and --dry-run says why."""
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("clip_id,identity,split,audio,face\na,id0,train,a.wav,a.png\n")
    presets = tmp_path / "presets.yaml"
    shutil.copy(ROOT / "params" / "presets.yaml", presets)
    model = {"preset": "tiny", "presets_file": str(presets)}
    p = tiny_grid(tmp_path, manifest, systems=["full_input", "bicubic"], model=model)

    def finish():  # every step of the plan done, as after a run
        steps = grid.plan(p)[1]
        for s in steps:
            grid._write_record(s, "done")
        return {s.name: s.hash for s in steps}

    base = finish()
    with manifest.open("a") as f:
        f.write("b,id0,test,b.wav,b.png\n")
    st = grid.status(p).set_index(["step", "system"])
    assert (st["status"] == "stale").all(), st  # preprocessing and everything downstream
    assert st.loc[("preprocess", ""), "why"] == "changed: data.manifest_content"
    assert st.loc[("features", ""), "why"] == "changed: upstream preprocess"
    assert not set(base.values()) & set(_hashes(p).values())

    finish()
    presets.write_text(presets.read_text().replace("timesteps: 8", "timesteps: 9"))  # the tiny preset
    st = grid.status(p).set_index(["step", "system"])
    trained = st.index.get_level_values("step").isin(["train", "evaluate", "report"])
    assert (st.loc[~trained, "status"] == "done").all() and (st.loc[trained, "status"] == "stale").all(), st
    assert st.loc[("train", "full_input"), "why"] == "changed: model.presets_file_content"
    assert st.loc[("evaluate", "bicubic"), "why"] == "changed: upstream train:bicubic"  # its model's output size
    assert grid.main(["run", str(p), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "changed: model.presets_file_content" in out and out.count(" run") == 4


def test_a_manifest_the_grid_builds_and_a_test_list_in_the_hash(tmp_path):
    """A demo corpus manifest that preprocessing builds (data.demo_corpus.build) is its output: building it leaves
    the hashes as they were (else the step would be stale once done), its settings change them. A VoxCeleb test list
    is read by preprocessing: editing it reruns the grid."""
    manifest = tmp_path / "corpus" / "manifest.csv"
    data = {"kind": "manifest", "manifest": str(manifest), "root": str(manifest.parent)}
    p = tiny_grid(tmp_path, manifest, data={**data, "demo_corpus": {"build": True, "identities": 4}})
    before = _hashes(p)
    manifest.parent.mkdir()
    manifest.write_text("clip_id,identity,split,audio,face\na,id0,train,a.wav,a.png\n")  # as the build writes it
    assert _hashes(p) == before
    assert _hashes(p, {"data": {"demo_corpus": {"identities": 5}}})["preprocess"] != before["preprocess"]

    listed = tmp_path / "eval_set.txt"
    listed.write_text("id00017/01dfn2spqyE/00001\n")
    q = tiny_grid(
        tmp_path, manifest, "vox", data={"kind": "voxceleb", "test_root": str(tmp_path), "test_list": str(listed)}
    )
    before = _hashes(q)
    listed.write_text("id00017/01dfn2spqyE/00001\nid00017/5MkXgwdrmJw/00002\n")
    after = _hashes(q)
    assert after["preprocess"] != before["preprocess"] and after["report"] != before["report"]


# a kernel on a loaded machine: still inside papermill's last request (kernel_info) after sending its reply
SLOW_KERNEL_INFO = """k = get_ipython().kernel
_info = k.shell_handlers["kernel_info_request"]
async def slow_info(*args):
    await _info(*args)
    __import__("time").sleep(1.0)
k.shell_handlers["kernel_info_request"] = slow_info"""


def test_a_finished_notebook_shuts_its_kernel_down_without_an_error_line(tmp_path, capfd):
    """Issue 11: jupyter_client interrupts a kernel before shutting it down; when the kernel was still in a handler
    (papermill's final kernel_info, on a loaded machine) ipykernel printed `[IPKernelApp] ERROR | KeyboardInterrupt
    caught in kernel.` although nothing failed. The grid's notebook runs do not interrupt a finished kernel: same
    notebook, plain papermill prints the line, notebook_run.run_notebook does not; a cell error is still reported."""
    import nbformat
    import papermill as pm

    spec = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": spec})
    nb.cells = [nbformat.v4.new_code_cell("x = 1", metadata={"tags": ["parameters"]})]
    nb.cells.append(nbformat.v4.new_code_cell(SLOW_KERNEL_INFO))
    path = tmp_path / "slow.ipynb"
    nbformat.write(nb, path)

    pm.execute_notebook(str(path), str(tmp_path / "plain.ipynb"), kernel_name="python3", progress_bar=False)
    plain = capfd.readouterr().err
    assert "KeyboardInterrupt caught in kernel" in plain  # the test reproduces the symptom
    assert "susceptible to eavesdropping" in plain  # and ipykernel's TCP warning (issue 28: a grid is quiet)

    with open(tmp_path / "log.txt", "w") as log:
        run_notebook(path, tmp_path / "grid.ipynb", {"x": 2}, log, cwd=tmp_path)
    err = capfd.readouterr().err
    assert "ERROR" not in err and "KeyboardInterrupt" not in err and "WARNING" not in err, err
    assert "x = 2" in (tmp_path / "grid.ipynb").read_text()  # parameters injected, notebook saved

    nb.cells.append(nbformat.v4.new_code_cell("raise ValueError('real failure')"))
    nbformat.write(nb, path)
    with open(tmp_path / "log.txt", "w") as log, pytest.raises(pm.PapermillExecutionError, match="real failure"):
        run_notebook(path, tmp_path / "fail.ipynb", {}, log, cwd=tmp_path)


@pytest.mark.parametrize("grid_file", sorted(p.name for p in (ROOT / "params").glob("*.yaml")))
def test_every_grid_file_in_params_loads_and_plans(grid_file):
    from slf_utils import layout

    data = yaml.safe_load((ROOT / "params" / grid_file).read_text())
    if "systems" not in data or not isinstance(data["systems"], list):
        pytest.skip("not a grid file (layout, systems or presets)")
    cfg, steps = grid.plan(ROOT / "params" / grid_file)
    declared = layout.load_systems(cfg["systems_file"], layout.load_layout(cfg))
    assert set(cfg["systems"]) <= set(declared)
    planned = {s.system for s in steps if s.kind == "evaluate"}
    assert planned == set(cfg["systems"]) and steps[-1].kind == "report"


def test_kernel_environment_drops_dasks_malloc_trim_and_pins_threads():
    """A Dask worker carries MALLOC_TRIM_THRESHOLD_=65536 (its nanny's pre-spawn environ); a kernel must not inherit it
    (1.6x the training wall time, 10x the page faults: benchmarks/kernel_env.py)."""
    import dask.config
    import distributed  # noqa: F401

    pre = dask.config.get("distributed.nanny.pre-spawn-environ")
    assert "MALLOC_TRIM_THRESHOLD_" in pre  # what the benchmark compares against still exists
    worker = {"PATH": "/usr/bin", "MALLOC_TRIM_THRESHOLD_": "65536", "OMP_NUM_THREADS": "8"}
    env = kernel_environ(2, worker)
    assert "MALLOC_TRIM_THRESHOLD_" not in env and env["PATH"] == "/usr/bin"
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == env["SLF_THREADS"] == "2"
    assert worker["OMP_NUM_THREADS"] == "8"  # the worker's own mapping is left as it was


def test_seeds_plan_one_training_and_evaluation_per_seed_in_their_own_folders(tmp_path, demo_corpus_small):
    """grid.seeds [0, 1, 2] (speaker_embeddings_only: [0, 1] by system_overrides): each trained system once per seed,
    the first seed in the system's folder, the others in seed<s>/, each hashed with its seed; reference rows once."""
    p = tiny_grid(
        tmp_path,
        demo_corpus_small,
        systems=["full_input", "speaker_embeddings_only", "bicubic"],
        grid={"scheduler": "sequential", "seeds": [0, 1, 2]},
        system_overrides={"speaker_embeddings_only": {"grid": {"seeds": [0, 1]}}},
    )
    cfg, steps = grid.plan(p)
    by = {s.name: s for s in steps}
    results = Path(cfg["results"])
    assert by["train:full_input"].run_dir == results / "full_input" / "runs"
    assert by["train:full_input@seed2"].run_dir == results / "full_input" / "seed2" / "runs"
    assert {"train:speaker_embeddings_only@seed1"} <= set(by) and "train:speaker_embeddings_only@seed2" not in by
    assert "evaluate:bicubic" in by and not any(n.startswith("evaluate:bicubic@") for n in by)
    hashes = [by[n].hash for n in ("train:full_input", "train:full_input@seed1", "train:full_input@seed2")]
    assert len(set(hashes)) == 3 and by["evaluate:full_input@seed1"].deps == ["train:full_input@seed1"]
    assert by["train:full_input@seed1"].overrides["train"]["seed"] == 1
    assert by["evaluate:full_input@seed1"].overrides["evaluate"]["seed"] == 1
    assert set(by["report"].deps) >= {"evaluate:full_input@seed2", "evaluate:speaker_embeddings_only@seed1"}


def test_progress_lines_count_steps_and_estimate_what_is_left_from_the_steps_that_ran(tmp_path):
    """Issue 28: each finished step prints done/total, the elapsed time and an estimate of what is left (the median
    time of the finished steps of the same kind, over the workers)."""
    steps = [
        grid.Step(k, s, "h", tmp_path / f"{k}-{s}")
        for k, s in [("preprocess", None), ("train", "a"), ("train", "b"), ("evaluate", "a"), ("evaluate", "b")]
    ]
    for s, secs in zip(steps[:2], (60, 600)):
        s.run_dir.mkdir()
        atomic_write_json(s.record_path, {"status": "done", "hash": "h", "seconds": secs})
    ok = {steps[0].name: True, steps[1].name: True}
    line = grid.progress_line(steps[1], steps, ok, time.time() - 700, slots=2)
    # left: train:b 600 s (its kind) + two evaluations at the overall median 330 s, over two workers = 630 s
    assert line.startswith("[grid] 2/5 train:a: done in 600 s · 12 min elapsed"), line
    assert line.endswith("about 10 min left"), line
    assert "left" not in grid.progress_line(steps[1], steps, dict.fromkeys([s.name for s in steps], True), time.time())


def _run_one(args):
    path, out, x, cwd = args
    with open(f"{out}.log", "w") as log:
        run_notebook(path, out, {"x": x}, log, cwd=cwd)
    return out


def test_notebooks_run_at_once_from_one_folder_do_not_share_kernel_sockets(tmp_path):
    """Issue 28: kernels talk over IPC; jupyter_client's default socket name (`kernel-ipc` in the working folder) is
    the same for every kernel started there, so two grid workers' kernels read each other's messages (Invalid
    Signature, a failed step). Four notebooks at once from one folder each get their own answer."""
    import concurrent.futures
    import multiprocessing

    import nbformat

    spec = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": spec})
    nb.cells = [nbformat.v4.new_code_cell("x = 0", metadata={"tags": ["parameters"]})]
    nb.cells.append(nbformat.v4.new_code_cell("import time\nfor _ in range(20):\n    time.sleep(0.05)\nprint(x * 7)"))
    path = tmp_path / "nb.ipynb"
    nbformat.write(nb, path)
    jobs = [(path, tmp_path / f"out{i}.ipynb", i, tmp_path) for i in range(4)]
    with concurrent.futures.ProcessPoolExecutor(4, mp_context=multiprocessing.get_context("spawn")) as pool:
        outs = list(pool.map(_run_one, jobs))
    for i, out in enumerate(outs):
        printed = [o.get("text", "") for c in nbformat.read(out, as_version=4).cells for o in c.get("outputs", [])]
        assert "".join(printed).strip() == str(i * 7), (i, printed)
    assert not list(tmp_path.glob("kernel-ipc*"))  # no socket files left in the working folder


def test_the_same_grid_run_twice_on_one_machine_gives_identical_numbers(tmp_path, finished_grid):
    """Repeatability (issue 28 item 5): the whole tiny grid again from nothing, in another folder (preprocessing,
    features, training, sampling, scoring, the report), gives the very same metrics, hits and headline as the first
    run, which was itself interrupted after one system and resumed."""
    tmp, p, _, _ = finished_grid
    q = tiny_grid(tmp_path, yaml.safe_load(p.read_text())["data"]["manifest"])
    table = grid.run(q)
    assert (table["status"] == "done").all(), table
    a, b = tmp / "results" / "tiny", tmp_path / "results" / "tiny"
    for system in ("full_input", "speaker_embeddings_only"):
        for name in ("metrics.csv", "hits.csv"):
            pd.testing.assert_frame_equal(
                pd.read_csv(a / system / "eval" / name), pd.read_csv(b / system / "eval" / name)
            )
    assert (a / "report" / "headline.md").read_text() == (b / "report" / "headline.md").read_text()
