"""The whole recipe, stage after stage, on one Ray cluster (the README's main command).

    python jobs/recipe.py [preset=tiny] [key=value ...]

Joins the cluster at $RAY_ADDRESS, or starts a local one for the run and shuts it down at the end.
Each stage runs as its own driver (`python jobs/<stage>.py`, exactly what a user would run), so a
failing stage names itself and the stages already done keep their outputs.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import ray

from clinicalgpt.config import Config, load_config
from clinicalgpt.lineage import git_commit, iso
from clinicalgpt.runtime import init_ray

JOBS = Path(__file__).resolve().parent


def main(argv: list[str]) -> None:
    recipe_started = time.time()
    cfg = load_config(argv)
    init_ray(cfg)
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    timings = {}
    for stage in cfg.recipe_stages():
        print(f"\n===== {stage} =====", flush=True)
        started = time.time()
        done = subprocess.run([sys.executable, str(JOBS / f"{stage}.py"), *argv], env=env)
        if done.returncode != 0:
            raise SystemExit(f"stage {stage} failed (exit {done.returncode}); rerun: python jobs/{stage}.py "
                             + " ".join(argv))
        timings[stage] = round(time.time() - started, 1)
    finished = time.time()
    (cfg.run_dir / "recipe.json").write_text(json.dumps({
        "command": shlex.join(["python", "jobs/recipe.py", *argv]), "commit": git_commit(),
        "started": iso(recipe_started), "finished": iso(finished), "seconds": round(finished - recipe_started, 1),
        "stages": timings}, indent=2))
    print_summary(cfg, timings)


def print_summary(cfg: Config, timings: dict[str, float]) -> None:
    """One screen: time per stage, the data, and each stage's headline figures from its output files."""
    manifest = json.loads((cfg.data_dir / "manifest.json").read_text())
    print("\n===== summary =====")
    print(f"preset {cfg.preset}, data root {cfg.data_root}, outputs under {cfg.run_dir}")
    for stage, seconds in timings.items():
        print(f"  {stage:10s} {seconds:7.1f} s")
    print(f"  records: {manifest['totals']['records']:,} ({', '.join(f'{k} {v:,}' for k, v in manifest['totals']['by_task'].items())})")
    print(f"  skipped input lines: {manifest['skipped_total']:,}; see {cfg.data_dir / 'manifest.md'}")
    print(f"  base model: {cfg.model_path}")
    for stage in [s for s in ("pretrain", "sft", "rm", "judge", "dpo") if s in timings]:
        summary = json.loads((cfg.stage_dir(stage) / "summary.json").read_text())
        extra = ""
        if "accuracy" in summary:
            extra = f", {'implicit-reward' if stage == 'dpo' else 'pairwise'} accuracy {summary['accuracy']:.3f}"
        print(f"  {stage}: {summary['steps']} steps, held-out loss {summary['first_eval_loss']:.3f} -> "
              f"{summary['last_eval_loss']:.3f}{extra}; model {summary['model']}")
    if "ppo" in timings:
        ppo = json.loads((cfg.stage_dir("ppo") / "summary.json").read_text())
        print(f"  ppo: {ppo['steps']} steps, reward {ppo['first_reward']:.3f} -> {ppo['last_reward']:.3f}, held-out "
              f"reward {ppo['first_eval_reward']:.3f} -> {ppo['last_eval_reward']:.3f} at KL {ppo['last_eval_kl']:.2f}, "
              f"{ppo['samples_per_s']:.1f} samples/s; policy {ppo['model']}")
    results = json.loads((cfg.stage_dir("eval") / "results.json").read_text())
    fam = results["families"]
    for name in results["models"]:
        parts = []
        if "exam" in fam:
            exam = fam["exam"][name]
            parts.append(f"exam {exam['accuracy']:.3f} (option likelihood {exam.get('likelihood_accuracy', float('nan')):.3f})")
        if "conversation" in fam:
            parts.append(f"BLEU-1 {fam['conversation'][name]['bleu1']:.1f} ROUGE-L {fam['conversation'][name]['rougeL']:.1f}")
        if "diagnosis" in fam:
            parts.append(f"diagnosis {fam['diagnosis'][name]['accuracy']:.3f}")
        print(f"  eval {name}: " + ", ".join(parts))
    for family in ("qa", "safety"):
        for pair, v in fam.get(family, {}).items():
            print(f"  eval {family} {pair}: win {v['win']:.2f} tie {v['tie']:.2f} lose {v['lose']:.2f}")
    print(f"  evaluation report: {cfg.stage_dir('eval') / 'report.md'}")
    for stage in cfg.recipe_stages():
        if (cfg.stage_dir(stage) / "curves.png").exists():
            print(f"  curves {stage:8s} {cfg.stage_dir(stage) / 'curves.png'}")
    print(f"  lineage (commit, config, versions): <stage>/lineage.json; the recipe's: {cfg.run_dir / 'recipe.json'}")
    served = "ppo" if "ppo" in timings else "dpo"  # serve.model's default: ppo
    print(f"  serve the {served.upper()} policy (OpenAI API on http://127.0.0.1:8000/v1): "
          "CLINICALGPT_API_KEY=<a key of your own> .venv/bin/python jobs/serve.py"
          + ("" if served == "ppo" else " serve.model=dpo"))


if __name__ == "__main__":
    main(sys.argv[1:])
    ray.shutdown()
