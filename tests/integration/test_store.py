import json
import multiprocessing as mp
import os
import pickle
import shutil
import signal
import sqlite3
import time

import numpy as np
import pandas as pd
import pytest

from slf_utils import locks
from slf_utils import store as store_module
from slf_utils.store import (
    Store,
    StoreError,
    StoreFormatError,
    WriterLock,
    caches,
    index,
    normalise_gender,
    open_store,
    safe_key,
)
from slf_utils.store.migration import format1_store


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
    store.put(ids[0], "preprocess", {"face": face}, "h1")
    store.put(ids[0], "audio", {"audio": np.zeros(10, np.float32)}, "h1")
    store.reject(ids[1], "preprocess", "no face found", "h1")
    got = store.get(ids[0], "preprocess")
    assert got["face"].dtype == np.uint8 and np.array_equal(got["face"], face)
    assert store.get(ids[0], "audio")["audio"].dtype == np.float32
    with pytest.raises(ValueError, match="audio goes to its own stage"):
        store.put(ids[0], "preprocess", {"face": face, "audio": np.zeros(10, np.float32)}, "h1")
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
    store.put(ids[1], "preprocess", {"face": face}, "h1")
    assert store.rejects().empty
    store.reject(ids[0], "preprocess", "silent", "h1")
    assert not store.path(ids[0], "preprocess").exists()
    assert store.check() == []
    s = store.summary()
    assert s.loc["preprocess", "done"] == 1 and s.loc["preprocess", "rejected"] == 1
    assert s.loc["audio", "done"] == 1
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
    # a re-written clip: its new arrays win, from a new segment of each key
    store.put("c0", "mel", {"frames": frames["c0"] * 0 + 1, "embedding": frames["c0"][0]}, "h2")
    assert (store.load_stacked("mel", ["c0"])["frames"] == 1).all()
    assert np.array_equal(store.load_stacked("mel", ["c1"])["frames"][0], frames["c1"])
    assert len(list((tmp_path / "arrays" / "mel.cache" / "frames").glob("*.npy"))) == 2
    with pytest.raises(KeyError, match="not done"):
        store.load_stacked("mel", ["c0", "zzz"])


def test_load_stacked_does_not_query_per_sample(tmp_path, monkeypatch):
    store = Store(tmp_path)
    for i in range(50):
        store.put(f"c{i:02d}", "speaker", {"embedding": np.full(8, i, np.float32)}, "h")
    store.load_stacked("speaker", ["c00"])  # build the cache (and read the stage's keys once)
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


def _writer(root, worker, n, hold_s=0.0):
    store = Store(root)
    for i in range(n):
        store.put(f"w{worker}/c{i}", "speaker", {"embedding": np.full(4, worker, np.float32)}, "h")
    time.sleep(hold_s)  # a writing session that is still open


def test_a_second_writer_process_is_refused(tmp_path):
    Store(tmp_path).put("seed", "speaker", {"embedding": np.zeros(4, np.float32)}, "h")  # released: this store is gone
    ctx = mp.get_context("spawn")
    first = ctx.Process(target=_writer, args=(tmp_path, 0, 5, 30.0))
    first.start()
    t0 = time.time()
    while len(Store(tmp_path).done("speaker", "h")) < 6 and time.time() - t0 < 60:  # reading needs no lock
        time.sleep(0.05)
    with pytest.raises(store_module.StoreLocked, match=rf"pid {first.pid} on .*remove .*speaker.lock"):
        Store(tmp_path).put("x", "speaker", {"embedding": np.ones(4, np.float32)}, "h")
    second = ctx.Process(target=_writer, args=(tmp_path, 1, 5))
    second.start()
    second.join(60)
    assert second.exitcode != 0  # refused too
    Store(tmp_path).put("other", "mel", {"frames": np.ones((2, 2))}, "h")  # another stage is another lock
    os.kill(first.pid, signal.SIGKILL)  # the kernel releases a dead holder's lock
    first.join(10)
    Store(tmp_path).put("x", "speaker", {"embedding": np.ones(4, np.float32)}, "h")
    store = Store(tmp_path)
    assert store.done("speaker", "h") == {"seed", "x"} | {f"w0/c{i}" for i in range(5)}
    assert store.check() == []


