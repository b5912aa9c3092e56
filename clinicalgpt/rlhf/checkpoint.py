"""PPO checkpoints: the learners' DeepSpeed states (policy, critic) and the controller's state (step,
prompts consumed, the KL coefficient), one folder per step under ppo/checkpoints/step_NNNNNN."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

KEEP_CHECKPOINTS = 2


def save_checkpoint(folder: Path, learners, state: dict) -> None:
    """Written beside the last good checkpoint, then renamed into place: a crash mid-write leaves a
    .tmp folder that resume ignores. `learners`: the LearnerGroup (its ranks save their shards)."""
    tmp = folder / f"step_{state['step']:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    learners.call("save", str(tmp))
    (tmp / "controller.json").write_text(json.dumps(state))
    os.replace(tmp, folder / f"step_{state['step']:06d}")
    for old in sorted(folder.glob("step_??????"))[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old)


def latest_checkpoint(folder: Path) -> Path | None:
    done = sorted(p for p in folder.glob("step_??????") if (p / "controller.json").exists())
    return done[-1] if done else None


def load_checkpoint(folder: Path, learners) -> dict | None:
    """The last checkpoint's controller state, its learner states loaded into `learners`; None without one."""
    last = latest_checkpoint(folder)
    if last is None:
        return None
    state = json.loads((last / "controller.json").read_text())
    missing = {"step", "consumed", "beta"} - set(state)
    if missing:
        raise SystemExit(f"{last / 'controller.json'} lacks {', '.join(sorted(missing))}: it was not written by "
                         f"this version of the PPO stage; move {folder} away to start PPO afresh")
    learners.call("load", str(last))
    print(f"[ppo] resumed from {last.name}: step {state['step']}, {state['consumed']} prompts consumed", flush=True)
    return state
