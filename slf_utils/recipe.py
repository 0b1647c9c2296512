"""A system resolved once: the model presets (params/presets.yaml: load_presets, resolve_preset) and the Recipe of a
system of a grid file (resolve_recipe), which training, evaluation, the report and the benchmarks take as it is.

* Model options (preset keys, overridable per grid, per system in systems.yaml and per grid system_overrides):
  `face_prior` (the model learns the residual from a mean face: training_data.FacePrior) and `latent` (the unets run
  on the latents of a small autoencoder, slf_utils.autoencoder; generation only).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from slf_utils import autoencoder
from slf_utils.basics import ParamsError, _get, atomic_write_json, deep_merge, params_hash, read_yaml, resolve
from slf_utils.folds import fold_stage, n_folds
from slf_utils.layout import Layout, System, load_layout, load_systems
from slf_utils.results import Results

PRESET_KEYS = {
    "unets",
    "unet_common",
    "generation",
    "super_resolution",
    "text_embed_dim",
    "timesteps",
    "resize_mode",
    "imagen",
    "trainer",
    "cond_drop_prob",
    "lowres_aug_range",
    "lowres_sample_noise_level",
    "face_prior",
    "face_prior_attributes",
    "latent",
    "name",
}
FACE_PRIORS = ("none", "mean", "attribute_mean")
# model.trainer.precision: auto (bf16 mixed precision where the device has it, else fp32), fp32, bf16 or fp16
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
PRIOR_ATTRIBUTES = ("gender", "ethnicity", "age", "language")  # clip labels; age in decades


# ---------------------------------------------------------------------- presets
def load_presets(path=None) -> dict:
    return read_yaml(resolve(path or "params/presets.yaml"))


def resolve_preset(model_cfg: dict) -> dict:
    """The grid file's `model` section -> a full preset: `preset` names one of presets.yaml (or `presets_file`),
    every other key overrides it."""
    model_cfg = dict(model_cfg or {})
    name = model_cfg.pop("preset", "demo")
    path = resolve(model_cfg.pop("presets_file", "params/presets.yaml"))
    presets = load_presets(path)
    if name not in presets:
        raise ParamsError(f"{path}: no preset '{name}' (presets: {', '.join(presets)})")
    preset = deep_merge(presets[name], model_cfg)
    preset["name"] = name
    unknown = set(preset) - PRESET_KEYS
    if unknown:
        raise ParamsError(
            f"{path}: model/preset '{name}': unknown key(s) {sorted(unknown)} (known: {', '.join(sorted(PRESET_KEYS))})"
        )
    lo_hi = preset.setdefault("lowres_aug_range", [0.0, 1.0])
    if not (
        isinstance(lo_hi, (list, tuple))
        and len(lo_hi) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in lo_hi)
        and 0 <= lo_hi[0] <= lo_hi[1] <= 1
    ):
        raise ParamsError(
            f"{path}: model/preset '{name}': lowres_aug_range must be [low, high] with 0 <= low <= high <= 1, "
            f"got {lo_hi!r}"
        )
    level = preset.setdefault("lowres_sample_noise_level", 0.2)
    if not (isinstance(level, (int, float)) and not isinstance(level, bool) and 0 <= level <= 1):
        raise ParamsError(
            f"{path}: model/preset '{name}': lowres_sample_noise_level must be a number in [0, 1], got {level!r}"
        )
    _check_model_options(preset, f"{path}: model/preset '{name}'")
    return preset


def output_size(cfg, mode: str = "super_resolution") -> int:
    """Side of the faces the grid's model preset draws in `mode` (its largest image size): every system of the grid,
    references and direct decoders included, is scored at it, so PSNR, SSIM and the recogniser compare like with
    like."""
    return int(max(resolve_preset(cfg["model"])[mode]["image_sizes"]))


def _check_model_options(preset: dict, where: str):
    """face_prior, face_prior_attributes and latent (absent keys mean none / pixel diffusion: presets and checkpoints
    written before these options existed stay valid and resumable)."""
    prior = preset.get("face_prior", "none")
    if prior not in FACE_PRIORS:
        raise ParamsError(f"{where}: model.face_prior must be one of {', '.join(FACE_PRIORS)}, got {prior!r}")
    attrs = preset.get("face_prior_attributes", ["gender", "ethnicity"])
    if not (
        isinstance(attrs, list)
        and attrs
        and len(set(attrs)) == len(attrs)
        and all(a in PRIOR_ATTRIBUTES for a in attrs)
    ):
        raise ParamsError(
            f"{where}: model.face_prior_attributes must be a non-empty list of distinct clip labels among "
            f"{', '.join(PRIOR_ATTRIBUTES)}, got {attrs!r}"
        )
    trainer = preset.get("trainer", {})
    precision = trainer.get("precision", "fp32")
    if precision not in PRECISIONS:
        raise ParamsError(f"{where}: model.trainer.precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    compile_ = trainer.get("compile", False)
    if not (isinstance(compile_, bool) or compile_ == "auto"):
        raise ParamsError(f"{where}: model.trainer.compile must be false, true or auto, got {compile_!r}")
    if not isinstance(trainer.get("channels_last", False), bool):
        raise ParamsError(
            f"{where}: model.trainer.channels_last must be true or false, got {trainer['channels_last']!r}"
        )
    if trainer.get("foreach") and trainer.get("fused"):
        raise ParamsError(f"{where}: model.trainer: Adam runs foreach or fused, not both: set one of them to false")
    if preset.get("latent") is None:
        return
    preset["latent"] = latent = autoencoder.check_config(preset["latent"], f"{where}: model.latent")
    if prior != "none":
        raise ParamsError(
            f"{where}: model.face_prior {prior!r} with model.latent: the face prior is a pixel-space residual; "
            "use one or the other"
        )
    sizes = preset.get("generation", {}).get("image_sizes", [])
    bad = [s for s in sizes if s % latent["downsample"] or s // latent["downsample"] < 4]
    if bad:
        raise ParamsError(
            f"{where}: model.latent.downsample {latent['downsample']} must divide every generation image size into "
            f"latents of at least 4 x 4, got image_sizes {sizes}"
        )


# ---------------------------------------------------------------------- recipes
def system_model(cfg, system) -> dict:
    """The `model` section a system trains with: the grid's `model`, then the system's own `model` options in
    systems.yaml (e.g. face_prior: mean for full_input_prior), then the grid's system_overrides.<system>.model:
    the most specific wins."""
    return deep_merge(deep_merge(cfg["model"], getattr(system, "model", None) or {}), _override_model(cfg, system))


# the stages a trained encoder writes, and the parameter sections that encoder is trained with
ENCODER_SECTIONS = {
    "voice_face_embedding": ("speech2face.voice_encoder", "crossfit"),
    "contrastive_speech": ("contrastive", "crossfit"),
}


def _flat(d, prefix: str) -> dict:
    if not isinstance(d, dict):
        return {prefix: d}
    return {k: v for key, val in d.items() for k, v in _flat(val, f"{prefix}.{key}").items()}


@dataclass(frozen=True)
class Recipe:
    """One system resolved from a grid file and validated once (resolve_recipe): what training, evaluation and the
    benchmarks take as it is. `preset`: the model preset with the system's own options and the grid's
    system_overrides; `train`: the training settings (`train`, or `face_decoder` for a direct decoder) with the
    system's overrides; `fold`: the identity fold it is trained without (data.identity_folds), None in the closed set.
    `flat()` is everything the system is made from as dotted keys, `hash` its digest: two systems' recipes differ
    exactly where the systems do (report.differences lists it), and any training setting changes the hash while an
    evaluation setting does not."""

    name: str
    system: System
    layout: Layout
    preset: dict | None
    train: dict
    fold: int | None = None
    cfg: dict = field(default=None, repr=False, compare=False)  # the grid's data and encoder sections, for reads

    @property
    def mode(self) -> str:
        return self.system.mode

    @property
    def seed(self) -> int:
        return int(self.train.get("seed", 0))

    @property
    def trained(self) -> bool:
        return self.mode not in ("none", "reference")

    @property
    def who(self) -> str:
        """The model this recipe makes, in messages: the system and its identity fold."""
        return self.name if self.fold is None else f"{self.name} (identity fold {self.fold})"

    def flat(self) -> dict:
        out = {"mode": self.mode, "decoder": self.system.decoder}
        if not self.trained:
            return out
        stages, keep = self.layout.stages(self.system.keep), ", ".join(self.layout.expand(self.system.keep))
        out |= {
            "keep": keep,
            "stages": ", ".join(stages),
            # what it is trained from: a diffusion model its kept constituents, a direct decoder its train_on (so
            # two decoders trained and fed alike differ in the decoder alone)
            "train_on": keep if self.system.train_on is None else ", ".join(self.layout.expand(self.system.train_on)),
        }
        for stage in self.layout.system_stages(self.system):  # the encoders of its training inputs too
            for section in ENCODER_SECTIONS.get(stage, ()):
                out |= _flat(_get(self.cfg, section), f"encoder.{stage}.{section}")
        out |= _flat({"face_prior": "none", "latent": None} | self.preset, "model")
        out |= _flat(self.train, "face_decoder" if self.system.decoder == "direct" else "train")
        if self.fold is not None:
            out |= {"fold": self.fold} | _flat(self.cfg["data"]["identity_folds"], "data.identity_folds")
        return out

    @property
    def hash(self) -> str:
        return params_hash(self.flat())


def resolve_recipe(cfg, system_name: str, fold: int | None = None) -> Recipe:
    """The Recipe of a system of the grid `cfg` (for identity fold `fold`), refused with the reason where the
    system's options do not fit together or do not fit the grid. A fold's recipe reads the trained encoders' stages
    from that fold's copies (folds.fold_stage: nested cross-fitting, none of their encoders saw the fold)."""
    layout = load_layout(cfg)
    if fold is not None and n_folds(cfg):
        layout = layout.with_stages({s: fold_stage(s, fold) for s in ENCODER_SECTIONS})
    systems = load_systems(cfg["systems_file"], layout)
    if system_name not in systems:
        raise ParamsError(f"{cfg['systems_file']}: no system '{system_name}' (systems: {', '.join(systems)})")
    system = systems[system_name]
    scfg = deep_merge(cfg, (cfg.get("system_overrides") or {}).get(system_name) or {})
    section = "face_decoder" if system.decoder == "direct" else "train"
    if system.mode in ("none", "reference"):
        return Recipe(system_name, system, layout, None, {}, fold, cfg)
    preset = resolve_preset(system_model(cfg, system))
    if system.decoder != "direct":
        preset["cond_drop_prob"] = float(scfg["train"]["cond_drop_prob"])
    if preset.get("latent") and system.mode != "generation":
        raise ParamsError(
            f"{system_name}: model.latent: latent diffusion is generation only (a super-resolution system's guide "
            f"conditioning in latent space is out of scope), and {system_name} is a {system.mode} system"
        )
    # e.g. a demo-scale model option of systems.yaml in a 128 px grid: its faces would not match the gallery's
    grid_model = deep_merge(cfg["model"], _override_model(cfg, system))
    out_size, grid_size = (
        preset[system.mode]["image_sizes"][-1],
        resolve_preset(grid_model)[system.mode]["image_sizes"][-1],
    )
    if out_size != grid_size:
        raise ParamsError(
            f"{system_name}: its model options ({cfg['systems_file']}: model {system.model}) make {out_size} px faces, "
            f"the grid's model {grid_size} px: set system_overrides.{system_name}.model in the grid file"
        )
    return Recipe(system_name, system, layout, preset, dict(scfg[section]), fold, cfg)


