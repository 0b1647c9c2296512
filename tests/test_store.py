import multiprocessing as mp
import pickle
import sqlite3

import numpy as np
import pandas as pd
import pytest

from slf_utils.store import Store, normalise_gender, open_store, safe_key


def _clips(n=3):
    return pd.DataFrame(
        {
            "clip_id": [f"id{i:05d}/yt{i}/00001" for i in range(n)],
            "identity": [f"id{i:05d}" for i in range(n)],
            "split": ["train"] * (n - 1) + ["test"],
            "video": [f"mp4/id{i:05d}/yt{i}/00001.mp4" for i in range(n)],
            "audio": [None] * n,
            "face": [f"faces/{i}.png" for i in range(n)],
            "gender": ["Man", "female", "M"][:n] + ["woman"] * max(0, n - 3),
            "age": [31, np.nan, ""][:n] + [None] * max(0, n - 3),
            "ethnicity": [""] * n,
            "language": ["fr"] * n,
            "voice_set": ["mbrola-fr1"] * n,
        }
    )


def test_safe_key_is_filesystem_safe_and_injective():
    assert safe_key("id00003/orlS03vA/00001") == "id00003__orlS03vA__00001"
    keys = {safe_key(k) for k in ["a/b", "a__b", "a_b", "ä/b", "a b", "../x", "a/b" * 200]}
    assert len(keys) == 7
    for k in keys:
        assert "/" not in k and k.isascii() and not k.startswith(".") and len(k) < 200


def test_clips_labels_and_normalisation(tmp_path):
    store = Store(tmp_path)
    store.add_clips(_clips())
    df = store.clips()
    assert list(df.clip_id) == sorted(df.clip_id)
    assert list(df.gender) == ["man", "woman", "man"]
    assert df.age.iloc[0] == 31.0 and df.age.isna().sum() == 2
    assert df.ethnicity.isna().all() and (df.voice_set == "mbrola-fr1").all()
    assert len(store.clips(split="test")) == 1
    cid = df.clip_id.iloc[1]
    store.update_labels(cid, age=44.5, gender="Female", ethnicity="Latino_Hispanic", detected_gender="woman")
    row = store.clips().set_index("clip_id").loc[cid]
    assert (row.age, row.gender, row.ethnicity, row.detected_gender) == (44.5, "woman", "latino hispanic", "woman")
    # upsert: re-adding keeps one row per clip, and empty values do not erase stored labels
    store.add_clips(_clips())
    assert len(store.clips()) == 3
    row = store.clips().set_index("clip_id").loc[cid]
    assert (row.age, row.gender, row.ethnicity, row.detected_gender) == (44.5, "woman", "latino hispanic", "woman")
    store.add_clips(_clips().assign(language="de"))
    assert (store.clips().language == "de").all()
    with pytest.raises(KeyError):
        store.update_labels("nope", age=3)
    with pytest.raises(ValueError):
        normalise_gender("robot")


def test_put_get_reject_done(tmp_path):
    store = Store(tmp_path)
    store.add_clips(_clips())
    ids = list(store.clips().clip_id)
    face = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    store.put(ids[0], "preprocess", {"face": face, "audio": np.zeros(10, np.float32)}, "h1")
    store.reject(ids[1], "preprocess", "no face found", "h1")
    got = store.get(ids[0], "preprocess")
    assert got["face"].dtype == np.uint8 and np.array_equal(got["face"], face)
    assert got["audio"].dtype == np.float32
    assert store.done("preprocess", "h1") == {ids[0]}
    assert store.done("preprocess", "h2") == set()
    assert store.finished("preprocess", "h1") == {ids[0], ids[1]}
    rej = store.rejects()
    assert list(rej.columns) == ["clip_id", "stage", "reason"]
    assert rej.iloc[0].tolist() == [ids[1], "preprocess", "no face found"]
    assert list(store.clips(stage="preprocess").clip_id) == [ids[0]]
    with pytest.raises(KeyError):
        store.get(ids[1], "preprocess")
    # a later success replaces the reject; a later reject removes the stale array
    store.put(ids[1], "preprocess", {"face": face, "audio": np.zeros(3, np.float32)}, "h1")
    assert store.rejects().empty
    store.reject(ids[0], "preprocess", "silent", "h1")
    assert not store.path(ids[0], "preprocess").exists()
    assert store.check() == []
    s = store.summary()
    assert s.loc["preprocess", "done"] == 1 and s.loc["preprocess", "rejected"] == 1
    # no temporary files left behind by atomic writes
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]


