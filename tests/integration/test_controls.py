"""The known-answer bench (issue 26): the oracle reference row, the controls, the dose-response and the power."""

import numpy as np
import pandas as pd
import pytest

from slf_utils import retrieval, tables
from slf_utils.results import Results


def _hand_ranking(v, faces, s, candidates):
    """Gallery indices of `candidates` ordered by |v - s c|^2 (the oracle's distance), by hand."""
    d = {j: float(np.sum((v - s * faces[j]) ** 2)) for j in candidates}
    return sorted(candidates, key=d.get)


def _hand_hits(order, ids, own_identity, k):
    """Hit within the first k distinct identities of a ranking of gallery indices."""
    seen = []
    for j in order:
        if ids[j] not in seen:
            seen.append(ids[j])
    return own_identity in seen[:k]


def test_oracle_equals_a_hand_computation_on_a_toy_gallery():
    # 4 identities x 2 images; the voice code of each identity (per query clip), each image's face code
    ids = np.array(["a", "a", "b", "b", "c", "c", "d", "d"])
    faces = np.array([[1.0, 0.0], [0.8, 0.3], [0.0, 1.0], [-0.2, 1.1], [-1.0, 0.0], [-0.7, -0.4], [0.2, -1.2], [0, -1]])
    code = {"a": [0.9, 0.1], "b": [-0.6, 0.5], "c": [-0.4, -0.9], "d": [1.3, -0.2]}  # noisy voices: b, c, d miss
    voice = np.array([code[i] for i in ids])
    s, ks = 0.6, (1, 2, 3)
    hits = retrieval.oracle_hits(voice, faces, s, ids, ks)
    for q in range(len(ids)):
        paper = _hand_ranking(voice[q], faces, s, list(range(len(ids))))
        identity = [j for j in paper if j != q]  # the query's own image left out
        for k in ks:
            assert hits["paper"][k][q] == _hand_hits(paper, ids, ids[q], k)
            assert hits["identity"][k][q] == _hand_hits(identity, ids, ids[q], k)
    # the hand values themselves (|v - s c|^2): a's voice is nearest a's images; b's nearest a c image, then a b one;
    # c's nearest d's images, then c's; d's nearest a's, then d's
    first = [True, True, False, False, False, False, False, False]
    assert hits["identity"][1].tolist() == first and hits["paper"][1].tolist() == first
    assert hits["identity"][2].all()

    # per-fold galleries: each query ranked among its own group's images only
    groups = [0, 0, 0, 0, 1, 1, 1, 1]
    grouped = retrieval.oracle_hits(voice, faces, s, ids, ks, groups=groups)
    for q in range(len(ids)):
        mine = [j for j in range(len(ids)) if groups[j] == groups[q] and j != q]
        assert grouped["identity"][1][q] == _hand_hits(_hand_ranking(voice[q], faces, s, mine), ids, ids[q], 1)

    # s = 0: every image ties; a seeded random order, the random row's
    null = retrieval.oracle_hits(voice, faces, 0.0, ids, ks, seed=3)
    own = np.arange(len(ids))
    rand = retrieval.random_selection_hits(ids, ids, ks, 3, own, None, own)
    assert all((null["identity"][k] == rand[k]).all() for k in ks)


# ---------------------------------------------------------------------------------------------- synthetic grids
N_IDS, SCALES = 40, (0.0, 4.0, 8.0)  # per split: 40 identities x 2 held-out clips each


def _exact(rng, n, p):
    """{k: (n,) bool} with exactly round(p_k n) hits, nested in k (p_1 = p/4 ... p_10 = p)."""
    u = rng.permutation(n)
    return {k: u < round(min(1.0, p * (0.25 + 0.75 * (k - 1) / 9)) * n) for k in retrieval.KS}


