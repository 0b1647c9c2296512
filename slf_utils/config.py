"""Grid files: load_params (a grid file, the files it extends and overrides, checked and resolved), the checks
across keys, `show`, seeds and where a system's run lives, and the command line (python -m slf_utils.config)."""

from __future__ import annotations

import argparse
import functools
import os
from pathlib import Path

import yaml

from slf_utils.basics import (
    ROOT,
    ParamsError,
    _get,
    _set,
    atomic_write_text,
    deep_merge,
    default,
    exists,
    flat,
    read_yaml,
    resolve,
)
from slf_utils.parameters import DEFAULTS, check_keys, parameters_table

# The factor a pair of report.differences names (its third entry) and the recipe keys (recipe.Recipe.flat) that
# factor may change: a pair whose systems differ anywhere else measures more than its factor, and the report flags it.
# `method`: two whole pipelines compared as they are (not an ablation: nothing is flagged, everything is listed).
FACTORS = {
    # what the model is fed, and the encoders that make it; a diffusion model trains on what it is fed, so its
    # `train_on` moves with `keep`
    "inputs": ("keep", "stages", "encoder.", "train_on"),
    # what the model is trained from, fed the same (a direct decoder's train_on: true vs predicted embeddings)
    "training_inputs": ("train_on", "encoder."),
    "encoder": ("encoder.",),  # the same constituent, made by a differently trained encoder
    "face_prior": ("model.face_prior", "model.face_prior_attributes"),
    "latent": ("model.",),  # the latent preset changes the unet to fit its latents
    # the decoder and its own settings only: a pair that also changes what it is trained from is flagged
    "decoder": ("decoder", "train.", "face_decoder.", "model."),
    "training": ("train.", "face_decoder."),
    "guide": ("mode",),
    "method": ("",),
}
PATH_KEYS = (
    "results",
    "data.manifest",
    "data.root",
    "data.train_root",
    "data.test_root",
    "data.test_list",
    "data.known_answer.cache",
    "layout",
    "systems_file",
)
# a model source is a local folder or a hub id ("speechbrain/spkrec-ecapa-voxceleb"): resolved only when it names
# an existing folder or is written as a path (./x, ../x, /x, ~/x)
SOURCE_KEYS = ("features.speaker_source", "features.language_source", "face_decoder.perceptual_source")
VOXCELEB_ONLY = ("data.test_list", "data.max_train_clips")  # a manifest's rows are its clips and its splits
MIN_PER_FOLD = 2  # identities a fold of data.identity_folds needs at least (the known-answer corpus is refused below)


def corpus_builder(data: dict) -> str | None:
    """The data section that builds the manifest corpus (demo_corpus or known_answer), None when none does: the
    manifest is then that step's output, not an input file."""
    return next((k for k in ("demo_corpus", "known_answer") if data[k]["build"]), None)


def read_grid(path) -> tuple[dict, dict, list]:
    """A grid file with its `extends` chain: each file may name a base grid file (`extends: paper.yaml`, relative to
    the file) and set only what differs; the chain is merged base first (deep merge: the child's keys win, lists are
    replaced). Each file is checked alone, so an error names the file that has the key. Returns the merged
    parameters, {dotted key: the file that set it} and the files, the grid file first."""
    chain = []  # (path, its parameters), child first
    path = resolve(path)
    while True:
        if path.resolve() in [p.resolve() for p, _ in chain]:
            names = " -> ".join(str(p) for p, _ in [*chain, (path, None)])
            raise ParamsError(f"{chain[-1][0]}: extends: a cycle ({names})")
        data = read_yaml(path)
        base = data.pop("extends", None)
        check_keys(data, str(path))
        chain.append((path, data))
        if base is None:
            break
        if not isinstance(base, str):
            raise ParamsError(f"{path}: extends must name one grid file (relative to {path.parent}), got {base!r}")
        base_path = path.parent / os.path.expanduser(base)
        if not base_path.is_file():
            raise ParamsError(f"{path}: extends: {base_path} not found")
        path = base_path.resolve()
    merged, origins, results = {}, {}, {}
    for p, data in reversed(chain):
        merged = deep_merge(merged, data)
        origins |= {k: str(p) for k in flat(data)}
        results[p] = resolve(default(merged.get("results"), f"results/{merged.get('name', DEFAULTS['name'])}"))
    # a grid's results folder holds its run records: two grids in one would rerun each other's steps
    for (child, _), (base, _) in zip(chain, chain[1:]):
        if results[child] == results[base]:
            raise ParamsError(
                f"{child}: name: its results folder {results[child]} is the one of {base} it extends: set its own name"
            )
    return merged, origins, [p for p, _ in chain]