def test_a_stale_lock_is_taken_over_and_a_live_one_names_its_holder(tmp_path):
    holder = os.fork()
    if holder == 0:  # take the lock, fork a child that keeps it (an inherited flock), die: the lock is stale
        WriterLock(tmp_path / "x.lock", "test").acquire()
        if os.fork() == 0:
            time.sleep(30)
        os._exit(0)
    os.waitpid(holder, 0)
    with WriterLock(tmp_path / "x.lock", "me") as lock:  # its pid is dead: taken over although a child holds it
        assert lock.held and json.loads((tmp_path / "x.lock").read_text())["pid"] == os.getpid()
        with WriterLock(tmp_path / "x.lock", "me again"):  # reentrant in one process
            pass
        assert lock.held


def _segment_files(root, stage, key):
    return {
        p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (root / "arrays" / f"{stage}.cache" / key).iterdir()
    }


def test_cache_appends_segments_without_rewriting_them(tmp_path):
    store = Store(tmp_path)
    for i in range(10):
        store.put(f"c{i:02d}", "pyaudio", {"frames": np.full((3, 2), i, np.float32)}, "h")
    store.load_stacked("pyaudio", ["c00"])
    first = _segment_files(tmp_path, "pyaudio", "frames")
    assert sorted(first) == ["000000000000-000000000010.npy"]  # one file: the index, then its JSON trailer
    for i in range(10, 15):  # appends: a new segment with only these clips
        store.put(f"c{i:02d}", "pyaudio", {"frames": np.full((4, 2), i, np.float32)}, "h")
    store.reject("c03", "pyaudio", "silent audio", "h")
    out, lens = store.load_stacked("pyaudio", ["c14", "c01", "c12"], with_lengths=True)
    assert out["frames"][:, 0, 0].tolist() == [14, 1, 12] and lens["frames"].tolist() == [4, 3, 4]
    assert out["frames"].shape == (3, 4, 2) and not out["frames"][1, 3:].any()
    after = _segment_files(tmp_path, "pyaudio", "frames")
    assert {k: after[k] for k in first} == first  # the first segment's files were not touched
    assert len(after) == 2
    new = np.load(tmp_path / "arrays" / "pyaudio.cache" / "frames" / "000000000010-000000000016.npy")
    assert new["length"].tolist() == [4] * 5  # the new clips only; the reject is listed as removed
    with pytest.raises(KeyError, match="not done"):
        store.load_stacked("pyaudio", ["c03"])
    # another process (a fresh Store) reads the same segments without building anything
    fresh = Store(tmp_path)
    assert fresh.load_stacked("pyaudio", ["c09"])["frames"][0, 0, 0] == 9
    assert _segment_files(tmp_path, "pyaudio", "frames") == after


def test_batch_reads_never_touch_audio(tmp_path, monkeypatch):
    store = Store(tmp_path)
    for i in range(4):
        store.put(f"c{i}", "audio", {"audio": np.full(16000 * 24, i, np.float32)}, "h")
        store.put(f"c{i}", "preprocess", {"face": np.full((8, 8, 3), i, np.uint8), "guide": np.zeros((2, 2, 3))}, "h")
    real_load = np.load

    def load(path, *a, **k):
        assert "audio" not in str(path), f"batch read opened {path}"
        return real_load(path, *a, **k)

    monkeypatch.setattr(np, "load", load)
    batch = store.load_stacked("preprocess", ["c3", "c0"])
    assert sorted(batch) == ["face", "guide"] and batch["face"][:, 0, 0, 0].tolist() == [3, 0]
    with pytest.raises(ValueError, match="one clip at a time"):
        store.load_stacked("audio", ["c0"])
    assert not (tmp_path / "arrays" / "audio.cache").exists()
    # only the keys asked for are cached
    store.load_stacked("preprocess", ["c1"], keys=["face"])
    assert sorted(p.name for p in (tmp_path / "arrays" / "preprocess.cache").iterdir()) == ["face", "guide"]


def _read_loop(root, n, seconds, queue):
    store, t0, reads = Store(root), time.time(), 0
    try:
        while time.time() - t0 < seconds:
            ids = [f"base{i}" for i in np.random.default_rng(reads).choice(n, 8)]
            got = store.load_stacked("speaker", ids)["embedding"][:, 0]
            assert got.tolist() == [float(c[4:]) for c in ids], got
            reads += 1
        queue.put(("ok", reads))
    except Exception as e:  # reported to the test, which fails with it
        queue.put(("error", repr(e)))