def write_grid(tmp_path, name, strength, recall, systems):
    """A finished known-answer grid as the controls read it: data.root with a build record of `strength`, and for
    each system metrics.csv and hits.csv with exactly the recall@10 `recall[system][split][scale]` (a float: a
    reference row, no scale) over 40 val and 40 test identities x 2 clips."""
    import yaml

    from slf_utils.config import load_params

    root = tmp_path / f"corpus_{name}"
    (root / ".build").mkdir(parents=True)
    (root / ".build" / "settings.json").write_text(f'{{"settings": {{"link_strength": {strength}}}}}')
    grid = {"name": name, "results": str(tmp_path / name), "systems": systems, "data": {"root": str(root)}}
    grid["report"] = {"bootstrap": 200}  # quick intervals: the tests read hit counts and exact intervals
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(grid))
    cfg = load_params(tmp_path / f"{name}.yaml")
    splits = np.repeat(["val", "test"], 2 * N_IDS)
    idents = [f"{s}{i:03d}" for s in ("v", "t") for i in range(N_IDS) for _ in range(2)]
    ids = [f"{i}/x/{j}" for j, i in enumerate(idents)]
    rng = np.random.default_rng(7)
    # one gallery: the same chance for every system
    chance = pd.DataFrame(tables.chance_rows("-", idents, retrieval.KS, splits))
    for system in systems:
        rows, frames = chance.assign(system=system).to_dict("records"), []
        spec = recall.get(system, 0.0)
        for scale in [np.nan] if not isinstance(spec, dict) else SCALES:
            hits = {}
            for split in ("val", "test"):
                p = spec if not isinstance(spec, dict) else spec[split][scale]
                hits[split] = _exact(rng, 2 * N_IDS, p)
            both = {k: np.concatenate([hits["val"][k], hits["test"][k]]) for k in retrieval.KS}
            h = {"identity": both, "paper": both}
            rows += tables.recall_rows(system, scale, h, 200, 0, idents, splits)
            frames.append(tables.hit_frame(system, scale, ids, idents, h, splits))
        out = Results.of(cfg).eval(system)
        out.mkdir(parents=True)
        pd.DataFrame(rows, columns=tables.METRIC_COLUMNS).to_csv(out / "metrics.csv", index=False)
        pd.concat(frames).to_csv(out / "hits.csv", index=False)
    return tmp_path / f"{name}.yaml"


def _sweep(val, test):
    return {"val": dict(zip(SCALES, val)), "test": dict(zip(SCALES, test))}


POSITIVE_RECALL = {
    # chosen on val at scale 4 (test is best at 8: the controls must not read it there)
    "speaker_embeddings_only": _sweep((0.05, 0.5, 0.3), (0.05, 0.45, 0.6)),
    "full_input": _sweep((0.3, 0.3, 0.2), (0.3, 0.3, 0.2)),  # no better than bicubic: the floor fails
    "face_to_face_direct": 0.4,
    "bicubic": 0.3,
    "attribute_mean": 0.06,
    "random": 0.05,
    "oracle": 0.9,
}
NULL_RECALL = {
    "speaker_embeddings_only": _sweep((0.05, 0.05, 0.05), (0.05, 0.05, 0.05)),  # at chance (0.048 at k = 10)
    "contrastive_speech": _sweep((0.3, 0.3, 0.3), (0.3, 0.3, 0.3)),  # far above chance: specificity fails
    "attribute_mean": 0.06,
    "random": 0.05,
    "oracle": 0.05,
}


