"""The resource plan of a preset on a GPU cluster, before renting it: per stage, its actors and workers, their
CPUs, GPUs, dtype, ZeRO stage, gradient checkpointing and estimated memory per GPU, the weight-sync path and
what the drivers hold; computed from the model's shape, without loading a weight (clinicalgpt/plan.py).

    python jobs/plan.py preset=bloom-7b [cluster=8x1] [gpu_memory_gb=80] [--json] [out=plan.json] [key=value ...]

cluster: GPUs per node x nodes. --json prints the plan as JSON, out= also writes it to a file. Exits non-zero,
saying which stage and by how much, when a stage cannot fit in GPU memory or cannot be placed on the cluster.
"""

import json
import sys
from pathlib import Path

from clinicalgpt.config import load_config
from clinicalgpt.plan import Cluster, make_plan, table

OPTIONS = ("cluster=", "gpu_memory_gb=", "out=", "--json")


def main(argv: list[str]) -> dict:
    options = dict(a.split("=", 1) for a in argv if a.startswith(OPTIONS[:3]))
    cfg = load_config([a for a in argv if not a.startswith(OPTIONS)])
    plan = make_plan(cfg, Cluster.parse(options.get("cluster", "8x1"), float(options.get("gpu_memory_gb", 80))))
    print(json.dumps(plan.to_json(), indent=2) if "--json" in argv else table(plan))
    if "out" in options:
        Path(options["out"]).write_text(json.dumps(plan.to_json(), indent=2))
    if plan.problems:
        raise SystemExit(f"plan refused for the cluster {plan.cluster}: " + "; ".join(plan.problems))
    return plan.to_json()


if __name__ == "__main__":
    main(sys.argv[1:])
