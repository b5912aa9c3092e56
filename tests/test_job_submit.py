"""Jobs as users run them on a cluster: `ray job submit --working-dir . -- python jobs/<stage>.py` against a
head started with `ray start --head` (token authentication on, as Ray 2.60 starts it), for a training
stage (Ray Train inside the job) and for PPO with the reward model (its Ray actor roles inside the job)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clinicalgpt.config import load_config
from conftest import REPO, free_ports, history, isolated_run, ppo_args, stage_args

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


def submit_job(ray_head, cwd: Path, *command: str) -> str:
    """`ray job submit --working-dir <repo> -- <command>` against the ray_head cluster: its output.
    The head takes a while to accept jobs: retried until one is submitted (then never again)."""
    ray_cli, url, env = ray_head
    submit = [ray_cli, "job", "submit", "--address", url, "--working-dir", str(REPO), "--", *command]
    deadline = time.time() + 180
    while True:
        done = subprocess.run(submit, env=env, capture_output=True, text=True, cwd=cwd)
        out = done.stdout + done.stderr
        if "raysubmit_" in out or time.time() > deadline:
            return out
        time.sleep(5)


def test_a_stage_runs_under_ray_job_submit(built, tmp_path, ray_head):
    cfg, _ = built
    run_root = isolated_run(cfg, tmp_path)
    out = submit_job(ray_head, tmp_path, "python", "jobs/pretrain.py", f"run_root={run_root}",
                     f"data.root={cfg.data_root}", *stage_args("pretrain", 2))
    assert "succeeded" in out, out[-3000:]
    assert [h["step"] for h in history(load_config([f"run_root={run_root}"]), "pretrain")] == [1, 2]
    assert (run_root / cfg.preset / "pretrain" / "final" / "config.json").exists()


def test_ppo_runs_under_ray_job_submit(trained, tmp_path, ray_head):
    cfg, _ = trained
    run_root = isolated_run(cfg, tmp_path, shared=("data", "base", "sft", "rm"))
    out = submit_job(ray_head, tmp_path, "python", "jobs/ppo.py", *ppo_args(run_root, cfg, 2, "ppo.reward=model"))
    assert "succeeded" in out, out[-3000:]
    assert "[ppo] done" in out
    summary = json.loads((run_root / cfg.preset / "ppo" / "summary.json").read_text())
    assert summary["steps"] == 2
