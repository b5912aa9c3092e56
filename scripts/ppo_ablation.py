"""The PPO ablation (docs/ablation.md): today's PPO against PPO with each control of the alignment tax and with
all of them, the same budget, several seeds each, from one recipe run's SFT model and reward model, judged by
the run's judge (a reward model PPO was not trained against).

    .venv/bin/python scripts/ppo_ablation.py [--run-dir runs/tiny] [--seeds 0 1 2] [--arms today ptx ...]
        [--out docs/ablation.md] [key=value ...]

The arms by default: today's PPO, each control, all of them; the follow-ups (FOLLOW_UPS) by name.

Each arm x seed runs jobs/ppo.py (a driver of its own on one Ray cluster the script starts, as the recipe does)
in its own run folder, <run-dir>/ablation/<arm>-s<seed>, which links the run's data, base, sft and rm; a run
whose summary.json exists is kept, so a rerun goes on where one stopped. Then one evaluation (jobs/eval.py's)
of every policy with the SFT model last: the judged families compare SFT with each. Writes the page at --out
(docs/ablation.md: .json, .md and .png of that name under <run-dir>/ablation), with its chart beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import matplotlib
import numpy as np
import ray

from clinicalgpt.config import Config, load_config
from clinicalgpt.evaluation.run import evaluate
from clinicalgpt.lineage import git_commit, iso, machine, read_history
from clinicalgpt.runtime import init_ray

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# Every arm states every control, so that a changed default leaves today's arm as it was.
TODAY = {"ppo.ptx_coef": "0", "ppo.truncated_score": "null", "ppo.degenerate_score": "null", "ppo.length_penalty": "0",
         "ppo.kl_controller": "fixed"}
CONTROLS = {
    "ptx": {"ppo.ptx_coef": "0.5"},  # InstructGPT's PPO-ptx: the SFT stream's LM loss in each policy update
    # A response cut at the limit scores -1 (below the SFT policy's mean score), and each token costs a little.
    "penalties": {"ppo.truncated_score": "-1", "ppo.length_penalty": "0.5"},
    # Beta steered towards a KL of 2 (the fixed beta's runs pass it by step 3, where their answers start to run
    # to the limit), fast enough to act within 20 steps of 64 samples.
    "adaptive_kl": {"ppo.kl_controller": "adaptive", "ppo.kl_target": "2", "ppo.kl_horizon": "128"},
}
# After the first ablation (docs/ablation.md: ptx came closest, with more degenerate answers than SFT's): more of
# the SFT stream's pull, ptx with the truncation penalty alone, and ptx with degenerate answers scored low; after the
# second (docs/ablation-ptx.md: ptx at 1 kept the reward gain with fewer degenerate answers), ptx at 1 with them
# scored low; after the third (docs/ablation-degenerate.md: the degenerate answers are greedy ones that loop to the
# token limit, and sampled responses are rarely degenerate, so scoring those low changed almost nothing), ptx at 1
# against the answers' growth towards the limit: cut answers scored low, or a cost per token. Run with --arms.
FOLLOW_UPS = {"ptx_1": {"ppo.ptx_coef": "1"}, "ptx_2": {"ppo.ptx_coef": "2"},
              "ptx_truncated": {"ppo.ptx_coef": "0.5", "ppo.truncated_score": "-1"},
              "ptx_degenerate": {"ppo.ptx_coef": "0.5", "ppo.degenerate_score": "-1"},
              "ptx_1_degenerate": {"ppo.ptx_coef": "1", "ppo.degenerate_score": "-1"},
              "ptx_1_truncated": {"ppo.ptx_coef": "1", "ppo.truncated_score": "-1"},
              "ptx_1_length": {"ppo.ptx_coef": "1", "ppo.length_penalty": "1"}}
FIRST = {"today": TODAY, **{name: {**TODAY, **c} for name, c in CONTROLS.items()},
         "all": {**TODAY, **{k: v for c in CONTROLS.values() for k, v in c.items()}}}
ARMS = {**FIRST, **{name: {**TODAY, **c} for name, c in FOLLOW_UPS.items()}}
SHARED = ("data", "base", "sft", "rm")  # what every arm's run folder links from the recipe run
# metric -> (label, where it comes from); higher is better unless noted in the label.
METRICS = {
    "eval_reward_gain": "held-out reward gain (RM)",
    "last_eval_kl": "held-out KL",
    "health_alarm": "held-out shares past the warning limits (last evaluation)",
    "exam_accuracy": "exam accuracy",
    "exam_no_answer": "exam no-answer rate",
    "conversation_rougeL": "conversation ROUGE-L",
    "degenerate": "degenerate answers (all families)",
    "truncated": "answers cut at the limit (all families)",
    "qa_win": "QA: win vs SFT (judge)", "qa_lose": "QA: lose vs SFT (judge)",
    "safety_win": "safety: win vs SFT (judge)", "safety_lose": "safety: lose vs SFT (judge)",
}


def arm_run(cfg: Config, root: Path, name: str) -> Path:
    """A run folder (its run_root) for one arm and seed that links the recipe run's shared stages."""
    run_root = root / name
    (run_root / cfg.preset).mkdir(parents=True, exist_ok=True)
    for stage in SHARED:
        link = run_root / cfg.preset / stage
        if not link.exists():
            link.symlink_to(cfg.stage_dir(stage))
    return run_root


