"""What several test modules share: one writer of a tiny grid file (the fixture `project` in conftest gives it a
synthetic store to train on)."""

import yaml

TINY_TRAIN = {"steps": 2, "batch_size": 4, "lr": 3e-3, "ema": False, "seed": 0, "checkpoint_every": 2}


def write_params(tmp_path, name="t", train=None, model=None, **top):
    """A grid file `<name>.yaml` in tmp_path: the tiny model preset (plus `model`), TINY_TRAIN (plus `train`), results
    in tmp_path/results (where `project` puts its store), and any other top-level keys as given."""
    p = tmp_path / f"{name}.yaml"
    params = {
        "name": name,
        "results": str(tmp_path / "results"),
        "model": {"preset": "tiny", **(model or {})},
        "train": TINY_TRAIN | (train or {}),
        **top,
    }
    p.write_text(yaml.safe_dump(params))
    return p