def test_controls_judge_recall_at_10_on_test_speakers_at_the_scale_validation_chose(tmp_path):
    from slf_utils import controls
    from slf_utils.config import load_params

    grid = write_grid(tmp_path, "ka1", 1.0, POSITIVE_RECALL, list(POSITIVE_RECALL))
    view = controls.grid_view(load_params(grid))
    assert view["strength"] == 1.0 and view["scales"]["speaker_embeddings_only"] == 4.0
    assert view["roles"]["speech_only"] == ["speaker_embeddings_only"]
    assert view["roles"]["super_resolution"] == ["full_input"]
    checks = controls.control_checks(view)
    judged = checks[checks["judged"]].set_index("system")
    assert set(judged.index) == {"speaker_embeddings_only", "face_to_face_direct", "full_input"}
    assert (judged["k"] == 10).all() and (judged["split"] == "test").all()
    sens = judged.loc["speaker_embeddings_only"]
    assert sens["value"] == pytest.approx(0.45 - 0.0625, abs=1e-9) and sens["passes"]  # 36/80 - 5/80 at scale 4
    assert judged.loc["face_to_face_direct", "passes"] and judged.loc["face_to_face_direct", "ci_low"] > 0.048
    assert judged.loc["full_input", "value"] == 0 and not judged.loc["full_input", "passes"]
    lines = controls.verdict_lines(view, checks)
    assert "CONTROL FAILED" in lines[0] and any("Full Input" in x and "floor" in x for x in lines)
    # recall@1 and the validation speakers are shown beside, never judged
    assert {1, 10} <= set(checks["k"]) and {"val", "test"} == set(checks["split"])


def test_the_null_control_judges_every_speech_only_system_against_the_exact_interval_of_chance(tmp_path):
    from slf_utils import controls
    from slf_utils.config import load_params

    grid = write_grid(tmp_path, "ka0", 0.0, NULL_RECALL, list(NULL_RECALL))
    view = controls.grid_view(load_params(grid))
    checks = controls.control_checks(view)
    judged = checks[checks["judged"]].set_index("system")
    assert set(judged.index) == {"speaker_embeddings_only", "contrastive_speech"}
    assert judged.loc["speaker_embeddings_only", "passes"] and not judged.loc["contrastive_speech", "passes"]
    lo, hi = judged.loc["speaker_embeddings_only", ["ci_low", "ci_high"]]
    assert lo < 0.048 < hi  # 4 of 80 hits: Clopper-Pearson [0.014, 0.123]
    assert (lo, hi) == pytest.approx((0.01379, 0.12315), abs=1e-4)