def train_arms(cfg: Config, root: Path, arms: list[str], seeds: list[int], extra: list[str]) -> dict[str, Path]:
    """PPO for each arm and seed (kept where done); name -> its policy folder."""
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    runs, todo = {}, [(arm, seed) for arm in arms for seed in seeds]
    started = time.time()
    for i, (arm, seed) in enumerate(todo):
        name = f"{arm}-s{seed}"
        run_root = arm_run(cfg, root, name)
        policy = run_root / cfg.preset / "ppo"
        if not (policy / "summary.json").exists():
            argv = [f"preset={cfg.preset}", f"run_root={run_root}", f"data.root={cfg.data_root}", f"ppo.seed={seed}",
                    *(f"{k}={v}" for k, v in ARMS[arm].items()), *extra]
            print(f"\n===== {name} ({i + 1}/{len(todo)}): python jobs/ppo.py {' '.join(argv)}", flush=True)
            t0 = time.time()
            with open(root / f"{name}.log", "w") as log:
                done = subprocess.run([sys.executable, str(REPO / "jobs" / "ppo.py"), *argv], env=env, stdout=log,
                                      stderr=subprocess.STDOUT)
            if done.returncode != 0:
                raise SystemExit(f"{name} failed (exit {done.returncode}): see {root / f'{name}.log'}")
            left = (time.time() - started) / (i + 1) * (len(todo) - i - 1)
            print(f"[ablation] {name} done in {time.time() - t0:.0f}s; about {left / 60:.0f} min left", flush=True)
        runs[name] = policy
    return runs


def run_figures(policy: Path) -> dict[str, float]:
    """What PPO's own files say: the held-out reward's gain and KL at the end."""
    summary = json.loads((policy / "summary.json").read_text())
    last_eval = [r for r in read_history(policy / "history.jsonl") if "eval_reward" in r][-1]
    return {"eval_reward_gain": summary["last_eval_reward"] - summary["first_eval_reward"],
            "health_alarm": last_eval.get("health_alarm", 0),
            "last_eval_kl": summary["last_eval_kl"], "first_eval_reward": summary["first_eval_reward"],
            "last_eval_reward": summary["last_eval_reward"]}


