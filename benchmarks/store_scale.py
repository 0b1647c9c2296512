"""Does the store's cost per clip stay flat up to VoxCeleb2 size? Synthetic clips shaped like the paper's.

Each clip is written as the pipeline writes it (the driver, `put_many` per stage): `preprocess` face 128x128x3 uint8
and guide 8x8x3, `speaker` 192, `speaker_windows` 37x192, `pyaudio` 79x68, `mel` 79x128 (float32). The store grows
through the sizes given; at each size a fresh process appends the new clips, builds the caches (only the new
clips' segments) and reads random training batches (every stage, as `layout.build` does), so its peak RSS is
that of a process working on a store of that size. Printed: write time per clip, cache build per new clip, the
median random batch read, peak RSS, disk per clip; then the ratios at the largest size against the first
(goal: time per clip and batch read <= 1.3x, peak RSS <= 1.5x) and an extrapolation to VoxCeleb2 dev.

    python benchmarks/store_scale.py                         # 10k, 30k, 100k (as far as the disk allows)
    python benchmarks/store_scale.py --sizes 2000,6000 --root /tmp/s   # quick
    python benchmarks/store_scale.py --extract-s 0.8 --workers 16      # + feature extraction in the estimate
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VOXCELEB2_DEV = 1_092_009
SHAPES = {  # stage -> {key: (shape, dtype)}
    "preprocess": {"face": ((128, 128, 3), np.uint8), "guide": ((8, 8, 3), np.uint8)},
    "speaker": {"embedding": ((192,), np.float32)},
    "speaker_windows": {"embedding": ((37, 192), np.float32)},
    "pyaudio": {"frames": ((79, 68), np.float32)},
    "mel": {"frames": ((79, 128), np.float32)},
}
CHUNK = 500  # clips per put_many: what a driver collects from its workers between writes


def clip_id(i: int) -> str:
    return f"id{i % 5994:05d}/yt{i // 5994:07d}/{i:08d}"  # VoxCeleb2-like ids


def synthetic(i: int, pool) -> dict:
    """Stage -> arrays of clip i: a pooled random clip stamped with i (content is irrelevant to the store)."""
    out = {}
    for stage in SHAPES:
        out[stage] = {}
        for k, a in pool[stage].items():
            a = a[i % len(a)].copy()
            a.flat[0] = i % 255 if a.dtype == np.uint8 else i
            out[stage][k] = a
    return out


def phase(root: Path, start: int, stop: int, batch: int, repeats: int, small: Path | None = None, small_n=0) -> dict:
    """Append clips [start, stop), build caches, time random batches: one process, one size. With `small` (a copy
    of the store at the first size) batches from it and from this store alternate: their ratio is side by side."""
    import pandas as pd

    from slf_utils.store import Store

    rng = np.random.default_rng(start)
    pool = {
        s: {k: (rng.random((16, *shp)) * (255 if dt == np.uint8 else 1)).astype(dt) for k, (shp, dt) in keys.items()}
        for s, keys in SHAPES.items()
    }

    def write(st, first, last):
        t0 = time.perf_counter()
        for lo in range(first, last, CHUNK):
            ids = range(lo, min(lo + CHUNK, last))
            st.add_clips(pd.DataFrame({"clip_id": [clip_id(i) for i in ids], "split": "train"}))
            clips = [synthetic(i, pool) for i in ids]
            for stage in SHAPES:
                st.put_many(stage, [(clip_id(i), c[stage]) for i, c in zip(ids, clips)], "bench")
            del clips  # one chunk in memory at a time
        return (time.perf_counter() - t0) / (last - first)

    def build(st, last):
        t0 = time.perf_counter()
        for stage in SHAPES:  # the first read after appending builds the new clips' segments
            st.load_stacked(stage, [clip_id(last - 1)])
        return time.perf_counter() - t0

    store, ref = Store(root), Store(small) if small else None
    # side by side: the same work on the first-size store right after (a few more clips written to it, and its
    # whole cache rebuilt), so that the ratios compare two measurements taken under the same machine load
    write_s = write(store, start, stop)
    extra = min(2000, stop - start)
    n_small = len(ref.done("speaker", "bench")) if ref else 0
    write_ref = write(ref, 10**8 + start, 10**8 + start + extra) if ref else write_s
    build_s = build(store, stop) / (stop - start)
    if ref:
        shutil.rmtree(Path(small) / "arrays" / "speaker.cache", ignore_errors=True)
        for stage in SHAPES:
            shutil.rmtree(Path(small) / "arrays" / f"{stage}.cache", ignore_errors=True)
        n_small += extra
    build_ref = build(Store(small), 10**8 + start + extra) / n_small if ref else build_s

    def timed(st, n, again=False):
        """Seconds for one random batch of every stage; with `again`, the same batch read a second time: its
        pages are in memory, so this is the store's own cost (lookups, reads from the page cache), whatever the
        disk and however much of the corpus fits in RAM."""
        ids = [clip_id(int(i)) for i in rng.choice(n, batch, replace=False)]
        for _ in range(2 if again else 1):
            t0 = time.perf_counter()
            got = {s: st.load_stacked(s, ids) for s in SHAPES}
            elapsed = time.perf_counter() - t0
        assert got["speaker"]["embedding"][:, 0].tolist() == [float(c.rsplit("/", 1)[1]) for c in ids]
        return elapsed

    ref = Store(small) if small else None
    small_ids = small_n  # batches from the first-size clips (ids 0..), not the extra ones
    times, small_times, warm, small_warm = [], [], [], []
    for r in range(repeats + 1):
        t = timed(store, stop)
        s = timed(ref, small_ids) if ref else None
        w = timed(store, stop, again=True)
        sw = timed(ref, small_ids, again=True) if ref else None
        if r:  # the first batch opens the segments
            times.append(t)
            small_times.append(s)
            warm.append(w)
            small_warm.append(sw)
    return {
        "n": stop,
        "new": stop - start,
        "write_s_per_clip": write_s,
        "build_s_per_clip": build_s,
        "write_ratio": write_s / write_ref,
        "build_ratio": build_s / build_ref,
        "batch_s": float(np.median(times)),
        "batch_ratio": float(np.median(np.divide(times, small_times))) if ref else 1.0,
        "warm_batch_s": float(np.median(warm)),
        "warm_batch_ratio": float(np.median(np.divide(warm, small_warm))) if ref else 1.0,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,30000,100000", help="store sizes to reach, comma-separated")
    ap.add_argument("--root", default="/tmp/slf_store_scale", help="scratch folder (removed first unless --keep)")
    ap.add_argument("--keep", action="store_true", help="keep the store afterwards (and do not clear it first)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--margin-gb", type=float, default=5.0, help="free disk to leave")
    ap.add_argument("--extract-s", type=float, default=None, help="feature extraction s/clip (benchmarks/features.py)")
    ap.add_argument("--workers", type=int, default=8, help="Dask workers for the extrapolation")
    ap.add_argument("--phase", nargs=2, type=int, help=argparse.SUPPRESS)
    ap.add_argument("--small", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--small-n", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    root = Path(args.root)
    if args.phase:
        print(json.dumps(phase(root, *args.phase, args.batch, args.repeats, args.small, args.small_n)))
        return
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    rows, at, per_clip = [], 0, 400e3  # a first guess of disk per clip, replaced by the measured one
    head = ("clips", "write ms/clip", "build ms/clip", "batch ms", "batch ratio", "peak RSS MB", "KB/clip")
    print(" ".join(f"{h:>{w}}" for h, w in zip(head, (8, 14, 14, 9, 12, 12, 8))))
    for n in sizes:
        free = shutil.disk_usage(root).free - args.margin_gb * 1e9
        if (n - at + (n if not rows else 0)) * per_clip > free:  # the first size is kept as a copy
            need = (n - at) * per_clip / 1e9
            print(f"{n:>8} skipped: needs ~{need:.1f} GB, {free / 1e9:.1f} GB free beyond the margin")
            break
        cmd = [sys.executable, __file__, "--root", str(root / "grow"), "--phase", str(at), str(n)]
        cmd += ["--batch", str(args.batch), "--repeats", str(args.repeats)]
        cmd += ["--small", str(root / "small"), "--small-n", str(rows[0]["n"])] if rows else []
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"the {n:,}-clip phase failed:\n{proc.stderr[-3000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        if not rows:  # the first size, kept as it is: later batches are timed against it, side by side
            shutil.copytree(root / "grow", root / "small")
        per_clip = disk_bytes(root / "grow") / n
        r["disk_kb_per_clip"] = per_clip / 1e3
        rows.append(r)
        at = n
        print(
            f"{n:>8} {r['write_s_per_clip'] * 1e3:>14.2f} {r['build_s_per_clip'] * 1e3:>14.2f} "
            f"{r['batch_s'] * 1e3:>9.1f} {r['batch_ratio']:>12.2f} {r['peak_rss_mb']:>12.0f} "
            f"{r['disk_kb_per_clip']:>8.0f}",
            flush=True,
        )
    if len(rows) >= 2:
        a, b = rows[0], rows[-1]
        print(f"\nratios at {b['n']:,} clips against {a['n']:,} (goal: <= 1.3, <= 1.3, <= 1.5):")
        across = {k: b[f"{k}_s_per_clip"] / a[f"{k}_s_per_clip"] for k in ("write", "build")}
        print(f"  write time per clip  {b['write_ratio']:.2f}x side by side ({across['write']:.2f}x across runs)")
        print(f"  cache build per clip {b['build_ratio']:.2f}x side by side ({across['build']:.2f}x across runs)")
        print(f"  random batch of {args.batch}  {b['batch_ratio']:.2f}x (side by side with the {a['n']:,}-clip store)")
        print(
            f"  the same batch again  {b['warm_batch_ratio']:.2f}x (in memory: the store's own cost; a cold batch "
            "is disk reads once the corpus outgrows the page cache)"
        )
        print(f"  peak RSS             {b['peak_rss_mb'] / a['peak_rss_mb']:.2f}x")
    if rows:
        b = rows[-1]
        store_h = (b["write_s_per_clip"] + b["build_s_per_clip"]) * VOXCELEB2_DEV / 3600
        print(f"\nextrapolation to VoxCeleb2 dev ({VOXCELEB2_DEV:,} clips), at the {b['n']:,}-clip rates:")
        print(f"  disk: {b['disk_kb_per_clip'] * 1e3 * VOXCELEB2_DEV / 1e9:.0f} GB (arrays + cache indexes, no audio)")
        print(f"  store writes + cache build on one node: {store_h:.1f} h (the driver writes; workers only compute)")
        if args.extract_s:
            one = args.extract_s * VOXCELEB2_DEV / 3600
            print(f"  feature extraction: {one:.0f} h on one worker, {one / args.workers:.1f} h with {args.workers}")
            print(f"  end to end with {args.workers} Dask workers: {max(store_h, one / args.workers):.1f} h")
        print(f"  a random training batch of {args.batch}: {b['batch_s'] * 1e3:.0f} ms (every stage)")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
