"""The soak benchmark (bench/serve_soak.py) in short: clients against two engine replicas of the session's SFT model,
one replica killed under load. Only requests in flight on the killed replica may fail; Serve brings the second
replica back, and nothing hangs."""

import json
import os
import subprocess
import sys

import pytest
import ray

from clinicalgpt.config import load_config
from conftest import REPO, isolated_run

pytestmark = [pytest.mark.e2e, pytest.mark.chaos]


def test_a_replica_killed_under_load_costs_only_its_in_flight_requests(trained, tmp_path):
    cfg, _ = trained
    run_root = isolated_run(cfg, tmp_path, shared=("sft",))
    clients, timeout = 4, 60
    done = subprocess.run([sys.executable, str(REPO / "bench" / "serve_soak.py"), "--minutes", "2", "--kill-at", "0.05",
                           "--clients", str(clients), "--max-tokens", "8", "--timeout", str(timeout),
                           f"run_root={run_root}", "serve.model=sft"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "RAY_ADDRESS": ray._private.worker._global_node.address})  # this cluster
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    result = json.loads((load_config([f"run_root={run_root}"]).run_dir / "bench" / "serve_soak.json").read_text())
    before, during, after = (result["phases"][p] for p in ("before", "during", "after"))
    print(json.dumps({k: v for k, v in result.items() if k != "log"}, indent=1))
    assert before["requests"] and after["requests"], result["phases"]
    assert before["errors"] == after["errors"] == 0, result["phases"]
    assert during["errors"] <= clients, during  # at most what was in flight on the killed replica
    assert result["time_to_full_capacity_s"] is not None and result["time_to_full_capacity_s"] < 110
    assert max(lat for _, lat, _ in result["log"]) < timeout  # nothing hung
