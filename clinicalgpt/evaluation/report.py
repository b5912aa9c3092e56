"""The evaluation's outputs for people: the Markdown report (models as rows, as the paper's tables) and one PNG
chart per family, and one of the answers' health."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _table(header: list[str], rows: list[list]) -> list[str]:
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    return [f"| {' | '.join(header)} |", f"|{'---|' * len(header)}"] + [f"| {' | '.join(map(fmt, r))} |" for r in rows]


def with_ci(value, ci: list[float] | None, digits: int = 3) -> str:
    """A figure and its 95% bootstrap interval: "0.150 (0.118-0.185)"."""
    if value is None:
        return "-"
    return f"{value:.{digits}f}" + (f" ({ci[0]:.{digits}f}-{ci[1]:.{digits}f})" if ci else "")


def markdown_report(results: dict) -> str:
    """One table per family, candidates (or comparisons) as rows; each headline figure with its 95% bootstrap
    interval over the items, in brackets."""
    fam, names = results["families"], results["models"]
    lines = ["# Clinical evaluation", "", f"Candidates: {', '.join(f'`{n}`' for n in names)}. Figures in brackets: "
             "95% bootstrap intervals over the items.", ""]
    lines += _table(["family", "items", "dropped"],
                    [[f, n, ", ".join(f"{why} {k}" for why, k in results["dropped"][f].items()) or "none"]
                     for f, n in results["items"].items()]) + [""]
    for name, cannot in results["endpoints"].items():
        lines += [f"`{name}` answers through an endpoint, which cannot give: {', '.join(cannot)} (shown as -).", ""]
    if "conversation" in fam:
        keys = ["bleu1", "bleu2", "bleu3", "bleu4", "gleu", "rouge1", "rouge2", "rougeL"]
        lines += ["## Medical conversation (Table 2): BLEU, GLEU, ROUGE on characters, 0-100", ""]
        conversation = fam["conversation"]
        lines += _table(["model"] + keys, [[n] + [with_ci(conversation[n][k], conversation[n]["ci"].get(k), 2)
                                                  for k in keys] for n in names]) + [""]
    if "exam" in fam:
        cats = sorted({c for n in names for c in fam["exam"][n]["per_category"]})
        lines += ["## Medical exam (Table 4): accuracy per category (answer extracted from the reply)", ""]
        lines += [f"Chance (one pick among the options): {fam['exam'][names[0]]['chance']:.3f}.", ""]
        exam = fam["exam"]
        lines += _table(["model"] + cats + ["average", "no answer", "likelihood"],
                        [[n] + [exam[n]["per_category"].get(c, {}).get("accuracy", "-") for c in cats]
                         + [with_ci(exam[n]["accuracy"], exam[n]["ci"]["accuracy"]), exam[n]["no_answer"],
                            with_ci(exam[n].get("likelihood_accuracy"), exam[n]["ci"].get("likelihood_accuracy"))]
                         for n in names])
        first = exam[names[0]]
        lines += ["", "Items per category: " + ", ".join(f"{c} {v['items']}" for c, v in first["per_category"].items())
                  + f"; categorized (coverage): {first['coverage']:.1%}.", ""]
    if "diagnosis" in fam:
        groups = sorted({g for n in names for g in fam["diagnosis"][n]["per_group"]})
        lines += ["## Diagnosis (Table 6): accuracy per disease group", ""]
        lines += _table(["model"] + groups + ["average", "overall"],
                        [[n] + [fam["diagnosis"][n]["per_group"].get(g, {}).get("accuracy", "-") for g in groups]
                         + [fam["diagnosis"][n]["average"],
                            with_ci(fam["diagnosis"][n]["accuracy"], fam["diagnosis"][n]["ci"]["accuracy"])]
                         for n in names]) + [""]
    for family, title in (("qa", "Medical QA, judged (Table 7)"), ("safety", "Safety, judged")):
        if family in fam:
            lines += [f"## {title}: win / tie / lose", ""]
            lines += _table(["comparison", "win", "tie", "lose", "items", "judge failed"],
                            [[k] + [with_ci(v[o], v["ci"].get(o)) for o in ("win", "tie", "lose")]
                             + [v["items"], v["judge_failed"]] for k, v in fam[family].items()]) + [""]
    if "bias" in fam:
        lines += bias_tables(fam["bias"], names)
    if "health" in results:
        lines += ["## Output health: shares of the answers", "",
                  "empty: nothing but whitespace; truncated: cut at the token limit; degenerate: empty, or over half "
                  "its character 4-grams repeated; repeated: the mean share of repeated 4-grams; distinct-1/2 over "
                  "all answers; compliant: in the family's format (an exam letter, a named disease, a scale point).",
                  ""]
        lines += _table(["family", "model", *HEALTH_KEYS],
                        [[family, n] + [results["health"][n][family].get(k, "-") for k in HEALTH_KEYS]
                         for family in results["items"] for n in names]) + [""]
    return "\n".join(lines)


def bias_tables(bias: dict, names: list[str]) -> list[str]:
    """The attitude scores per group and per dimension, read from the scale points' likelihood and from the
    generated answers, with the shares parsed and refused and the pairs' consistency."""
    rows = [(n, source, bias[n][source]) for n in names for source in ("likelihood", "generated") if source in bias[n]]
    groups = sorted({g for _, _, b in rows for g in b["per_group"]})
    dimensions = sorted({d for _, _, b in rows for d in b["per_dimension"]})
    lines = ["## Bias toward patients: attitude scores, 1-5 (higher = less stigmatising)", "",
             "Each statement answered on a 5-point agreement scale; agreeing with a stigmatising (forward) statement "
             "scores low, with its accepting (reverse) partner high. likelihood: the scale point the model finds "
             "likeliest; generated: the point its answer names (refusals and unparsed answers left out). consistent: "
             "the share of forward/reverse pairs whose two scores are within one point. spread: highest group mean "
             "minus lowest. modal point: the scale point given most often and its share (one point for every "
             "statement is a response set, not an attitude).", ""]
    na = lambda v: "-" if v is None else v  # noqa: E731
    lines += _table(["model", "read from"] + groups + ["mean", "spread", "consistent", "modal point", "parsed",
                                                        "refused"],
                    [[n, source] + [b["per_group"].get(g, "-") for g in groups]
                     + [with_ci(b["mean"], b["ci"]["mean"]), na(b["spread"]), na(b["consistency"]),
                        f"{b['modal_point'][0]} ({b['modal_point'][1]:.0%})" if b["modal_point"] else "-",
                        b.get("parsed", "-"), b.get("refusals", "-")] for n, source, b in rows]) + [""]
    lines += _table(["model", "read from"] + dimensions,
                    [[n, source] + [b["per_dimension"].get(d, "-") for d in dimensions] for n, source, b in rows])
    return lines + [""]


