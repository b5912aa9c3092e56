"""Jobs as users run them on a cluster: `ray job submit --working-dir . -- python jobs/<stage>.py` against a
head started with `ray start --head` (token authentication on, as Ray 2.60 starts it), for a training
stage (Ray Train inside the job), resuming a run that was interrupted, and for PPO with a user's reward
function (its Ray actor roles inside the job)."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clinicalgpt.config import load_config
from conftest import REPO, free_ports, history, isolated_run, ppo_args, stage_args, wait_for_step

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A cluster started the way a user starts one (`ray start --head`), once for this module's jobs,
    stopped through its own process (SIGINT to `--block` shuts down what it started; never `ray stop`):
    (ray cli, dashboard url, env)."""
    tmp_path = tmp_path_factory.mktemp("ray_head")
    ray_cli = str(Path(sys.executable).parent / "ray")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    gcs, dashboard, agent, metrics = free_ports(4)
    with (tmp_path / "head.log").open("w") as log:
        head = subprocess.Popen([ray_cli, "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dashboard}",
                                 f"--dashboard-agent-listen-port={agent}", f"--metrics-export-port={metrics}",
                                 "--num-cpus=4", "--disable-usage-stats"], env=env, stdout=log, stderr=subprocess.STDOUT)
    yield ray_cli, f"http://127.0.0.1:{dashboard}", env
    head.send_signal(signal.SIGINT)
    head.wait(timeout=120)


def submit_job(ray_head, cwd: Path, *command: str, runtime_env: dict | None = None) -> str:
    """`ray job submit --working-dir <repo> [--runtime-env-json ...] -- <command>` against the ray_head cluster:
    its output. The head takes a while to accept jobs: retried until one is submitted (then never again)."""
    ray_cli, url, env = ray_head
    extra = ["--runtime-env-json", json.dumps(runtime_env)] if runtime_env else []
    submit = [ray_cli, "job", "submit", "--address", url, "--working-dir", str(REPO), *extra, "--", *command]
    deadline = time.time() + 180
    while True:
        done = subprocess.run(submit, env=env, capture_output=True, text=True, cwd=cwd)
        out = done.stdout + done.stderr
        if "raysubmit_" in out or time.time() > deadline:
            return out
        time.sleep(5)


@pytest.mark.chaos
def test_an_interrupted_stage_resumes_under_ray_job_submit_on_fewer_workers(built, tmp_path, ray_head):
    """A training job is killed with the local cluster it started (a crash, not a stop); submitted again
    with `ray job submit` on fewer workers than saved its checkpoint, it resumes from that checkpoint
    instead of starting over (the weights restore; ZeRO-2's per-rank optimizer shards cannot) and finishes."""
    cfg, _ = built
    run_root = isolated_run(cfg, tmp_path)
    argv = [f"run_root={run_root}", f"data.root={cfg.data_root}"] + stage_args(
        "pretrain", 6, checkpoint_every=2, min_workers=1, num_workers=2)
    run = load_config(argv)
    proc = subprocess.Popen([sys.executable, str(REPO / "jobs" / "pretrain.py"), *argv],
                            env={**os.environ, "RAY_ADDRESS": ""}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_step(run.stage_dir("pretrain") / "history.jsonl", 3, proc)
    finally:
        proc.kill()  # interrupted, with a checkpoint every 2 steps behind it
        proc.wait()
    out = submit_job(ray_head, tmp_path, "python", "jobs/pretrain.py", *argv, "pretrain.num_workers=1",
                     "pretrain.min_workers=0")
    assert "succeeded" in out, out[-3000:]
    restored = re.search(r"resumed from step (\d+) on 1 worker\(s\) \(saved by 2", out)
    assert restored, out[-3000:]
    # The killed job's rows, then the rerun's from the step after its checkpoint (the killed job's workers may log a
    # step after its driver died, and a checkpoint being written when they died is not the last one).
    steps, resumed = [h["step"] for h in history(run, "pretrain")], int(restored[1])
    killed, rerun = steps[:len(steps) - (6 - resumed)], steps[len(steps) - (6 - resumed):]
    assert rerun == list(range(resumed + 1, 7)) and killed == list(range(1, len(killed) + 1)), steps
    assert resumed % 2 == 0 and len(killed) - 2 <= resumed <= len(killed), steps  # never from the start
    assert (run.stage_dir("pretrain") / "final" / "config.json").exists()


def test_ppo_runs_under_ray_job_submit_with_a_users_reward_function(trained, tmp_path, ray_head):
    """With a user's Python function, imported inside the reward actor from the job's working directory and
    configured by an environment variable of the submitted runtime env, which also sets variables the job
    itself sets (Ray refuses conflicting keys between the two: the job must not pass them again). The reward
    model as the reward: tests/test_ppo.py's roles."""
    cfg, _ = trained
    run_root = isolated_run(cfg, tmp_path, shared=("data", "base", "sft"))
    reward = "python:tests.user_rewards:answer_length"
    user_env = {"env_vars": {"ANSWER_CHARS": "10000", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}}
    out = submit_job(ray_head, tmp_path, "python", "jobs/ppo.py", *ppo_args(run_root, cfg, 2, f"ppo.reward={reward}"),
                     runtime_env=user_env)
    assert "succeeded" in out, out[-3000:]
    assert f"reward {reward}," in out and "[ppo] done" in out
    summary = json.loads((run_root / cfg.preset / "ppo" / "summary.json").read_text())
    assert summary["steps"] == 2
    # -|characters - 10000| / 10000 of answers of 24 tokens at most: in [-1, -0.95]
    rows = [json.loads(x) for x in (run_root / cfg.preset / "ppo" / "history.jsonl").read_text().splitlines()]
    assert all(-1 <= r[k] <= -0.95 for r in rows for k in ("reward", "eval_reward") if k in r), rows
