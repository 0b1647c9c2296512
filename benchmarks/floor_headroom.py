"""How much room the super-resolution floor leaves, from a finished grid (issue 26): recall@k (identity protocol, test
clips) of the real face and of bicubic upscaling of the guide at each output size and recogniser, and of a trained
super-resolution system's saved samples: one draw per scale and the pixel mean of the draws of several scales (a
stand-in for the posterior mean, which a recogniser that is linear in the image would favour). A system can beat
bicubic only by part of the gap between the two reference rows, so a gap smaller than the paired interval's
half-width means the floor control cannot pass at that size and recogniser, whatever the model.

    python benchmarks/floor_headroom.py params/known-answer-floor-6k.yaml --sizes 16,32 --recognisers eigenfaces,Dlib
    python benchmarks/floor_headroom.py params/known-answer-floor-6k.yaml --system full_input --scales 0,2
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from slf_utils import evaluation as ev
from slf_utils.config import load_params
from slf_utils.recognisers import make_embedder
from slf_utils.references import reference_images
from slf_utils.results import Results
from slf_utils.store import open_store
from slf_utils.tables import _scale_is, at_protocol, at_split


def recall(name, images, gallery, embedder, cfg, ks, clip_ids=None) -> dict:
    rows, _, _ = ev.score_scale(
        name, 0, images, gallery, embedder, ks, metric=cfg["evaluate"]["metric"], n_boot=200, clip_ids=clip_ids
    )
    r = at_protocol(at_split(pd.DataFrame(rows), "test"), "identity")
    r = r[r["metric"].str.startswith("recall@")]
    return {m: round(float(v), 4) for m, v in zip(r["metric"], r["value"])}


def saved_samples(cfg, system: str, scale, clip_ids) -> list:
    """The images notebook 04 saved for `system` at `scale`, in the order of clip_ids."""
    out = Results.of(cfg).eval(system)
    s = pd.read_csv(out / "samples.csv", dtype={"clip_id": str})
    s = s[_scale_is(s["scale"], scale)].set_index("clip_id")
    return [np.asarray(Image.open(out / s.loc[c, "image"]).convert("RGB")) for c in clip_ids]


def headroom(cfg, sizes, recognisers, system=None, scales=(), ks=(1, 10), log=print) -> list[dict]:
    store = open_store(cfg)
    clips = ev.eval_clips(store)
    order = clips["clip_id"].tolist()  # the gallery's order (prepare_gallery keeps it)
    draws = [saved_samples(cfg, system, x, order) for x in scales] if system else []
    rows = []
    for face_model in recognisers:
        for size in sizes:
            c = copy.deepcopy(cfg)
            c["evaluate"]["face_model"] = face_model
            c["model"]["super_resolution"] = {**c["model"].get("super_resolution", {}), "image_sizes": [8, size]}
            embedder = make_embedder(c, store)
            gallery = ev.prepare_gallery(c, store, embedder, None, clips)
            sets = {}
            for kind in ("real_face", "bicubic"):
                ref_ids, images = reference_images(kind, store, gallery, size, c)
                sets[kind] = (images, ref_ids)
            assert list(gallery.clip_ids) == order, "the saved draws are in the gallery's order"
            if draws and draws[0][0].shape[0] == size:  # saved at the grid's own output size: scored at that size
                for x, d in zip(scales, draws):
                    sets[f"{system} scale {x}"] = (d, None)
                if len(draws) > 1:
                    mean = [np.stack(d).astype(np.float32).mean(0).round().astype(np.uint8) for d in zip(*draws)]
                    sets[f"{system} mean of scales {','.join(map(str, scales))}"] = (mean, None)
            for name, (images, clip_ids) in sets.items():
                row = {"recogniser": face_model, "size": size, "row": name}
                row |= recall(name, images, gallery, embedder, c, ks, clip_ids)
                log(json.dumps(row))
                rows.append(row)
    return rows


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("params_file")
    ap.add_argument("--sizes", default="16", help="output sizes (px) the references are drawn and scored at")
    ap.add_argument("--recognisers", default="eigenfaces", help="evaluate.face_model values, comma-separated")
    ap.add_argument("--system", default=None, help="a trained super-resolution system whose saved samples to score")
    ap.add_argument("--scales", default="0", help="its scales (several: also their pixel mean)")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = headroom(
        load_params(args.params_file),
        [int(x) for x in args.sizes.split(",")],
        args.recognisers.split(","),
        args.system,
        [float(x) if "." in x else int(x) for x in args.scales.split(",") if x],
    )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
