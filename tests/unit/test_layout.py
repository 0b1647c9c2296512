"""The feature matrix layout (paper Table 1) and the ablation systems: declared in params/, validated, vectorised."""

import numpy as np
import pandas as pd
import pytest
import yaml

from slf_utils.basics import ROOT, ParamsError
from slf_utils.layout import Layout, load_systems, plot_layout
from slf_utils.synthetic import synthetic_store

LAYOUT = ROOT / "params" / "layout.yaml"
SYSTEMS = ROOT / "params" / "systems.yaml"
COMMONLANGUAGE = (
    "Arabic Basque Breton Catalan Chinese_China Chinese_Hongkong Chinese_Taiwan Chuvash Czech Dhivehi Dutch English "
    "Esperanto Estonian French Frisian Georgian German Greek Hakha_Chin Indonesian Interlingua Italian Japanese Kabyle "
    "Kinyarwanda Kyrgyz Latvian Maltese Mangolian Persian Polish Portuguese Romanian Romansh_Sursilvan Russian Sakha "
    "Slovenian Spanish Swedish Tamil Tatar Turkish Ukranian Welsh"
).split()


@pytest.fixture(scope="module")
def layout():
    return Layout.load(LAYOUT)


@pytest.fixture(scope="module")
def systems(layout):
    return load_systems(SYSTEMS, layout)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return synthetic_store(tmp_path_factory.mktemp("store"), n_identities=4, clips_per_identity=4, face_size=16)


@pytest.fixture(scope="module")
def train_ids(store):
    return store.clips(split="train")["clip_id"].tolist()


@pytest.fixture(scope="module")
def stats(layout, store, train_ids):
    return layout.fit(store, train_ids)


def nonzero_rows(X):
    return np.abs(X).sum(-1) > 0  # (B, rows): what imagen-pytorch keeps unmasked


def write_layout(tmp_path, change):
    raw = yaml.safe_load(LAYOUT.read_text())
    change(raw)
    p = tmp_path / "layout.yaml"
    p.write_text(yaml.safe_dump(raw, sort_keys=False))
    return p


# ---------------------------------------------------------------------- declaration and validation
def test_layout_fits_the_matrix_and_has_the_reference_rows(layout):
    assert (layout.rows, layout.cols) == (256, 768)
    rows = {n: c.rows for n, c in layout.constituents.items()}
    assert rows == {
        "age": (0, 1),
        "ethnicity": (1, 2),
        "gender": (2, 3),
        "language": (3, 4),
        "speaker": (4, 5),
        "speaker_windows": (5, 33),
        "pyaudio": (33, 112),
        "mel": (112, 223),
        "face_embedding": (224, 230),  # Speech2Face (issue 12): a 4096-d VGG-Face vector wrapped over 6 rows
        "voice_face_embedding": (230, 236),
        "contrastive_speech": (240, 241),  # SCLDM (test_contrastive.py)
    }
    for c in layout.constituents.values():
        assert 0 <= c.rows[0] < c.rows[1] <= 256 and c.col + c.width <= 768
    assert layout.constituents["pyaudio"].width == 68
    assert len(layout.table()) == len(layout.constituents)


def test_overlapping_declarations_are_rejected_with_both_names(tmp_path):
    p = write_layout(tmp_path, lambda r: r["constituents"]["mel"].update(rows=[100, 150]))
    with pytest.raises(ParamsError, match=r"'pyaudio'.*'mel'.*overlap"):
        Layout.load(p)
    # same rows, disjoint columns: allowed
    p = write_layout(tmp_path, lambda r: r["constituents"]["gender"].update(rows=[1, 2], col=10))
    assert Layout.load(p).constituents["gender"].rows == (1, 2)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda r: r["constituents"]["mel"].update(rows=[112, 300]), r"constituents\.mel\.rows"),
        (lambda r: r["constituents"]["mel"].update(col=700), r"constituents\.mel: columns"),
        (lambda r: r.update(rows=300), "at most 256 x 768"),
        (lambda r: r.update(cols=1024), "at most 256 x 768"),
        (lambda r: r["constituents"]["age"].update(encoder="magic"), r"age\.encoder"),
        (lambda r: r["groups"].update(speech=["speaker", "voice"]), r"groups\.speech: unknown constituent 'voice'"),
        (lambda r: r["constituents"]["language"]["classes"].append("PT"), "duplicate classes"),
        (lambda r: r["constituents"]["speaker_windows"].update(select="longest"), r"speaker_windows\.select"),
        (lambda r: r["constituents"]["speaker_windows"]["source"].pop("bounds"), r"speaker_windows\.source\.bounds"),
        (lambda r: r["constituents"]["age"].update(select="pool_per_length"), r"age\.select"),
    ],
)
def test_invalid_layouts_fail_naming_the_key(tmp_path, change, match):
    with pytest.raises(ParamsError, match=match):
        Layout.load(write_layout(tmp_path, change))