def _write_loop(root, n):
    store = Store(root)
    for i in range(n):
        store.put(f"new{i}", "speaker", {"embedding": np.full(4, -i, np.float32)}, "h")


def test_two_readers_while_a_third_process_writes(tmp_path):
    with Store(tmp_path) as store:  # closed: its writer lock goes, the writer process below takes it
        store.put_many("speaker", [(f"base{i}", {"embedding": np.full(4, i, np.float32)}) for i in range(20)], "h")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    readers = [ctx.Process(target=_read_loop, args=(tmp_path, 20, 4.0, queue)) for _ in range(2)]
    writer = ctx.Process(target=_write_loop, args=(tmp_path, 60))
    for p in (*readers, writer):
        p.start()
    results = [queue.get(timeout=120) for _ in readers]
    for p in (*readers, writer):
        p.join(120)
    assert [p.exitcode for p in (*readers, writer)] == [0, 0, 0]
    assert all(status == "ok" and reads > 0 for status, reads in results), results
    assert len(Store(tmp_path).done("speaker", "h")) == 80
    assert Store(tmp_path).load_stacked("speaker", ["new59"])["embedding"][0, 0] == -59


def _format1_store(root):
    """A store as the previous workbook wrote it: audio inside preprocess, no seq column, a whole-stage cache."""
    arrays = {
        f"c{i}": {
            "face": np.full((8, 8, 3), i, np.uint8),
            "guide": np.zeros((2, 2, 3), np.uint8),
            "audio": np.full(100, i, np.float32),
        }
        for i in range(2)
    }
    format1_store(root, arrays, provenance={"face_size": 8})


def test_old_store_is_refused_then_migrated(tmp_path, capsys):
    _format1_store(tmp_path)
    with pytest.raises(StoreFormatError, match=r"python -m slf_utils.store migrate .*"):
        Store(tmp_path).clips()
    with pytest.raises(StoreFormatError):
        Store(tmp_path).get("c1", "preprocess")
    store_module.main(["migrate", str(tmp_path)])
    store = Store(tmp_path)
    assert sorted(store.get("c1", "preprocess")) == ["face", "guide"]
    assert store.get("c1", "audio")["audio"].tolist() == [1.0] * 100
    assert store.done("audio", "h") == {"c0", "c1"} and store.provenance("audio") == {"face_size": 8}
    assert not (tmp_path / "arrays" / "preprocess.cache" / "index.json").exists()
    assert store.load_stacked("preprocess", ["c1", "c0"])["face"][:, 0, 0, 0].tolist() == [1, 0]
    assert store.check() == []
    store_module.main(["migrate", str(tmp_path)])
    assert "nothing to do" in capsys.readouterr().out
    # a re-write after the migration gets a new file with its metadata; the migrated one goes
    store.put(
        "c1", "preprocess", {"face": np.full((8, 8, 3), 7, np.uint8), "guide": np.zeros((2, 2, 3), np.uint8)}, "h2"
    )
    assert not (tmp_path / "arrays" / "preprocess" / "c1.npz").exists()
    assert store.load_stacked("preprocess", ["c1"])["face"][0, 0, 0, 0] == 7 and store.check() == []


def test_migration_marks_missing_files_failed_and_a_rerun_finishes_after_a_kill(tmp_path, monkeypatch, capsys):
    _format1_store(tmp_path)
    (tmp_path / "arrays" / "preprocess" / "c0.npz").unlink()
    real = shutil.rmtree
    monkeypatch.setattr(shutil, "rmtree", lambda *a, **k: os.kill(os.getpid(), 0) or 1 / 0)
    with pytest.raises(ZeroDivisionError):  # "killed" after the commit, before the old caches are gone
        store_module.migrate(tmp_path)
    monkeypatch.setattr(shutil, "rmtree", real)
    assert "c0: done but its array file is missing" in capsys.readouterr().out
    assert (tmp_path / "arrays" / ".old-caches").exists()
    assert any(p.startswith("orphan:") for p in Store(tmp_path).check())
    store_module.migrate(tmp_path)  # the rerun finishes the job
    assert not (tmp_path / "arrays" / ".old-caches").exists()
    store = Store(tmp_path)
    assert store.done("preprocess", "h") == {"c1"} and store.finished("preprocess", "h") == {"c1"}  # c0: retried
    assert "missing" in store.rejects().set_index("clip_id").loc["c0", "reason"]
    assert store.check() == []