def _override_model(cfg, system) -> dict:
    return ((cfg.get("system_overrides") or {}).get(system.name) or {}).get("model") or {}


RECIPE = "recipe.json"  # beside each trained model: the recipe it was trained from, read back instead of re-resolved


def _reads(cfg) -> dict:
    """The parts of a grid file a Recipe reads beyond its own (flat: the encoders' sections, the identity folds;
    training: the data section), as nested dicts: what recipe.json keeps so that a loaded recipe is the same."""
    out = {"data": cfg["data"]}
    for section in {s for sections in ENCODER_SECTIONS.values() for s in sections}:
        value = _get(cfg, section)
        node = out
        *parents, last = section.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return out


def write_recipe(r: Recipe, model_dir) -> None:
    """Save the recipe a model is trained from beside it (nanoGPT keeps the config in its checkpoint): evaluation
    samples the model as it was trained (load_recipe) and the report describes the systems that trained, not what
    today's systems.yaml would resolve to."""
    saved = {
        "system": r.name,
        "fold": r.fold,
        "hash": r.hash,
        "flat": r.flat(),
        "resolved": {
            "system": asdict(r.system),
            # the file's constituent order is the layout's order (a JSON object's keys are written sorted)
            "layout": {
                "raw": r.layout.raw,
                "order": r.layout.names,
                "path": str(r.layout.path),
                "redirects": r.layout.redirects,
            },
            "preset": r.preset,
            "train": r.train,
            "reads": _reads(r.cfg),
        },
    }
    atomic_write_json(Path(model_dir) / RECIPE, saved)


