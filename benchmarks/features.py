"""Feature extraction benchmark: our extractor vs a reference-style pipeline, same clips, same models, same params.

(a) ours: decode each file once, then every constituent from that audio; the whole clip and all sliding windows
    go through the speaker model together (`speech_models.speaker_embeddings`).
(b) reference-style (as in the paper's code): every extractor decodes the file again, the speaker model is
    called once per window (`VoiceEncoder.embed_utterance` / `encode_batch` per segment), and the short-term
    features come from pyAudioAnalysis' own per-frame loop (`features.pyaudio_features_reference`; ours is its
    vectorised equivalent, `features.short_term_features`).

Each pipeline runs in its own subprocess so that its peak memory (max RSS, and the tracemalloc peak of Python and
numpy allocations) is its own. Both load their models and run one warm-up clip before the clock starts.

    python benchmarks/features.py [--params params/demo.yaml] [--clips 20] [--manifest PATH] [--threads 1]
                                  [--audio-seconds 24] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import slf_utils  # noqa: E402,F401  (offline switches before torch & co)
from slf_utils import features as F  # noqa: E402
from slf_utils import preprocessing as P  # noqa: E402
from slf_utils import speech_models  # noqa: E402
from slf_utils.config import load_params  # noqa: E402
from slf_utils.results import Results  # noqa: E402

ALL = ("speaker", "speaker_windows", "pyaudio", "mel")


def clip_paths(cfg, n: int) -> list[str]:
    clips = P.list_clips(cfg)
    clips = clips[clips.video.notna()].head(n)
    if len(clips) < n:
        raise SystemExit(f"only {len(clips)} clips with a video in {cfg['data']}")
    return clips.video.tolist()


def load_audio(path, seconds):
    audio, _ = P.decode(path, frame=False)
    return P.fit_length(audio, seconds)


def ours(path, cfg, backend):
    f = cfg["features"]
    audio = load_audio(path, cfg["preprocess"]["audio_seconds"])
    arrays, _ = F.extract_all(audio, ALL, f, {"speaker": backend})
    return arrays


def reference(path, cfg, backend):
    """One decode per extractor and one model call per segment (no batching, no reuse of the whole clip)."""
    f, seconds = cfg["features"], cfg["preprocess"]["audio_seconds"]
    one = (lambda x: backend.embed([x])[0]) if not hasattr(backend, "prepare") else None
    if one is None:  # Resemblyzer: the library's own per-utterance call
        one = lambda x: backend.model.embed_utterance(x)  # noqa: E731
    audio = load_audio(path, seconds)
    prep = backend.prepare(audio) if hasattr(backend, "prepare") else audio
    whole = one(prep)
    audio = load_audio(path, seconds)
    prep = backend.prepare(audio) if hasattr(backend, "prepare") else audio
    bounds = speech_models.window_bounds(len(prep), f["windows"])
    windows = np.stack([one(prep[s : s + n]) for s, n in bounds])
    audio = load_audio(path, seconds)
    pa = F.pyaudio_features_reference(audio, f["frame_window"], f["frame_step"])  # pyAudioAnalysis' own loop
    audio = load_audio(path, seconds)
    mel = F.log_mel(audio, f["frame_window"], f["frame_step"], f["n_mels"])
    return {
        "speaker": {"embedding": whole},
        "speaker_windows": {"embedding": windows},
        "pyaudio": {"frames": pa},
        "mel": {"frames": mel},
    }


def run_pipeline(name, cfg, paths, threads):
    import torch

    torch.set_num_threads(threads)
    f = cfg["features"]
    store_root = Results.of(cfg).store
    backend = F.models({"features": f, "stages": ["speaker"]}, store_root)["speaker"]
    fn = ours if name == "ours" else reference
    first = fn(paths[0], cfg, backend)  # warm-up: imports, JIT, first-call allocations
    tracemalloc.start()
    t0 = time.perf_counter()
    out = [fn(p, cfg, backend) for p in paths]
    elapsed = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    digest = {s: float(np.mean([np.abs(o[s][k]).sum() for o in out for k in o[s] if k != "window"])) for s in ALL}
    return {
        "pipeline": name,
        "clips": len(paths),
        "seconds": elapsed,
        "clips_per_s": len(paths) / elapsed,
        "tracemalloc_peak_mb": peak / 2**20,
        "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "digest": digest,
        "first_keys": {s: sorted(first[s]) for s in ALL},
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params/demo.yaml")
    ap.add_argument("--manifest", default=None, help="a manifest CSV instead of the params' data.manifest")
    ap.add_argument("--clips", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared 2-core machine)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating runs of both pipelines; the median ratio")
    ap.add_argument("--audio-seconds", type=float, default=None, help="instead of preprocess.audio_seconds")
    ap.add_argument("--pipeline", choices=["ours", "reference"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    overrides = {}
    if args.manifest:
        overrides["data"] = {"kind": "manifest", "manifest": args.manifest, "root": str(Path(args.manifest).parent)}
    if args.audio_seconds:
        overrides["preprocess"] = {"audio_seconds": args.audio_seconds}
    cfg = load_params(args.params, overrides)
    if args.pipeline:  # child process: one pipeline, result as JSON on the last line
        print(json.dumps(run_pipeline(args.pipeline, cfg, clip_paths(cfg, args.clips), args.threads)))
        return 0
    P.ensure_demo_corpus(cfg)
    # numpy's BLAS gets the same thread count as torch: otherwise a busy machine slows the pipelines unevenly
    env = {**os.environ, "TQDM_DISABLE": "1"}
    env.update({v: str(args.threads) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")})
    rounds = []
    for r in range(args.rounds):  # the two pipelines one after the other, order alternating: a ratio per round
        res = {}
        for name in ("ours", "reference") if r % 2 == 0 else ("reference", "ours"):
            cmd = [sys.executable, __file__, "--params", args.params, "--clips", str(args.clips)]
            cmd += ["--threads", str(args.threads), "--pipeline", name]
            cmd += ["--manifest", args.manifest] if args.manifest else []
            cmd += ["--audio-seconds", str(args.audio_seconds)] if args.audio_seconds else []
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
            res[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        rounds.append(res)
    ratios = [r["ours"]["clips_per_s"] / r["reference"]["clips_per_s"] for r in rounds]
    res = rounds[int(np.argsort(ratios)[len(ratios) // 2])]  # the median round
    a, b = res["ours"], res["reference"]
    same = all(np.isclose(a["digest"][s], b["digest"][s], rtol=1e-4) for s in ALL)
    f = cfg["features"]
    print(
        f"clips: {args.clips} of {cfg['data'].get('manifest')}, audio {cfg['preprocess']['audio_seconds']} s, "
        f"speaker backend {f['speaker_backend']}, windows {f['windows']}, torch threads {args.threads}"
    )
    for name, r in res.items():
        print(
            f"  {name:9s}: {r['clips_per_s']:.2f} clips/s ({r['seconds']:.1f} s), peak memory: "
            f"max RSS {r['maxrss_mb']:.0f} MiB, tracemalloc {r['tracemalloc_peak_mb']:.1f} MiB"
        )
    ratio = float(np.median(ratios))
    each = ", ".join(f"{x:.2f}" for x in ratios)
    print(f"  ratio ours/reference: {ratio:.2f}x median of {len(ratios)} rounds ({each}); same outputs: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