def test_power_shrinks_with_the_identities_and_the_strength_command_carries_voice_free_systems(tmp_path, capsys):
    from slf_utils import controls
    from slf_utils.config import load_params

    one = write_grid(tmp_path, "ka1", 1.0, POSITIVE_RECALL, list(POSITIVE_RECALL))
    null = {**NULL_RECALL, "face_to_face_direct": 0.4}
    zero = write_grid(tmp_path, "ka0", 0.0, null, list(null))  # no bicubic, no full_input: carried from s = 1
    power = controls.power_table(controls.grid_view(load_params(one)))
    seo = power[(power["a"] == "speaker_embeddings_only") & (power["k"] == 10)].set_index("fraction")
    assert seo.loc[1.0, "identities"] == 40 and seo.loc[0.25, "identities"] == 10
    assert seo.loc[0.25, "half_width"] > 1.4 * seo.loc[1.0, "half_width"]  # about 2x: 1/sqrt(N)

    res = controls.strength([zero, one], tmp_path / "dose")
    t = res["table"]
    carried = t[t["carried"]]
    assert set(carried["system"]) == {"bicubic"} and set(carried["strength"]) == {0.0}  # full_input hears the voice
    seo = t[(t["system"] == "speaker_embeddings_only") & (t["k"] == 10)].set_index("strength")["value"]
    assert seo[0.0] == pytest.approx(0.05) and seo[1.0] == pytest.approx(0.45)  # each at its val-chosen scale
    assert (tmp_path / "dose" / "strength.png").exists() and (tmp_path / "dose" / "strength.md").exists()
    assert "Test identities needed" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_the_bench_runs_end_to_end_on_a_small_known_answer_corpus(ka_small, ka_cache, ka_small_settings, tmp_path):
    """Issue 26 item 7, the CI-sized bench: params/known-answer.yaml itself on the tests' 30-identity corpus at s = 1
    (3 identity folds, 6 validation speakers), the tiny preset and one trained speech system, through the grid
    runner (notebooks 01-05). The report opens with the controls' verdict, controls.md/csv and power.csv are written,
    and the oracle row finds the planted link far above chance."""
    import yaml

    from slf_utils import controls, grid
    from slf_utils.basics import ROOT
    from slf_utils.config import load_params

    systems = ["speaker_embeddings_only", "attribute_mean", "oracle"]  # the sensitivity pair and the oracle
    spec = {
        "extends": str(ROOT / "params" / "known-answer.yaml"),
        "name": "ka-ci",
        "results": str(tmp_path / "results"),
        "data": {
            "root": str(ka_small),
            "manifest": str(ka_small / "manifest.csv"),
            "known_answer": {"build": True, "cache": str(ka_cache), "link_strength": 1.0, **ka_small_settings},
            # one gallery of the 30 identities: at 10 a fold, recall@10 (the controls' k) would be 1 for every row
            "identity_folds": {"gallery": "all"},
            "validation": {"identities": 6},
        },
        "preprocess": {"audio_seconds": 3},
        "systems": systems,
        "model": {"preset": "tiny"},
        "train": {"steps": 4, "batch_size": 4, "checkpoint_every": 2},
        "system_overrides": {"speaker_embeddings_only": {"train": {"steps": 4}}},
        # eigenfaces: this corpus has one training face an identity, too few for the within-identity scatter of the
        # bench's fisherfaces (which refuse it, named; tested on ORL in test_evaluation)
        "evaluate": {"scales": [0, 3], "sampling_steps": 3, "bootstrap": 50, "face_model": "eigenfaces"},
        "report": {"differences": [["speaker_embeddings_only", "attribute_mean", "method"]], "bootstrap": 50},
        "grid": {"scheduler": "sequential"},
    }
    grid_file = tmp_path / "ka-ci.yaml"
    grid_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    table = grid.run(grid_file)
    assert (table["status"] == "done").all(), table

    cfg = load_params(grid_file)
    m = pd.read_csv(Results.of(cfg).eval("oracle") / "metrics.csv")
    m = m[(m["split"] == "test") & (m["protocol"] == "identity")].set_index("metric")
    chance = m.loc["chance@1", "value"]
    assert 0 < chance < 0.05  # 60 held-out clips of 30 identities, the query's own left out
    assert m.loc["recall@1", "value"] > 5 * chance and m.loc["recall@1", "ci_low"] > 2 * chance, m  # 0.65 vs 0.017
    assert m.loc["recall@10", "ci_low"] > m.loc["chance@10", "value"]

    out = Results.of(cfg).report
    checks = pd.read_csv(out / "controls.csv")
    judged = checks[checks["judged"]]
    sens = judged[(judged["system"] == "speaker_embeddings_only") & (judged["control"] == "sensitivity")]
    assert len(sens) == 1 and sens["k"].iloc[0] == controls.CONTROL_K and sens["split"].iloc[0] == "test"
    assert set(checks["split"]) == {"val", "test"}  # chosen on the validation speakers, shown beside
    assert (pd.read_csv(out / "power.csv")["a"] == "speaker_embeddings_only").any()
    # Face-to-Face (direct) is not in this grid: its control is not read, which is not a pass
    summary = (out / "summary.md").read_text().split("\n")
    assert summary[2].startswith("**Controls of known answer** (link strength s = 1, the positive control")
    assert "CONTROL FAILED" in summary[2] and any("not evaluated" in x and "Face to Face" in x for x in summary[:8])
    assert (out / "controls.md").read_text().startswith("# Controls of known answer: ka-ci")

    # the dose-response command reads the finished grid: the oracle and chance against the strength
    res = controls.strength([grid_file], tmp_path / "dose")
    t = res["table"].set_index(["system", "k"])
    assert t.loc[("oracle", 1), "value"] == pytest.approx(m.loc["recall@1", "value"])
    assert t.loc[("chance", 1), "value"] == pytest.approx(chance)