def read_recipe(model_dir) -> dict | None:
    """The recipe saved beside a trained model (write_recipe), None where there is none (not trained, or trained
    before recipes were saved)."""
    path = Path(model_dir) / RECIPE
    return json.loads(path.read_text()) if path.exists() else None


def load_recipe(model_dir) -> Recipe | None:
    """The Recipe a model in `model_dir` was trained from, rebuilt from its recipe.json and nothing else (no grid
    file, no systems.yaml, no layout file), None where there is none or it predates the full save. Its hash is the
    saved one: checked, so that a hand-edited recipe.json is refused with its path rather than sampled."""
    saved = read_recipe(model_dir)
    if not saved or "resolved" not in saved:
        return None
    res = saved["resolved"]
    system = System(**{**res["system"], "keep": tuple(res["system"]["keep"])})
    raw = res["layout"]["raw"]
    raw = raw | {"constituents": {n: raw["constituents"][n] for n in res["layout"]["order"]}}
    lay = Layout.from_raw(raw, res["layout"]["path"])
    if res["layout"]["redirects"]:
        lay = lay.with_stages(res["layout"]["redirects"])
    r = Recipe(saved["system"], system, lay, res["preset"], res["train"], saved["fold"], res["reads"])
    if r.hash != saved["hash"]:
        raise ParamsError(
            f"{Path(model_dir) / RECIPE}: its contents do not match its hash ({saved['hash']}): the file was edited "
            "after training; retrain the model (notebook 03) rather than edit its recipe"
        )
    return r


