"""The evaluation's outputs for people: the Markdown report (models as rows, as the paper's tables) and one PNG
chart per family, and one of the answers' health."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _table(header: list[str], rows: list[list]) -> list[str]:
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    return [f"| {' | '.join(header)} |", f"|{'---|' * len(header)}"] + [f"| {' | '.join(map(fmt, r))} |" for r in rows]


def markdown_report(results: dict) -> str:
    """One table per family, models (or comparisons) as rows."""
    fam, names = results["families"], results["models"]
    lines = ["# Clinical evaluation", "", f"Models: {', '.join(f'`{n}`' for n in names)}; items per family: "
             f"{results['items']}; dropped as too long: {results['skipped_long']}.", ""]
    if "conversation" in fam:
        keys = ["bleu1", "bleu2", "bleu3", "bleu4", "gleu", "rouge1", "rouge2", "rougeL"]
        lines += ["## Medical conversation (Table 2): BLEU, GLEU, ROUGE on characters, 0-100", ""]
        lines += _table(["model"] + keys, [[n] + [fam["conversation"][n][k] for k in keys] for n in names]) + [""]
    if "exam" in fam:
        cats = sorted({c for n in names for c in fam["exam"][n]["per_category"]})
        lines += ["## Medical exam (Table 4): accuracy per category (answer extracted from the reply)", ""]
        lines += [f"Chance (one pick among the options): {fam['exam'][names[0]]['chance']:.3f}.", ""]
        lines += _table(["model"] + cats + ["average", "no answer", "likelihood"],
                        [[n] + [fam["exam"][n]["per_category"].get(c, {}).get("accuracy", "-") for c in cats]
                         + [fam["exam"][n]["accuracy"], fam["exam"][n]["no_answer"],
                            fam["exam"][n].get("likelihood_accuracy", "-")] for n in names])
        first = fam["exam"][names[0]]
        lines += ["", "Items per category: " + ", ".join(f"{c} {v['items']}" for c, v in first["per_category"].items())
                  + f"; categorized (coverage): {first['coverage']:.1%}.", ""]
    if "diagnosis" in fam:
        groups = sorted({g for n in names for g in fam["diagnosis"][n]["per_group"]})
        lines += ["## Diagnosis (Table 6): accuracy per disease group", ""]
        lines += _table(["model"] + groups + ["average", "overall"],
                        [[n] + [fam["diagnosis"][n]["per_group"].get(g, {}).get("accuracy", "-") for g in groups]
                         + [fam["diagnosis"][n]["average"], fam["diagnosis"][n]["accuracy"]] for n in names]) + [""]
    for family, title in (("qa", "Medical QA, judged (Table 7)"), ("safety", "Safety, judged")):
        if family in fam:
            lines += [f"## {title}: win / tie / lose", ""]
            lines += _table(["comparison", "win", "tie", "lose", "items"],
                            [[k, v["win"], v["tie"], v["lose"], v["items"]] for k, v in fam[family].items()]) + [""]
    if "health" in results:
        lines += ["## Output health: shares of the answers", "",
                  "empty: nothing but whitespace; truncated: cut at the token limit; degenerate: empty, or over half "
                  "its character 4-grams repeated; repeated: the mean share of repeated 4-grams; distinct-1/2 over "
                  "all answers; compliant: in the family's format (an exam letter, a named disease).", ""]
        lines += _table(["family", "model", *HEALTH_KEYS],
                        [[family, n] + [results["health"][n][family].get(k, "-") for k in HEALTH_KEYS]
                         for family in results["items"] for n in names]) + [""]
    return "\n".join(lines)


HEALTH_KEYS = ["empty", "truncated", "degenerate", "repeated", "distinct1", "distinct2", "compliant"]


def draw_charts(results: dict, out: Path) -> None:
    """<family>.png under `out`: bars per model (the exam's chance level dashed), or stacked win / tie / lose bars
    per comparison for the judged families."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fam, names = results["families"], results["models"]

    def grouped(title: str, labels: list[str], values: dict[str, list[float]], file: str, chance: float = 0):
        fig, ax = plt.subplots(figsize=(max(6, len(labels) * 0.9), 4))
        if chance:
            ax.axhline(chance, color="gray", linestyle="--", linewidth=1, label="chance")
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
                 + [fam["exam"][n]["accuracy"]] for n in names}, "exam.png", chance=fam["exam"][names[0]]["chance"])
    if "diagnosis" in fam:
        groups = sorted({g for n in names for g in fam["diagnosis"][n]["per_group"]})
        grouped("Diagnosis accuracy per disease group", groups + ["average"],
                {n: [fam["diagnosis"][n]["per_group"].get(g, {}).get("accuracy", 0) for g in groups]
                 + [fam["diagnosis"][n]["average"]] for n in names}, "diagnosis.png")
    if "health" in results:
        shares = ("empty", "truncated", "degenerate")
        grouped("Output health: share of answers", [f"{f} {k}" for f in results["items"] for k in shares],
                {n: [results["health"][n][f][k] for f in results["items"] for k in shares] for n in names}, "health.png")
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