def test_check_and_migrate_refuse_a_path_without_a_store(tmp_path, capsys):
    for cmd in ("check", "migrate"):
        with pytest.raises(SystemExit, match="2"):
            store_module.main([cmd, str(tmp_path / "typo")])
        assert not (tmp_path / "typo").exists()
    assert capsys.readouterr().err.count("no store here") == 2
    with pytest.raises(FileNotFoundError):
        store_module.migrate(tmp_path / "typo")


def test_get_is_one_query_on_a_cached_connection(tmp_path, monkeypatch):
    Store(tmp_path).put("a", "mel", {"frames": np.ones((2, 3))}, "h")
    store = Store(tmp_path)
    store.get("a", "mel")
    monkeypatch.setattr(sqlite3, "connect", lambda *a, **k: pytest.fail("get opened the database again"))
    assert Store(tmp_path).get("a", "mel")["frames"].shape == (2, 3)
    assert sorted(Store(tmp_path).get("a", "mel")) == ["frames"]  # the metadata entry is the store's own


@pytest.mark.parametrize("mode", store_module.JOURNAL_MODES)
def test_journal_mode_is_set_on_the_writing_connection(tmp_path, mode):
    store = Store(tmp_path, journal_mode=mode)
    store.put("a", "mel", {"frames": np.ones((2, 3))}, "h")
    with store._transaction() as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == mode
    assert store.get("a", "mel")["frames"].shape == (2, 3)
    index.close_readers(store.db)
    with pytest.raises(SystemExit) as e:  # check keeps the store's mode
        store_module.main(["check", str(tmp_path)])
    assert e.value.code == 0
    with sqlite3.connect(store.db) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == ("wal" if mode == "wal" else "delete")


def test_leaving_wal_while_another_process_has_the_store_open_says_why(tmp_path):
    Store(tmp_path).put("a", "mel", {"frames": np.ones((2, 3))}, "h")
    index.close_readers(tmp_path / "store.sqlite")
    other = sqlite3.connect(tmp_path / "store.sqlite")  # another process, as far as SQLite can tell
    other.execute("BEGIN")
    other.execute("SELECT * FROM stages").fetchall()
    with pytest.raises(StoreError, match="cannot switch the journal mode from wal to delete now.*another process"):
        Store(tmp_path, journal_mode="delete").done("mel", "h")
    other.close()
    assert Store(tmp_path, journal_mode="delete").done("mel", "h") == {"a"}
    with pytest.raises(ValueError, match="journal_mode"):
        Store(tmp_path, journal_mode="wall")
    assert open_store({"results": str(tmp_path), "store": {"journal_mode": "delete"}}).journal_mode == "delete"


def _value(cid, h):
    return float(int(cid[1:]) * 1000 + int(h[1:]))


def _rewrite(root, h, kill_at):
    """Re-write every clip with hash `h` and die (SIGKILL) at `kill_at`."""

    def die(*a, **k):
        os.kill(os.getpid(), signal.SIGKILL)

    store = Store(root)
    if kill_at == "before_commit":
        index.fsync_dir = die  # every new file written, no row changed
    elif kill_at == "after_commit":
        real = Store._transaction

        def commit_then_die(self):
            cm = real(self)

            class Die:
                def __enter__(self):
                    return cm.__enter__()

                def __exit__(self, *exc):
                    cm.__exit__(*exc)
                    die()

            return Die()

        Store._transaction = commit_then_die  # rows changed, old files still there
    store.put_many("mel", [(f"c{i}", {"frames": np.full((3, 2), _value(f"c{i}", h))}) for i in range(40)], h)