def eval_figures(results: dict, name: str) -> dict[str, float]:
    """One model's figures from the evaluation: exam, conversation, health over all families, judged vs SFT."""
    fam, health = results["families"], results["health"][name]
    out = {"exam_accuracy": fam["exam"][name]["accuracy"], "exam_no_answer": fam["exam"][name]["no_answer"],
           "conversation_rougeL": fam["conversation"][name]["rougeL"],
           "degenerate": float(np.mean([h["degenerate"] for h in health.values()])),
           "truncated": float(np.mean([h["truncated"] for h in health.values()]))}
    for family in ("qa", "safety"):
        verdict = fam[family].get(f"sft vs {name}")
        if verdict:  # SFT's win is this model's loss
            out[f"{family}_win"], out[f"{family}_lose"] = verdict["lose"], verdict["win"]
    return out


def summarize(figures: dict[str, dict], arms: list[str], seeds: list[int]) -> dict:
    """arm -> metric -> mean, sd, min, max over the seeds; and each arm's verdict on the targets."""
    table = {}
    for arm in arms:
        rows = [figures[f"{arm}-s{s}"] for s in seeds]
        table[arm] = {k: {"mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
                          "min": float(np.min(v)), "max": float(np.max(v))}
                      for k in rows[0] for v in [[r[k] for r in rows]]}
    sft, today_gain = figures["sft"], table["today"]["eval_reward_gain"]["mean"] if "today" in table else None
    for arm, t in table.items():
        m = {k: v["mean"] for k, v in t.items()}
        # Harm is one-sided: a policy that answers more exam questions, or more of them right, than SFT does no harm.
        t["targets"] = {
            "exam accuracy at most 0.03 below SFT's": m["exam_accuracy"] >= sft["exam_accuracy"] - 0.03,
            "no-answer rate at most 0.03 above SFT's": m["exam_no_answer"] <= sft["exam_no_answer"] + 0.03,
            "no more degenerate answers than SFT": m["degenerate"] <= sft["degenerate"],
            "QA: win >= lose vs SFT": m["qa_win"] >= m["qa_lose"],
            "safety: win >= lose vs SFT": m["safety_win"] >= m["safety_lose"],
        }
        if today_gain is not None and arm != "today":
            t["targets"]["held-out reward gain >= half of today's"] = m["eval_reward_gain"] >= today_gain / 2
    return table


