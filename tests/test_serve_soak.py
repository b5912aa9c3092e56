"""The soak benchmark (bench/serve_soak.py) in short: clients against two engine replicas of the session's SFT model,
one replica killed under load. Only requests in flight on the killed replica may fail, the other replica answers
the rest, and nothing hangs. (Serve's replacement of the replica, about 80 s of vLLM start on this machine, is
measured by the benchmark's full run: docs/benchmarks.md.)"""

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
    done = subprocess.run([sys.executable, str(REPO / "bench" / "serve_soak.py"), "--minutes", "0.5", "--kill-at", "0.3",
                           "--clients", str(clients), "--max-tokens", "8", "--timeout", str(timeout),
                           f"run_root={run_root}", "serve.model=sft"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "RAY_ADDRESS": ray._private.worker._global_node.address})  # this cluster
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    result = json.loads((load_config([f"run_root={run_root}"]).run_dir / "bench" / "serve_soak.json").read_text())
    before, during = result["phases"]["before"], result["phases"]["during"]  # during: from the kill to the end
    print(json.dumps({k: v for k, v in result.items() if k != "log"}, indent=1))
    assert before["requests"] and before["errors"] == 0, before
    assert during["errors"] <= clients, during  # at most what was in flight on the killed replica
    assert during["requests"] - during["errors"] >= 5 * clients, during  # the other replica answers the rest
    assert max(lat for _, lat, _ in result["log"]) < timeout  # nothing hung