@pytest.mark.parametrize("kill_at", ["before_commit", "after_commit"])
def test_a_kill_while_rewriting_done_clips_never_mixes_rows_and_files(tmp_path, kill_at):
    ids = [f"c{i}" for i in range(40)]
    with Store(tmp_path) as store:
        store.put_many("mel", [(c, {"frames": np.full((3, 2), _value(c, "h1"))}) for c in ids], "h1")
        store.load_stacked("mel", ids)  # the cache, built before the re-write
    p = mp.get_context("fork").Process(target=_rewrite, args=(tmp_path, "h2", kill_at))
    p.start()
    p.join(60)
    assert p.exitcode == -signal.SIGKILL
    store = Store(tmp_path)
    want = "h1" if kill_at == "before_commit" else "h2"
    assert store.done("mel", want) == set(ids)
    cached = store.load_stacked("mel", ids)["frames"][:, 0, 0]
    assert cached.tolist() == [_value(c, want) for c in ids]
    assert [store.get(c, "mel")["frames"][0, 0] for c in ids] == [_value(c, want) for c in ids]
    problems = store.check()
    assert len(problems) == 40 and all(p.startswith("orphan:") for p in problems), problems
    assert store.check(repair=True) == [] and store.check() == []
    assert len(list((tmp_path / "arrays" / "mel").iterdir())) == 40


def test_check_verifies_each_file_against_its_row(tmp_path):
    store = Store(tmp_path)
    for c in ("a", "b", "c"):
        store.put(c, "mel", {"frames": np.ones((2, 3))}, "h")
    store.path("a", "mel").write_bytes(b"")  # zero-length: `get` would raise EOFError
    os.replace(store.path("c", "mel"), store.path("b", "mel"))  # b's row now names c's arrays
    problems = store.check()
    assert [p.split(":")[0] for p in problems] == ["unreadable", "mismatch", "missing"], problems
    with pytest.raises(StoreError, match="holds mel/c"):
        store.get("b", "mel")
    assert store.check(repair=True) == [] and store.check() == []
    assert store.done("mel", "h") == set() and set(store.rejects().clip_id) == {"a", "b", "c"}
    assert store.finished("mel", "h") == set()  # failed: the next run recomputes them


def test_temp_files_of_dead_writers_are_reported_removed_and_not_counted(tmp_path):
    store = Store(tmp_path)
    store.put("a", "mel", {"frames": np.ones((2, 3))}, "h")
    size = store.size_bytes()
    dead = tmp_path / "arrays" / "mel" / f".a.npz+999999+{locks.HOST}+abcd.tmp"
    dead.write_bytes(b"x" * 10000)
    old = tmp_path / "arrays" / "mel" / ".a.npz.k2j3.tmp.npz"  # an older workbook's temp file, a day old
    old.write_bytes(b"x" * 10000)
    os.utime(old, (time.time() - 90000, time.time() - 90000))
    assert store.size_bytes() == size
    assert sorted(p.split(":")[0] for p in store.check()) == ["temp", "temp"]
    store.close()
    Store(tmp_path).put("b", "mel", {"frames": np.ones((2, 3))}, "h")  # a new writing session clears them
    assert not dead.exists() and not old.exists() and store.check() == []


def _hold(path, seconds):
    with WriterLock(path, "grid run other.yaml"):
        time.sleep(seconds)


def test_a_second_grid_run_on_one_results_folder_is_refused(tmp_path):
    import yaml

    from slf_utils import grid

    (tmp_path / "m.csv").write_text("clip_id,identity,split,video\n")
    cfg = {"name": "g", "results": str(tmp_path / "results"), "systems": ["full_input"], "model": {"preset": "tiny"}}
    cfg["data"] = {"kind": "manifest", "manifest": str(tmp_path / "m.csv"), "root": str(tmp_path)}
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(cfg))
    holder = mp.get_context("spawn").Process(target=_hold, args=(tmp_path / "results" / ".grid.lock", 60))
    holder.start()
    t0 = time.time()
    while not (tmp_path / "results" / ".grid.lock").exists() or not locks.lock_busy(
        tmp_path / "results" / ".grid.lock"
    ):
        assert time.time() - t0 < 60
        time.sleep(0.05)
    try:
        with pytest.raises(store_module.StoreLocked, match=rf"grid run .*g.yaml: refused, pid {holder.pid} on "):
            grid.run(tmp_path / "g.yaml", scheduler="sequential")
        assert not (tmp_path / "results" / "store").exists()  # refused before any step ran
    finally:
        holder.kill()
        holder.join()