def _origin(origins: dict, grid_file: str, key: str) -> str:
    """The file that set `key` (or a key under it), for an error message; the grid file for a default."""
    return origins.get(key) or next((f for k, f in origins.items() if k.startswith(key + ".")), grid_file)


def load_params(path, overrides: dict | None = None) -> dict:
    """Read a grid file (and the files it extends), merge `overrides` (e.g. from papermill or --set), validate,
    resolve paths."""
    path = resolve(path)
    raw, origins, _ = read_grid(path)
    over_where = f"{path} (overrides)"
    check_keys(overrides or {}, over_where)
    origins |= dict.fromkeys(flat(overrides or {}), over_where)
    cfg = deep_merge(DEFAULTS, deep_merge(raw, overrides))
    cfg["results"] = default(cfg["results"], f"results/{cfg['name']}")
    for key in PATH_KEYS:
        if exists(_get(cfg, key)):
            _set(cfg, key, str(resolve(_get(cfg, key))))
    for key in SOURCE_KEYS:
        src = _get(cfg, key)
        if exists(src) and (str(src).startswith((".", "/", "~")) or resolve(src).is_dir()):
            _set(cfg, key, str(resolve(src)))
    where = functools.partial(_origin, origins, str(path))
    _check_files(cfg, where)
    _check_system_names(cfg, where)
    _check_pairs(cfg, where)
    _check_speech2face(cfg["speech2face"], where("speech2face.voice_encoder.loss"))
    _check_contrastive(cfg["contrastive"], where("contrastive"))
    cfg["grid"]["reuse"] = [str(resolve(p)) for p in cfg["grid"]["reuse"] or []]
    for over in cfg["system_overrides"].values():
        _check_files(deep_merge(cfg, over), where)
    cfg["params_file"] = str(path)
    return cfg


def _check_files(cfg: dict, where):
    """The files the grid reads exist (a manifest the preprocessing builds excepted); keys its data kind does not
    read are refused, not ignored."""
    data = cfg["data"]
    for key in VOXCELEB_ONLY:
        if data["kind"] != "voxceleb" and exists(_get(cfg, key)):
            raise ParamsError(
                f"{where(key)}: {key} is read only with data.kind voxceleb: with a manifest, its rows are the clips "
                f"and their splits (select clips there, or drop {key})"
            )
    if data["identity_folds"]["folds"] and (data["kind"] != "manifest" or data["identity_folds"]["folds"] < 2):
        raise ParamsError(
            f"{where('data.identity_folds.folds')}: data.identity_folds.folds is 0 (closed set) or at least 2, and "
            f"only with data.kind manifest (VoxCeleb2's test speakers are unseen already), got "
            f"{data['identity_folds']['folds']} with data.kind {data['kind']}"
        )
    _check_validation(data, where)
    if data["known_answer"]["build"]:
        _check_known_answer(data, where)
    files = ["layout", "systems_file"]
    if data["kind"] == "manifest" and not corpus_builder(data):
        files.append("data.manifest")
    if data["kind"] == "voxceleb" and data["demo_corpus"]["build"]:  # preprocessing builds the trees and the list
        _check_demo_voxceleb(data, where)
    else:
        files.append("data.test_list")
    if exists(cfg["model"].get("presets_file")):
        files.append("model.presets_file")
    for key in files:
        p = _get(cfg, key)
        if exists(p) and not resolve(p).is_file():
            raise ParamsError(f"{where(key)}: {key}: {resolve(p)} not found")


