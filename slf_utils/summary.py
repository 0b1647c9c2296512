"""The report's `summary.md`: the headline under the lead protocol with how the scales were chosen (and, with
identity folds, the unseen-speakers paragraph), the learning checks, recall at each system's best scale under both
protocols, the training seeds, the paired differences, the significance of each input and the list of figures, each
table with the lines that say how to read it.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from slf_utils.basics import atomic_write_text
from slf_utils.differences import pretty_differences, pretty_seed_differences
from slf_utils.folds import n_folds, roles_line
from slf_utils.references import REFERENCES
from slf_utils.report_tables import REPORT_EXTRAS, pretty_checks, pretty_headline, pretty_seeds
from slf_utils.results import Results
from slf_utils.retrieval import PROTOCOLS
from slf_utils.significance import describe_weights, pretty_significance
from slf_utils.store import open_store
from slf_utils.tables import markdown_table


def _seed_lines(result) -> list[str]:
    seeds = result.get("seeds")
    if seeds is None or seeds.empty or seeds["seeds"].max() < 2:
        return [
            "One training run per system (one seed): every interval covers the test identities only, not the noise "
            "of training (set `grid.seeds: [0, 1, 2]` to measure it).",
            "",
        ]
    lead, diff = result["lead_protocol"], result.get("differences")
    lines = [
        markdown_table(pretty_seeds(seeds)),
        f"Each system at its chosen scale, test clips, {lead} protocol: recall@1 of each training seed (initial "
        "weights, data order, training and sampling noise), their spread, and two intervals of the seed mean: one "
        "that resamples identities and seeds (the one every table uses) and one over identities alone (what a "
        "one-seed report would claim).",
        "",
    ]
    if diff is not None and len(diff):
        lines += [
            markdown_table(pretty_seed_differences(diff, lead)),
            f"Paired differences at the best scales (test clips, {lead} protocol): the mean over the pairs of runs "
            "(two systems of several seeds: seed by seed where both have it; a one-run reference: against every seed "
            "of the other), its interval resampling identities and those pairs, and beside it each pair's "
            "difference.",
            "",
        ]
    return lines


def _choice_line(result) -> str:
    if result["chosen_on"] == "val":
        n = result["validation"]
        n = int(n.loc[n["metric"] == "recall@1", "n"].max()) if len(n) else 0
        late = result.get("chosen_on_test")
        return (
            f"Best scales are chosen on the {n} validation clips; every number is of the test clips at those scales. "
            "`best on test` is the recall@1 at the scale best on the test clips themselves: biased upwards by the "
            "selection, shown only to say by how much."
            + (f" Evaluated without validation clips (chosen on test, optimistic): {', '.join(late)}." if late else "")
        )
    return (
        "**This grid has no validation clips** (`data.validation`): best scales are chosen on the test clips, so "
        "every best-scale number is optimistic."
    )


def _unseen_line(cfg) -> str:
    k = n_folds(cfg)
    store = Results.of(cfg).store / "store.sqlite"
    roles = roles_line(cfg, open_store(cfg).clips()) if store.exists() else ""  # folds.fold_roles: who is what
    chosen = "; scales chosen on validation speakers, never reported" if cfg["data"]["validation"]["identities"] else ""
    return (
        f"**Unseen speakers** (`data.identity_folds`: {k} folds over identities): each fold's models trained on the "
        "training clips of the other folds' identities only (never a gallery image) and answered its own identities' "
        f"queries, so no test or validation identity was seen in training (each identity tested once){chosen}. "
        "identity_mean does not exist here (no training face of the speaker: skipped); attribute_mean (the mean "
        "training face of the query's gender and ethnicity, from the fold's training identities) is what knowing the "
        f"attributes gives, the ceiling of a voice that tells only them. {roles}"
    ).rstrip()


def write_summary(out: Path, cfg, metrics, result, weights, missing, chosen) -> Path:
    rep = {**REPORT_EXTRAS, **cfg["report"]}
    best_table, best_pretty = result["tables"]["table_best_scale"]
    lines = [f"# Report: {cfg['name']}", ""]
    lines += [
        f"## {result['lead_protocol'].capitalize()} protocol: each system at its best conditional scale, with the "
        "reference rows",
        "",
        *(
            []
            if result["lead_protocol"] == PROTOCOLS[0]
            else [
                "**Led by the paper protocol**: no test speaker has a second gallery clip, so under the identity "
                "protocol no query can hit (chance 0; the paper's one clip per test speaker). The learning checks "
                f"read the {result['check_protocol']} protocol of the {result['chosen_on']} clips.",
                "",
            ]
        ),
        _choice_line(result),
        "",
        *([_unseen_line(cfg), ""] if n_folds(cfg) else []),
        markdown_table(pretty_headline(result["headline"])),
        *[line + "\n" for line in result.get("notes", [])],
        "Identity protocol: the query's own real image is left out of its ranking, so a hit is another image of the "
        "same person. 95 % intervals resample identities. Reference rows: bicubic = the 8x8 guide upscaled (the "
        "floor of super-resolution), identity_mean = the mean training face of the speaker (the closed-set "
        "ceiling), real_face (where evaluated) = the query's own real face, a perfect reconstruction (under the "
        "paper protocol it finds itself; under the identity protocol it must look more like the person's other "
        "images than anyone's), random = a random ordering of the gallery clips (an uninformative system, ranked "
        "like every other). chance@1: the exact expected recall@1 of such a system under this protocol and "
        "gallery (under the identity protocol the query's identity has one gallery clip fewer, so it is below "
        "1/N). `vs identity_mean` (`vs attribute_mean` where identity_mean does not exist: unseen speakers): "
        "recall@1 as a share of the ceiling's.",
        "",
        f"Systems evaluated: {', '.join(dict.fromkeys(best_table['system']))}.",
    ]
    unscaled = [s for s, v in result["best"].items() if pd.isna(v) and s not in REFERENCES]
    if unscaled:
        lines += [
            f"No conditional scale (`no scale`: a direct decoder draws one face per clip): {', '.join(unscaled)}; "
            "one point, a dash-dotted horizontal line in the figure."
        ]
    if missing:
        lines += [f"Not evaluated yet (skipped): {', '.join(missing)}."]
    if not result["checks"].empty:
        lines += [
            "",
            f"## Does each system learn? recall@1 against chance ({result['checks']['chance@1'].iloc[0]:.3f}), "
            f"the bicubic floor and the identity-mean ceiling ({result['check_protocol']} protocol, "
            f"{result['chosen_on']} clips)",
            "",
            markdown_table(pretty_checks(result["checks"], float(rep["guide_top1_min"]))),
            "Judged on the clips that choose ("
            + result["chosen_on"]
            + "), at the scale chosen there"
            + (
                f", under the {result['check_protocol']} protocol"
                + (
                    " (the validation speakers have other clips to find; the test speakers do not, which is why the "
                    "headline leads with the paper protocol)"
                    if result["check_protocol"] != result["lead_protocol"]
                    else ""
                )
                + "."
                if result["chosen_on"] == "val"
                else f": this grid has no validation clips, so the best of {metrics['scale'].dropna().nunique()} "
                "scales is picked on the test clips and its recall is optimistic."
            )
            + " At scale 0 the feature rows are ignored: a generation system should be at chance there, a "
            "super-resolution system at what the 8x8 guide alone gives. A super-resolution system should reach "
            f"bicubic's recall@1 and keep its guide (guide_top1 ≥ {float(rep['guide_top1_min']):g}).",
        ]
    lines += ["", "## Recall at each system's best conditional scale, both protocols", ""]
    lines += [
        markdown_table(
            best_pretty[
                [
                    c
                    for c in best_pretty.columns
                    if c in ("protocol", "system", "scale", "recall@1", "recall@3", "recall@5", "recall@10")
                    or c in ("guide_top1", "chance@1", "unsampled (misses)", "n")
                ]
            ]
        ),
        f"Best scale = the scale with the highest recall@1 on the {result['chosen_on']} clips under that protocol "
        "(ties: recall@3, then the smaller scale); for a super-resolution system only scales that keep its guide "
        "(guide_top1 ≥ "
        f"{float(cfg['report']['guide_top1_min']):g}) compete, where any does. Tables at the chosen scale "
        f"{chosen:g}: `table_scale_{chosen:g}.md`.",
        "",
        "## Training seeds",
        "",
        *_seed_lines(result),
        "## Paired differences of recall (a − b on the same clips, 95 % bootstrap over identities and seeds)",
        "",
        "The difference is the mean over pairs of runs: two systems of several seeds pair seed by seed where both "
        "have the seed, a one-run system or reference pairs with every seed of the other (`seeds (a, b)`: how many "
        "each side has; `seeds.md`: each pair's difference); the interval resamples identities and those pairs, and "
        "with one seed per system it covers the test identities only. "
        "⚑: the two systems differ in more than the factor the pair names (`differences.md` lists every way).",
        "",
    ]
    diff = result["differences"]
    lines += [markdown_table(pretty_differences(diff)) if not diff.empty else "No pair has both systems evaluated."]
    lines += [
        "",
        "## Significance of each input (paper Eq. 3/4)",
        "",
        f"Weights over k (`report.k_weights` = {cfg['report'].get('k_weights')!r}; the paper does not give "
        f"its weights): {describe_weights(weights)}.",
        "",
    ]
    for stem, sig in result["significance"].items():
        if sig.empty:
            lines += [f"{stem}: no input has both of its systems evaluated.", ""]
            continue
        lines += [f"### {stem}", "", markdown_table(pretty_significance(sig))]
    lines += [
        "With few test identities a recall difference of a few points is noise: read S with its interval.",
        "",
        "## Figures",
        "",
    ]
    for name, paths in result["figures"].items():
        lines += [f"* {name}: " + ", ".join(f"`{p.name}`" for p in paths)]
    return atomic_write_text(out / "summary.md", "\n".join(lines) + "\n")
