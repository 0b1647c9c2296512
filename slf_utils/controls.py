"""Controls of known answer (issue 26): does the bench find a voice-face link where one is planted, on speakers it
never saw, and none where there is none? Read from the finished grids of a known-answer corpus
(slf_utils.known_answer; params/known-answer*.yaml): the controls in each grid's report (`controls.md`, and its
verdict in the first lines of `summary.md`), the dose-response across link strengths and the power.

    python -m slf_utils.controls strength params/known-answer-null.yaml params/known-answer-half.yaml \\
        params/known-answer.yaml [--out results/known-answer-strength]
    python -m slf_utils.controls report params/known-answer.yaml      # controls.md of one grid (notebook 05 too)

The controls (identity protocol, unseen speakers; each system at the conditional scale its validation speakers
choose, recall@CONTROL_K, ties by the next smaller k then the smaller scale; judged on the test speakers, with
intervals over identities and seeds; the validation speakers' value beside):
* specificity (s = 0): every speech-only system (generation from speech-derived rows only: Speaker Embeddings Only,
  Contrastive Speech, Speech-to-Face) is at chance: chance inside the exact (Clopper-Pearson) interval of its hits
  over clips x seeds;
* sensitivity (s = 1): Speaker Embeddings Only beats attribute mean (the paired interval of the difference above 0)
  and Face-to-Face (direct decoder, fed the true face embedding) beats chance (the exact interval above chance);
* the floor (every s): every super-resolution system beats bicubic (paired interval above 0).
At 0 < s < 1 the sensitivity rows are shown, not judged (a point of the dose-response).

The k was fixed before any bench result was seen: CONTROL_K = 10, the largest k the workbook scores. At ~100
identities a gallery a 16-px model's signal is clear at recall@10 and weak at recall@1 (the lead's prototype:
chance 0.004 / 0.038, diffusion 0.034 / 0.165 at k = 1 / 10), while recall@1 stays the headline: it is reported
beside every check, never judged. Power: the half-width of each control pair's paired interval (the smallest
difference the bench resolves), on 25 %, 50 % and 100 % of the test identities (seeded subsamples).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from slf_utils import contrastive, recipe, report, voice_encoder
from slf_utils.basics import atomic_write_text
from slf_utils.config import load_params
from slf_utils.differences import differences_table
from slf_utils.figures import save_figure
from slf_utils.references import FLOOR, corpus_link_strength
from slf_utils.report_tables import REPORT_EXTRAS, combine_seeds
from slf_utils.results import Results
from slf_utils.stats import binomial_interval
from slf_utils.tables import _at, at_protocol, at_split, hits_at, markdown_table

CONTROL_K = 10  # the k the controls judge (pre-registered: module docstring)
HEADLINE_K = 1  # reported beside every check
PROTOCOL = "identity"
POSITIVE = ("speaker_embeddings_only", "attribute_mean")  # sensitivity: speech above knowing the gender
DECODER_BOUND = "face_to_face_direct"  # sensitivity: the decoder draws an unseen face from its true embedding
UNINFORMED = "random"
ORACLE = "oracle"
SPEECH_STAGES = (voice_encoder.VOICE_STAGE, contrastive.STAGE)  # speech-derived rows outside the layout's `speech`
FRACTIONS = (0.25, 0.5, 1.0)  # of the test identities, for the power
REPEATS = 5  # seeded subsamples per fraction below 1
CHECK_COLUMNS = ["control", "system", "against", "judged", "k", "split", "value", "ci_low", "ci_high", "passes"]


# ---------------------------------------------------------------------------------------------- reading a grid
def roles(cfg) -> dict[str, list]:
    """The grid's systems by what the controls ask of them: `speech_only` (generation from speech-derived rows
    only), `super_resolution`, `voice_free` (their answer does not depend on the voice: the same at every strength
    of one seed's corpora; the oracle excepted)."""
    scored = recipe.scored_recipes(cfg)  # as evaluation scored them
    systems = {k: r.system for k, r in scored.items()}
    speech = {c for r in scored.values() for c in r.layout.groups["speech"]} | set(SPEECH_STAGES)
    mine = [s for s in cfg["systems"] if s in systems]
    return {
        "speech_only": [
            s for s in mine if systems[s].mode == "generation" and systems[s].keep and set(systems[s].keep) <= speech
        ],
        "super_resolution": [s for s in mine if systems[s].mode == "super_resolution"],
        "voice_free": [s for s in mine if s != ORACLE and not set(systems[s].keep) & speech],
    }


def grid_view(cfg, k: int = CONTROL_K) -> dict:
    """A finished grid as the controls read it: every system's metrics (seed means, combine_seeds) and hits,
    and the scale each system is read at: chosen on the validation speakers by recall@k (ties: the next smaller k,
    then the smaller scale), super-resolution systems among the scales that keep their guide (report.best_scales)."""
    rep = {**REPORT_EXTRAS, **cfg["report"]}
    per_seed = report.load_all(cfg)
    hits = {s: report.load_hits(cfg, s) for s in dict.fromkeys(per_seed["system"])}
    metrics = combine_seeds(per_seed, hits, rep["bootstrap"], rep["seed"]) if len(per_seed) else per_seed
    modes = report.system_modes(cfg)
    keep = {s: float(rep["guide_top1_min"]) for s, m in modes.items() if m == "super_resolution"}
    ks = sorted({int(m.split("@")[1]) for m in metrics["metric"] if str(m).startswith("recall@")})
    by = (f"recall@{k}", f"recall@{max([x for x in ks if x < k], default=k)}")
    test, val = at_split(metrics, "test"), at_split(metrics, "val")
    scales = {
        **report.best_scales(at_protocol(test, PROTOCOL), keep, by),
        **report.best_scales(at_protocol(val, PROTOCOL), keep, by),
    }
    return {
        "cfg": cfg,
        "name": cfg["name"],
        "strength": corpus_link_strength(cfg),
        "metrics": metrics,
        "hits": hits,
        "scales": scales,
        # the systems a control asks for are named by title also where the grid lacks them ("not evaluated")
        "titles": report.system_titles(cfg, [*cfg["systems"], *POSITIVE, DECODER_BOUND, FLOOR]),
        "roles": roles(cfg),
        "k": k,
        "n_boot": int(rep["bootstrap"]),
        "seed": int(rep["seed"]),
        "chosen_on": "val" if len(val) else "test",
    }


def _hits(view, system, split: str, k: int) -> pd.DataFrame | None:
    h = view["hits"].get(system)
    if h is None or system not in view["scales"]:
        return None
    h = hits_at(at_split(h, split), view["scales"][system], PROTOCOL)
    return h[h["k"] == k] if h is not None and len(h) else None


def _chance(view, system, split: str, k: int) -> float:
    m = at_protocol(at_split(view["metrics"], split), PROTOCOL)
    return _at(m, system, np.nan, f"chance@{k}")[0]


def binomial_row(view, control, system, split, k, judged, side: str) -> dict | None:
    """recall@k of `system` against chance: the exact interval of its hits over clips x seeds; `side` `within` (the
    interval holds chance) or `above` (its lower end is above chance)."""
    h = _hits(view, system, split, k)
    if h is None:
        return None
    n, hits = len(h), int(h["hit"].sum())
    lo, hi = binomial_interval(hits, n)
    chance = _chance(view, system, split, k)
    ok = lo <= chance <= hi if side == "within" else lo > chance
    return dict(zip(CHECK_COLUMNS, (control, system, f"chance {chance:.3f}", judged, k, split, hits / n, lo, hi, ok)))


def difference_rows(view, pairs, split: str, ks, identities=None) -> pd.DataFrame:
    """Paired differences a - b (differences_table: the seed mean, intervals over identities and seeds) at
    the controls' scales, on one split's clips (`identities`: these only, for the power)."""
    hits = {}
    for s in {x for p in pairs for x in p[:2]}:
        h = view["hits"].get(s)
        if h is not None:
            h = at_split(h, split)
            hits[s] = h if identities is None else h[h["identity"].isin(identities)]
    pairs = [p for p in pairs if p[0] in view["scales"] and p[1] in view["scales"] and p[0] in hits and p[1] in hits]
    scales = {("controls", PROTOCOL): view["scales"]}
    return differences_table(pairs, scales, hits, view["titles"], ks, view["n_boot"], view["seed"])


def control_checks(view) -> pd.DataFrame:
    """Every control that applies to the grid's strength (module docstring), at CONTROL_K (judged) and HEADLINE_K
    (beside), on the test speakers (the verdict) and the validation speakers."""
    s, r, k = view["strength"], view["roles"], view["k"]
    rows = []
    splits = ["test", "val"] if view["chosen_on"] == "val" else ["test"]
    for split in splits:
        for kk in (k, HEADLINE_K):
            judged = kk == k and split == "test"
            if s == 0:
                rows += [binomial_row(view, "specificity", x, split, kk, judged, "within") for x in r["speech_only"]]
            if s > 0:
                rows.append(binomial_row(view, "sensitivity", DECODER_BOUND, split, kk, judged and s == 1, "above"))
            pairs = [(*POSITIVE, "sensitivity")] if s > 0 else []
            pairs += [(x, FLOOR, "floor") for x in r["super_resolution"]]
            diff = difference_rows(view, pairs, split, [kk])
            for d in diff.itertuples():
                control = "sensitivity" if (d.a, d.b) == POSITIVE else "floor"
                j = judged and (control == "floor" or s == 1)
                row = (control, d.a, f"{d.b} (paired)", j, kk, split, d.difference, d.ci_low, d.ci_high, d.ci_low > 0)
                rows.append(dict(zip(CHECK_COLUMNS, row)))
    return pd.DataFrame([x for x in rows if x is not None], columns=CHECK_COLUMNS)


def failures(checks: pd.DataFrame) -> pd.DataFrame:
    return checks[checks["judged"] & ~checks["passes"].astype(bool)]


def expected_controls(view) -> list[str]:
    """Judged controls the grid cannot read (a system missing): a control never run is not a pass."""
    s, r, have = view["strength"], view["roles"], set(view["scales"])
    need = []
    if s == 1:
        need += [x for x in (*POSITIVE, DECODER_BOUND) if x not in have]
    if r["super_resolution"] and FLOOR not in have:
        need.append(FLOOR)
    return [x for x in need if x]


# ---------------------------------------------------------------------------------------------- power
def power_pairs(view) -> list[tuple]:
    """The pairs whose resolution matters: each speech-only system - attribute mean (what a null on speech would be
    read against), each super-resolution system - bicubic, Face-to-Face - random (a direct decoder's recall against
    an uninformative ranking of the same gallery)."""
    r = view["roles"]
    pairs = [(x, POSITIVE[1], "speech") for x in r["speech_only"]]
    pairs += [(x, FLOOR, "floor") for x in r["super_resolution"]]
    return pairs + [(DECODER_BOUND, UNINFORMED, "decoder")]


def power_table(view, fractions=FRACTIONS, repeats: int = REPEATS) -> pd.DataFrame:
    """Half-width of each power pair's paired 95 % interval (test speakers, recall@HEADLINE_K and @CONTROL_K) on a
    fraction of the test identities (seeded subsamples, the mean half-width over `repeats` of them below 1)."""
    first = next((h for h in view["hits"].values() if h is not None), None)
    if first is None:
        return pd.DataFrame()
    ids = np.array(sorted(set(at_split(first, "test")["identity"])))
    rng = np.random.default_rng(view["seed"])
    rows = []
    for f in fractions:
        n = max(2, round(f * len(ids)))
        draws = [ids] if n == len(ids) else [rng.choice(ids, n, replace=False) for _ in range(repeats)]
        parts = [difference_rows(view, power_pairs(view), "test", (HEADLINE_K, view["k"]), d) for d in draws]
        d = pd.concat(parts, ignore_index=True)
        d["half_width"] = (d["ci_high"] - d["ci_low"]) / 2
        g = d.groupby(["a", "b", "k"], sort=False).agg(
            half_width=("half_width", "mean"), difference=("difference", "mean")
        )
        rows += [{"a": a, "b": b, "k": k, "fraction": f, "identities": n, **v} for (a, b, k), v in g.iterrows()]
    return pd.DataFrame(rows)


def identities_for(table: pd.DataFrame, half_width: float) -> pd.DataFrame:
    """Test identities a pair needs for a given half-width, extrapolated from its full-size run as 1/sqrt(N)."""
    full = table[table["fraction"] == 1.0]
    need = np.ceil(full["identities"] * (full["half_width"] / half_width) ** 2)
    return full.assign(target=half_width, identities_needed=need.astype(int))


# ---------------------------------------------------------------------------------------------- writing
def _fmt(v, lo, hi, paired: bool) -> str:
    f = "{:+.3f}" if paired else "{:.3f}"
    return f"{f.format(v)} [{f.format(lo)}, {f.format(hi)}]"


def pretty_checks(checks: pd.DataFrame, titles: dict) -> pd.DataFrame:
    rows = []
    for (control, system, against), g in checks.groupby(["control", "system", "against"], sort=False):
        paired = "paired" in against
        row = {"control": control, "system": titles.get(system, system), "against": against}
        for r in g.itertuples():
            row[f"{r.split} recall@{r.k}" + (" − b" if paired else "")] = _fmt(r.value, r.ci_low, r.ci_high, paired)
        verdict = g[g["judged"]]
        row["judged"] = f"@{verdict['k'].iloc[0]}, {verdict['split'].iloc[0]}" if len(verdict) else "shown only"
        row["passes"] = ("yes" if verdict["passes"].all() else "**NO**") if len(verdict) else "–"
        rows.append(row)
    return pd.DataFrame(rows)


def pretty_power(power: pd.DataFrame, titles: dict) -> pd.DataFrame:
    out = power.assign(
        pair=[f"{titles.get(a, a)} − {titles.get(b, b)}" for a, b in zip(power["a"], power["b"])],
        col=[f"±recall@{k}, {n} ids ({f:.0%})" for k, n, f in zip(power["k"], power["identities"], power["fraction"])],
    )
    return out.pivot_table(index="pair", columns="col", values="half_width", aggfunc="first", sort=False).map(
        lambda x: f"{x:.3f}"
    )


def verdict_lines(view, checks: pd.DataFrame) -> list[str]:
    """The lines the report opens with: which controls fail (or that all pass), at which k, and what it means."""
    s, k = view["strength"], view["k"]
    what = {0: "null control", 1: "positive control"}.get(s, "dose-response point")
    bad, missing = failures(checks), expected_controls(view)
    titles = view["titles"]
    head = f"**Controls of known answer** (link strength s = {s:g}, the {what}; recall@{k} judged, test speakers)"
    if bad.empty and not missing and len(checks[checks["judged"]]):
        return [f"{head}: every control passes (`controls.md`)."]
    lines = [f"{head}: **CONTROL FAILED**." if len(bad) or missing else f"{head}: nothing is judged at this strength."]
    for r in bad.itertuples():
        ci = _fmt(r.value, r.ci_low, r.ci_high, "paired" in r.against)
        lines.append(f"* {r.control}: {titles.get(r.system, r.system)} against {r.against}: {ci} at recall@{r.k}")
    for x in missing:
        lines.append(f"* not evaluated, so its control is not read: {titles.get(x, x)}")
    if len(bad) or missing:
        lines.append(
            "A bench that fails its known-answer controls cannot tell a method that fails from a bench that cannot "
            "see: a null on real data run with these settings does not mean the voice carries nothing."
        )
    return lines


def write_report(cfg, log=print) -> Path | None:
    """controls.md / controls.csv / power.csv in the grid's report folder, and the verdict first in summary.md
    (after its title); None for a grid without a known-answer corpus."""
    if corpus_link_strength(cfg) is None:
        return None
    view = grid_view(cfg)
    if view["metrics"].empty:
        return None
    out = Results.of(cfg).report
    checks, power = control_checks(view), power_table(view)
    lines = verdict_lines(view, checks)
    atomic_write_text(out / "controls.csv", checks.to_csv(index=False))
    atomic_write_text(out / "power.csv", power.to_csv(index=False))
    text = [
        f"# Controls of known answer: {cfg['name']}",
        "",
        *lines,
        "",
        markdown_table(pretty_checks(checks, view["titles"])),
    ]
    text += [
        f"Each system at the scale its validation speakers chose by recall@{view['k']} ({PROTOCOL} protocol); "
        "intervals over identities and seeds; `judged`: the row that decides (pre-registered: recall@"
        f"{view['k']}, test speakers), the others shown beside it.",
        "",
        "## Power: half-width of the paired 95 % interval (the smallest difference resolved)",
        "",
        markdown_table(pretty_power(power, view["titles"]).reset_index()) if len(power) else "no pairs",
    ]
    path = atomic_write_text(out / "controls.md", "\n".join(text) + "\n")
    summary = out / "summary.md"
    if summary.exists():
        old = summary.read_text().split("\n")
        atomic_write_text(summary, "\n".join([old[0], "", *lines, "", *old[1:]]))
    for line in lines:
        log(line)
    return path


# ---------------------------------------------------------------------------------------------- dose-response
def strength_table(views: list[dict], ks=(HEADLINE_K, CONTROL_K)) -> pd.DataFrame:
    """recall@k on the test speakers of every system of every grid at its controls' scale, against the link
    strength; a voice-free system missing from a grid is carried from the grid that has it (the same faces,
    training and answers at every strength of one seed's corpora), marked `carried`."""
    rows = []
    for v in views:
        test = at_protocol(at_split(v["metrics"], "test"), PROTOCOL)
        for system, scale in v["scales"].items():
            for k in ks:
                val, lo, hi = _at(test, system, scale, f"recall@{k}")
                if not np.isnan(val):
                    rows.append([v["strength"], v["name"], system, v["titles"].get(system, system), scale, k])
                    rows[-1] += [val, lo, hi, False]
        for k in ks:
            chance = test.loc[test["metric"] == f"chance@{k}", "value"]
            if len(chance):
                rows.append([v["strength"], v["name"], "chance", "chance (exact)", np.nan, k, chance.mean()])
                rows[-1] += [np.nan, np.nan, False]
    cols = ["strength", "grid", "system", "title", "scale", "k", "value", "ci_low", "ci_high", "carried"]
    t = pd.DataFrame(rows, columns=cols)
    free = {s for v in views for s in v["roles"]["voice_free"]}
    for v in views:
        for system in free - set(t.loc[t["grid"] == v["name"], "system"]):
            donor = t[(t["system"] == system) & ~t["carried"]].head(len(ks))
            t = pd.concat([t, donor.assign(strength=v["strength"], grid=v["name"], carried=True)], ignore_index=True)
    return t.sort_values(["k", "system", "strength"]).reset_index(drop=True)


def plot_strength(table: pd.DataFrame, ks=(HEADLINE_K, CONTROL_K)):
    """recall@k against link strength, one panel per k: every system with its 95 % interval, chance dashed black,
    attribute mean and the oracle thick; carried (voice-free) systems dotted."""
    from matplotlib.figure import Figure  # heavy: only the figure needs it

    fig = Figure(figsize=(5.0 * len(ks) + 2.8, 4.0), layout="constrained")
    axes = fig.subplots(1, len(ks), squeeze=False)[0]
    names = list(dict.fromkeys(table["system"]))
    colour = {s: f"C{i % 10}" for i, s in enumerate(n for n in names if n != "chance")}
    for ax, k in zip(axes, ks):
        for system, g in table[table["k"] == k].groupby("system", sort=False):
            g = g.sort_values("strength")
            if system == "chance":
                ax.plot(g["strength"], g["value"], "k--", lw=1, label="chance (exact)")
                continue
            thick = system in (POSITIVE[1], ORACLE)
            style = ":" if g["carried"].any() else "-"
            label = g["title"].iloc[0] + (" (voice-free: carried)" if g["carried"].any() else "")
            err = np.vstack([g["value"] - g["ci_low"], g["ci_high"] - g["value"]])
            ax.errorbar(
                g["strength"],
                g["value"],
                yerr=err,
                color=colour[system],
                ls=style,
                marker="o",
                capsize=3,
                lw=2.6 if thick else 1.4,
                label=label,
            )
        ax.set_xlabel("link strength s (voice code = s · face code + √(1 − s²) · noise)")
        ax.set_ylabel(f"recall@{k}, unseen speakers ({PROTOCOL} protocol)")
        ax.set_title(f"recall@{k} against the planted link's strength (test speakers)", fontsize=9)
        ax.set_xticks(sorted(table["strength"].dropna().unique()))
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="outside right upper")
    return fig


