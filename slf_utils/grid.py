"""The ablation-grid runner: papermill-executes 01 -> 02 once, 03 -> 04 for every system, then 05.

A grid with a system that reads a Speech2Face stage (`face_embedding`, `voice_face_embedding`: a kept constituent's
or a direct decoder's `train_on` source stage) also runs the voice encoder (notebook 06) once after 02; the trainings
of those systems wait for it (and rerun when it changes), the others do not. In the same way a grid with a system
that reads the `contrastive_speech` stage runs the contrastive pre-training (notebook 07) once after 02 (after the
voice encoder too where both run and its face encoder is the recogniser, whose face_embedding stage notebook 06 also
writes), and the trainings of those systems wait for it.

Each step is a notebook run (slf_utils.notebook_run) with the papermill parameters (params_file, system, overrides). Its
executed notebook, log and run record (status, hash of what it depends on and the list of those inputs, timings, error)
are saved beside its outputs, so an interrupted grid resumes where it stopped and a changed parameter reruns only the
steps that depend on it. The hash covers the parameters a step reads, the contents of the files it reads (manifest, test
list, model presets, layout, systems file: `_input_files`), its upstream steps' hashes and its notebook; `status` and
`--dry-run` name what changed for a stale step.
`grid.reuse` lists other grids' results folders: a step done there with the same hash is copied, not run (`reused`).
Steps run on a Dask distributed client: a local cluster by default, or a scheduler address (a SLURM cluster through
dask-jobqueue, one GPU per worker); `sequential` runs them in this process, in order.

    python -m slf_utils.grid run params/demo.yaml [--only SYSTEM] [--dry-run] [--scheduler ADDR|local|sequential]
    python -m slf_utils.grid status params/demo.yaml
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from slf_utils.basics import ROOT, _get, atomic_write_json, deep_merge, default, exists, flat, params_hash, resolve
from slf_utils.config import corpus_builder, load_params, parse_set, seed_overrides, seeds_of
from slf_utils.layout import load_layout, load_systems
from slf_utils.locks import WriterLock
from slf_utils.notebook_run import kernel_environ, run_notebook
from slf_utils.results import Results

NOTEBOOKS = ROOT / "notebooks"
NOTEBOOK = {
    "preprocess": "01_preprocess.ipynb",
    "features": "02_extract_features.ipynb",
    "train": "03_train.ipynb",
    "evaluate": "04_evaluate.ipynb",
    "report": "05_report.ipynb",
    "voice_encoder": "06_voice_encoder.ipynb",
    "contrastive": "07_contrastive.ipynb",
}
# The parameter sections each step reads; with its upstream steps' hashes they decide whether it must rerun.
READS = {
    "preprocess": ("data", "preprocess"),
    "features": ("features",),
    "train": ("layout", "layout_drop", "systems_file", "model", "train"),
    "evaluate": ("evaluate",),
    "report": ("report", "systems"),
    # the stages it writes depend on the recogniser's detection settings (and eigenfaces' fit), not on the sweep
    "voice_encoder": (
        "speech2face",
        "crossfit",
        "evaluate.detector_backend",
        "evaluate.upscale_to",
        "evaluate.eigenfaces_size",
        "evaluate.eigenfaces_components",
        "evaluate.eigenfaces_crop",
    ),
}
# the contrastive pre-training (notebook 07) reads its section; with `face_encoder: recogniser` also what the
# face_embedding stage depends on (READS["voice_encoder"] less the voice encoder's own settings): contrastive_reads
READS["contrastive"] = ("contrastive", "crossfit")
# a direct decoder's training (slf_utils.face_decoder) reads its own section instead of `train`
READS_DIRECT_TRAIN = ("layout", "layout_drop", "systems_file", "model", "face_decoder")
# store stages notebook 06 writes (slf_utils.voice_encoder.FACE_STAGE, VOICE_STAGE)
VOICE_ENCODER_STAGES = ("face_embedding", "voice_face_embedding")
VOICE_ENCODER_PRIORITY = 10**9  # four trainings may wait for it: it goes first
# store stages notebook 07 writes (slf_utils.contrastive.STAGE)
CONTRASTIVE_STAGES = ("contrastive_speech",)
STORE_STEPS = ("preprocess", "features", "voice_encoder", "contrastive")  # steps whose output is the store


@dataclass
class Step:
    kind: str
    system: str | None
    hash: str
    run_dir: Path
    deps: list[str] = field(default_factory=list)
    overrides: dict = field(default_factory=dict)
    priority: int = 0  # ready steps with higher priority go first: every training (longest first), then the
    # evaluations, so the last steps to run are the short ones and the workers finish together
    results: Path | None = None  # the grid's results folder
    reuse: tuple = ()  # other grids' results folders (grid.reuse) to copy this step from when it is done there
    inputs: dict = field(default_factory=dict)  # what the hash covers, by name ({dotted key: value}): kept in the
    # run record, so a stale step can say what changed
    seed: int | None = None  # a training seed after the grid's first (grid.seeds): its own folder and name

    @property
    def name(self) -> str:
        name = f"{self.kind}:{self.system}" if self.system else self.kind
        return name if self.seed is None else f"{name}@seed{self.seed}"

    @property
    def record_path(self) -> Path:
        return self.run_dir / f"{Path(NOTEBOOK[self.kind]).stem}.json"

    def record(self) -> dict:
        try:
            return json.loads(self.record_path.read_text())
        except (OSError, ValueError):
            return {}

    def is_done(self) -> bool:
        r = self.record()
        return r.get("status") == "done" and r.get("hash") == self.hash


def _file_digest(path) -> str:
    try:
        return hashlib.sha1(Path(path).read_bytes()).hexdigest()[:12]
    except OSError:
        return "missing"


def _input_files(cfg: dict, reads) -> dict:
    """{key naming it: path} of the files in params/ and data/ a step reads: their contents enter its hash, not only
    their names (an edited manifest, test list or preset reruns what reads it). A demo corpus manifest that
    preprocessing builds (data.demo_corpus.build, or data.known_answer.build: config.corpus_builder) is that step's
    output, not its input: what decides its contents, data.demo_corpus or data.known_answer, is hashed with `data`,
    and hashing the file would make the step stale once it has built it (a hand-edited built manifest is therefore
    not noticed: set build: false to run from one). The same holds for the test list of VoxCeleb2 trees made from
    the demo corpus (data.kind voxceleb with data.demo_corpus.build)."""
    files = {k: cfg[k] for k in ("layout", "systems_file") if k in reads}
    if "data" in reads:
        data = cfg["data"]
        if data["kind"] == "manifest" and exists(data["manifest"]) and not corpus_builder(data):
            files["data.manifest"] = data["manifest"]
        if data["kind"] == "voxceleb" and exists(data["test_list"]) and not data["demo_corpus"]["build"]:
            files["data.test_list"] = data["test_list"]
    if "model" in reads:  # the model presets (recipe.resolve_preset's default file)
        files["model.presets_file"] = resolve(cfg["model"].get("presets_file", "params/presets.yaml"))
    return files


def _step(kind: str, system: str | None, cfg: dict, up: list[Step], run_dir: Path, reads=None, **kw) -> Step:
    """A step whose hash covers the parameters it reads (READS, or `reads`), the contents of the files it reads, the
    hashes of the steps `up` whose outputs it reads (its deps unless given) and its notebook."""
    part = {k: _get(cfg, k) for k in default(reads, READS[kind])}
    part.update({f"{k}_content": _file_digest(f) for k, f in _input_files(cfg, part).items()})
    notebook = _file_digest(NOTEBOOKS / NOTEBOOK[kind])
    h = params_hash(
        {"kind": kind, "system": system, "params": part, "upstream": [u.hash for u in up], "notebook": notebook}
    )
    inputs = {**flat(part), **{f"upstream {u.name}": u.hash for u in up}, "notebook": notebook}
    kw.setdefault("deps", [u.name for u in up])
    return Step(kind, system, h, run_dir, inputs=json.loads(json.dumps(inputs, default=str)), **kw)


def _why(step: Step, rec: dict) -> str:
    """What changed since a stale step ran: the inputs whose values differ from its run record's."""
    if "inputs" not in rec:
        return "hash changed (its record predates the list of inputs)"
    old, new = rec["inputs"], step.inputs
    changed = [k for k in {**old, **new} if k not in old or k not in new or old[k] != new[k]]
    shown = ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
    return f"changed: {shown}" if changed else "hash changed"


