"""Write docs/results.md from a recipe run's JSON outputs: no figure on that page is typed by hand.

    .venv/bin/python scripts/results.py [--run-dir runs/tiny] [--out docs/results.md]

Reads, under the run folder (runs/<preset>/): recipe.json (the command, commit, times and seconds per
stage), each stage's lineage.json (commit, config, machine, times, the command that reproduces it),
summary.json, data/manifest.json, rm/accuracy.json and eval/results.json, and the tables the benchmarks wrote
under bench/ when run on the run's models (bench/*.py run_root=...). A file a run did not write
(older runs have no recipe.json or lineage.json) shows as "not recorded". Each stage's curves.png is
copied beside the page (docs/results/<stage>-curves.png) so that the page's links work in a checkout.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NR = "not recorded"
# The recipe's stages in order, and the folder each writes its outputs to.
STAGES = ["data", "bootstrap", "pretrain", "sft", "rm", "judge", "dpo", "ppo", "eval"]
STAGE_DIRS = {"data": ["data"], "bootstrap": ["bootstrap", "base"], "pretrain": ["pretrain"], "sft": ["sft"],
              "rm": ["rm"], "judge": ["judge"], "dpo": ["dpo"], "ppo": ["ppo"], "eval": ["eval"]}
PHASES = {"generate_s": "step phase: generate (s)", "score_s": "step phase: score (s)",
          "train_s": "step phase: train (s)", "sync_s": "step phase: weight sync (s)", "step_s": "whole step (s)"}
CURVES = ("pretrain", "sft", "rm", "judge", "dpo", "ppo")  # the training stages, which plot their curves
TITLES = {"data": "Data", "bootstrap": "Bootstrap (base model)", "pretrain": "Domain pretraining", "sft": "SFT",
          "rm": "Reward model", "judge": "Judge (a second reward model, on the other half of the pairs)",
          "dpo": "DPO (recipe.align dpo or both)", "ppo": "PPO",
          "eval": "Clinical evaluation"}


def shown(path: Path) -> str:
    """A path as a reader of the repository would type it."""
    try:
        return path.relative_to(REPO).as_posix()
    except ValueError:
        return str(path)


def read_json(path: Path):
    """The parsed file, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def num(value, digits: int = 3) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return NR if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


def seconds(value) -> str:
    return f"{value:,.0f} s" if isinstance(value, (int, float)) and not isinstance(value, bool) else NR


def arrow(first, last, digits: int = 3) -> str:
    if first is None and last is None:
        return NR
    return f"{num(first, digits)} → {num(last, digits)}"


def cell(text) -> str:
    """A value safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def code(text) -> str:
    return f"`{text}`" if text else NR


def table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return lines + [""]


def when(value) -> str:
    """A date (UTC) from an ISO string or a Unix time."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if isinstance(value, str) and value:
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return value
        if parsed.tzinfo:
            parsed = parsed.astimezone(timezone.utc)
            return parsed.strftime("%Y-%m-%d %H:%M UTC")
        return parsed.strftime("%Y-%m-%d %H:%M")
    return NR


def machine(info) -> str:
    if not isinstance(info, dict):
        return NR
    parts = [str(info[k]) for k in ("platform", "cpu") if info.get(k)]
    cores = info.get("cores") or info.get("logical_cores")
    if cores:
        parts.append(f"{cores} cores")
    if info.get("memory_gib"):
        parts.append(f"{num(info['memory_gib'], 0)} GiB")
    gpus = info.get("gpus")
    if isinstance(gpus, list):
        names = sorted({str(g.get("name", g)) if isinstance(g, dict) else str(g) for g in gpus})
        parts.append(f"{len(gpus)} GPU ({', '.join(names)})" if gpus else "no GPU")
    elif isinstance(gpus, int):
        parts.append(f"{gpus} GPU" if gpus else "no GPU")
    elif gpus:
        parts.append(str(gpus))
    return ", ".join(parts) or NR


def commit(info) -> str:
    if not isinstance(info, dict) or not info.get("commit"):
        return NR
    return f"`{str(info['commit'])[:10]}`" + (" (uncommitted changes)" if info.get("dirty") else "")