def test_systems_are_declared_with_modes_and_paper_numbers(systems, layout):
    expected = {
        "full_input": ("super_resolution", 2),
        "no_image_guide": ("generation", 3),
        "no_speaker_embeddings": ("super_resolution", 4),
        "no_audio": ("super_resolution", 5),
        "no_additional_attributes": ("super_resolution", 8),
        "audio_only": ("generation", None),
        "speaker_embeddings_only": ("generation", None),
        "pure_sr": ("super_resolution", None),
        "full_input_no_classical": ("super_resolution", None),
        "random": ("reference", None),
        "bicubic": ("reference", None),
        "identity_mean": ("reference", None),
        "attribute_mean": ("reference", None),
        "real_face": ("reference", None),
        "oracle": ("reference", None),  # the planted code (issue 26, test_controls.py)
        "face_to_face": ("generation", None),  # Speech2Face (issue 12, tests/integration/test_speech2face.py)
        "speech_to_face": ("generation", None),
        "face_to_face_direct": ("generation", None),
        "speech_to_face_direct": ("generation", None),
        "full_input_prior": ("super_resolution", None),  # test_face_prior_latent.py
        "full_input_attribute_prior": ("super_resolution", None),
        "speaker_embeddings_only_prior": ("generation", None),
        "speaker_embeddings_only_latent": ("generation", None),
        "contrastive_speech": ("generation", None),  # SCLDM (test_contrastive.py)
    }
    assert {n: (s.mode, s.paper_no) for n, s in systems.items()} == expected
    # everything but the Speech2Face embeddings (the true one is the answer): they are not in the group `all`
    named_only = {"face_embedding", "voice_face_embedding", "contrastive_speech"}
    assert set(systems["full_input"].keep) == set(layout.names) - named_only
    assert systems["no_audio"].keep == ("age", "ethnicity", "gender")  # language is speech-derived: dropped
    assert "language" in systems["no_additional_attributes"].keep
    assert not {"age", "gender", "ethnicity"} & set(systems["no_additional_attributes"].keep)
    assert set(systems["audio_only"].keep) == {"language", "speaker", "speaker_windows", "pyaudio", "mel"}
    assert systems["speaker_embeddings_only"].keep == ("speaker", "speaker_windows")
    assert systems["pure_sr"].keep == ()
    assert not {"pyaudio", "mel"} & set(systems["full_input_no_classical"].keep)


def test_unknown_constituent_in_a_system_fails_naming_it(tmp_path, layout):
    p = tmp_path / "systems.yaml"
    p.write_text(yaml.safe_dump({"mine": {"title": "Mine", "mode": "generation", "keep": ["speaker", "voice"]}}))
    with pytest.raises(ParamsError, match=r"mine\.keep: unknown constituent 'voice'"):
        load_systems(p, layout)
    p.write_text(yaml.safe_dump({"mine": {"mode": "painting", "keep": []}}))
    with pytest.raises(ParamsError, match=r"mine\.mode"):
        load_systems(p, layout)


