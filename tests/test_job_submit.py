"""A training stage as users run it on a cluster: `ray job submit --working-dir . -- python jobs/<stage>.py`
against a head started with `ray start --head` (token authentication on, as Ray 2.60 starts it), resuming a run
that was interrupted. PPO submitted as a job, with a user's reward function: tests/test_architectures.py."""

import os
import re
import subprocess
import sys
import time

import pytest

from clinicalgpt.config import load_config
from conftest import REPO, history, isolated_run, stage_args, submit_job, wait_for_step

pytestmark = pytest.mark.e2e


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


def test_a_job_submitted_without_the_clusters_token_is_refused(ray_head, tmp_path):
    """A head started as cluster.yaml starts it (RAY_AUTH_MODE=token) refuses a submission without its token and one
    with a wrong token; nothing runs. With the token, the same cluster answers."""
    ray_cli, url, env = ray_head
    listing = [ray_cli, "job", "list", "--address", url]
    deadline = time.time() + 180  # the head takes a while to answer: wait until it does, with the token
    while subprocess.run(listing, env=env, capture_output=True).returncode != 0 and time.time() < deadline:
        time.sleep(3)
    ran = tmp_path / "ran"
    without = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
    for extra in ({"HOME": str(tmp_path), "RAY_AUTH_MODE": "disabled"},  # no token at all
                  {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 32}):  # a wrong one
        done = subprocess.run([ray_cli, "job", "submit", "--address", url, "--no-wait", "--", "touch", str(ran)],
                              env={**without, **extra}, capture_output=True, text=True, timeout=120)
        out = done.stdout + done.stderr
        assert done.returncode != 0 and "raysubmit_" not in out, out[-2000:]
        assert re.search(r"401|[Uu]nauthori[sz]ed|[Aa]uthentication", out), out[-2000:]
    listed = subprocess.run(listing, env=env, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0 and str(ran) not in listed.stdout
    assert not ran.exists()