def load_lineages(run: Path) -> dict[str, dict]:
    """Each stage's lineage.json, by its `stage` key (else its folder's stage)."""
    found = {}
    folder_stage = {d: s for s, dirs in STAGE_DIRS.items() for d in dirs}
    for path in sorted(run.glob("*/lineage.json")):
        data = read_json(path)
        if isinstance(data, dict):
            found.setdefault(str(data.get("stage") or folder_stage.get(path.parent.name, path.parent.name)), data)
    return found


def stage_file(run: Path, stage: str, name: str) -> Path | None:
    for folder in STAGE_DIRS[stage]:
        if (run / folder / name).is_file():
            return run / folder / name
    return None


class Page:
    def __init__(self, run: Path, out: Path):
        self.run, self.out = run, out
        self.recipe = read_json(run / "recipe.json")
        self.recipe = self.recipe if isinstance(self.recipe, dict) else None
        self.lineage = load_lineages(run)
        self.lines: list[str] = []

    def stage_seconds(self, stage: str):
        """The recipe's time for the stage, unless the stage was rerun alone after the recipe: then its own."""
        stages = (self.recipe or {}).get("stages") or {}
        if isinstance(stages.get(stage), (int, float)) and not self.rerun_alone(stage):
            return stages[stage]
        return (self.lineage.get(stage) or {}).get("seconds")

    def rerun_alone(self, stage: str) -> bool:
        started, finished = (self.lineage.get(stage) or {}).get("started"), (self.recipe or {}).get("finished")
        return bool(started and finished) and str(started) > str(finished)  # ISO times in UTC compare as text

    def curves(self, stage: str) -> str:
        """Copy the stage's curves.png beside the page and return a link to the copy."""
        src = stage_file(self.run, stage, "curves.png")
        if src is None:
            return NR
        dest = self.out.parent / "results" / f"{stage}-curves.png"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
        return f"[curves.png]({dest.relative_to(self.out.parent).as_posix()})"

    def provenance(self, stage: str) -> None:
        info = self.lineage.get(stage) or {}
        line = (f"- Date: {when(info.get('started')) if info else NR} · machine: {machine(info.get('machine'))} · "
                f"commit: {commit(info or None)} · stage time: {seconds(self.stage_seconds(stage))}")
        seed = info.get("seed")
        if isinstance(seed, dict) and seed:
            line += " · seeds " + ", ".join(f"{k} {v}" for k, v in seed.items())
        elif seed is not None and not isinstance(seed, dict):
            line += f" · seed {seed}"
        if info.get("data_manifest_sha256"):
            line += f" · data manifest `{str(info['data_manifest_sha256'])[:12]}`"
        self.add(line, f"- Reproduce: {code(info.get('command'))}")
        if stage in CURVES or stage_file(self.run, stage, "curves.png"):
            self.add(f"- Curves: {self.curves(stage)}")
        self.add("")

    def add(self, *lines: str) -> None:
        self.lines += list(lines)

    # --- sections -------------------------------------------------------------------------------

    def header(self) -> None:
        r = self.recipe or {}
        self.add("# Results", "",
                 "Generated by `scripts/results.py` from the JSON files a recipe run writes; do not edit by hand.",
                 f"Regenerate: `.venv/bin/python scripts/results.py --run-dir {shown(self.run)}`. Figures measured "
                 "outside a recipe run (benchmarks, the test suite) are in [benchmarks.md](benchmarks.md).", "",
                 "## The run", "")
        self.add(*table(["", ""], [
            ["run folder", f"`{shown(self.run)}`"],
            ["command", code(r.get("command"))],
            ["commit", commit(r)],
            ["started", when(r.get("started"))],
            ["finished", when(r.get("finished"))],
            ["total time", seconds(r.get("seconds"))],
        ]))
        extra = [k for k in (r.get("stages") or {}) if k not in STAGES]
        # DPO only where the run aligned with it (recipe.align dpo or both).
        listed = [s for s in STAGES if s != "dpo" or s in (r.get("stages") or {}) or s in self.lineage]
        rows = []
        for stage in listed + extra:
            info = self.lineage.get(stage) or {}
            rerun = " (rerun alone, after the recipe)" if self.rerun_alone(stage) else ""
            rows.append([stage, seconds(self.stage_seconds(stage)) + rerun, when(info.get("started")) if info else NR,
                         machine(info.get("machine")), commit(info or None)])
        self.add("## Stages", "", *table(["stage", "time", "date", "machine", "commit"], rows))

    def run_file(self, name: str) -> dict | None:
        """A JSON file of the run as a dict; when it is missing, a line on the page says it was not recorded."""
        content = read_json(self.run / name)
        if isinstance(content, dict):
            return content
        self.add(f"`{name}`: {NR}.", "")
        return None

    def data(self) -> None:
        self.add("## Data", "")
        m = self.run_file("data/manifest.json")
        if m:
            totals = m.get("totals") or {}
            rows = [["records", num((totals.get("records")))],
                    *[[f"records, split {k}", num(v)] for k, v in (totals.get("by_split") or {}).items()],
                    *[[f"records, task {k}", num(v)] for k, v in (totals.get("by_task") or {}).items()],
                    ["input lines skipped (reasons in manifest.md)", num(m.get("skipped_total"))],
                    ["records dropped (duplicates, test overlaps)", num(m.get("dropped_total"))],
                    ["job wall time (manifest)", seconds(m.get("job_seconds"))],
                    ["peak memory (PSS, GB)", num(m.get("peak_memory_gb"), 1)]]
            for name, s in (m.get("streams") or {}).items():
                rows.append([f"packed stream {name}: rows, fill",
                             f"{num(s.get('rows'))}, {num(s.get('packing_efficiency'), 3)}"])
            self.add(*table(["figure", "value"], rows))
        self.provenance("data")

    def bootstrap(self) -> None:
        self.add("## Bootstrap (base model)", "")
        self.provenance("bootstrap")

    def causal(self, stage: str) -> None:
        self.add(f"## {TITLES[stage]}", "")
        s = self.run_file(f"{stage}/summary.json")
        if s:
            self.add(*table(["figure", "value"], [
                ["optimizer steps", num(s.get("steps"))],
                ["held-out loss, first → last", arrow(s.get("first_eval_loss"), s.get("last_eval_loss"))],
                ["training tokens/s (mean)", num(s.get("mean_tokens_per_s"), 0)]]))
        self.provenance(stage)

    def reward_model(self, stage: str) -> None:
        self.add(f"## {TITLES[stage]}", "")
        s = self.run_file(f"{stage}/summary.json")
        if s:
            self.add(*table(["figure", "value"], [
                ["optimizer steps", num(s.get("steps"))],
                ["held-out loss, first → last", arrow(s.get("first_eval_loss"), s.get("last_eval_loss"))]]))
        a = self.run_file(f"{stage}/accuracy.json")
        if a:
            self.add("Held-out pairwise accuracy, with two baselines on the same pairs: the longer reply wins, "
                     "and the SFT model's own likelihood preference.", "")
            rows = [["**overall**", num(a.get("pairs")), "", num(a.get("overall")), num(a.get("length_baseline")),
                     num(a.get("base_likelihood"))]]
            for src, v in sorted((a.get("per_source") or {}).items()):
                rows.append([f"`{src}`", num(v.get("pairs")), num(v.get("train_pairs")), num(v.get("accuracy")),
                             num(v.get("length_baseline")), num(v.get("base_likelihood"))])
            self.add(*table(["source", "held-out pairs", "training pairs", "accuracy", "longer reply",
                             "SFT likelihood"], rows))
            if "prefers_longer" in a:
                self.add(f"Length bias: score-length correlation {num(a['score_length_correlation'])} over every "
                         f"held-out reply; the longer reply of a pair scores higher in {num(a['prefers_longer'])} "
                         "of the pairs.", "")
        self.provenance(stage)

    def dpo(self) -> None:
        """Only for a run that aligned with DPO (recipe.align dpo or both)."""
        self.add(f"## {TITLES['dpo']}", "")
        s = self.run_file("dpo/summary.json")
        if s:
            self.add(*table(["figure", "value"], [
                ["optimizer steps", num(s.get("steps"))],
                ["held-out loss, first → last", arrow(s.get("first_eval_loss"), s.get("last_eval_loss"))]]))
        a = self.run_file("dpo/accuracy.json")
        if a:
            self.add("Held-out pairs: the implicit reward's accuracy and margin, how far the policy moved each reply's "
                     "summed log-prob from the SFT model's, and the SFT model's own likelihood preference.", "")
            rows = [["**overall**", num(a.get("pairs")), "", num(a.get("overall")), num(a.get("margin")),
                     num(a.get("chosen_logp_change"), 2), num(a.get("rejected_logp_change"), 2),
                     num(a.get("sft_likelihood"))]]
            for src, v in sorted((a.get("per_source") or {}).items()):
                rows.append([f"`{src}`", num(v.get("pairs")), num(v.get("train_pairs")), num(v.get("accuracy")),
                             num(v.get("margin")), num(v.get("chosen_logp_change"), 2),
                             num(v.get("rejected_logp_change"), 2), num(v.get("sft_likelihood"))])
            self.add(*table(["source", "held-out pairs", "training pairs", "accuracy", "margin", "chosen log-prob "
                             "change", "rejected log-prob change", "SFT likelihood"], rows))
        self.provenance("dpo")

    def ppo(self) -> None:
        self.add("## PPO", "")
        s = self.run_file("ppo/summary.json")
        if s:
            t = s.get("timing_s") or {}
            self.add(*table(["figure", "value"], [
                ["steps", num(s.get("steps"))],
                ["reward, first → last step", arrow(s.get("first_reward"), s.get("last_reward"))],
                ["held-out reward, first → last", arrow(s.get("first_eval_reward"), s.get("last_eval_reward"))],
                ["held-out KL (k3, summed per answer), first → last", arrow(s.get("first_eval_kl"),
                                                                             s.get("last_eval_kl"), 2)],
                ["KL of the last step", num(s.get("last_kl"), 2)],
                ["samples/s", num(s.get("samples_per_s"), 2)],
                *[[PHASES.get(k, k), num(v, 2)] for k, v in t.items()]]))
        self.provenance("ppo")

    def evaluation(self) -> None:
        self.add("## Clinical evaluation", "")
        r = self.run_file("eval/results.json")
        if not r:
            self.provenance("eval")
            return
        models, fam, items = r.get("models") or [], r.get("families") or {}, r.get("items") or {}
        self.add(f"Models: {', '.join(f'`{m}`' for m in models) or NR}; items per family: "
                 + (", ".join(f"{k} {num(v)}" for k, v in items.items()) or NR)
                 + f"; evaluation time in results.json: {seconds(r.get('seconds'))}.", "")
        if "conversation" in fam:
            keys = ["bleu1", "bleu2", "bleu3", "bleu4", "gleu", "rouge1", "rouge2", "rougeL"]
            self.add("**Conversation** (character-level, 0-100)", "", *table(
                ["model", *keys], [[m, *(num(fam["conversation"].get(m, {}).get(k), 1) for k in keys)]
                                   for m in models if m in fam["conversation"]]))
        if "exam" in fam:
            rows = []
            for m in models:
                e = fam["exam"].get(m)
                if e:
                    rows.append([m, num(e.get("accuracy")), num(e.get("likelihood_accuracy")),
                                 num(e.get("no_answer")), num(e.get("chance")), num(e.get("coverage"))])
            self.add("**Exam**", "", *table(["model", "accuracy (letter in reply)", "option likelihood",
                                             "no letter", "chance", "category coverage"], rows))
            per_cat = {m: (fam["exam"].get(m) or {}).get("per_category") or {} for m in models}
            cats = sorted({c for m in models for c in per_cat[m]})
            if cats:
                rows = []
                for c in cats:
                    n = next((per_cat[m][c].get("items") for m in models if c in per_cat[m]), None)
                    rows.append([f"{c} ({num(n)})", *(num((per_cat[m].get(c) or {}).get("accuracy")) for m in models)])
                self.add("Exam accuracy (letter in reply) per derived category (items):", "",
                         *table(["category", *models], rows))
        if "diagnosis" in fam:
            rows = [[m, num(d.get("accuracy")), num(d.get("average"))]
                    for m in models if (d := fam["diagnosis"].get(m))]
            self.add("**Diagnosis**", "", *table(["model", "accuracy", "average over disease groups"], rows))
        config = (self.lineage.get("eval") or {}).get("config")
        settings = (config.get("eval") or {}) if isinstance(config, dict) else {}
        judge = f"`eval.judge={settings['judge']}`" if settings.get("judge") else NR
        if settings.get("judge") == "reward_model":
            judge += f", `eval.judge_reward_model={settings.get('judge_reward_model', 'rm')}`"
        for family in ("qa", "safety"):
            if family in fam:
                rows = [[pair, num(v.get("win"), 2), num(v.get("tie"), 2), num(v.get("lose"), 2), num(v.get("items"))]
                        for pair, v in fam[family].items()]
                self.add(f"**{'QA' if family == 'qa' else 'Safety'}** (judge: {judge})", "",
                         *table(["comparison", "win", "tie", "lose", "items"], rows))
        if "bias" in fam:
            rows = []
            for m in models:
                for source in ("likelihood", "generated"):
                    b = (fam["bias"].get(m) or {}).get(source)
                    if b:  # "-": nothing to score (no answer gave a scale point)
                        modal = b.get("modal_point")
                        rows.append([f"`{m}`", source, *("-" if b.get(k) is None else num(b[k], 2)
                                                         for k in ("mean", "spread", "consistency")),
                                     f"{modal[0]} ({modal[1]:.0%})" if modal else "-",
                                     num(b["parsed"], 2) if "parsed" in b else "-"])
            self.add("**Bias toward patients** (attitude 1-5, higher = less stigmatising; consistent: forward/reverse "
                     "pairs within one point; modal point: the scale point given most often; -: no answer gave a "
                     "scale point)", "",
                     *table(["model", "read from", "mean", "spread across groups", "consistent", "modal point",
                             "parsed"], rows))
        health = r.get("health") or {}
        if health:
            keys = ["empty", "truncated", "degenerate", "repeated", "distinct2", "compliant"]
            rows = [[family, f"`{m}`", *(num(health[m][family].get(k), 2) for k in keys)]
                    for family in items for m in models if family in health.get(m, {})]
            self.add("**Output health** (shares of the answers; degenerate: empty or over half its 4-grams repeated; "
                     "compliant: an exam letter, a named disease)", "", *table(["family", "model", *keys], rows))
        self.provenance("eval")

    def benchmarks(self) -> None:
        """The tables bench/*.py wrote on this run's models (runs/<preset>/bench/<name>.md, from their JSON)."""
        self.add("## Benchmarks on this run's models", "")
        tables = sorted((self.run / "bench").glob("*.md"))
        command = f".venv/bin/python bench/<name>.py run_root={shown(self.run.parent)}"
        if not tables:
            self.add(f"No benchmark was run on them: `{command}`.", "")
        for md in tables:
            written = datetime.fromtimestamp(md.stat().st_mtime, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
            self.add(f"### {md.stem}", "", f"Written {written} by `{command.replace('<name>', md.stem)}`:", "",
                     md.read_text(encoding="utf-8").strip(), "")

    def render(self) -> str:
        self.header()
        self.data()
        self.bootstrap()
        for stage in ("pretrain", "sft"):
            self.causal(stage)
        for stage in ("rm", "judge"):
            self.reward_model(stage)
        if (self.run / "dpo").is_dir():
            self.dpo()
        self.ppo()
        self.evaluation()
        self.benchmarks()
        return "\n".join(self.lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", type=Path, default=REPO / "runs" / "tiny", help="a recipe run: runs/<preset>")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "results.md")
    args = ap.parse_args(argv)
    run = args.run_dir.expanduser().resolve()
    if not run.is_dir():
        raise SystemExit(f"no run folder at {run}: run scripts/recipe.sh first, or pass --run-dir")
    out = args.out.expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(Page(run, out).render(), encoding="utf-8")
    print(f"wrote {out} from {run}")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