# ---------------------------------------------------------------------- the reference code's defects (SPEC §5)
def test_a_both_classical_feature_sets_on_fill_their_rows(layout, systems, store, train_ids, stats):
    X = layout.build(store, train_ids, systems["full_input"].keep, stats)
    nz = nonzero_rows(X)
    _, lengths = store.load_stacked("pyaudio", train_ids, with_lengths=True)
    _, mel_lengths = store.load_stacked("mel", train_ids, with_lengths=True)
    for i in range(len(train_ids)):
        assert nz[i, 33 : 33 + lengths["frames"][i]].all() and not nz[i, 33 + lengths["frames"][i] : 112].any()
        assert nz[i, 112 : 112 + mel_lengths["frames"][i]].all()
    # and each alone too
    for keep in (["pyaudio"], ["mel"]):
        rows = nonzero_rows(layout.build(store, train_ids, keep, stats)).any(0)
        assert rows[33:112].any() == (keep == ["pyaudio"]) and rows[112:223].any() == (keep == ["mel"])


def test_b_gender_spellings_share_one_row(layout, store, train_ids, stats):
    g = layout.constituents["gender"]
    assert len({g.class_index(v) for v in ("Man", "man", "MAN", "male", "M")}) == 1
    assert len({g.class_index(v) for v in ("Woman", "woman", "female", "F")}) == 1
    assert g.class_index("Man") != g.class_index("Woman")
    # through build, with raw labels as deepface gives them at evaluation time and as manifests give them
    ids = train_ids[:4]
    labels = store.clips().set_index("clip_id")
    labels.loc[ids, "gender"] = ["Man", "man", "Woman", "woman"]
    blocks = layout.blocks(store, ids, ["gender"], stats, labels=labels)["gender"][:, 0]
    assert (blocks[0] == blocks[1]).all() and (blocks[2] == blocks[3]).all() and (blocks[0] != blocks[2]).any()
    assert (blocks.sum(-1) == 1).all()


def test_c_one_hots_use_distinct_in_range_columns(layout):
    eth = layout.constituents["ethnicity"]
    cols = [eth.class_index(e) for e in ("asian", "indian", "black", "white", "middle eastern", "latino hispanic")]
    assert sorted(cols) == list(range(6)) and eth.col + max(cols) < eth.col + eth.width <= 768
    assert eth.class_index("latino_hispanic") == eth.class_index("Latino Hispanic")
    lang = layout.constituents["language"]
    cl = [lang.class_index(n) for n in COMMONLANGUAGE]
    assert len(set(cl)) == 45 and all(0 <= c < lang.width for c in cl) and lang.col + lang.width <= 768
    assert lang.class_index("Portuguese") == lang.class_index("pt") == lang.class_index("pt_BR")
    assert lang.class_index("Spanish") == lang.class_index("es") != lang.class_index("pt")
    assert lang.class_index("en_GB") == lang.class_index("English")
    with pytest.warns(UserWarning, match="klingon"):
        from slf_utils.constituents import encode_labels

        row = encode_labels(lang, ["klingon", "fr"])
    assert row[0].sum() == 0 and row[1].sum() == 1  # unknown language: empty row = masked, not a wrong column


def test_c_demo_corpus_languages_are_known_and_distinct(layout):
    # the language folders of klettres-data and ktuberling-data (demo_corpus strips the region: pt_BR -> pt)
    demo = "ar cs da de en es fr he hu id it lt ml nb nds nl nn pt ru tn uk ca el fi ga gl ro sl sr sv wa".split()
    lang = layout.constituents["language"]
    cols = [lang.class_index(c) for c in demo]
    assert None not in cols and len(set(cols)) == len(demo)
    assert lang.class_index("sr@latin") == lang.class_index("sr")


# ---------------------------------------------------------------------- building matrices
def test_each_system_fills_exactly_its_constituents_rows(layout, systems, store, train_ids, stats):
    for name, system in systems.items():
        X = layout.build(store, train_ids, system.keep, stats)
        assert X.shape == (len(train_ids), 256, 768) and X.dtype == np.float32
        nz = nonzero_rows(X)
        allowed = layout.row_mask(system.keep)
        assert not nz[:, ~allowed].any(), f"{name}: rows outside its constituents are filled"
        for n in system.keep:
            c = layout.constituents[n]
            assert nz[:, c.rows[0]].all(), f"{name}: constituent {n} is empty in some sample"
        assert np.abs(X).max() <= layout.clip


def test_a_system_without_constituents_is_all_masked(layout, systems, store, train_ids, stats):
    X = layout.build(store, train_ids, systems["pure_sr"].keep, stats)
    assert not X.any()
    assert not nonzero_rows(X).any()  # imagen-pytorch's text mask: every row masked -> null tokens only