def _check_validation(data: dict, where):
    """With identity folds, validation clips come from validation speakers that are never tested: per_identity
    would choose on other clips of the very identities reported."""
    folds, v = data["identity_folds"]["folds"], data["validation"]
    if folds < 2:
        return
    if v["per_identity"]:
        raise ParamsError(
            f"{where('data.validation.per_identity')}: data.validation.per_identity is {v['per_identity']} with "
            f"data.identity_folds: it would choose on other clips of the identities it reports; set "
            "data.validation.per_identity: 0 and use data.validation.identities (validation speakers, never tested)"
        )
    if 0 < v["identities"] < folds:
        raise ParamsError(
            f"{where('data.validation.identities')}: data.validation.identities is {v['identities']}: with "
            f"{folds} identity folds it is 0 or at least {folds}, so that every fold has validation speakers"
        )


def _check_demo_voxceleb(data: dict, where):
    missing = [k for k in ("root", "train_root", "test_root", "test_list") if not exists(data[k])]
    if missing:
        raise ParamsError(
            f"{where('data.demo_corpus.build')}: data.demo_corpus.build with data.kind voxceleb builds the demo corpus "
            f"in data.root and VoxCeleb2 trees from it: set data.{', data.'.join(missing)}"
        )
    dc = data["demo_corpus"]
    if not 1 <= dc["test_identities"] < dc["identities"]:
        raise ParamsError(
            f"{where('data.demo_corpus.test_identities')}: data.demo_corpus.test_identities must be at least 1 and "
            f"fewer than data.demo_corpus.identities ({dc['identities']}), got {dc['test_identities']}"
        )


def _check_known_answer(data: dict, where):
    ka, key = data["known_answer"], "data.known_answer.build"
    if data["kind"] != "manifest" or data["demo_corpus"]["build"]:
        raise ParamsError(
            f"{where(key)}: {key} builds a manifest corpus: it needs data.kind manifest and data.demo_corpus.build "
            f"false, got data.kind {data['kind']} and data.demo_corpus.build {data['demo_corpus']['build']}"
        )
    if not exists(data["root"]) or not exists(data["manifest"]):
        raise ParamsError(f"{where(key)}: {key} builds the corpus in data.root: set data.root and data.manifest")
    if Path(data["manifest"]) != Path(data["root"]) / "manifest.csv":
        raise ParamsError(
            f"{where('data.manifest')}: data.manifest must be data.root/manifest.csv when {key} (the builder writes "
            f"{Path(data['root']) / 'manifest.csv'}), got {data['manifest']}"
        )
    folds = data["identity_folds"]["folds"]
    if folds >= 2 and ka["identities"] < MIN_PER_FOLD * folds:
        raise ParamsError(
            f"{where('data.known_answer.identities')}: data.known_answer.identities {ka['identities']} is too few for "
            f"data.identity_folds.folds {folds}: at least {MIN_PER_FOLD} identities a fold ({MIN_PER_FOLD * folds})"
        )
    if ka["code_components"] >= ka["identities"]:
        raise ParamsError(
            f"{where('data.known_answer.code_components')}: data.known_answer.code_components "
            f"{ka['code_components']} needs more identities than components (the face code is a PCA of the "
            f"identities' faces), got data.known_answer.identities {ka['identities']}"
        )


def _check_system_names(cfg: dict, where):
    known = read_yaml(cfg["systems_file"])
    names = {"systems": cfg["systems"], "system_overrides": list(cfg["system_overrides"])}
    names["report.scales_system"] = [s for s in [cfg["report"]["scales_system"]] if exists(s)]
    for key, systems in names.items():
        unknown = [s for s in systems if s not in known]
        if unknown:
            raise ParamsError(
                f"{where(key)}: {key}: unknown system(s) {', '.join(map(repr, unknown))} "
                f"(systems of {cfg['systems_file']}: {', '.join(known)})"
            )


def _check_pairs(cfg: dict, where):
    for pair in cfg["report"]["differences"]:
        if len(pair) not in (2, 3):
            raise ParamsError(
                f"{where('report.differences')}: report.differences must be a list of [system, system] or "
                f"[system, system, factor], got {pair!r}"
            )
        if len(pair) == 3 and pair[2] not in FACTORS:
            raise ParamsError(
                f"{where('report.differences')}: report.differences {pair!r}: unknown factor {pair[2]!r} "
                f"(one of {', '.join(FACTORS)})"
            )
    for w in cfg["features"]["windows"]:
        if len(w) != 2:
            raise ParamsError(f"{where('features.windows')}: features.windows must be [length, step] pairs, got {w!r}")


