"""Report: significance (Eq. 3/4) by hand, best scales, tables and figures from a synthetic set of results, and the
notebooks 04/05 end to end on a tiny trained system."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from slf_utils import differences, figures, report, report_tables, retrieval, significance, stats, tables
from slf_utils import evaluation as ev
from slf_utils.results import Results

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------ significance
def test_significance_hand_worked_example():
    r_all = {1: 0.30, 3: 0.60, 5: 0.75, 10: 0.90}
    r_without = {1: 0.15, 3: 0.40, 5: 0.60, 10: 0.90}
    # increases 100, 50, 25, 0 %; weights 1, 1/3, 1/5, 1/10 -> (100 + 50/3 + 5) / (1 + 1/3 + 1/5 + 1/10)
    w = significance.k_weights("inverse", (1, 3, 5, 10))
    assert sum(w.values()) == pytest.approx(1) and w[1] / w[3] == pytest.approx(3)
    s = significance.significance(r_all, r_without, w)
    assert s == pytest.approx((100 + 50 / 3 + 5) / (1 + 1 / 3 + 1 / 5 + 1 / 10))  # 74.49
    assert significance.band(s) == "significant"
    assert significance.significance(r_all, r_without, significance.k_weights("uniform")) == pytest.approx(43.75)
    assert significance.significance(r_all, r_without, significance.k_weights([1, 0, 0, 0])) == pytest.approx(100)
    assert significance.recall_increase(0.2, 0.25) == pytest.approx(-20)


def test_significance_when_recall_without_the_input_is_zero():
    w = significance.k_weights("inverse", (1, 3))
    assert significance.recall_increase(0.1, 0.0) == float("inf")
    assert np.isnan(significance.recall_increase(0.0, 0.0))
    s = significance.significance({1: 0.1, 3: 0.3}, {1: 0.0, 3: 0.2}, w)
    assert s == float("inf") and significance.fmt_s(s) == "inf" and "unbounded" in significance.band(s)
    # 0/0 at k=1 is undefined: left out, S is the k=3 increase alone
    assert significance.significance({1: 0.0, 3: 0.3}, {1: 0.0, 3: 0.2}, w) == pytest.approx(50)
    assert np.isnan(significance.significance({1: 0.0, 3: 0.0}, {1: 0.0, 3: 0.0}, w))
    assert significance.band(float("nan")) == "undefined" and significance.fmt_s(float("nan")) == "undefined"


def test_bands():
    cases = {
        0: "negligible",
        0.5: "minor",
        20: "minor",
        31: "moderate",
        40: "moderate",
        55: "considerable",
        75: "significant",
        80: "significant",
        98: "profound",
    }
    for s, name in cases.items():
        assert significance.band(s) == name, s
    assert significance.band(-5).startswith("negative")
    with pytest.raises(ValueError):
        significance.k_weights("quadratic")


def test_bootstrap_significance_is_paired_and_contains_estimate():
    rng = np.random.default_rng(0)
    clips = [f"c{i}" for i in range(200)]

    def frame(p):
        return pd.concat(
            [pd.DataFrame({"clip_id": clips, "k": k, "hit": (rng.random(200) < p * k).astype(int)}) for k in (1, 3)]
        )

    a, b = frame(0.2), frame(0.1)
    w = significance.k_weights("inverse", (1, 3))
    ra = a.groupby("k")["hit"].mean().to_dict()
    rb = b.groupby("k")["hit"].mean().to_dict()
    s = significance.significance(ra, rb, w)
    lo, hi = significance.bootstrap_significance(a, b, w, n_boot=500, seed=0)
    assert lo < s < hi and lo > 0


# ------------------------------------------------------------------------------------------------ synthetic results
SYSTEMS = [
    "full_input",
    "no_image_guide",
    "no_speaker_embeddings",
    "no_audio",
    "pure_sr",
    "bicubic",
    "identity_mean",
    "random",
]
PEAK = {"full_input": 0.9, "no_image_guide": 0.35, "no_speaker_embeddings": 0.3, "no_audio": 0.0, "pure_sr": 0.15}
REFERENCE = {"bicubic": 0.3, "identity_mean": 0.5}  # recall@1 of the image reference rows (paper protocol)
GUIDE_TOP1 = {"full_input": 0.95, "no_speaker_embeddings": 0.9, "no_audio": 0.95, "pure_sr": 0.5, "bicubic": 1.0}
IDENTITY = 0.75  # the identity protocol keeps this share of the paper protocol's hits


def keep_share(hits, share):
    out = hits.copy()
    out[np.flatnonzero(hits)[round(share * hits.sum()) :]] = False
    return out


def exact_hits(rng, n, p1):
    """{protocol: {k: hits}} with exactly round(p n) hits (paper) and round(IDENTITY round(p n)) (identity): recall
    is known, so best scales and S are too."""
    paper = {k: rng.permutation(np.arange(n) < round(min(1, p1 + (k - 1) * 0.08) * n)) for k in retrieval.KS}
    return {"paper": paper, "identity": {k: keep_share(h, IDENTITY) for k, h in paper.items()}}


def write_synthetic_results(cfg, store):
    """metrics.csv, hits.csv, samples.csv and images for SYSTEMS, as evaluation.run would write them."""
    clips = store.clips(split="test", stage="preprocess")
    ids, idents = clips["clip_id"].tolist(), clips["identity"].tolist()
    faces = store.load_stacked("preprocess", ids)["face"]
    rng = np.random.default_rng(0)
    for system in SYSTEMS:
        out = Results.of(cfg).eval(system)
        out.mkdir(parents=True, exist_ok=True)
        rows = tables.chance_rows(system, idents) + [tables.constant_row(system, "n_unsampled", 0.0, len(ids))]
        hit_frames, samples = [], []
        if system == "random":
            hits = {p: retrieval.random_selection_hits(idents, idents, seed=0) for p in retrieval.PROTOCOLS}
            rows += tables.recall_rows(system, np.nan, hits, 200, clusters=idents)
            hit_frames.append(tables.hit_frame(system, np.nan, ids, idents, hits))
        else:
            scales = [np.nan] if system in REFERENCE else range(0, 9, 2)
            for scale in scales:
                p1 = REFERENCE[system] if system in REFERENCE else PEAK[system] * np.exp(-((scale - 3) ** 2) / 8)
                hits = exact_hits(rng, len(ids), p1)
                rows += tables.recall_rows(system, scale, hits, 200, clusters=idents)
                rows.append(tables.metric_row(system, scale, "psnr", 20 + rng.normal(0, 1, len(ids)) - scale, 200))
                rows.append(tables.metric_row(system, scale, "ssim", rng.random(len(ids)) / (1 + scale), 200))
                rows.append(tables.metric_row(system, scale, "gender_acc", (rng.random(len(ids)) < 0.8) * 1.0, 200))
                top1 = GUIDE_TOP1.get(system, 0.1)
                rows.append(tables.metric_row(system, scale, "guide_top1", np.arange(len(ids)) < top1 * len(ids), 200))
                hit_frames.append(tables.hit_frame(system, scale, ids, idents, hits))
                shift = 0 if np.isnan(scale) else 10 * scale
                images = [np.clip(face.astype(int) + shift, 0, 255).astype(np.uint8) for face in faces]
                samples += ev.write_samples(out, ids, idents, images, scale, "x")
            pd.DataFrame(samples).to_csv(out / "samples.csv", index=False)
        pd.DataFrame(rows, columns=tables.METRIC_COLUMNS).to_csv(out / "metrics.csv", index=False)
        pd.concat(hit_frames).to_csv(out / "hits.csv", index=False)


@pytest.fixture
def synthetic_results(tmp_path):
    from slf_utils.config import load_params
    from slf_utils.layout import Layout
    from slf_utils.synthetic import synthetic_store

    grid = {
        "name": "reporttest",
        "results": str(tmp_path / "results"),
        "systems": SYSTEMS + ["audio_only"],
        "report": {"k_weights": "inverse", "chosen_scale": 2},
    }
    p = tmp_path / "grid.yaml"
    p.write_text(yaml.safe_dump(grid))
    cfg = load_params(p)
    store = synthetic_store(
        Results.of(cfg).store, n_identities=6, clips_per_identity=4, layout=Layout.load(cfg["layout"])
    )
    write_synthetic_results(cfg, store)
    return cfg


def test_best_scale_of_a_super_resolution_system_keeps_its_guide():
    rows = [("sr", sc, "identity", "recall@1", r1) for sc, r1 in ((1, 0.50), (3, 0.63), (5, 0.63), (8, 0.70))] + [
        ("sr", sc, "identity", "recall@3", r3) for sc, r3 in ((1, 0.6), (3, 0.70), (5, 0.73), (8, 0.8))
    ]
    rows += [("sr", sc, "both", "guide_top1", g) for sc, g in ((1, 1.0), (3, 0.97), (5, 0.88), (8, 0.7))]
    m = pd.DataFrame(rows, columns=["system", "scale", "protocol", "metric", "value"])
    assert report.best_scales(m) == {"sr": 8.0}  # recall alone
    assert report.best_scales(m, {"sr": 0.9}) == {"sr": 3.0}  # 5 ties on recall@1 but loses its guide
    assert report.best_scales(m, {"sr": 1.01}) == {"sr": 8.0}  # no scale qualifies: recall alone (the check fails)


def test_report_from_synthetic_results(synthetic_results):
    cfg = synthetic_results
    logs = []
    res = report.run(cfg, log=logs.append)
    out = Results.of(cfg).report
    for stem in ("recall_vs_scale", "samples_systems", "samples_scales"):
        for ext in ("png", "pdf"):
            assert (out / f"{stem}.{ext}").stat().st_size > 1000, stem
    for stem in ("headline", "differences", "table_best_scale", "table_scale_2", "significance_best_scale"):
        assert (out / f"{stem}.csv").exists() and (out / f"{stem}.md").exists(), stem
    assert any("audio_only" in line for line in logs)  # not evaluated: skipped and said so

    best = res["best"]
    assert all(np.isnan(best[s]) for s in ("random", "bicubic", "identity_mean")) and best["no_audio"] == 0.0
    assert all(best[s] == 2.0 for s in PEAK if PEAK[s] > 0)  # 2 and 4 tie by construction: the smaller
    assert res["best_by_protocol"]["paper"]["full_input"] == 2.0
    table = pd.read_csv(out / "table_best_scale.csv")
    assert set(table["system"]) == set(SYSTEMS) and list(table["protocol"].unique()) == ["identity", "paper"]
    assert (table["recall@1_lo"] <= table["recall@1"]).all()
    t = table.set_index(["protocol", "system"])
    n = t.loc[("paper", "full_input"), "n"]
    assert t.loc[("paper", "bicubic"), "recall@1"] == pytest.approx(round(0.3 * n) / n)
    assert t.loc[("identity", "identity_mean"), "recall@1"] == pytest.approx(round(IDENTITY * round(0.5 * n)) / n)
    assert t.loc[("paper", "bicubic"), "guide_top1"] == 1.0 and pd.isna(t.loc[("paper", "bicubic"), "scale"])

    sig = pd.read_csv(out / "significance_scale_2.csv")
    sig = sig[sig["protocol"] == "paper"]
    # image guide, audio, speaker embeddings: their "without" systems ran; attributes' did not -> skipped
    assert list(sig["key"]) == ["image_guide", "audio", "speaker_embeddings"]
    assert list(sig["paper_S"]) == [75, 77, 98]
    audio = sig.set_index("key").loc["audio"]
    assert audio["S_text"] == "inf" and "unbounded" in audio["band"]  # no_audio recall is 0 everywhere
    guide = sig.set_index("key").loc["image_guide"]

    # by hand from the construction (exact_hits): recall@k = round(min(1, p1 + 0.08 (k - 1)) n) / n, weights 1/k
    def r(system, k, n=12):
        return round(min(1, PEAK[system] * np.exp(-((2 - 3) ** 2) / 8) + (k - 1) * 0.08) * n) / n

    weights = {k: (1 / k) / sum(1 / j for j in retrieval.KS) for k in retrieval.KS}
    want = sum(
        w * (r("full_input", k) - r("no_image_guide", k)) / r("no_image_guide", k) * 100 for k, w in weights.items()
    )
    # 10/12 vs 4/12, 11/12 vs 6/12, 12/12 vs 8/12, 12/12 vs 12/12: (150 + 83.3/3 + 50/5 + 0) / (1 + 1/3 + 1/5 + 1/10)
    assert want == pytest.approx(114.966, abs=0.001)
    assert guide["S"] == pytest.approx(want) and guide["S_ci_low"] <= want <= guide["S_ci_high"]

    checks = pd.read_csv(out / "learning_checks.csv").set_index("system")
    assert not {"random", "bicubic", "identity_mean"} & set(checks.index)
    assert checks.loc["no_image_guide", "mode"] == "generation"
    fi, na, ps = checks.loc["full_input"], checks.loc["no_audio"], checks.loc["pure_sr"]
    # 6 identities x 2 test clips, identity protocol: the query's identity keeps 1 of 11 gallery clips
    assert fi["x_chance"] == pytest.approx(fi["recall@1"] * 11) and fi["chance@1"] == pytest.approx(1 / 11)
    assert fi["ci_above_chance"] and fi["recall@1_lo"] > 1 / 11
    assert not na["ci_above_chance"] and pd.isna(na["scale0_at_chance"])  # recall 0; at chance: generation only
    ng = checks.loc["no_image_guide"]
    # scale 0: 1 hit of 12 (paper 1, identity round(0.75)); its exact interval [0.002, 0.385] holds chance 1/11
    assert ng["scale0_recall@1"] == pytest.approx(1 / 12) and ng["scale0_at_chance"]
    # 0 hits of 40 (expected 0.7 at chance 0.017) is at chance; 0 of 400 is below it
    assert stats.binomial_interval(0, 40) == pytest.approx((0.0, 1 - 0.025 ** (1 / 40)))
    assert stats.binomial_interval(0, 400)[1] < 0.017 < stats.binomial_interval(0, 40)[1]
    # the bicubic floor and the guide: super-resolution systems only
    assert fi["above_floor"] and fi["guide_kept"] and not ps["above_floor"] and not ps["guide_kept"]
    assert pd.isna(ng["above_floor"]) and pd.isna(ng["guide_kept"])
    # identity protocol: 10 paper hits of 12 keep round(0.75 * 10) = 8; identity_mean's 6 keep round(4.5) = 4
    assert fi["recall@1"] == pytest.approx(8 / 12) and fi["ceiling@1"] == pytest.approx(4 / 12)
    assert fi["of_ceiling"] == pytest.approx(2.0)

    diff = pd.read_csv(out / "differences.csv")
    pairs = set(zip(diff["a"], diff["b"]))
    # report.differences (full_input - pure_sr, full_input - no_speaker_embeddings) and each SR system - bicubic
    assert pairs == {
        ("full_input", "pure_sr"),
        ("full_input", "no_speaker_embeddings"),
        ("full_input", "bicubic"),
        ("no_speaker_embeddings", "bicubic"),
        ("no_audio", "bicubic"),
        ("pure_sr", "bicubic"),
    }
    assert set(diff["protocol"]) == {"identity", "paper"} and set(diff["scales"]) == {"best", "chosen 2"}
    d = diff.set_index(["scales", "protocol", "a", "b", "k"]).loc[("best", "paper", "full_input", "bicubic", 1)]
    fi_paper = t.loc[("paper", "full_input"), "recall@1"]
    assert d["difference"] == pytest.approx(fi_paper - t.loc[("paper", "bicubic"), "recall@1"])
    assert d["ci_low"] <= d["difference"] <= d["ci_high"] and d["n_clips"] == n

    summary = (out / "summary.md").read_text()
    first = summary.split("## ")[1]
    assert first.startswith("Identity protocol") and "Bicubic upscaling" in first and "Identity mean face" in first
    assert "vs identity_mean" in first and "Random selection" in first
    assert "Does each system learn?" in summary and "× chance" in summary and "Paired differences" in summary
    assert "w@1 = 0.612" in summary and "inverse" in summary and "75 %" in summary
    md = (out / "table_best_scale.md").read_text()
    assert md.startswith("| protocol | system |") and "Full Input" in md


def test_recall_figure_has_a_row_of_panels_per_protocol_and_reference_lines(synthetic_results):
    metrics = report.load_all(synthetic_results)
    fig = figures.plot_recall_vs_scale(metrics, report.system_titles(synthetic_results))
    axes = fig.get_axes()
    assert [ax.get_title().split(")")[1].split(",")[0].strip() for ax in axes] == [
        "identity protocol",
        "identity protocol",
        "paper protocol",
        "paper protocol",
    ]
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "Bicubic upscaling (reference)" in labels and "Identity mean face (reference)" in labels
    # the reference rows are horizontal lines at their recall (identity protocol: IDENTITY x the paper's hits)
    lines = [c for c in axes[0].collections if c.get_label() == "Identity mean face (reference)"]
    y = lines[0].get_segments()[0][:, 1]
    assert y[0] == y[1] == pytest.approx(round(IDENTITY * 6) / 12)


def test_differences_table_of_a_system_with_itself_is_zero(synthetic_results):
    cfg = synthetic_results
    hits = {"full_input": report.load_hits(cfg, "full_input")}
    diff = differences.differences_table(
        [("full_input", "full_input")], {("best", "identity"): {"full_input": 2.0}}, hits, ks=(1, 3)
    )
    assert list(diff["k"]) == [1, 3] and (diff[["difference", "ci_low", "ci_high"]] == 0).all().all()
    assert (diff["n_clips"] == 12).all() and (diff["n_identities"] == 6).all()
    # the report leaves such a pair out, and pairs with a system that was not evaluated
    assert (
        differences.difference_pairs([["full_input", "full_input"], ["full_input", "nope"]], {}, ["full_input"]) == []
    )


def test_report_with_nothing_evaluated(tmp_path):
    from slf_utils.config import load_params

    p = tmp_path / "grid.yaml"
    p.write_text(yaml.safe_dump({"name": "empty", "results": str(tmp_path / "r"), "systems": ["full_input"]}))
    res = report.run(load_params(p), log=lambda *a: None)
    assert "No evaluated system" in res["summary"].read_text()


# ------------------------------------------------------------------------------------------------ notebooks
@pytest.mark.slow
def _tiny_grid(tmp_path, grid: dict):
    """The grid file `grid` written in tmp_path and loaded, over a 4-identity synthetic store of 32 px faces."""
    from slf_utils.config import load_params
    from slf_utils.layout import Layout
    from slf_utils.synthetic import synthetic_store

    p = tmp_path / "grid.yaml"
    p.write_text(yaml.safe_dump(grid))
    cfg = load_params(p)
    layout = Layout.load(cfg["layout"])
    synthetic_store(Results.of(cfg).store, n_identities=4, clips_per_identity=4, layout=layout, face_size=32)
    return p, cfg


def test_notebooks_04_and_05_on_a_tiny_trained_system(tmp_path):
    """papermill runs 03 (train, tiny preset), 04 and 05 on the synthetic store; the report figures appear."""
    import papermill as pm

    grid = {
        "name": "nbtest",
        "results": str(tmp_path / "results"),
        "systems": ["full_input", "bicubic", "random"],
        "model": {"preset": "tiny"},
        "train": {"steps": 2, "batch_size": 4, "checkpoint_every": 2},
        "evaluate": {
            "scales": [0, 2],
            "sampling_steps": 2,
            "face_model": "eigenfaces",
            "bootstrap": 50,
            "attributes": "none",
        },
        "report": {"chosen_scale": 2},
    }
    p, cfg = _tiny_grid(tmp_path, grid)
    from slf_utils import diffusion

    diffusion.train(cfg, "full_input")
    nb = ROOT / "notebooks"
    for system in ("full_input", "bicubic", "random"):
        pm.execute_notebook(
            str(nb / "04_evaluate.ipynb"),
            str(tmp_path / f"04_{system}.ipynb"),
            cwd=str(nb),
            parameters={"params_file": str(p), "system": system, "overrides": {}},
            kernel_name="python3",
            progress_bar=False,
        )
    pm.execute_notebook(
        str(nb / "05_report.ipynb"),
        str(tmp_path / "05.ipynb"),
        cwd=str(ROOT),
        parameters={"params_file": str(p), "overrides": {}},
        kernel_name="python3",
        progress_bar=False,
    )
    out = Results.of(cfg).report
    for stem in ("recall_vs_scale", "samples_systems", "samples_scales"):
        assert (out / f"{stem}.png").exists() and (out / f"{stem}.pdf").exists()
    m = pd.read_csv(Results.of(cfg).eval("full_input") / "metrics.csv")
    assert set(m["scale"].dropna()) == {0, 2} and {"guide_top1", "n_unsampled"} <= set(m["metric"])
    headline = (out / "headline.md").read_text()
    assert "Bicubic upscaling" in headline and "Random selection" in headline and "reference" in headline


def test_headline_shows_guide_consistency_only_for_systems_given_the_guide():
    rows = [(s, 1.0, "identity", "recall@1", 0.5) for s in ("sr", "gen")]
    rows += [(s, 1.0, "both", "guide_top1", 0.9) for s in ("sr", "gen")]
    rows += [(s, np.nan, "both", "chance@1", 0.025) for s in ("sr", "gen")]
    m = pd.DataFrame(rows, columns=["system", "scale", "protocol", "metric", "value"]).assign(ci_low=0.4, ci_high=0.6)
    t = report_tables.headline_table(m, {"sr": 1.0, "gen": 1.0}, modes={"sr": "super_resolution", "gen": "generation"})
    assert t.set_index("system")["guide_top1"].to_dict() == pytest.approx({"sr": 0.9, "gen": np.nan}, nan_ok=True)
    assert t["x_chance"].tolist() == pytest.approx([20.0, 20.0])


def test_recall_figure_gives_every_system_its_own_colour_past_ten():
    """Thirteen systems: the default ten-colour cycle would draw two of them alike."""
    rows = []
    for i in range(13):
        for scale in (0.0, 3.0):
            rows.append(
                {
                    "system": f"s{i}",
                    "scale": scale,
                    "protocol": "identity",
                    "metric": "recall@1",
                    "value": 0.1,
                    "ci_low": 0.0,
                    "ci_high": 0.2,
                    "n": 10,
                }
            )
    fig = figures.plot_recall_vs_scale(pd.DataFrame(rows), ks=(1,), protocols=("identity",))
    lines = [ln for ln in fig.axes[0].get_lines() if not ln.get_label().startswith("_")]
    assert len(lines) == 13 and len({ln.get_color() for ln in lines}) == 13


def test_best_scales_are_chosen_on_validation_clips_only(synthetic_results):
    """A planted optimum that only the test clips have (recall@1 = 1 at scale 8) must not move the choice: the
    validation rows peak at scale 4, so every table reports the test clips at scale 4, and the optimistic column
    shows what choosing on the test clips would have claimed."""
    cfg = synthetic_results
    path = Results.of(cfg).eval("full_input") / "metrics.csv"
    test = tables.load_metrics(path)
    recall = test["metric"].str.startswith("recall@")
    planted = test.copy()
    planted.loc[recall & (planted["scale"] == 8), ["value", "ci_low", "ci_high"]] = 1.0
    val = test.assign(split="val")
    val.loc[recall, "value"] = np.where(val.loc[recall, "scale"] == 4, 0.9, 0.2)
    pd.concat([planted, val]).to_csv(path, index=False)
    res = report.run(cfg, log=lambda *a: None)
    assert res["chosen_on"] == "val" and res["best"]["full_input"] == 4.0
    assert res["best_by_protocol"]["paper"]["full_input"] == 4.0
    head = res["headline"].set_index("system").loc["full_input"]
    at4 = planted[(planted["metric"] == "recall@1") & (planted["protocol"] == "identity") & (planted["scale"] == 4)]
    assert head["recall@1"] == pytest.approx(at4["value"].iloc[0])  # the test clips, at the validation's scale
    assert head["best_on_test_scale"] == 8.0 and head["best_on_test@1"] == 1.0
    summary = (Results.of(cfg).report / "summary.md").read_text()
    assert "chosen on the" in summary and "validation clips" in summary and "optimistic" in summary


def test_differences_list_every_way_a_pair_differs_and_flag_a_two_factor_pair(synthetic_results):
    """full_input - pure_sr differs only in what it keeps (factor inputs: one factor); full_input - no_image_guide
    named `inputs` too differs in its mode (super-resolution vs generation): flagged, with the key named."""
    cfg = synthetic_results
    cfg["report"]["differences"] = [["full_input", "pure_sr", "inputs"], ["full_input", "no_image_guide", "inputs"]]
    res = report.run(cfg, log=lambda *a: None)
    rd = res["recipe_differences"].set_index(["a", "b"])
    # what each is trained from (train_on) moves with what it keeps: a diffusion model trains on what it is fed
    assert set(rd.loc[("full_input", "pure_sr"), "key"]) == {"keep", "stages", "train_on"}
    assert rd.loc[("full_input", "pure_sr"), "one_factor"].all()
    two = rd.loc[[("full_input", "no_image_guide")]]
    assert set(two["key"]) == {"mode"} and not two["one_factor"].any()
    text = (Results.of(cfg).report / "differences.md").read_text()
    assert "FLAG: differs in more than inputs**: `mode`" in text
    assert "No Image Guide" in text and "'super_resolution' vs 'generation'" in text
    diff = res["differences"]
    assert not diff.loc[diff["b"] == "no_image_guide", "one_factor"].any()
    assert diff.loc[diff["b"] == "pure_sr", "one_factor"].all()
    # a recipe changes with a model option of the system and with its training settings
    from slf_utils import recipe

    base = recipe.resolve_recipe(cfg, "full_input").flat()
    cfg["system_overrides"] = {"full_input": {"train": {"steps": 7}, "model": {"face_prior": "mean"}}}
    changed = recipe.resolve_recipe(cfg, "full_input").flat()
    assert {k for k in base if base[k] != changed[k]} == {"train.steps", "model.face_prior"}


def test_a_pair_named_decoder_that_also_changes_the_training_inputs_is_flagged(tmp_path):
    """Issue 25: `decoder` changes the decoder only; speech_to_face - speech_to_face_direct also changes what the
    decoder is trained from (cross-fitted predictions vs true embeddings): flagged under `decoder`. face_to_face -
    face_to_face_direct (both trained on and fed the true embedding) is the decoder alone; two direct decoders fed the
    prediction and trained on true vs predicted embeddings are a pure `training_inputs` pair. The pairs the params
    files name are all one factor (or `method`)."""
    from slf_utils.basics import ROOT
    from slf_utils.config import load_params

    systems = tmp_path / "systems.yaml"
    extra = {"title": "Direct decoder trained on predictions", "mode": "generation", "decoder": "direct"}
    systems.write_text(
        (ROOT / "params" / "systems.yaml").read_text()
        + yaml.safe_dump({"s2f_direct_predicted": extra | {"keep": ["voice_face_embedding"]}})
    )
    p = tmp_path / "grid.yaml"
    p.write_text(yaml.safe_dump({"name": "factors", "results": str(tmp_path / "r"), "systems_file": str(systems)}))
    pairs = [
        ("speech_to_face", "speech_to_face_direct", "decoder"),
        ("face_to_face", "face_to_face_direct", "decoder"),
        ("s2f_direct_predicted", "speech_to_face_direct", "training_inputs"),
    ]
    rd = report.recipe_differences(load_params(p), pairs)
    one = rd.groupby(["a", "b"])["one_factor"].first()
    assert not one[("speech_to_face", "speech_to_face_direct")]
    both = rd[(rd["a"] == "speech_to_face") & ~rd["within_factor"]]
    assert list(both["key"]) == ["train_on"]
    assert list(both[["value_a", "value_b"]].iloc[0]) == ["voice_face_embedding", "face_embedding"]
    assert one[("face_to_face", "face_to_face_direct")] and one[("s2f_direct_predicted", "speech_to_face_direct")]
    assert "train_on" not in set(rd.loc[rd["a"] == "face_to_face", "key"])
    assert set(rd.loc[rd["a"] == "s2f_direct_predicted", "key"]) == {"train_on"}
    assert "FLAG: differs in more than decoder**: `train_on`" in differences.pretty_recipe_differences(rd)
    for grid in ("compare.yaml", "demo-open.yaml"):
        cfg = load_params(ROOT / "params" / grid)
        named = report.recipe_differences(cfg, [tuple(x) for x in cfg["report"]["differences"]])
        assert named["one_factor"].all(), (grid, named.loc[~named["within_factor"], ["a", "b", "key"]])


def test_seeds_enter_every_table_as_their_mean_with_intervals_over_identities_and_seeds(synthetic_results):
    """grid.seeds [0, 1]: a second run of full_input that misses a third of seed 0's recall@1 hits. Every table shows
    the mean over the two seeds; seeds.md gives each seed's value, the spread and an interval over identities and
    seeds wider than the one over identities alone; reference rows (one run) are as they were."""
    import shutil

    cfg = synthetic_results
    cfg["grid"]["seeds"] = [0, 1]
    src = Results.of(cfg).eval("full_input")
    dst = src.parent / "seed1" / "eval"
    shutil.copytree(src, dst)
    hits = tables.load_hits(dst / "hits.csv")
    hit1 = hits.index[(hits["k"] == 1) & (hits["hit"] == 1)]
    hits.loc[hit1[::3], "hit"] = 0
    hits.to_csv(dst / "hits.csv", index=False)
    m = tables.load_metrics(dst / "metrics.csv")
    for (scale, protocol), g in hits[hits["k"] == 1].groupby(["scale", "protocol"]):
        at = (m["metric"] == "recall@1") & (m["protocol"] == protocol) & np.isclose(m["scale"], scale)
        m.loc[at, "value"] = g["hit"].mean()
    m.to_csv(dst / "metrics.csv", index=False)
    res = report.run(cfg, log=lambda *a: None)
    seeds = res["seeds"].set_index("system")
    fi = seeds.loc["full_input"]
    a, b = (float(x) for x in fi["per_seed"].split(", "))
    assert fi["seeds"] == 2 and b < a and fi["mean"] == pytest.approx((a + b) / 2, abs=1e-3) and fi["sd"] > 0
    assert fi["ci_high"] - fi["ci_low"] > fi["id_high"] - fi["id_low"]
    head = res["headline"].set_index("system")
    assert head.loc["full_input", "recall@1"] == pytest.approx(fi["mean"])
    assert seeds.loc["bicubic", "seeds"] == 1
    summary = (Results.of(cfg).report / "summary.md").read_text()
    assert "## Training seeds" in summary and "identities and seeds" in summary
    # full_input - bicubic: both seeds against the one run, the seed mean, each seed's difference in seeds.md
    diff = res["differences"].set_index(["scales", "protocol", "a", "b", "k"])
    d = diff.loc[("best", "identity", "full_input", "bicubic", 1)]
    assert (d["seeds_a"], d["seeds_b"], d["seed_pairs"]) == (2, 1, 2)
    assert d["difference"] == pytest.approx(fi["mean"] - head.loc["bicubic", "recall@1"], abs=1e-3)
    per = [float(x) for x in d["per_seed"].split(", ")]
    assert per == pytest.approx([a - head.loc["bicubic", "recall@1"], b - head.loc["bicubic", "recall@1"]], abs=1e-3)
    md = (Results.of(cfg).report / "seeds.md").read_text()
    assert "Full Input − Bicubic upscaling" in md and d["per_seed"] in md and "each pair of runs" in md
    assert "| 2, 1 |" in (Results.of(cfg).report / "differences.md").read_text()


def test_a_test_set_of_one_clip_per_speaker_has_no_identity_protocol_chance_and_the_report_says_so():
    """The paper's 118-clip list has one clip per test speaker: under the identity protocol no query can hit (chance
    0), which made the headline and the learning checks divide by zero (found by params/paper-smoke.yaml)."""
    rows = []
    for system, scale, metric, value in [
        ("full_input", 3.0, "recall@1", 0.0),
        ("full_input", 0.0, "recall@1", 0.0),
        ("full_input", np.nan, "chance@1", 0.0),
        ("full_input", 3.0, "guide_top1", 0.5),
    ]:
        rows.append(dict(system=system, scale=scale, protocol="identity", split="test", metric=metric, value=value,
                         ci_low=value, ci_high=value, n=6))  # fmt: skip
    m = pd.DataFrame(rows, columns=tables.METRIC_COLUMNS)
    head = report_tables.headline_table(m, {"full_input": 3.0})
    assert np.isnan(head["x_chance"].iloc[0]) and report_tables.pretty_headline(head)["× chance"].iloc[0] == "–"
    checks = report_tables.learning_checks(m, {"full_input": 3.0}, {"full_input": "super_resolution"})
    assert np.isnan(checks["x_chance"].iloc[0]) and not checks["ci_above_chance"].iloc[0]
    assert report_tables.pretty_checks(checks)["× chance"].iloc[0] == "–"
    assert report_tables.times_chance(0.2, 0.1) == pytest.approx(2)
    # such a grid's report leads with the paper protocol; one with a second clip per speaker with the identity one
    assert report.lead_protocol(m) == "paper"
    assert report.lead_protocol(m.assign(value=m["value"].where(m["metric"] != "chance@1", 0.017))) == "identity"


# ------------------------------------------------------------------------------------------------ seeds in differences
def seed_hits(system, counts, n_ids=40, per_id=2, scale=2.0):
    """Hits (identity protocol, k = 1) of one run per entry of `counts` {seed: hits}: the first `hits` of
    n_ids x per_id clips hit, so runs of more hits hit a superset (seeds that agree where they can)."""
    clips = [f"c{i:03d}" for i in range(n_ids * per_id)]
    return pd.concat(
        pd.DataFrame(
            {
                "system": system,
                "scale": scale,
                "protocol": "identity",
                "split": "test",
                "clip_id": clips,
                "identity": [f"id{i // per_id}" for i in range(len(clips))],
                "k": 1,
                "hit": (np.arange(len(clips)) < h).astype(int),
                "seed": s,
            }  # fmt: skip
        )
        for s, h in counts.items()
    )


def test_a_one_run_reference_pairs_with_every_seed_and_two_seeded_systems_pair_seed_by_seed():
    """Issue 25: full_input of 3 seeds (41, 45, 39 hits of 80) minus a one-run reference (32) is the seed mean
    (+0.1208), not seed 0's 41 - 32 (+0.1125); its interval resamples seeds too, so it is wider than seed 0's
    identities-only interval where the seeds disagree."""
    hits = {
        "full_input": seed_hits("full_input", {0: 41, 1: 45, 2: 39}),
        "bicubic": seed_hits("bicubic", {0: 32}, scale=np.nan),
        "pure_sr": seed_hits("pure_sr", {0: 35, 1: 37}),
    }
    scales = {("best", "identity"): {"full_input": 2.0, "bicubic": np.nan, "pure_sr": 2.0}}
    pairs = [("full_input", "bicubic"), ("full_input", "pure_sr"), ("bicubic", "full_input")]
    d = differences.differences_table(pairs, scales, hits, ks=(1,), n_boot=2000).set_index(["a", "b"])
    fb = d.loc[("full_input", "bicubic")]
    assert fb["difference"] == pytest.approx((41 + 45 + 39) / 3 / 80 - 32 / 80) == pytest.approx(0.1208, abs=1e-4)
    assert (fb["seeds_a"], fb["seeds_b"], fb["seed_pairs"], fb["n_clips"], fb["n_identities"]) == (3, 1, 3, 80, 40)
    assert [float(x) for x in fb["per_seed"].split(", ")] == pytest.approx([9 / 80, 13 / 80, 7 / 80], abs=1e-3)
    assert fb["ci_low"] < fb["difference"] < fb["ci_high"]
    assert d.loc[("bicubic", "full_input"), "difference"] == pytest.approx(-fb["difference"])
    seed0 = {**hits, "full_input": hits["full_input"][hits["full_input"]["seed"] == 0]}
    old = differences.differences_table(pairs[:1], scales, seed0, ks=(1,), n_boot=2000).iloc[0]
    assert old["difference"] == pytest.approx(9 / 80) and old["seeds_a"] == 1  # what the report said before
    assert fb["ci_high"] - fb["ci_low"] > old["ci_high"] - old["ci_low"]
    # 3 seeds against 2: seeds 0 and 1, the ones both have, pair seed by seed (seed 2 of full_input has no partner)
    fp = d.loc[("full_input", "pure_sr")]
    assert (fp["seeds_a"], fp["seeds_b"], fp["seed_pairs"]) == (3, 2, 2)
    assert fp["difference"] == pytest.approx(((41 - 35) + (45 - 37)) / 2 / 80)
    pretty = differences.pretty_differences(d.reset_index().assign(factor="method", one_factor=True))
    assert list(pretty["seeds (a, b)"]) == ["3, 1", "3, 2", "1, 3"]
    seeds_md = differences.pretty_seed_differences(d.reset_index(), "identity")
    assert seeds_md.iloc[0, 3] == f"+0.121 [{fb['ci_low']:+.3f}, {fb['ci_high']:+.3f}]"
    assert seeds_md.iloc[0, 4] == fb["per_seed"]


def test_the_learning_checks_count_the_hits_of_every_seed_on_every_clip():
    """Scale 0 of a generation system, 0 hits, chance 0.05: 0 of 40 queries (one seed) is at chance (exact interval
    [0, 0.088]), 0 of 3 x 40 (three seeds) is below it ([0, 0.030]): the binomial is over seeds x clips."""
    rows = []
    for scale, metric, value in [(0.0, "recall@1", 0.0), (2.0, "recall@1", 0.5), (np.nan, "chance@1", 0.05)]:
        rows.append(dict(system="g", scale=scale, protocol="identity", split="val", metric=metric, value=value,
                         ci_low=value - 0.1 * (value > 0), ci_high=value, n=40))  # fmt: skip
    m = pd.DataFrame(rows)
    one = report_tables.learning_checks(m.assign(n_seeds=1), {"g": 2.0}, {"g": "generation"}).iloc[0]
    three = report_tables.learning_checks(m.assign(n_seeds=3), {"g": 2.0}, {"g": "generation"}).iloc[0]
    assert one["scale0_at_chance"] and one["passes"]
    assert not three["scale0_at_chance"] and not three["passes"]


def test_bootstrap_significance_resamples_seeds_where_a_system_has_several():
    """S's interval with two runs of `all` that disagree is wider than with one of them (both runs' mean, which is
    what S is computed from)."""
    clips = [f"c{i:03d}" for i in range(80)]

    def frame(counts):
        return pd.concat(
            pd.DataFrame(
                {
                    "clip_id": clips,
                    "identity": [f"id{i % 40}" for i in range(80)],  # 2 clips each: hits spread over identities
                    "k": k,
                    "seed": s,
                    "hit": (np.arange(80) < h + 10 * (k > 1)).astype(int),
                }
            )  # fmt: skip
            for s, h in counts.items()
            for k in (1, 3)
        )

    w = significance.k_weights("inverse", (1, 3))
    two = significance.bootstrap_significance(frame({0: 30, 1: 50}), frame({0: 20}), w, n_boot=1000, seed=0)
    mean = significance.bootstrap_significance(frame({0: 40}), frame({0: 20}), w, n_boot=1000, seed=0)
    s = significance.significance({1: 40 / 80, 3: 50 / 80}, {1: 20 / 80, 3: 30 / 80}, w)
    assert two[0] < s < two[1] and mean[0] < s < mean[1]
    assert two[1] - two[0] > mean[1] - mean[0]


# ------------------------------------------------------------------------------------------------ learning checks
def write_one_clip_test_list(cfg):
    """Results of a VoxCeleb2-shaped grid, as evaluation.run writes them: 6 test speakers of one clip each (the SLF
    list: no identity-protocol hit is possible) and 4 validation speakers of 3 clips each, one gallery of all 18.
    pure_sr keeps its guide and nothing else (under the paper protocol it finds every query's own image; under the
    identity protocol 1 of 12 validation queries, at chance); full_input also knows who speaks at scale 2 (11 of
    12); bicubic is the guide upscaled."""
    ids = [f"T{i}" for i in range(6)] + [f"V{i // 3}" for i in range(12)]
    clips, splits = [f"x{i:02d}" for i in range(18)], ["test"] * 6 + ["val"] * 12
    ks = (1, 3)

    def hits(identity_val_hits):
        ident = np.zeros(18, bool)
        ident[6 : 6 + identity_val_hits] = True  # no test query can hit under the identity protocol
        return {"paper": {k: np.ones(18, bool) for k in ks}, "identity": {k: ident for k in ks}}

    runs = {
        "full_input": {0.0: hits(1), 2.0: hits(11)},
        "pure_sr": {0.0: hits(1), 2.0: hits(1)},
        "bicubic": {np.nan: hits(1)},
    }
    for system, by_scale in runs.items():
        out = Results.of(cfg).eval(system)
        out.mkdir(parents=True, exist_ok=True)
        rows, frames = tables.chance_rows(system, ids, ks, splits), []
        for scale, h in by_scale.items():
            rows += tables.recall_rows(system, scale, h, 200, clusters=ids, splits=splits)
            for s, n in (("test", 6), ("val", 12)):  # every output reproduces its guide
                rows.append(tables.metric_row(system, scale, "guide_top1", np.ones(n), 200, split=s))
            frames.append(tables.hit_frame(system, scale, clips, ids, h, splits))
        pd.DataFrame(rows, columns=tables.METRIC_COLUMNS).to_csv(out / "metrics.csv", index=False)
        pd.concat(frames).to_csv(out / "hits.csv", index=False)


def test_a_one_clip_per_speaker_test_list_leads_with_paper_but_checks_learning_on_identity_val_rows(tmp_path):
    """Issue 25: the paper grid's test list has no identity-protocol chance, so the headline leads with the paper
    protocol; the learning checks read the identity protocol of the validation speakers (3 clips each), where a
    system that only keeps its guide is at chance and fails, and one that knows the speaker passes. Under the paper
    protocol the guide copier would pass (it finds each query's own image)."""
    from slf_utils.config import load_params

    p = tmp_path / "grid.yaml"
    grid = {
        "name": "onecliptest",
        "results": str(tmp_path / "results"),
        "systems": ["full_input", "pure_sr", "bicubic"],
    }
    p.write_text(yaml.safe_dump(grid | {"report": {"bootstrap": 200}}))
    cfg = load_params(p)
    write_one_clip_test_list(cfg)
    res = report.run(cfg, log=lambda *a: None)
    assert res["chosen_on"] == "val" and res["lead_protocol"] == "paper" and res["check_protocol"] == "identity"
    checks = res["checks"].set_index("system")
    chance = checks.loc["pure_sr", "chance@1"]
    assert 0.05 < chance < 0.2  # the validation rows' identity-protocol chance: 2 other clips of 17, 9 identities
    ps, fi = checks.loc["pure_sr"], checks.loc["full_input"]
    assert ps["recall@1"] == pytest.approx(1 / 12) and not ps["ci_above_chance"] and not ps["passes"]
    assert fi["best_scale"] == 2.0 and fi["recall@1"] == pytest.approx(11 / 12) and fi["passes"]
    # what the checks said before: the paper protocol's validation rows, where keeping the guide is enough
    val = report_tables.combine_seeds(report.load_all(cfg), {}).pipe(tables.at_split, "val")
    paper = report_tables.learning_checks(
        tables.at_protocol(val, "paper"), {"pure_sr": 2.0}, {"pure_sr": "super_resolution"}
    )
    assert paper["recall@1"].iloc[0] == 1.0 and paper["passes"].iloc[0]
    summary = (Results.of(cfg).report / "summary.md").read_text()
    assert "Led by the paper protocol" in summary and "learning checks read the identity protocol of the val" in summary
    assert "(identity protocol, val clips)" in summary


def test_differences_describe_the_recipes_that_trained_not_an_edited_systems_file(tmp_path):
    """Resolve once (issue 27): training saves recipe.json beside each model; after systems.yaml is edited (Pure
    Super-Resolution made to keep everything, as Full Input does), differences.md still lists how the two trained
    systems differ, while the edited file alone would resolve them to the same recipe."""
    from slf_utils import diffusion, recipe
    from slf_utils.basics import ROOT, ParamsError
    from slf_utils.config import load_params
    from slf_utils.store import open_store

    systems = tmp_path / "systems.yaml"
    systems.write_text((ROOT / "params" / "systems.yaml").read_text())
    grid = {
        "name": "recipetest",
        "results": str(tmp_path / "results"),
        "systems_file": str(systems),
        "systems": ["full_input", "pure_sr"],
        "model": {"preset": "tiny"},
        "train": {"steps": 1, "batch_size": 4, "checkpoint_every": 1},
        "evaluate": {"sampling_steps": 2, "scales": [0], "face_model": "eigenfaces", "attributes": "none"},
    }
    p, cfg = _tiny_grid(tmp_path, grid)
    for s in ("full_input", "pure_sr"):
        diffusion.train(cfg, s)
        saved = recipe.read_recipe(Path(cfg["results"]) / s / "model")
        assert saved["hash"] == recipe.resolve_recipe(cfg, s).hash
    pair = [("full_input", "pure_sr", "inputs")]
    assert set(report.recipe_differences(cfg, pair)["key"]) == {"keep", "stages", "train_on"}
    ev.run(cfg, "pure_sr", log=lambda *a: None)  # notebook 04 saves the recipe it scored beside its outputs

    text = systems.read_text().replace(
        "pure_sr:\n  title: Pure Super-Resolution\n  mode: super_resolution\n  keep: []",
        "pure_sr:\n  title: Renamed\n  mode: super_resolution\n  keep: [all]",
    )
    assert text != systems.read_text()
    systems.write_text(text)
    edited = load_params(p)
    assert recipe.resolve_recipe(edited, "pure_sr").hash == recipe.resolve_recipe(edited, "full_input").hash
    rd = report.recipe_differences(edited, pair)
    assert set(rd["key"]) == {"keep", "stages", "train_on"}  # the trained recipes, not the edited file
    assert rd.set_index("key").loc["keep", "value_b"] == ""
    # the report's titles are the scored system's; one not yet scored resolves from today's files
    assert report.system_titles(edited) == {"pure_sr": "Pure Super-Resolution", "full_input": "Full Input"}
    assert recipe.scored_recipes(edited)["pure_sr"].system.keep == ()

    # evaluation samples each model as its recipe.json says (no features for Pure Super-Resolution), where the edited
    # file would feed it every constituent
    model = Path(cfg["results"]) / "pure_sr" / "model"
    loaded = recipe.load_recipe(model)
    assert loaded.system.keep == () and loaded.hash == recipe.read_recipe(model)["hash"]
    store = open_store(edited)
    clips = ev.eval_clips(store)
    samples = ev.generate(edited, "pure_sr", clips, store, log=lambda *a: None)
    assert sorted(samples["clip_id"]) == sorted(clips["clip_id"]) and set(samples["scale"]) == {0}
    # a recipe.json edited by hand is refused with its path, not sampled
    saved = json.loads((model / recipe.RECIPE).read_text())
    saved["resolved"]["train"]["steps"] = 2
    (model / recipe.RECIPE).write_text(json.dumps(saved))
    with pytest.raises(ParamsError, match=r"pure_sr/model/recipe.json: its contents do not match its hash"):
        ev.generate(edited, "pure_sr", clips, store, log=lambda *a: None)
