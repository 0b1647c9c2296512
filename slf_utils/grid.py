"""The ablation-grid runner: papermill-executes 01 -> 02 once, 03 -> 04 for every system, then 05.

Each step is a notebook run with the papermill parameters (params_file, system, overrides). Its executed notebook,
log and run record (status, hash of the parameters it depends on, timings, error) are saved beside its outputs, so
an interrupted grid resumes where it stopped and a changed parameter reruns only the steps that depend on it.
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
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

from slf_utils.config import ROOT, atomic_write_json, deep_merge, default, exists, load_params, params_hash

NOTEBOOKS = ROOT / "notebooks"
NOTEBOOK = {
    "preprocess": "01_preprocess.ipynb",
    "features": "02_extract_features.ipynb",
    "train": "03_train.ipynb",
    "evaluate": "04_evaluate.ipynb",
    "report": "05_report.ipynb",
}
# The parameter sections each step reads; with its upstream steps' hashes they decide whether it must rerun.
READS = {
    "preprocess": ("data", "preprocess"),
    "features": ("features",),
    "train": ("layout", "layout_drop", "systems_file", "model", "train"),
    "evaluate": ("evaluate",),
    "report": ("report", "systems"),
}
FILE_KEYS = ("layout", "systems_file")  # hash the contents of these files, not only their paths


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

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.system}" if self.system else self.kind

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


def _step_hash(kind: str, cfg: dict, upstream: list[str], system: str | None) -> str:
    part = {k: cfg.get(k) for k in READS[kind]}
    part.update({f"{k}_content": _file_digest(cfg[k]) for k in FILE_KEYS if k in part})
    return params_hash(
        {
            "kind": kind,
            "system": system,
            "params": part,
            "upstream": upstream,
            "notebook": _file_digest(NOTEBOOKS / NOTEBOOK[kind]),
        }
    )


def plan(params_file, overrides: dict | None = None, only: str | None = None) -> tuple[dict, list[Step]]:
    """The steps of a grid in dependency order (each after the steps it needs)."""
    cfg = load_params(params_file, overrides)
    results = Path(cfg["results"])
    systems = list(cfg["systems"])
    if exists(only):
        if only not in systems:
            raise SystemExit(f"--only {only}: not a system of {params_file} (systems: {', '.join(systems)})")
        systems = [only]
    untrained = _untrained_systems(cfg)
    pre = Step("preprocess", None, _step_hash("preprocess", cfg, [], None), results / "runs")
    feat = Step("features", None, _step_hash("features", cfg, [pre.hash], None), results / "runs", [pre.name])
    steps, evals = [pre, feat], []
    for s in systems:
        sys_over = deep_merge(overrides or {}, cfg["system_overrides"].get(s, {}))
        scfg = load_params(params_file, sys_over)
        tr = Step(
            "train",
            s,
            _step_hash("train", scfg, [feat.hash], s),
            results / s / "runs",
            [feat.name],
            sys_over,
            priority=int(scfg["train"]["steps"]),
        )
        # a reference row trains nothing: no notebook 03; the train hash still stands for what it reads (the
        # systems file, the model preset's output size)
        upstream = feat if s in untrained else tr
        ev = Step(
            "evaluate", s, _step_hash("evaluate", scfg, [tr.hash], s), results / s / "runs", [upstream.name], sys_over
        )
        steps += [ev] if s in untrained else [tr, ev]
        evals.append(ev)
    if not exists(only):
        rep_hash = _step_hash("report", cfg, [e.hash for e in evals], None)
        steps.append(Step("report", None, rep_hash, results / "runs", [e.name for e in evals]))
    return cfg, steps


def _untrained_systems(cfg) -> set:
    """Systems of the grid without a model (mode reference, or none in older systems files)."""
    from slf_utils.layout import load_layout, load_systems

    systems = load_systems(cfg["systems_file"], load_layout(cfg))
    return {s for s in cfg["systems"] if s in systems and systems[s].mode in ("reference", "none")}


def execute(step: Step, params_file: str, overrides: dict, threads: int, *upstream_ok: bool) -> bool:
    """Run one step's notebook with papermill (on a Dask worker or in this process); returns success."""
    import papermill as pm

    if step.is_done():
        return True
    if step.kind != "report" and not all(upstream_ok):
        _write_record(step, "skipped", error={"ename": "UpstreamFailed", "evalue": "a step it needs failed"})
        return False
    # The kernel inherits this environment: one BLAS/torch thread per worker, so parallel steps don't fight.
    os.environ.update(
        {
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
            "SLF_THREADS": str(threads),
            "TQDM_MININTERVAL": "10",
            # torch/imagen-pytorch deprecation notices would otherwise fill the terminal once per notebook
            "PYTHONWARNINGS": os.environ.get("PYTHONWARNINGS", "ignore::FutureWarning"),
        }
    )
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
            pm.execute_notebook(
                str(nb),
                str(out),
                parameters=parameters,
                cwd=str(ROOT),
                kernel_name="python3",
                progress_bar=False,
                log_output=True,
                stdout_file=log_file,
                stderr_file=log_file,
            )
    except pm.PapermillExecutionError as e:
        err = {"cell": e.exec_count, "ename": e.ename, "evalue": str(e.evalue)[:2000]}
        _write_record(step, "failed", started=started, error=err)
        return False
    except Exception as e:  # a kernel that died, a notebook that could not be read: report, don't stop the grid
        _write_record(step, "failed", started=started, error={"ename": type(e).__name__, "evalue": str(e)[:2000]})
        return False
    _write_record(step, "done", started=started)
    return True


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
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, memory_limit=0, dashboard_address=None)
        return Client(cluster)


def _dispatch(client, steps: list[Step], params_file, overrides, threads):
    """List scheduling: whenever a worker is free, submit the ready step with the highest priority. Submitting the
    whole graph at once lets Dask queue a ready training behind another on a busy worker while a free one takes an
    evaluation (measured: one core idle for the last 4.6 of 30 minutes)."""
    from dask.distributed import wait

    ok, pending, running = {}, list(steps), {}
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
            print(f"[grid] {s.name}: {s.record().get('status')}", flush=True)
    return ok


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
    params_file = str(cfg["params_file"])
    if scheduler == "sequential" and client is None:
        ok = {}
        for s in steps:
            ok[s.name] = execute(s, params_file, overrides, threads, *[ok[d] for d in s.deps])
            print(f"[grid] {s.name}: {s.record().get('status')}", flush=True)
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
    report = Path(cfg["results"]) / "report"
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