def test_build_is_vectorised(layout, systems, store, train_ids, stats):
    calls = {"load_stacked": 0, "clips": 0, "get": 0}

    class Counting:
        def __getattr__(self, name):
            if name in calls:
                calls[name] += 1
            return getattr(store, name)

    layout.build(Counting(), train_ids, systems["full_input"].keep, stats)
    assert calls == {"load_stacked": 4, "clips": 1, "get": 0}  # one per stage, one label read, no per-sample I/O


def test_precomputed_batches_equal_build_and_dropout_zeroes_only_attributes(layout, systems, store, train_ids, stats):
    keep = systems["full_input"].keep
    blocks = layout.precompute(store, train_ids, keep, stats)
    idx = np.array([3, 0, 3, 5])
    X = blocks.batch(idx)
    assert np.array_equal(X, layout.build(store, [train_ids[i] for i in idx], keep, stats))
    assert layout.dropout_constituents == ("age", "ethnicity", "gender")
    drop = {n: np.array([True, False, False, True]) for n in layout.dropout_constituents}
    Xd = blocks.batch(idx, drop)
    assert not Xd[[0, 3], 0:3].any() and np.array_equal(Xd[[1, 2], 0:3], X[[1, 2], 0:3])
    assert np.array_equal(Xd[:, 3:], X[:, 3:])


def test_standard_normalisation_uses_training_statistics(layout, store, train_ids, stats):
    X = layout.build(store, train_ids, ["pyaudio"], stats)
    _, lengths = store.load_stacked("pyaudio", train_ids, with_lengths=True)
    frames = np.concatenate([X[i, 33 : 33 + n, :68] for i, n in enumerate(lengths["frames"])])
    assert np.allclose(frames.mean(0), 0, atol=1e-4) and np.allclose(frames.std(0), 1, atol=1e-3)
    assert not X[:, :, 68:].any()
    assert str(stats["layout_hash"]) == layout.hash


def test_scale_and_clip(tmp_path, store, train_ids):
    p = write_layout(tmp_path, lambda r: r["constituents"]["speaker"].update(scale=50.0))
    lay = Layout.load(p)
    X = lay.build(store, train_ids, ["speaker"], lay.fit(store, train_ids, ["speaker"]))
    assert np.abs(X).max() == pytest.approx(10.0) and (np.abs(X[:, 4, :256]) > 1).mean() > 0.5


def test_age_missing_flag_keeps_the_row(layout, store, train_ids, stats):
    clips = store.clips().set_index("clip_id").loc[train_ids]
    X = layout.build(store, train_ids, ["age"], stats)
    missing = clips["age"].isna().to_numpy()
    assert missing.any() and (~missing).any()
    assert (X[missing, 0, :2] == [0, 1]).all()
    assert np.allclose(X[~missing, 0, 0], clips["age"][~missing] / 100) and not X[~missing, 0, 1].any()


def test_overflowing_frames_are_truncated_with_a_warning(tmp_path, store, train_ids):
    p = write_layout(tmp_path, lambda r: r["constituents"]["speaker_windows"].update(rows=[5, 8], select="first"))
    lay = Layout.load(p)
    stats = lay.fit(store, train_ids, ["speaker_windows"])
    with pytest.warns(UserWarning, match="first 3 are used"):
        X = lay.build(store, train_ids, ["speaker_windows"], stats)
    assert nonzero_rows(X)[:, 5:8].all() and not nonzero_rows(X)[:, 8:].any()


def test_layout_figure(layout, systems):
    fig = plot_layout(layout, keep=systems["no_audio"].keep)
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert len(labels) == len(layout.constituents)
    assert any("mel" in t and "dropped" in t for t in labels) and any(t.startswith("age") for t in labels)
    assert isinstance(layout.table(), pd.DataFrame)