def _check_speech2face(s2f: dict, where: str):
    loss = s2f["voice_encoder"]["loss"]
    if loss["l1"] + loss["l2"] + loss["cosine"] <= 0:
        raise ParamsError(
            f"{where}: speech2face.voice_encoder.loss: one of l1, l2, cosine must be > 0 (the embedding loss), "
            f"got {loss!r}"
        )


def _check_contrastive(ct: dict, where: str):
    if ct["face_px"] >> len(ct["channels"]) < 1:
        raise ParamsError(
            f"{where}: contrastive.face_px {ct['face_px']} is too small for {len(ct['channels'])} pooling blocks "
            f"(at least {2 ** len(ct['channels'])})"
        )
    if 1 / ct["temperature"] > ct["max_logit_scale"]:
        raise ParamsError(
            f"{where}: contrastive: 1 / temperature must be at most max_logit_scale, got {ct['temperature']!r}, "
            f"{ct['max_logit_scale']!r}"
        )


def show(path, overrides: dict | None = None) -> str:
    """The resolved parameters of a grid file as YAML, each leaf with the file that set it (`default`: DEFAULTS)."""
    path = resolve(path)
    _, origins, chain = read_grid(path)
    origins |= dict.fromkeys(flat(overrides or {}), "--set")
    cfg = load_params(path, overrides)
    cfg.pop("params_file")
    chain = ["--set"] * bool(overrides) + chain

    def label(p):
        return os.path.relpath(p, ROOT) if str(p).startswith(str(ROOT) + os.sep) else str(p)

    lines = [f"# {label(path)}: resolved parameters ({' <- '.join(map(label, chain))} <- default)"]

    def walk(d, at, indent):
        for k, v in d.items():
            key, pad = f"{at}{k}", "  " * indent
            if isinstance(v, dict) and v:
                lines.append(f"{pad}{k}:")
                walk(v, key + ".", indent + 1)
            else:
                value = yaml.safe_dump([v], default_flow_style=True, width=10**6).strip()[1:-1]
                lines.append(f"{pad}{k}: {value}  # {label(origins.get(key, 'default'))}")

    walk(cfg, "", 0)
    return "\n".join(lines) + "\n"


def seeds_of(cfg) -> list[int]:
    """The training seeds of a grid (or of a system, its system_overrides merged): grid.seeds, else train.seed."""
    return [int(x) for x in cfg["grid"]["seeds"]] if exists(cfg["grid"]["seeds"]) else [int(cfg["train"]["seed"])]


def seed_overrides(seed: int) -> dict:
    """What one seed of a grid sets: initial weights, data order and training noise (train, face_decoder) and the
    sampling noise and bootstrap draws (evaluate)."""
    return {"train": {"seed": int(seed)}, "face_decoder": {"seed": int(seed)}, "evaluate": {"seed": int(seed)}}


def parse_set(pairs: list[str]) -> dict:
    """`--set train.steps=100 --set evaluate.scales=[0,3]` -> nested overrides (values parsed as YAML)."""
    out: dict = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set {pair}: expected KEY=VALUE, e.g. train.steps=100")
        d = out
        *head, last = key.split(".")
        for part in head:
            d = d.setdefault(part, {})
        d[last] = yaml.safe_load(value)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m slf_utils.config", description="Grid parameter files.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("show", help="print the resolved parameters and the file that set each")
    s.add_argument("params_file")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a parameter")
    t = sub.add_parser("parameters", help="print the parameter table (docs/parameters.md)")
    t.add_argument("--out", help="write it here instead")
    a = ap.parse_args(argv)
    if a.cmd == "parameters":
        if a.out:
            atomic_write_text(a.out, parameters_table())
        else:
            print(parameters_table(), end="")
        return 0
    try:
        print(show(a.params_file, parse_set(a.set)), end="")
    except ParamsError as e:
        raise SystemExit(f"error: {e}") from None
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
