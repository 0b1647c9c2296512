"""Fault injection for the store (issue 19): kill -9 at random points, then check that nothing mixed, got lost or
was skipped.

Every array is a known function of its clip and parameter hash (`value`), so after each fault the expected content
of every done clip is known from its row. Scenarios, each on its own small store (one process per fault, forked,
killed with SIGKILL after a random delay within the scenario's measured duration):
* `rewrite`  — `put_many` with a new hash over all done clips (chunks), then a cache build; killed anywhere.
* `cache`    — the parent re-writes some clips, a child builds the caches (`load_stacked`), killed mid-build.
* `migrate`  — a format-1 store (one done row without its file), `migrate` killed, then rerun to the end.
* `writers`  — a writer holding the stage, a second writer on the same clips (must be refused), the first killed,
  then a third (must take the dead holder's lock over).
* `readers`  — a reader process (`get` and `load_stacked`) while a re-writer is killed: every array it reads
  must be whole and belong to its clip.
After each fault: `check` (orphans and temp files are expected leftovers; anything else is an inconsistency),
`get` and the cache against the rows' hashes, nothing done before is lost, `check --repair` leaves it clean.

    python benchmarks/faults.py --faults 200            # ~ 6 min on 2 cores shared with other jobs
    python benchmarks/faults.py --faults 20 --clips 50  # quick
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from slf_utils import store as S  # noqa: E402
from slf_utils.store.migration import format1_store as write_format1  # noqa: E402

STAGE = "mel"
CHUNK = 25  # clips per put_many
KIND_OK = ("orphan", "temp")  # what a kill is allowed to leave behind (check reports it, repair removes it)
SCENARIOS = ("rewrite", "cache", "migrate", "writers", "readers")
_ctx = mp.get_context("fork")  # forked children start in ms: a fault costs the work it interrupts, not an import


def cid(i: int) -> str:
    return f"id{i % 7:02d}/v/{i:05d}"


def value(clip: str, h: str) -> float:
    """The array content of a clip computed with hash `h` (h = 'h<int>')."""
    return int(clip.rsplit("/", 1)[1]) * 1000 + int(h[1:])


def arrays(clip: str, h: str) -> dict:
    v, n = value(clip, h), 3 + int(clip.rsplit("/", 1)[1]) % 5  # a variable first axis: the cache pads it
    return {"frames": np.full((n, 16), v, np.float64), "embedding": np.full(8, v, np.float32)}


def write(root, ids, h, store=None):
    own = store is None
    store = store or S.Store(root)
    for lo in range(0, len(ids), CHUNK):
        store.put_many(STAGE, [(c, arrays(c, h)) for c in ids[lo : lo + CHUNK]], h)
    if own:
        store.close()


# ------------------------------------------------------------------ children (forked, killed)
def _rewrite(root, ids, h, ready=None, hold=False):
    store = S.Store(root)
    write(root, ids[:CHUNK], h, store)
    if ready is not None:
        ready.set()  # the stage's writer lock is held from here on
    write(root, ids[CHUNK:], h, store)
    store.load_stacked(STAGE, ids)
    while hold:
        time.sleep(0.1)


def _second_writer(root, ids, h, out):
    try:
        write(root, ids, h)
        out.put("written")
    except S.StoreLocked:
        out.put("refused")


def _build(root, ids):
    S.Store(root).load_stacked(STAGE, ids)


def _migrate(root):
    S.migrate(root, log=lambda *a: None)


def _read(root, ids, hashes, seconds, out):
    """Read while another process writes and dies: each array must be whole and its clip's."""
    store, bad, n, t0 = S.Store(root), Counter(), 0, time.time()
    rng = np.random.default_rng(os.getpid())
    while time.time() - t0 < seconds:
        pick = [ids[i] for i in rng.choice(len(ids), 8, replace=False)]
        try:
            got = [store.get(c, STAGE)["frames"] for c in pick]
            batch = store.load_stacked(STAGE, pick, keys=["frames"])["frames"]
        except KeyError:  # not done at this version: not an error
            continue
        except Exception as e:
            bad[f"reader:{type(e).__name__}"] += 1
            continue
        for c, a, b in zip(pick, got, batch):
            ok = {value(c, h) for h in hashes}
            if not (np.unique(a).size == 1 and a.flat[0] in ok):
                bad["reader:get"] += 1
            if not (b[: len(a)] == b[0, 0]).all() or b[0, 0] not in ok:
                bad["reader:cache"] += 1
        n += 1
    out.put((dict(bad), n))


def _kill_after(proc, delay) -> bool:
    """Start `proc`, SIGKILL it after `delay` s; True if it was killed (not already finished)."""
    proc.start()
    proc.join(delay)
    if proc.exitcode is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    return proc.exitcode == -signal.SIGKILL