def pretty_strength(table: pd.DataFrame) -> pd.DataFrame:
    t = table.assign(
        cell=[
            f"{v:.3f}" + ("" if np.isnan(lo) else f" [{lo:.3f}, {hi:.3f}]") + (" (carried)" if c else "")
            for v, lo, hi, c in zip(table["value"], table["ci_low"], table["ci_high"], table["carried"])
        ],
        col=[f"s = {s:g}, recall@{k}" for s, k in zip(table["strength"], table["k"])],
    )
    return t.pivot_table(index="title", columns="col", values="cell", aggfunc="first", sort=False).reset_index()


def strength(grids, out=None, log=print) -> dict:
    """The dose-response of finished known-answer grids (grid files): strength.csv/.md and strength.png/.pdf (recall@k
    against link strength for every system, chance, attribute mean and the oracle), each grid's controls and power
    (controls.csv, power.csv), into `out` (default results/known-answer-strength). Returns the tables."""
    views = [grid_view(load_params(g)) for g in grids]
    missing = [v["name"] for v in views if v["strength"] is None]
    if missing:
        raise SystemExit(f"not a known-answer grid (no corpus build record in data.root): {', '.join(missing)}")
    views = sorted(views, key=lambda v: v["strength"])
    out = Path(out or Path(views[0]["cfg"]["results"]).parent / "known-answer-strength")
    table = strength_table(views)
    save_figure(plot_strength(table), out, "strength")
    atomic_write_text(out / "strength.csv", table.to_csv(index=False))
    checks = pd.concat([control_checks(v).assign(grid=v["name"], strength=v["strength"]) for v in views])
    power = pd.concat([power_table(v).assign(grid=v["name"], strength=v["strength"]) for v in views])
    atomic_write_text(out / "controls.csv", checks.to_csv(index=False))
    atomic_write_text(out / "power.csv", power.to_csv(index=False))
    titles = {k: t for v in views for k, t in v["titles"].items()}
    text = ["# Dose-response: recall on unseen speakers against link strength", ""]
    text += [markdown_table(pretty_strength(table)), ""]
    for v in views:
        c = checks[checks["grid"] == v["name"]]
        text += [f"## {v['name']} (s = {v['strength']:g})", "", *verdict_lines(v, c), ""]
        text += [markdown_table(pretty_checks(c, titles)), ""]
        p = power[power["grid"] == v["name"]]
        if len(p):
            text += [
                "Power (half-width of the paired 95 % interval):",
                "",
                markdown_table(pretty_power(p, titles).reset_index()),
                "",
            ]
            need = pd.concat([identities_for(p, h) for h in (0.05, 0.02)])
            text += [
                "Test identities needed for a half-width of 0.05 / 0.02 (1/√N from the full run): "
                + "; ".join(
                    f"{titles.get(a, a)} − {titles.get(b, b)} @{k}: {' / '.join(map(str, g['identities_needed']))}"
                    for (a, b, k), g in need.groupby(["a", "b", "k"], sort=False)
                ),
                "",
            ]
    atomic_write_text(out / "strength.md", "\n".join(text) + "\n")
    log("\n".join(text))
    log(f"controls: dose-response -> {out}")
    return {"table": table, "checks": checks, "power": power, "out": out}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m slf_utils.controls", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("strength", help="dose-response, controls and power of finished known-answer grids")
    s.add_argument("grids", nargs="+", type=Path, help="grid files (params/known-answer*.yaml), any order")
    s.add_argument("--out", type=Path, default=None, help="output folder (default results/known-answer-strength)")
    r = sub.add_parser("report", help="controls.md of one finished grid, and its verdict first in summary.md")
    r.add_argument("grid", type=Path)
    args = ap.parse_args(argv)
    if args.cmd == "strength":
        strength(args.grids, args.out)
    else:
        path = write_report(load_params(args.grid))
        print(path or f"{args.grid}: not a known-answer grid (no corpus build record in data.root)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