def plan(params_file, overrides: dict | None = None, only: str | None = None) -> tuple[dict, list[Step]]:
    """The steps of a grid in dependency order (each after the steps it needs)."""
    cfg = load_params(params_file, overrides)
    results = Results.of(cfg)
    systems = list(cfg["systems"])
    if exists(only):
        if only not in systems:
            raise SystemExit(f"--only {only}: not a system of {params_file} (systems: {', '.join(systems)})")
        systems = [only]
    specs = _system_specs(cfg)
    untrained = _untrained_systems(cfg, specs)
    speech2face = voice_encoder_systems(cfg, specs, systems)
    pre = _step("preprocess", None, cfg, [], results.steps)
    feat = _step("features", None, cfg, [pre], results.steps)
    steps, evals = [pre, feat], []
    if speech2face:
        ve = _step("voice_encoder", None, cfg, [feat], results.encoder("voice_encoder") / "runs")
        ve.priority = VOICE_ENCODER_PRIORITY
        steps.append(ve)
    contrastive = contrastive_systems(cfg, specs, systems)
    if contrastive:
        # the recogniser face encoder reads the face_embedding stage: after notebook 06 where it runs too
        ct_up = [feat, ve] if speech2face and cfg["contrastive"]["face_encoder"] == "recogniser" else [feat]
        ct = _step("contrastive", None, cfg, ct_up, results.encoder("contrastive") / "runs", contrastive_reads(cfg))
        ct.priority = VOICE_ENCODER_PRIORITY
        steps.append(ct)
    decoders = {}  # (train_on, face_decoder section) -> the train step of the first direct system with them
    runs = []  # (system, seed after the first or None, its overrides): every trained system once per seed
    for s in systems:
        base = deep_merge(overrides or {}, cfg["system_overrides"].get(s, {}))
        scfg = load_params(params_file, base)
        seeds = seeds_of(scfg) if exists(scfg["grid"]["seeds"]) else []
        if not seeds or s in untrained:  # a reference row has no training to repeat
            runs.append((s, None, base))
            continue
        runs += [(s, None if i == 0 else x, deep_merge(base, seed_overrides(x))) for i, x in enumerate(seeds)]
    for s, seed, sys_over in runs:
        scfg = load_params(params_file, sys_over)
        run_dir = Results.of(scfg).runs(s)
        up = [feat, *([ve] if s in speech2face else []), *([ct] if s in contrastive else [])]
        direct = s in specs and specs[s].decoder == "direct"
        tr = _step(
            "train",
            s,
            scfg,
            up,
            run_dir,
            READS_DIRECT_TRAIN if direct else None,
            overrides=sys_over,
            seed=seed,
            # a direct decoder trains in seconds to minutes: after the diffusion trainings
            priority=int(scfg["face_decoder"]["steps"] if direct else scfg["train"]["steps"]) // (100 if direct else 1),
        )
        if direct:  # two direct systems with the same training train one decoder: the second copies the first's
            key = (specs[s].train_on, params_hash(scfg["face_decoder"]))
            if key in decoders:
                tr.deps.append(decoders[key])
            decoders.setdefault(key, tr.name)
        # a reference row trains nothing: no notebook 03; the train hash still stands for what it reads (the
        # systems file, the model preset's output size)
        upstream = feat if s in untrained else tr
        ev = _step("evaluate", s, scfg, [tr], run_dir, deps=[upstream.name], overrides=sys_over, seed=seed)
        steps += [ev] if s in untrained else [tr, ev]
        evals.append(ev)
    if not exists(only):
        steps.append(_step("report", None, cfg, evals, results.steps))
    for st in steps:
        st.results, st.reuse = results.root, tuple(cfg["grid"]["reuse"])
    return cfg, steps