def test_a_store_created_again_at_the_same_path_is_not_read_through_a_stale_connection(tmp_path):
    import shutil

    for r in range(3):
        store = Store(tmp_path / "s")
        store.put_many("mel", [(f"c{i}", {"frames": np.full((2, 2), r)}) for i in range(20)], f"h{r}")
        assert store.get("c3", "mel")["frames"][0, 0] == r  # caches the reader connection
        store.close()
        if r < 2:
            shutil.rmtree(tmp_path / "s")
    index.close_readers(tmp_path / "s" / "store.sqlite")
    assert Store(tmp_path / "s").done("mel", "h2") == {f"c{i}" for i in range(20)} and store.check() == []


def test_the_per_clip_files_are_the_only_copy_of_the_arrays(tmp_path):
    store = Store(tmp_path)
    frames = {f"c{i}": np.full((50 + i, 128), i, np.float32) for i in range(20)}
    store.put_many("mel", [(c, {"frames": f, "order": np.asfortranarray(f[:3, :4])}) for c, f in frames.items()], "h")
    files = sum(p.stat().st_size for p in (tmp_path / "arrays" / "mel").iterdir())
    out, lens = store.load_stacked("mel", ["c3", "c19"], with_lengths=True)
    assert np.array_equal(out["frames"][0, :53], frames["c3"]) and not out["frames"][0, 53:].any()
    assert lens["frames"].tolist() == [53, 69] and np.array_equal(out["order"][1], frames["c19"][:3, :4])
    cache = sum(p.stat().st_size for p in (tmp_path / "arrays" / "mel.cache").rglob("*") if p.is_file())
    assert cache < files / 50  # an index: where each clip's arrays lie in its file, no second copy of them
    shutil.rmtree(tmp_path / "arrays" / "mel.cache")  # the caches are derived: removed, they are built again
    assert np.array_equal(Store(tmp_path).load_stacked("mel", ["c7"])["frames"][0, :57], frames["c7"])


def test_a_batch_read_follows_a_rewrite_made_after_its_version_was_read(tmp_path, monkeypatch):
    reader = Store(tmp_path)
    with Store(tmp_path) as writer:
        writer.put_many("mel", [(f"c{i}", {"frames": np.full((3, 2), i)}) for i in range(4)], "h1")
        reader.load_stacked("mel", ["c1"])  # its cache, at this version
        stale = reader.version("mel")
        writer.put("c1", "mel", {"frames": np.full((3, 2), 9)}, "h2")  # the file the cache names is gone
    versions = iter([stale])
    real = Store.version
    monkeypatch.setattr(Store, "version", lambda self, st: next(versions, None) or real(self, st))
    assert reader.load_stacked("mel", ["c1", "c2"])["frames"][:, 0, 0].tolist() == [9, 2]
    (tmp_path / "arrays" / "mel" / reader.status("mel").set_index("clip_id").loc["c2", "file"]).unlink()
    with pytest.raises(StoreError, match="named by its row but missing.*check"):  # not a re-write: says so
        reader.load_stacked("mel", ["c2"])


def test_a_format3_store_is_migrated_by_dropping_its_copying_caches(tmp_path):
    store = Store(tmp_path)
    store.put_many("mel", [(f"c{i}", {"frames": np.full((3, 2), i)}) for i in range(3)], "h")
    store.close()
    rows = store.status("mel")
    old = tmp_path / "arrays" / "mel.cache" / "frames" / "000000000000-000000000003.npy"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"\x93NUMPY data of format 3" + caches._TRAILER.pack(2, b"SLFSEG01"))
    with sqlite3.connect(store.db) as con:
        con.execute("PRAGMA user_version=3")
    index._prepared.clear()
    with pytest.raises(StoreFormatError, match="format 3 .*copy every array.*migrate"):
        Store(tmp_path).load_stacked("mel", ["c1"])
    store_module.migrate(tmp_path)
    store = Store(tmp_path)
    assert not old.exists() and store.status("mel").equals(rows)  # rows and files as they were
    assert store.load_stacked("mel", ["c2", "c0"])["frames"][:, 0, 0].tolist() == [2, 0] and store.check() == []
