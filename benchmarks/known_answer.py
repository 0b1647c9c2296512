"""The known-answer corpus (issue 26) measured: build time, identities kept of candidates, variant re-identification,
and how much of the planted face code a ridge regression reads from the voice at each link strength.

Builds N identities once per strength into OUT/s<strength> (the faces are made once, in OUT/cache, and shared), then
for each strength: Resemblyzer whole-clip embeddings of every clip (the workbook's speaker path) and the grouped
cross-validated R^2 of the face code (known_answer_checks.code_recovery); once: dlib recall@1 of every image against the
others (known_answer_checks.reidentification) and recall@1 of each image's own face code against the identities' codes
(what the oracle reference will reach at best).

    python benchmarks/known_answer.py --identities 200 --strengths 0 0.5 1 --out .cache/bench/ka200
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np

from slf_utils import known_answer as ka
from slf_utils import known_answer_checks as checks
from slf_utils.references import read_codes


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--identities", type=int, default=200)
    ap.add_argument("--strengths", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--no-reid", action="store_true", help="skip the dlib re-identification (a few minutes)")
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    out = {"identities": a.identities, "seed": a.seed, "strengths": {}}
    for s in a.strengths:
        corpus = a.out / f"s{s:g}"
        t = time.time()
        ka.build(corpus, cache=a.out / "cache", identities=a.identities, link_strength=s, seed=a.seed)
        stats = json.loads((corpus / ".build" / "stats.json").read_text())
        clips = list(csv.DictReader(open(corpus / "manifest.csv", newline="")))
        t_emb = time.time()
        emb = checks.voice_embeddings(corpus, clips)
        ids, codes = read_codes(corpus)
        code_of = dict(zip(ids, codes))
        groups = [c["identity"] for c in clips]
        r2 = checks.code_recovery(emb, groups, np.stack([code_of[g] for g in groups]))
        out["strengths"][s] = {"build_s": round(t_emb - t, 1), "stats": stats, "r2": round(r2, 4)}
        print(json.dumps({s: out["strengths"][s]}), flush=True)
    first = a.out / f"s{a.strengths[0]:g}"
    out["code_recall@1"] = round(checks.code_identification(first), 4)
    if not a.no_reid:
        out["reid_recall@1"] = round(checks.reidentification(first), 4)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