def _system_specs(cfg) -> dict:
    return load_systems(cfg["systems_file"], load_layout(cfg))


def _untrained_systems(cfg, specs=None) -> set:
    """Systems of the grid without a model (mode reference, or none in older systems files)."""
    systems = specs if exists(specs) else _system_specs(cfg)
    return {s for s in cfg["systems"] if s in systems and systems[s].mode in ("reference", "none")}


def voice_encoder_systems(cfg, specs=None, systems=None) -> set:
    """Systems of `systems` (default the grid's) that read a stage the voice encoder (notebook 06) writes: through
    a kept constituent's source stage or a direct decoder's `train_on`."""
    specs = specs if exists(specs) else _system_specs(cfg)
    layout = load_layout(cfg)
    return {
        s
        for s in default(systems, cfg["systems"])
        if s in specs and set(layout.system_stages(specs[s])) & set(VOICE_ENCODER_STAGES)
    }


def contrastive_systems(cfg, specs=None, systems=None) -> set:
    """Systems of `systems` (default the grid's) that read a stage the contrastive pre-training (notebook 07)
    writes: through a kept constituent's source stage or a direct decoder's `train_on`."""
    specs = specs if exists(specs) else _system_specs(cfg)
    layout = load_layout(cfg)
    return {
        s
        for s in default(systems, cfg["systems"])
        if s in specs and set(layout.system_stages(specs[s])) & set(CONTRASTIVE_STAGES)
    }