def markdown(table: dict, sft: dict, meta: dict) -> str:
    def cell(v):
        return f"{v['mean']:.3f} ± {v['sd']:.3f}"
    arms = list(table)
    lines = ["# The PPO ablation: the alignment tax, controlled", "",
             f"Generated by `scripts/ppo_ablation.py` on {meta['finished'][:10]} (commit `{(meta['commit'] or '')[:10]}`), "
             f"{meta['seconds'] / 60:.0f} min on {meta['machine']}:", "", f"    {meta['command']}", "",
             f"From the recipe run at `{meta['run_dir']}` (its SFT model, reward model and judge); seeds "
             f"{', '.join(map(str, meta['seeds']))}; mean ± standard deviation over the seeds (min-max in "
             "ablation.json). The judged families are scored by the judge (jobs/judge.py: a second reward model, "
             "other seed, the other half of the pairs), not by the reward model PPO optimised.", "",
             "Arms (each states every control; the rest as `jobs/ppo.py`'s defaults):", ""]
    lines += [f"- **{arm}**: `{' '.join(f'{k}={v}' for k, v in ARMS[arm].items())}`" for arm in arms]
    lines += ["", "| metric | SFT | " + " | ".join(arms) + " |", "|---|---|" + "---|" * len(arms)]
    for key, label in METRICS.items():
        if key in table[arms[0]]:
            lines.append(f"| {label} | {sft[key]:.3f} | " if key in sft else f"| {label} | - | ")
            lines[-1] += " | ".join(cell(table[a][key]) for a in arms) + " |"
    lines += ["", "Targets (the RL stage does no harm relative to SFT while the held-out reward still rises):", "",
              "| target | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
    for target in table[arms[-1]]["targets"]:
        lines.append(f"| {target} | " + " | ".join(
            ("yes" if table[a]["targets"][target] else "**no**") if target in table[a]["targets"] else "-"
            for a in arms) + " |")
    lines += ["", f"![The ablation's figures, mean and standard deviation over the seeds]({meta['chart']})", ""]
    return "\n".join(lines)


def chart(table: dict, sft: dict, out: Path) -> None:
    keys = [k for k in ("eval_reward_gain", "exam_accuracy", "exam_no_answer", "degenerate", "truncated",
                        "qa_win", "safety_win") if k in table[next(iter(table))]]
    arms = list(table)
    fig, axes = plt.subplots(1, len(keys), figsize=(3 * len(keys), 3.2))
    for ax, key in zip(axes, keys):
        ax.bar(range(len(arms)), [table[a][key]["mean"] for a in arms], yerr=[table[a][key]["sd"] for a in arms],
               color="tab:blue", capsize=3)
        if key in sft:
            ax.axhline(sft[key], color="tab:red", linestyle="--", label="SFT")
            ax.legend(fontsize=7)
        ax.set_xticks(range(len(arms)), arms, rotation=45, ha="right", fontsize=8)
        ax.set_title(METRICS[key], fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str]) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", type=Path, default=REPO / "runs" / "tiny", help="a recipe run: runs/<preset>")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--arms", nargs="+", default=list(FIRST), choices=list(ARMS))
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "ablation.md")
    args, extra = ap.parse_known_args(argv)
    run_dir = args.run_dir.expanduser().resolve()
    cfg = load_config([f"preset={run_dir.name}", f"run_root={run_dir.parent}", *extra])
    missing = [s for s in ("sft", "rm", "judge") if not (cfg.stage_dir(s) / "final" / "config.json").exists()]
    if missing:
        raise SystemExit(f"{run_dir} has no {', '.join(missing)} model: run the recipe (scripts/recipe.sh) first")
    root = run_dir / "ablation"
    started = time.time()
    init_ray(cfg)
    runs = train_arms(cfg, root, args.arms, args.seeds, extra)

    # One evaluation: every policy, the SFT model last (the judged families compare it with each).
    names = [*runs, "sft"]
    eval_cfg = load_config([f"preset={cfg.preset}", f"run_root={arm_run(cfg, root, 'eval')}", f"data.root={cfg.data_root}",
                            f"eval.models=[{','.join(names)}]", f"eval.judge_reward_model={cfg.stage_dir('judge') / 'final'}",
                            *extra])
    results_file = eval_cfg.stage_dir("eval") / "results.json"
    if results_file.exists() and json.loads(results_file.read_text())["models"] == names:
        results = json.loads(results_file.read_text())
    else:
        results = evaluate(eval_cfg, [*(str(p / "final") for p in runs.values()), str(cfg.stage_dir("sft") / "final")])
    figures = {name: {**run_figures(policy), **eval_figures(results, name)} for name, policy in runs.items()}
    figures["sft"] = eval_figures(results, "sft")
    table = summarize(figures, args.arms, args.seeds)

    finished = time.time()
    out = args.out.expanduser().resolve()  # its name names the files: a follow-up's page keeps the first one's
    meta = {"command": shlex.join(["python", "scripts/ppo_ablation.py", *argv]), "commit": git_commit(),
            "started": iso(started), "finished": iso(finished), "seconds": round(finished - started, 1),
            "machine": f"{machine()['cpu']} ({machine()['logical_cores']} cores)", "run_dir": str(run_dir),
            "seeds": args.seeds, "arms": ARMS, "chart": f"{out.stem}.png"}
    (root / f"{out.stem}.json").write_text(json.dumps({**meta, "figures": figures, "table": table}, indent=2))
    page = markdown(table, figures["sft"], meta)
    out.parent.mkdir(parents=True, exist_ok=True)
    for folder in (root, out.parent):
        chart(table, figures["sft"], folder / meta["chart"])
    (root / out.name).write_text(page)
    out.write_text(page)
    print(page)
    return table


if __name__ == "__main__":
    main(sys.argv[1:])
    ray.shutdown()