# ------------------------------------------------------------------ verification
def verify(root, before: dict | None = None, expect_hash=None) -> Counter:
    """Inconsistencies of a store after a fault. `before`: {clip: hash} done before the fault (none may be lost)."""
    bad = Counter()
    store = S.Store(root)
    try:
        for p in store.check():
            kind = p.split(":")[0]
            if kind not in KIND_OK:
                bad[f"check:{kind}"] += 1
        rows = store.status(STAGE)
        done = rows[rows.status == "done"].set_index("clip_id")["params_hash"].to_dict()
        for c in before or {}:
            if c not in done:
                bad["lost"] += 1
        for c, h in done.items():
            if expect_hash and h not in expect_hash:
                bad["unknown hash"] += 1
            try:
                got = store.get(c, STAGE)
                if not (got["frames"] == value(c, h)).all() or not (got["embedding"] == value(c, h)).all():
                    bad["get != row"] += 1
            except Exception:
                bad["get failed"] += 1
        ids = sorted(done)
        if ids:
            try:
                batch, lens = store.load_stacked(STAGE, ids, with_lengths=True)
                for j, c in enumerate(ids):
                    if not (batch["frames"][j, : lens["frames"][j]] == value(c, done[c])).all():
                        bad["cache != row"] += 1
            except Exception:
                bad["cache failed"] += 1
        left = store.check(repair=True, log=lambda *a: None)
        if left or store.check():
            bad["repair left problems"] += 1
    except Exception as e:
        bad[f"verify:{type(e).__name__}"] += 1
    finally:
        store.close()
    return bad


def _done(root) -> dict:
    with S.Store(root) as store:
        rows = store.status(STAGE)
    return rows[rows.status == "done"].set_index("clip_id")["params_hash"].to_dict()


def format1_store(root: Path, ids):
    """A store as the first workbook wrote it (the store's own format-1 builder), with one done row whose file is
    gone."""
    shutil.rmtree(root, ignore_errors=True)
    arrays = {}
    for c in ids:
        v = value(c, "h1")
        arrays[c] = {"face": np.full((8, 8, 3), v % 251, np.uint8), "audio": np.full(100, v, np.float32)}
    write_format1(root, arrays, "h1")
    (root / "arrays" / "preprocess" / f"{S.safe_key(ids[0])}.npz").unlink()


def verify_migrated(root, ids) -> Counter:
    bad = Counter()
    try:
        S.migrate(root, log=lambda *a: None)  # the rerun finishes whatever the kill left
        store = S.Store(root)
        if (root / "arrays" / ".old-caches").exists() or (root / "arrays" / "preprocess.cache").exists():
            bad["migrate: old caches left"] += 1
        want = set(ids[1:])
        if store.done("preprocess", "h1") != want or store.done(S.AUDIO_STAGE, "h1") != want:
            bad["migrate: rows"] += 1
        if ids[0] not in set(store.rejects().clip_id):
            bad["migrate: missing file not reported"] += 1
        for c in ids[1:]:
            a, f = store.get(c, S.AUDIO_STAGE)["audio"], store.get(c, "preprocess")
            if "audio" in f or not (a == value(c, "h1")).all() or not (f["face"] == value(c, "h1") % 251).all():
                bad["migrate: arrays"] += 1
        faces = store.load_stacked("preprocess", ids[1:])["face"][:, 0, 0, 0]
        if faces.tolist() != [value(c, "h1") % 251 for c in ids[1:]]:
            bad["migrate: cache"] += 1
        if [p for p in store.check() if p.split(":")[0] not in KIND_OK]:
            bad["migrate: check"] += 1
        store.close()
    except Exception as e:
        bad[f"migrate: {type(e).__name__}"] += 1
    return bad