def contrastive_reads(cfg) -> tuple:
    """What notebook 07's outputs depend on: its section and, with the recogniser face encoder, the face_embedding
    stage's settings."""
    if cfg["contrastive"]["face_encoder"] != "recogniser":
        return READS["contrastive"]
    face = ("speech2face.face_model", *(k for k in READS["voice_encoder"] if k.startswith("evaluate.")))
    return (*READS["contrastive"], *face)


def execute(step: Step, params_file: str, overrides: dict, threads: int, *upstream_ok: bool) -> bool:
    """Run one step's notebook with papermill (on a Dask worker or in this process); returns success."""
    import papermill as pm

    if step.is_done():
        return True
    if step.kind != "report" and not all(upstream_ok):
        _write_record(step, "skipped", error={"ename": "UpstreamFailed", "evalue": "a step it needs failed"})
        return False
    if reused(step):
        return True
    os.environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    os.environ.update(kernel_environ(threads))  # the kernel inherits it
    step.run_dir.mkdir(parents=True, exist_ok=True)
    nb = NOTEBOOKS / NOTEBOOK[step.kind]
    out = step.run_dir / nb.name
    log = step.run_dir / f"{nb.stem}.log"
    parameters = {"params_file": str(params_file), "system": step.system, "overrides": step.overrides or overrides}
    atomic_write_json(step.run_dir / f"{nb.stem}.parameters.json", parameters)
    started = time.time()
    _write_record(step, "running", started=started)
    try:
        with open(log, "w") as log_file:
            run_notebook(nb, out, parameters, log_file)
    except pm.PapermillExecutionError as e:
        err = {"cell": e.exec_count, "ename": e.ename, "evalue": str(e.evalue)[:2000]}
        _write_record(step, "failed", started=started, error=err)
        return False
    except Exception as e:  # a kernel that died, a notebook that could not be read: report, don't stop the grid
        _write_record(step, "failed", started=started, error={"ename": type(e).__name__, "evalue": str(e)[:2000]})
        return False
    _write_record(step, "done", started=started)
    return True