def test_load_stacked_pads_orders_and_refreshes(tmp_path):
    store = Store(tmp_path)
    rng = np.random.default_rng(0)
    frames = {f"c{i}": rng.normal(size=(n, 4)).astype(np.float32) for i, n in enumerate([5, 3, 7])}
    for cid, f in frames.items():
        store.put(cid, "mel", {"frames": f, "embedding": f[0]}, "h")
    out, lens = store.load_stacked("mel", ["c1", "c0"], with_lengths=True)
    assert out["frames"].shape == (2, 5, 4) and out["frames"].dtype == np.float32
    assert np.array_equal(out["frames"][0, :3], frames["c1"]) and not out["frames"][0, 3:].any()
    assert np.array_equal(out["frames"][1], frames["c0"])
    assert lens["frames"].tolist() == [3, 5]
    assert out["embedding"].shape == (2, 4)
    assert store.load_stacked("mel", ["c2"])["frames"].shape == (1, 7, 4)
    assert list(store.load_stacked("mel", ["c2"], keys=["embedding"])) == ["embedding"]
    cache_files = sorted(p.name for p in (tmp_path / "arrays" / "mel.cache").iterdir())
    # stale after a put: rebuilt once, old build files removed
    store.put("c0", "mel", {"frames": frames["c0"] * 0 + 1, "embedding": frames["c0"][0]}, "h2")
    assert (store.load_stacked("mel", ["c0"])["frames"] == 1).all()
    assert sorted(p.name for p in (tmp_path / "arrays" / "mel.cache").iterdir()) != cache_files
    assert len(list((tmp_path / "arrays" / "mel.cache").glob("*.npy"))) == 2
    with pytest.raises(KeyError, match="not done"):
        store.load_stacked("mel", ["c0", "zzz"])


def test_load_stacked_does_not_query_per_sample(tmp_path, monkeypatch):
    store = Store(tmp_path)
    for i in range(50):
        store.put(f"c{i:02d}", "speaker", {"embedding": np.full(8, i, np.float32)}, "h")
    store.load_stacked("speaker", ["c00"])  # build the cache
    calls = []
    real = Store._connect

    def counting(self):
        calls.append(1)
        return real(self)

    monkeypatch.setattr(Store, "_connect", counting)
    opened = []
    monkeypatch.setattr(np, "load", lambda *a, **k: opened.append(a) or pytest.fail("per-sample file read"))
    batch = store.load_stacked("speaker", [f"c{i:02d}" for i in range(49, -1, -1)])
    assert batch["embedding"][:, 0].tolist() == list(range(49, -1, -1))
    assert len(calls) == 1  # one version check per batch


def test_failed_is_retried_but_rejected_is_not(tmp_path):
    store = Store(tmp_path)
    store.reject("a", "mel", "silent audio", "h")
    store.reject("b", "mel", "error: RuntimeError: boom", "h", retry=True)
    assert store.finished("mel", "h") == {"a"}
    assert set(store.rejects().clip_id) == {"a", "b"}
    s = store.summary()
    assert (s.loc["mel", "rejected"], s.loc["mel", "failed"], s.loc["mel", "done"]) == (1, 1, 0)


def test_provenance_and_open_store(tmp_path):
    store = open_store({"results": str(tmp_path)})
    assert store.root == tmp_path / "store"
    assert store.provenance("mel") == {}
    store.set_provenance("mel", {"n_mels": 128, "packages": {"librosa": "0.11"}})
    store.set_provenance("mel", {"n_mels": 64})
    assert Store(tmp_path / "store").provenance("mel") == {"n_mels": 64}
    assert pickle.loads(pickle.dumps(store)).root == store.root
    with sqlite3.connect(store.db) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"clips", "stages", "provenance"} <= tables


def _writer(root, worker, n):
    store = Store(root)
    for i in range(n):
        store.put(f"w{worker}/c{i}", "speaker", {"embedding": np.full(4, worker, np.float32)}, "h")


def test_concurrent_writer_processes(tmp_path):
    Store(tmp_path)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(tmp_path, w, 25)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    store = Store(tmp_path)
    assert len(store.done("speaker", "h")) == 75
    assert store.check() == []
    assert store.version("speaker") == 75
