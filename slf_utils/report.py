"""The report (notebook 05): from whatever `<results>/<system>/eval/metrics.csv` exist, the paper's Fig. 8 (recall vs
conditional scale with bootstrap bands, the chance line and the reference rows), its tables (each system at its best
scale and at a chosen scale), paired differences between systems, the significance S of each input (Eq. 3/4) beside
the paper's values, and sample grids (Fig. 6, 7). This module is the run: it loads the grid's results (every seed of
every system), chooses the scales, and writes the files; the tables (report_tables, differences), figures, summary and
significance are built in their own modules.

Everything is shown under both recall protocols (retrieval: `identity` first, the main one, then `paper`); each
protocol picks its own best scales, on the validation clips where there are some. Reference rows have no scale: they
are horizontal lines in the figure and rows in every table. A system with a direct decoder (slf_utils.face_decoder)
has no conditional scale either (scale NaN): one point, judged by the learning checks like any trained system. The
learning checks read the identity protocol of the clips that choose wherever those can hit under it (lead_protocol).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from slf_utils import findings, recipe
from slf_utils.basics import atomic_write_json, atomic_write_text, deep_merge, default, exists, provenance
from slf_utils.config import FACTORS, seed_overrides, seeds_of
from slf_utils.differences import (
    difference_pairs,
    differences_table,
    pretty_differences,
    pretty_recipe_differences,
)
from slf_utils.figures import plot_recall_vs_scale, plot_sample_grid, plot_scale_grid, save_figure
from slf_utils.folds import n_folds
from slf_utils.report_tables import (
    NOTE_MARK,
    REPORT_EXTRAS,
    combine_seeds,
    headline_table,
    learning_checks,
    note_lines,
    pretty_checks,
    pretty_headline,
    pretty_seeds,
    pretty_table,
    protocol_tables,
    seed_table,
)
from slf_utils.results import Results
from slf_utils.retrieval import PROTOCOLS
from slf_utils.significance import (
    INPUTS,
    band,
    bootstrap_significance,
    describe_weights,
    fmt_s,
    k_weights,
    pretty_significance,
    recall_increase,
    significance,
)
from slf_utils.summary import _seed_lines, write_summary
from slf_utils.tables import (
    METRIC_COLUMNS,
    at_protocol,
    at_split,
    hits_at,
    load_metrics,
    markdown_table,
    recall_at,
)
from slf_utils.tables import load_hits as read_hits


def system_runs(cfg, system) -> list[tuple[int, Path]]:
    """(seed, eval folder) of every run of a system: one per seed of grid.seeds (its system_overrides merged), or
    the one run at train.seed."""
    scfg = deep_merge(cfg, (cfg.get("system_overrides") or {}).get(system) or {})
    return [(x, Results.of(deep_merge(scfg, seed_overrides(x))).eval(system)) for x in seeds_of(scfg)]


def load_all(cfg) -> pd.DataFrame:
    """Every finished `<system>/eval/metrics.csv` of cfg['systems'], each seed's (system_runs), in one tidy table
    with a `seed` column (missing ones skipped)."""
    frames = [
        load_metrics(d / "metrics.csv").assign(seed=x)
        for name in cfg["systems"]
        for x, d in system_runs(cfg, name)
        if (d / "metrics.csv").exists()
    ]
    if not frames:
        return pd.DataFrame(columns=[*METRIC_COLUMNS, "seed"])
    return pd.concat(frames, ignore_index=True)


def load_hits(cfg, system) -> pd.DataFrame | None:
    """A system's hits.csv of every seed, with a `seed` column (None without any)."""
    frames = [
        read_hits(d / "hits.csv").assign(seed=x) for x, d in system_runs(cfg, system) if (d / "hits.csv").exists()
    ]
    return pd.concat(frames, ignore_index=True) if frames else None


def _systems(cfg, names=None) -> dict:
    """{system: System} as evaluation scored it (recipe.scored_recipes): the grid's systems, or `names`."""
    return {k: r.system for k, r in recipe.scored_recipes(cfg, names).items()}


def system_titles(cfg, names=None) -> dict:
    try:
        return {k: v.title for k, v in _systems(cfg, names).items()}
    except Exception:  # noqa: BLE001  (titles are cosmetic: a report from metrics alone still works)
        return {}


def system_modes(cfg) -> dict:
    return {k: v.mode for k, v in _systems(cfg).items()}


def system_notes(cfg) -> dict:
    """{system: note} of the systems whose resolved entry has a `note` (a caveat the report must print)."""
    try:
        return {k: v.note for k, v in _systems(cfg).items() if v.note}
    except Exception:  # noqa: BLE001  (notes, like titles, need the systems file; a report from metrics alone works)
        return {}