def _outputs(step: Step) -> list[str]:
    """What a step writes besides its run records, relative to the results folder."""
    return {
        "preprocess": ["store"],
        "features": [],  # into the store, which came with preprocess
        "voice_encoder": [f"voice_encoder/{n}" for n in ("model", "metrics.csv", "hits.csv", "provenance.json")],
        "contrastive": [f"contrastive/{n}" for n in ("model", "metrics.csv", "hits.csv", "provenance.json")],
        "train": [f"{step.system}/model" if step.seed is None else f"{step.system}/seed{step.seed}/model"],
        "evaluate": [f"{step.system}/eval" if step.seed is None else f"{step.system}/seed{step.seed}/eval"],
    }[step.kind]


def _link_tree(src: Path, dst: Path):
    """Copy a file or folder, hard-linking files (every writer of the workbook replaces a file by renaming a new one
    over it, so a link is never written through), the SQLite index copied (it is written in place)."""

    def link(a, b):
        if Path(a).name.startswith("store.sqlite"):
            return shutil.copy2(a, b)
        try:
            os.link(a, b)
        except OSError:  # another filesystem
            shutil.copy2(a, b)
        return b

    if src.is_dir():
        shutil.copytree(src, dst, copy_function=link, ignore=shutil.ignore_patterns("*-shm"))
    elif src.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        link(src, dst)


def reused(step: Step) -> bool:
    """grid.reuse: copy `step` from another grid's results folder where the same step (same relative place) is done
    with the same hash, i.e. the same parameters, upstream steps and notebook. The store travels with preprocessing
    (only into a grid without a store yet), so the steps that write into the store (features, voice encoder) are
    reused only from the folder the store came from. The report is always made here. Returns whether it was."""
    if step.kind == "report" or not step.reuse or not exists(step.results):
        return False
    results = Path(step.results)
    stem = Path(NOTEBOOK[step.kind]).stem
    rel = step.run_dir.relative_to(results)
    for root in map(Path, step.reuse):
        if root.resolve() == results.resolve():
            continue
        try:
            rec = json.loads((root / rel / f"{stem}.json").read_text())
        except (OSError, ValueError):
            continue
        if rec.get("status") != "done" or rec.get("hash") != step.hash:
            continue
        if step.kind == "preprocess" and (results / "store").exists():
            continue
        if step.kind in STORE_STEPS[1:]:
            pre = Step("preprocess", None, "", results / "runs").record()
            if pre.get("reused_from") != str(root):
                continue
        for out in _outputs(step):
            if (results / out).is_dir():
                shutil.rmtree(results / out)  # not done here: partial or stale
            _link_tree(root / out, results / out)
        step.run_dir.mkdir(parents=True, exist_ok=True)
        for suffix in (".ipynb", ".log", ".parameters.json"):
            if (root / rel / f"{stem}{suffix}").exists():
                shutil.copy2(root / rel / f"{stem}{suffix}", step.run_dir / f"{stem}{suffix}")
        atomic_write_json(step.record_path, {**rec, "reused_from": str(root), "reused_at": time.time()})
        return True
    return False


def _write_record(step: Step, status: str, started: float | None = None, error: dict | None = None):
    now = time.time()
    rec = {
        "step": step.kind,
        "system": step.system,
        "hash": step.hash,
        "status": status,
        "pid": os.getpid(),
        "host": os.uname().nodename,
        "started": started,
        "ended": now if status != "running" else None,
        "seconds": round(now - started, 1) if exists(started) and status != "running" else None,
        "notebook": str(step.run_dir / NOTEBOOK[step.kind]),
        "error": error,
        "inputs": step.inputs,
    }
    atomic_write_json(step.record_path, rec)