def test_layout_drop_removes_a_constituent_from_every_system(layout, store, train_ids):
    """Issue 10: the demo grid drops the language label (it nearly names the speaker); its rows stay zero for every
    system, the groups lose it, and the layout's hash (checked when a training resumes) changes."""
    from slf_utils.config import load_params

    cfg = load_params(ROOT / "params" / "demo.yaml")
    assert cfg["layout_drop"] == ["language"]
    from slf_utils.layout import load_layout

    dropped = load_layout(cfg)
    assert "language" not in dropped.names and "language" not in dropped.groups["speech"]
    assert dropped.hash != layout.hash
    systems = load_systems(SYSTEMS, dropped)
    assert all("language" not in s.keep for s in systems.values())
    assert "language" in load_systems(SYSTEMS, layout)["no_speaker_embeddings"].keep  # the paper grid keeps it
    X = dropped.build(store, train_ids, systems["full_input"].keep, dropped.fit(store, train_ids))
    row = layout.constituents["language"].rows[0]
    assert not X[:, row].any()
    with pytest.raises(ParamsError, match="layout_drop: unknown constituent"):
        Layout.load(LAYOUT, drop=("langauge",))


# ---------------------------------------------------------------------- sliding windows (issue 11)
PAPER_WINDOWS = [[3, 1], [6, 2], [12, 4], [24, 8]]


@pytest.fixture(scope="module")
def window_store(tmp_path_factory):
    """Two clips of 24 s cut into the paper's 37 windows: 22 x 3 s, 10 x 6 s, 4 x 12 s, 1 x 24 s."""
    return synthetic_store(
        tmp_path_factory.mktemp("windows"), n_identities=1, clips_per_identity=2, face_size=16, windows=PAPER_WINDOWS
    )


def window_rows(tmp_path, store, select):
    """(clip ids, stored windows (N, 37, 2) and embeddings, the built rows 5-32 of speaker_windows) with `select`,
    no normalisation so that a row can be matched to the window it holds."""
    p = write_layout(tmp_path, lambda r: r["constituents"]["speaker_windows"].update(select=select, normalise="none"))
    lay = Layout.load(p)
    ids = store.clips()["clip_id"].tolist()
    stored = store.load_stacked("speaker_windows", ids)
    X = lay.build(store, ids, ["speaker_windows"], {})
    return stored["window"], stored["embedding"], X[:, 5:33, :256]


def test_paper_windows_fill_28_rows_longest_first(tmp_path, window_store):
    """The paper layout (select: longest_first): of a 24 s clip's 37 windows, row 5 holds the 24 s window, rows 6-9
    the four 12 s windows, rows 10-19 the ten 6 s windows and rows 20-32 the first 13 of the 22 3 s windows, each
    length in time order; no warning (the choice is declared)."""
    assert Layout.load(LAYOUT).constituents["speaker_windows"].select == "longest_first"
    bounds, emb, rows = window_rows(tmp_path, window_store, "longest_first")
    assert bounds.shape == (2, 37, 2) and emb.shape[:2] == (2, 37)
    expected = (  # (length s, start s) of rows 5..32
        [(24, 0)] + [(12, s) for s in range(0, 13, 4)] + [(6, s) for s in range(0, 19, 2)] + [(3, s) for s in range(13)]
    )
    assert len(expected) == 28
    for clip in range(2):
        held = []
        for r in range(28):
            (w,) = np.flatnonzero(np.all(np.isclose(emb[clip], rows[clip, r]), axis=1))
            held.append((int(bounds[clip, w, 1]), int(bounds[clip, w, 0])))
        assert held == expected
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        window_rows(tmp_path, window_store, "longest_first")


def test_paper_windows_first_and_pooled(tmp_path, window_store):
    """`first` keeps the 22 3 s and the first six 6 s windows (stored order) and warns; `pool_per_length` gives four
    rows, the mean of each length's windows, longest first, and leaves rows 9-32 zero (masked)."""
    with pytest.warns(UserWarning, match="first 28 are used"):
        bounds, emb, rows = window_rows(tmp_path, window_store, "first")
    assert np.allclose(rows, emb[:, :28]) and (bounds[:, :28, 1] <= 6).all()
    bounds, emb, rows = window_rows(tmp_path, window_store, "pool_per_length")
    for j, length in enumerate((24, 12, 6, 3)):
        m = bounds[0, :, 1] == length
        assert np.allclose(rows[:, j], emb[:, m].mean(1), atol=1e-5)
    assert not rows[:, 4:].any()