def best_scales(metrics: pd.DataFrame, guide_min: dict | None = None, by=("recall@1", "recall@3")) -> dict:
    """{system: scale} maximising recall@1 in a protocol view, ties broken by recall@3 then the smaller scale (`by`:
    the metric and its tie-breaker; the known-answer controls choose at their own k, slf_utils.controls).
    `guide_min` {system: g}: for these (the super-resolution systems) only scales whose guide_top1 is at least g
    compete, while any does: a scale at which the outputs no longer reproduce their guide is not a super-resolution
    of that guide, however well it is recognised. Systems without a scale (the reference rows) map to NaN."""
    first, second = by
    out = {}
    for system, m in metrics.groupby("system", sort=False):
        r = m[m["metric"].isin([first, second, "guide_top1"])].pivot_table(
            index="scale", columns="metric", values="value", dropna=False
        )
        if r.empty or first not in r:
            out[system] = np.nan
            continue
        r = r.reset_index().assign(r3=r.get(second, pd.Series(0, index=r.index)).to_numpy())
        g = (guide_min or {}).get(system)
        if exists(g) and "guide_top1" in r and (r["guide_top1"] >= g).any():
            r = r[r["guide_top1"] >= g]
        r = r.sort_values([first, "r3", "scale"], ascending=[False, False, True])
        out[system] = float(r["scale"].iloc[0])
    return out


def lead_protocol(metrics: pd.DataFrame) -> str:
    """The protocol a view of one split is read under: `identity`, unless no query of it can hit under it (one
    gallery clip per speaker, as the paper's 118-clip test list: chance 0), then `paper`. The report reads the
    headline, seeds and sample grids under the test clips' and the learning checks under the choosing clips'
    (VoxCeleb2's validation speakers have 3 clips each: identity, while the test list leads with paper)."""
    chance = metrics[(metrics["metric"] == "chance@1") & (metrics["protocol"] == PROTOCOLS[0])]["value"]
    return PROTOCOLS[0] if chance.empty or chance.max() > 0 else PROTOCOLS[1]


def recipe_differences(cfg, pairs) -> pd.DataFrame:
    """Every way the two systems of each pair differ (recipe.Recipe.flat), with the factor the pair names and whether
    the pair differs in more than it (`one_factor` False: a flag). Columns a, b, factor, key, value_a, value_b,
    within_factor, one_factor."""
    cols = ["a", "b", "factor", "key", "value_a", "value_b", "within_factor", "one_factor"]
    recipes, rows = {}, []
    for a, b, factor in pairs:
        for s in (a, b):
            if s not in recipes:
                fold = 0 if n_folds(cfg) else None  # with identity folds the first's: folds differ only in `fold`
                recipes[s] = recipe.trained_flat(cfg, s, Results.of(cfg).model(s, fold), fold)
        ra, rb = recipes[a], recipes[b]
        allowed = FACTORS.get(factor, ())
        diff = [k for k in dict.fromkeys([*ra, *rb]) if str(ra.get(k)) != str(rb.get(k))]
        within = {k: any(k.startswith(p) for p in allowed) for k in diff}
        one = bool(factor in FACTORS and all(within.values()))
        rows += [[a, b, factor, k, ra.get(k), rb.get(k), within[k], one] for k in diff]
        if not diff:
            rows.append([a, b, factor, "(none)", None, None, True, factor in FACTORS])
    return pd.DataFrame(rows, columns=cols)


def significance_table(
    cfg, metrics: pd.DataFrame, weights: dict, scales_by: str, scale_of: dict, protocol="paper", hits=None
) -> pd.DataFrame:
    """S of every input whose two systems were both evaluated, in the `protocol` view of the metrics, at
    scale_of[system] for each system (`scales_by` says how these scales were chosen). Bootstrap CIs (over
    identities) when the hits of both systems exist (`hits`: {system: hits frame}, default read from disk)."""
    rep = {**REPORT_EXTRAS, **cfg["report"]}
    metrics = at_protocol(metrics, protocol)
    ks = list(weights)
    rows = []
    for key, title, with_sys, without_sys, paper in INPUTS:
        if with_sys not in scale_of or without_sys not in scale_of:
            continue
        sa, sb = scale_of[with_sys], scale_of[without_sys]
        ra, rb = recall_at(metrics, with_sys, sa, ks), recall_at(metrics, without_sys, sb, ks)
        if ra is None or rb is None:
            continue
        s = significance(ra, rb, weights)
        lo = hi = float("nan")
        hits_of = (lambda s: hits.get(s)) if exists(hits) else (lambda s: load_hits(cfg, s))
        ha, hb = hits_at(hits_of(with_sys), sa, protocol), hits_at(hits_of(without_sys), sb, protocol)
        if exists(ha) and exists(hb):
            lo, hi = bootstrap_significance(ha, hb, weights, rep["bootstrap"], rep["seed"])
        row = {
            "protocol": protocol,
            "key": key,
            "input": title,
            "with": with_sys,
            "without": without_sys,
            "scales": scales_by,
            "scale_with": sa,
            "scale_without": sb,
        }
        for k in ks:
            row[f"R_all@{k}"], row[f"R_without@{k}"] = ra[k], rb[k]
            row[f"R_inc@{k}"] = recall_increase(ra[k], rb[k])
        row |= {
            "S": s,
            "S_ci_low": lo,
            "S_ci_high": hi,
            "S_text": fmt_s(s),
            "band": band(s),
            "paper_S": paper,
            "paper_band": band(paper),
            "weights": describe_weights(weights),
        }
        rows.append(row)
    return pd.DataFrame(rows)