def trained_flat(cfg, system_name: str, model_dir, fold: int | None = None) -> dict:
    """Recipe.flat of the model in `model_dir` as saved (any recipe.json, also one from before the full save, which
    keeps only `flat`): what the report's differences describe; resolved from the grid files only where nothing
    trained (a reference row) or the model predates saved recipes."""
    saved = read_recipe(model_dir)
    return saved["flat"] if saved else resolve_recipe(cfg, system_name, fold).flat()


def trained_recipe(cfg, system_name: str, model_dir, fold: int | None = None) -> Recipe:
    """The Recipe of the model in `model_dir` (load_recipe), which evaluation samples and decodes with; a model
    trained before recipes were saved in full is resolved from the grid files, as it was then."""
    return load_recipe(model_dir) or resolve_recipe(cfg, system_name, fold)


def scored_recipes(cfg, names=None) -> dict[str, Recipe]:
    """{system: Recipe} of the grid's systems (or `names`) as notebook 04 scored them (the recipe.json evaluation
    writes beside its outputs), so the report and the controls describe what ran, not what today's systems.yaml
    says. A system not scored (or scored before evaluation saved its recipe) is resolved from the grid files; one
    that does not resolve is left out (its rows keep their name)."""
    out, results = {}, Results.of(cfg)
    for name in dict.fromkeys(cfg["systems"] if names is None else names):
        try:
            out[name] = load_recipe(results.eval(name)) or resolve_recipe(cfg, name)
        except ParamsError:
            continue
    return out