# ------------------------------------------------------------------ scenarios: one fault each
class Scenario:
    def __init__(self, name, root: Path, n: int, rng):
        self.name, self.root, self.n, self.rng = name, root / name, n, rng
        self.ids = [cid(i) for i in range(n)]
        self.h, self.seen, self.duration = 1, {"h1"}, None
        if name != "migrate":
            shutil.rmtree(self.root, ignore_errors=True)
            write(self.root, self.ids, "h1")
            S.Store(self.root).load_stacked(STAGE, self.ids)

    def next_hash(self):
        self.h += 1
        self.seen.add(f"h{self.h}")
        return f"h{self.h}"

    def delay(self):
        return float(self.rng.uniform(0, self.duration))

    def timed(self, proc):
        """The first run of a scenario is not killed: its duration bounds the random kill delays."""
        if self.duration is None:
            t0 = time.perf_counter()
            proc.start()
            proc.join()
            self.duration = max(time.perf_counter() - t0, 0.01)
            return False
        return _kill_after(proc, self.delay())

    def fault(self) -> tuple[bool, Counter]:
        return getattr(self, f"_{self.name}")()

    def _rewrite(self):
        before = _done(self.root)
        killed = self.timed(_ctx.Process(target=_rewrite, args=(self.root, self.ids, self.next_hash())))
        return killed, verify(self.root, before, self.seen)

    def _cache(self):
        some = [self.ids[i] for i in self.rng.choice(self.n, max(1, self.n // 4), replace=False)]
        write(self.root, some, self.next_hash())
        if self.rng.random() < 0.5:  # a first build of every clip, else the segment of the re-written ones
            shutil.rmtree(self.root / "arrays" / f"{STAGE}.cache", ignore_errors=True)
        before = _done(self.root)
        killed = self.timed(_ctx.Process(target=_build, args=(self.root, self.ids)))
        return killed, verify(self.root, before, self.seen)

    def _migrate(self):
        format1_store(self.root, self.ids)
        killed = self.timed(_ctx.Process(target=_migrate, args=(self.root,)))
        return killed, verify_migrated(self.root, self.ids)

    def _writers(self):
        bad, before = Counter(), _done(self.root)
        ready, out = _ctx.Event(), _ctx.Queue()
        first = _ctx.Process(target=_rewrite, args=(self.root, self.ids, self.next_hash(), ready, True))
        first.start()
        if not ready.wait(60):
            bad["writers: first never started"] += 1
        second = _ctx.Process(target=_second_writer, args=(self.root, self.ids, self.next_hash(), out))
        second.start()
        if out.get(timeout=60) != "refused":
            bad["writers: second not refused"] += 1
        second.join()
        time.sleep(float(self.rng.uniform(0, self.duration or 0.3)))  # the first is somewhere in its re-write
        os.kill(first.pid, signal.SIGKILL)
        first.join()
        third = _ctx.Process(target=_second_writer, args=(self.root, self.ids[:CHUNK], self.next_hash(), out))
        third.start()
        if out.get(timeout=60) != "written":
            bad["writers: dead holder's lock not taken over"] += 1
        third.join()
        if self.duration is None:
            self.duration = 0.3
        return True, bad + verify(self.root, before, self.seen)

    def _readers(self):
        out = _ctx.Queue()
        reader = _ctx.Process(target=_read, args=(self.root, self.ids, sorted(self.seen | {f"h{self.h + 1}"}), 0, out))
        before = _done(self.root)
        h = self.next_hash()
        if self.duration is None:
            self.timed(_ctx.Process(target=_rewrite, args=(self.root, self.ids, h)))
            return False, verify(self.root, before, self.seen)
        delay = self.delay()
        reader = _ctx.Process(target=_read, args=(self.root, self.ids, sorted(self.seen), delay + 0.2, out))
        reader.start()
        killed = _kill_after(_ctx.Process(target=_rewrite, args=(self.root, self.ids, h)), delay)
        bad, reads = out.get(timeout=120)
        reader.join()
        bad = Counter(bad)
        if not reads:
            bad["reader: no reads"] += 1
        return killed, bad + verify(self.root, before, self.seen)


def run(faults=200, clips=100, root=None, seed=0, scenarios=SCENARIOS, log=print) -> dict:
    """Inject `faults` faults spread over the scenarios; returns {scenario: {runs, kills, bad: {kind: n}}}."""
    own = root is None
    root = Path(root or tempfile.mkdtemp(prefix="slf_faults_"))
    rng = np.random.default_rng(seed)
    result, t0 = {}, time.time()
    try:
        live = {s: Scenario(s, root, clips, rng) for s in scenarios}
        kills = 0
        while kills < faults:
            for name, sc in live.items():
                r = result.setdefault(name, {"runs": 0, "kills": 0, "bad": Counter()})
                for _ in range(8):  # until one run of it is killed (a random delay may outlast the work)
                    killed, bad = sc.fault()
                    r["runs"] += 1
                    r["kills"] += killed
                    r["bad"].update(bad)
                    if killed:
                        break
                kills += killed
                if kills >= faults:
                    break
    finally:
        if own:
            shutil.rmtree(root, ignore_errors=True)
    log(f"{'scenario':<10} {'runs':>6} {'kills':>6} {'inconsistencies':>16}  by kind")
    for name, r in result.items():
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(r["bad"].items())) or "-"
        log(f"{name:<10} {r['runs']:>6} {r['kills']:>6} {sum(r['bad'].values()):>16}  {kinds}")
    total = {k: sum(r[k] for r in result.values()) for k in ("runs", "kills")}
    total["bad"] = sum(sum(r["bad"].values()) for r in result.values())
    log(f"{'total':<10} {total['runs']:>6} {total['kills']:>6} {total['bad']:>16}  ({time.time() - t0:.0f} s)")
    return {"scenarios": result, **total}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--faults", type=int, default=200, help="kill -9 faults to inject (over all scenarios)")
    ap.add_argument("--clips", type=int, default=100, help="clips per store")
    ap.add_argument("--root", default=None, help="scratch folder (default: a temp folder, removed)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default=",".join(SCENARIOS), help="scenarios, comma-separated")
    args = ap.parse_args(argv)
    out = run(args.faults, args.clips, args.root, args.seed, tuple(args.only.split(",")))
    raise SystemExit(1 if out["bad"] else 0)


if __name__ == "__main__":
    main()