def _client(scheduler: str | None, workers: int | None, threads: int):
    from dask.distributed import Client, LocalCluster

    if exists(scheduler) and scheduler != "local":
        return Client(scheduler)
    import dask

    n = default(workers, max(1, (os.cpu_count() or 1) // threads))
    # Dask's stack profiler and its 20 ms event-loop ticks cost ~20 % of a 2-core machine while the notebooks
    # compute; a grid's steps last minutes, so slow ticks lose nothing (measured: 0.9 s -> 0.07 s CPU per idle
    # worker over 15 s)
    quiet = {
        "distributed.worker.profile.enabled": False,
        "distributed.admin.tick.interval": "1s",
        "distributed.admin.system-monitor.interval": "2s",
    }
    with dask.config.set(quiet):
        # ":0": a free port for the dashboard, so a second grid on the machine starts without a port warning
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, memory_limit=0, dashboard_address=":0")
        return Client(cluster)


def _dispatch(client, steps: list[Step], params_file, overrides, threads):
    """List scheduling: whenever a worker is free, submit the ready step with the highest priority. Submitting the
    whole graph at once lets Dask queue a ready training behind another on a busy worker while a free one takes an
    evaluation (measured: one core idle for the last 4.6 of 30 minutes)."""
    from dask.distributed import wait

    ok, pending, running, started = {}, list(steps), {}, time.time()
    while pending or running:
        slots = max(1, sum(w["nthreads"] for w in client.scheduler_info()["workers"].values()))
        ready = sorted((s for s in pending if all(d in ok for d in s.deps)), key=lambda s: -s.priority)
        for s in ready[: max(0, slots - len(running))]:
            fut = client.submit(
                execute, s, params_file, overrides, threads, *[ok[d] for d in s.deps], key=f"{s.name}-{time.time_ns()}"
            )
            running[fut] = s
            pending.remove(s)
        done = wait(list(running), return_when="FIRST_COMPLETED").done
        for fut in done:
            s = running.pop(fut)
            ok[s.name] = bool(fut.result())
            print(progress_line(s, steps, ok, started, slots), flush=True)
    return ok


def progress_line(step: Step, steps: list[Step], ok: dict, started: float, slots: int = 1) -> str:
    """`[grid] 7/23 train:full_input: done in 552 s · 14 min elapsed · about 31 min left`. What is left is estimated
    from the steps that ran: each step not yet finished costs the median time of the finished steps of its kind (of
    any kind where none has finished), shared over `slots` workers; steps skipped as done cost nothing."""
    rec = step.record()
    secs = {s.name: s.record().get("seconds") for s in steps if s.name in ok}
    ran = [(s.kind, secs[s.name]) for s in steps if s.name in ok and secs[s.name]]
    by_kind = {k: float(np.median([t for kk, t in ran if kk == k])) for k in {k for k, _ in ran}}
    overall = float(np.median([t for _, t in ran])) if ran else None
    left = [by_kind.get(s.kind, overall) for s in steps if s.name not in ok]
    took = f" in {rec['seconds']:.0f} s" if rec.get("seconds") else ""
    line = f"[grid] {len(ok)}/{len(steps)} {step.name}: {rec.get('status')}{took}"
    line += f" · {_minutes(time.time() - started)} elapsed"
    if left and all(exists(t) for t in left):
        line += f" · about {_minutes(sum(left) / max(1, slots))} left"
    return line


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def run(
    params_file,
    overrides: dict | None = None,
    only: str | None = None,
    dry_run: bool = False,
    scheduler: str | None = None,
    workers: int | None = None,
    client=None,
) -> pd.DataFrame:
    """Run (or resume) a grid; returns the status table. `scheduler`: None (from params: grid.scheduler, else a
    local cluster), 'local', 'sequential', or a Dask scheduler address."""
    overrides = overrides or {}
    cfg, steps = plan(params_file, overrides, only)
    scheduler = default(scheduler, cfg["grid"]["scheduler"])
    threads = int(cfg["grid"]["threads_per_worker"])
    if dry_run:
        return status_table(steps)
    # one grid run per results folder (released when run returns or the process dies); the notebooks it runs take
    # the store's stage locks themselves, so this lock never refuses the grid's own kernels
    lock = WriterLock(Results.of(cfg).lock, f"grid run {cfg['params_file']}").acquire()  # noqa: F841
    params_file = str(cfg["params_file"])
    if scheduler == "sequential" and client is None:
        ok, started = {}, time.time()
        for s in steps:
            ok[s.name] = execute(s, params_file, overrides, threads, *[ok[d] for d in s.deps])
            print(progress_line(s, steps, ok, started), flush=True)
    else:
        own = client is None
        client = client or _client(scheduler, default(workers, cfg["grid"]["workers"]), threads)
        try:
            _dispatch(client, steps, params_file, overrides, threads)
        finally:
            if own:
                cluster = client.cluster
                client.close()
                if exists(cluster):
                    cluster.close()
    table = status_table(steps)
    print(table.to_string(index=False))
    return table


def status_table(steps: list[Step]) -> pd.DataFrame:
    rows = []
    for s in steps:
        r = s.record()
        st = r.get("status", "todo")
        if st == "done" and r.get("hash") != s.hash:
            st = "stale"
        if st == "running" and r.get("host") == os.uname().nodename and not _alive(r.get("pid")):
            st = "interrupted"
        err = r.get("error") or {}
        rows.append(
            {
                "step": s.kind,
                "system": s.system or "",
                "status": st,
                "seconds": r.get("seconds"),
                "error": f"cell {err.get('cell')}: {err.get('ename')}: {err.get('evalue', '')[:120]}"
                if err and st in ("failed", "skipped")
                else "",
                "why": _why(s, r) if st == "stale" else "",
            }
        )
    return pd.DataFrame(rows)


def status(params_file, overrides: dict | None = None) -> pd.DataFrame:
    return status_table(plan(params_file, overrides)[1])


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
        return True
    except (OSError, TypeError, ValueError):
        return False


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m slf_utils.grid", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run or resume a grid")
    s = sub.add_parser("status", help="print what is done, running, failed")
    for p in (r, s):
        p.add_argument("params_file")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a parameter")
    r.add_argument("--only", metavar="SYSTEM", help="run 01, 02 and this system's 03 and 04 only")
    r.add_argument("--dry-run", action="store_true", help="print the plan and what would run")
    r.add_argument("--scheduler", help="'local' (default), 'sequential', or a Dask scheduler address")
    r.add_argument("--workers", type=int, help="local cluster size (default: cores / threads_per_worker)")
    a = ap.parse_args(argv)
    overrides = parse_set(a.set)
    if a.cmd == "status":
        print(status(a.params_file, overrides).to_string(index=False))
        return 0
    t0 = time.time()
    table = run(a.params_file, overrides, only=a.only, dry_run=a.dry_run, scheduler=a.scheduler, workers=a.workers)
    if a.dry_run:
        table["action"] = ["skip" if st == "done" else "run" for st in table["status"]]
        print(table.to_string(index=False))
        return 0
    cfg = load_params(a.params_file, overrides)
    report = Results.of(cfg).report
    for title, path in (
        ("Identity protocol, with the reference rows", report / "headline.md"),
        ("Does each system learn?", report / "learning_checks.md"),
    ):
        if path.exists():
            print(f"\n{title} ({path})\n{path.read_text()}")
    print(f"Figures and tables: {report}/ (summary: {report / 'summary.md'}). This run: {time.time() - t0:.0f} s.")
    return 0 if (table["status"] == "done").all() else 1


if __name__ == "__main__":
    sys.exit(main())