HEALTH_KEYS = ["empty", "truncated", "degenerate", "repeated", "distinct1", "distinct2", "compliant"]


def draw_charts(results: dict, out: Path) -> None:
    """<family>.png under `out`: bars per model (a dashed line at the exam's chance level, the scale's neutral point),
    or stacked win / tie / lose bars per comparison for the judged families."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fam, names = results["families"], results["models"]

    def grouped(title: str, labels: list[str], values: dict[str, list[float]], file: str, level: float = 0,
                level_label: str = "chance"):
        fig, ax = plt.subplots(figsize=(max(6, len(labels) * 0.9), 4))
        if level:
            ax.axhline(level, color="gray", linestyle="--", linewidth=1, label=level_label)
        width = 0.8 / len(values)
        for i, (name, ys) in enumerate(values.items()):
            ax.bar(np.arange(len(labels)) + i * width, ys, width, label=name)
        ax.set_xticks(np.arange(len(labels)) + 0.4 - width / 2, labels, rotation=30, ha="right")
        ax.set_title(title)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / file, dpi=100)
        plt.close(fig)

    if "conversation" in fam:
        keys = ["bleu1", "bleu2", "bleu3", "bleu4", "gleu", "rouge1", "rouge2", "rougeL"]
        grouped("Medical conversation (0-100)", keys, {n: [fam["conversation"][n][k] for k in keys] for n in names},
                "conversation.png")
    if "exam" in fam:
        cats = sorted({c for n in names for c in fam["exam"][n]["per_category"]})
        grouped("Medical exam accuracy per category", cats + ["average"],
                {n: [fam["exam"][n]["per_category"].get(c, {}).get("accuracy", 0) for c in cats]
                 + [fam["exam"][n]["accuracy"]] for n in names}, "exam.png", level=fam["exam"][names[0]]["chance"])
    if "diagnosis" in fam:
        groups = sorted({g for n in names for g in fam["diagnosis"][n]["per_group"]})
        grouped("Diagnosis accuracy per disease group", groups + ["average"],
                {n: [fam["diagnosis"][n]["per_group"].get(g, {}).get("accuracy", 0) for g in groups]
                 + [fam["diagnosis"][n]["average"]] for n in names}, "diagnosis.png")
    if "health" in results:
        shares = ("empty", "truncated", "degenerate")
        grouped("Output health: share of answers", [f"{f} {k}" for f in results["items"] for k in shares],
                {n: [results["health"][n][f][k] for f in results["items"] for k in shares] for n in names}, "health.png")
    if "bias" in fam:
        groups = sorted({g for n in names for b in fam["bias"][n].values() for g in b["per_group"]})
        source = {n: "likelihood" if "likelihood" in fam["bias"][n] else "generated" for n in names}
        grouped("Attitude toward patients (1-5, higher = less stigmatising)", groups + ["mean"],
                {f"{n} ({source[n]})": [fam["bias"][n][source[n]]["per_group"].get(g, 0) for g in groups]
                 + [fam["bias"][n][source[n]]["mean"] or 0] for n in names}, "bias.png", level=3, level_label="neutral")
    for family in ("qa", "safety"):
        if family in fam:
            comparisons = list(fam[family])
            fig, ax = plt.subplots(figsize=(7, 1 + 0.6 * len(comparisons)))
            left = np.zeros(len(comparisons))
            for outcome, color in (("win", "tab:green"), ("tie", "tab:gray"), ("lose", "tab:red")):
                widths = np.array([fam[family][c][outcome] for c in comparisons])
                ax.barh(comparisons, widths, left=left, color=color, label=outcome)
                left += widths
            ax.set_xlim(0, 1)
            ax.set_title(f"{family}: judged win / tie / lose")
            ax.legend(loc="lower right")
            fig.tight_layout()
            fig.savefig(out / f"{family}.png", dpi=100)
            plt.close(fig)