def _write_table(out: Path, stem: str, table: pd.DataFrame, pretty: pd.DataFrame) -> dict:
    atomic_write_text(out / f"{stem}.csv", table.to_csv(index=False))
    atomic_write_text(out / f"{stem}.md", markdown_table(pretty))
    return {"csv": out / f"{stem}.csv", "md": out / f"{stem}.md"}


def run(cfg, log=print) -> dict:
    """Notebook 05: write `<results>/report/` from every evaluated system of cfg['systems']. Returns
    {'metrics', 'best' (the identity protocol's best scales), 'best_by_protocol', 'headline', 'checks',
    'differences', 'tables': {name: (table, pretty)}, 'significance': {...}, 'figures': {name: [paths]},
    'summary': path}."""
    rep = {**REPORT_EXTRAS, **cfg["report"]}
    out = Results.of(cfg).report
    per_seed = load_all(cfg)
    hits = {s: load_hits(cfg, s) for s in dict.fromkeys(per_seed["system"])}
    # a system of several seeds enters every table as the mean over seeds, with intervals over identities and seeds
    everything = combine_seeds(per_seed, hits, rep["bootstrap"], rep["seed"]) if len(per_seed) else per_seed
    # every choice (best scales, learning checks) is made on the validation clips, every number reported is of the
    # test clips; a grid without validation clips chooses on the test clips and says so
    metrics, val = at_split(everything, "test"), at_split(everything, "val")
    chosen_on = "val" if len(val) else "test"
    choose = val if len(val) else metrics
    titles = system_titles(cfg)
    result = {
        "metrics": metrics,
        "validation": val,
        "chosen_on": chosen_on,
        "tables": {},
        "significance": {},
        "figures": {},
    }
    found = list(dict.fromkeys(metrics["system"]))
    missing = [s for s in cfg["systems"] if s not in found]
    if missing:
        log(f"report: no metrics yet for {', '.join(missing)}")
    if metrics.empty:
        atomic_write_text(out / "summary.md", "# Report\n\nNo evaluated system yet.\n")
        result["summary"] = out / "summary.md"
        return result

    ks = sorted({int(m.split("@")[1]) for m in metrics["metric"] if m.startswith("recall@")})
    weights = k_weights(rep["k_weights"], ks)
    modes = system_modes(cfg)
    hits = {s: None if (h := hits.get(s)) is None else at_split(h, "test") for s in found}
    lead = result["lead_protocol"] = lead_protocol(metrics)
    main = at_protocol(metrics, lead)
    keep_guide = {s: float(rep["guide_top1_min"]) for s, m in modes.items() if m == "super_resolution"}
    # a system evaluated before validation clips existed (no val rows) falls back to its test rows, and is named
    best_by = {
        p: {**best_scales(at_protocol(metrics, p), keep_guide), **best_scales(at_protocol(choose, p), keep_guide)}
        for p in PROTOCOLS
    }
    result["chosen_on_test"] = sorted(set(found) - set(choose["system"])) if chosen_on == "val" else []
    best = best_by[lead]
    on_test = best_scales(main, keep_guide) if chosen_on == "val" else None  # optimistic: chosen on what it reports
    chosen = float(rep["chosen_scale"])
    chosen_of = {s: (chosen if not pd.isna(best[s]) else np.nan) for s in found}
    result["seeds"] = seed_table(at_split(per_seed, "test"), hits, best, titles, rep["bootstrap"], rep["seed"], lead)
    chosen_by = dict.fromkeys(PROTOCOLS, chosen_of)
    result |= {"best": best, "best_by_protocol": best_by}

    fig = plot_recall_vs_scale(metrics, titles, ks=[k for k in (1, 3) if k in ks])
    result["figures"]["recall_vs_scale"] = save_figure(fig, out, "recall_vs_scale")

    notes = {s: n for s, n in system_notes(cfg).items() if s in found}
    marked = {s: t + NOTE_MARK if s in notes else t for s, t in {**{s: s for s in found}, **titles}.items()}
    result["headline"] = headline_table(main, best, marked, modes, on_test)
    result["notes"] = note_lines(notes, titles, found)
    _write_table(out, "headline", result["headline"], pretty_headline(result["headline"]))
    if result["notes"]:  # under the table, where it is read (make demo and the grid runner print headline.md)
        text = markdown_table(pretty_headline(result["headline"])) + "\n" + "\n\n".join(result["notes"]) + "\n"
        atomic_write_text(out / "headline.md", text)
    # the checks read the identity protocol wherever the choosing clips can hit under it, though the test clips may
    # not (VoxCeleb2's one clip per test speaker, 3 per validation speaker): under the paper protocol a system that
    # keeps its guide finds the query's own image and would pass without knowing anyone
    check = result["check_protocol"] = lead_protocol(choose)
    checks = learning_checks(at_protocol(choose, check), best_by[check], modes, titles, float(rep["guide_top1_min"]))
    result["checks"] = checks
    if not checks.empty:
        _write_table(out, "learning_checks", checks, pretty_checks(checks, float(rep["guide_top1_min"])))

    for stem, scales in (("table_best_scale", best_by), (f"table_scale_{chosen:g}", chosen_by)):
        table = protocol_tables(metrics, scales, titles)
        pretty = pretty_table(table)
        result["tables"][stem] = (table, pretty)
        _write_table(out, stem, table, pretty)

    pairs = difference_pairs(rep["differences"], modes, found)
    scales = {("best", p): best_by[p] for p in PROTOCOLS} | {(f"chosen {chosen:g}", p): chosen_of for p in PROTOCOLS}
    diff = differences_table(pairs, scales, hits, titles, [k for k in (1, 3) if k in ks], rep["bootstrap"], rep["seed"])
    factor_of = {(a, b): f for a, b, f in pairs}
    diff["factor"] = [factor_of.get((a, b)) for a, b in zip(diff["a"], diff["b"])]
    recipes = recipe_differences(cfg, pairs)
    one = recipes.groupby(["a", "b"])["one_factor"].first().to_dict() if len(recipes) else {}
    diff["one_factor"] = [one.get((a, b)) for a, b in zip(diff["a"], diff["b"])]
    result["differences"], result["recipe_differences"] = diff, recipes
    _write_table(out, "differences", diff, pretty_differences(diff))
    atomic_write_text(out / "recipe_differences.csv", recipes.to_csv(index=False))
    text = markdown_table(pretty_differences(diff)) if len(diff) else "No pair has both systems evaluated.\n"
    text += "\n## How the two systems of each pair differ\n\n" + pretty_recipe_differences(recipes, titles)
    atomic_write_text(out / "differences.md", text)
    if len(result["seeds"]):
        _write_table(out, "seeds", result["seeds"], pretty_seeds(result["seeds"]))
        if result["seeds"]["seeds"].max() > 1:  # with the differences over seeds, each pair of runs' beside
            atomic_write_text(out / "seeds.md", "\n".join(_seed_lines(result)) + "\n")

    for stem, by, scales in (
        ("significance_best_scale", "best", best_by),
        (f"significance_scale_{chosen:g}", f"chosen {chosen:g}", chosen_by),
    ):
        sig = pd.concat(
            [significance_table(cfg, metrics, weights, by, scales[p], p, hits) for p in PROTOCOLS], ignore_index=True
        )
        result["significance"][stem] = sig
        if not sig.empty:
            _write_table(out, stem, sig, pretty_significance(sig))

    n = int(rep["n_examples"])
    grid = plot_sample_grid(cfg, best, titles, n)
    if exists(grid):
        result["figures"]["samples_systems"] = save_figure(grid, out, "samples_systems")
    scaled = [s for s in found if not pd.isna(best[s])]
    across = default(rep["scales_system"], "full_input" if "full_input" in scaled else (scaled or [None])[0])
    grid = plot_scale_grid(cfg, across, titles, n) if exists(across) else None
    if exists(grid):
        result["figures"]["samples_scales"] = save_figure(grid, out, "samples_scales")

    result["summary"] = write_summary(out, cfg, metrics, result, weights, missing, chosen)
    atomic_write_json(out / "provenance.json", provenance({"grid": cfg["name"], "params_file": cfg.get("params_file")}))
    log(f"report: {len(found)} system(s) -> {out}")
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m slf_utils.report")
    sub = ap.add_subparsers(dest="command", required=True)
    f = sub.add_parser("findings", help="write docs/findings/<grid>.md from a finished grid's report")
    f.add_argument("results", help="the grid's results folder, e.g. results/demo")
    f.add_argument("--out", default=None, help="the page (default docs/findings/<grid>.md)")
    args = ap.parse_args(argv)
    try:
        print(findings.write(args.results, args.out))
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
