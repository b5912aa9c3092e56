"""Each process gets the GPUs and the environment its own resources call for, set by the functions the jobs
use: the training stages' ScalingConfig (trainer.scaling_config) and environment (runtime.device_env), the
PPO and evaluation roles' actor options (actors/placement.py), and the driver's runtime env under
`ray job submit` (runtime.driver_runtime_env).

The placement check runs a local Ray cluster that declares 16 GPUs (Ray schedules by declared resources, so
actors are placed by GPU without CUDA) in a subprocess, as this session's Ray has none; probes stand in for
the role actors and the training loop, as vLLM and DeepSpeed cannot set up a GPU without CUDA."""

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from ray.runtime_env.runtime_env import _merge_runtime_env

from clinicalgpt.config import load_config
from clinicalgpt.runtime import JOB_ENV, device_env, driver_runtime_env, submitted_job_env
from clinicalgpt.trainer import scaling_config
from conftest import REPO

GPU_PRESETS = ("bloom-7b", "qwen2.5-7b")
# The groups of actors (or Ray Train workers) that run at once, each as [(role, how many)]: the presets'
# training stages and roles, a tensor-parallel engine, and a CPU role.
PRESET_GROUPS = {"pretrain": [("pretrain", 8)], "sft": [("sft", 8)], "rm": [("rm", 8)],
                 "ppo": [("rollout", 1), ("reference", 1), ("reward", 1), ("learner", 4)],
                 "eval": [("eval-rollout", 1)], "eval judge": [("judge", 1)]}
CASES = [*((preset, PRESET_GROUPS) for preset in GPU_PRESETS),
         ("bloom-7b, tensor parallel 2", {"ppo": [("rollout", 1)]}),
         ("tiny", {"ppo": [("learner", 1)]})]
CONFIGS = {**{preset: [f"preset={preset}"] for preset in GPU_PRESETS},
           "bloom-7b, tensor parallel 2": ["preset=bloom-7b", "ppo.engine.tensor_parallel=2", "ppo.rollout.gpus=2"],
           "tiny": ["ppo.learner.num=1"]}


@pytest.mark.parametrize("preset", GPU_PRESETS)
def test_training_stages_ask_ray_train_for_a_gpu_per_worker(preset):
    cfg = load_config([f"preset={preset}"])
    for stage in (cfg.pretrain, cfg.sft, cfg.rm):
        scaling = scaling_config(stage)
        assert scaling.use_gpu and scaling.num_workers == 8
        assert scaling.resources_per_worker == {"CPU": 8, "GPU": 1}
        assert stage.gradient_checkpointing


def test_the_tiny_preset_trains_on_cpus():
    scaling = scaling_config(load_config([]).sft)
    assert not scaling.use_gpu and scaling.resources_per_worker == {"CPU": 0.5}
    assert device_env(0) == {"DS_ACCELERATOR": "cpu"} and device_env(0.5) == {"DS_ACCELERATOR": "cuda"}


def test_the_driver_passes_ray_init_no_variable_the_submitted_job_sets(monkeypatch):
    """Ray 2.60 refuses to merge a submitted job's runtime env with the one its driver passes to ray.init when
    both set a variable (ray/_private/worker.py); the job's value wins, the rest of JOB_ENV still goes in."""
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert submitted_job_env() == {} and driver_runtime_env({}) == {"env_vars": JOB_ENV}
    job = {"working_dir": "gcs://_ray_pkg_x.zip",
           "env_vars": {"HF_HUB_OFFLINE": "0", "TOKENIZERS_PARALLELISM": "true", "ANSWER_CHARS": "10"}}
    # What `ray job submit --runtime-env-json` hands its driver (dashboard/modules/job/job_supervisor.py).
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": job, "metadata": {}}))
    assert submitted_job_env() == job["env_vars"]
    ours = driver_runtime_env(submitted_job_env())
    assert set(ours["env_vars"]) == set(JOB_ENV) - {"HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM"}
    merged = _merge_runtime_env(job, ours)  # Ray's own merge, as ray.init does it: None on a conflict
    assert merged is not None and merged["env_vars"]["HF_HUB_OFFLINE"] == "0" and merged["working_dir"] == job["working_dir"]
    assert _merge_runtime_env(job, {"env_vars": JOB_ENV}) is None  # what passing all of JOB_ENV would hit


@pytest.mark.integration
def test_every_role_actor_and_training_worker_is_placed_with_its_gpus_and_environment():
    with tempfile.TemporaryDirectory() as out:
        done = subprocess.run([sys.executable, __file__, out], capture_output=True, text=True, timeout=300, cwd=REPO,
                              env={**os.environ, "RAY_ADDRESS": ""})
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        placed = json.loads((Path(out) / "placed.json").read_text())
    assert list(placed) == [label for label, _ in CASES]
    for label, groups in CASES:
        assert list(placed[label]) == list(groups), label
        for group, roles in groups.items():
            seen = placed[label][group]  # the probes of actors (or workers) that ran at once
            assert [p["role"] for p in seen] == [r for r, n in roles for _ in range(n)], (label, group)
            for p in seen:
                ids, gpus = p["gpu_ids"], p["gpus"]
                assert len(ids) == math.ceil(gpus), p  # a fraction of a GPU: that GPU's id
                if gpus:  # Ray Train shares a node's GPUs among its workers; an actor sees its own
                    assert p["DS_ACCELERATOR"] == "cuda" and set(ids) <= set(p["CUDA_VISIBLE_DEVICES"].split(",")), p
                else:
                    assert p["DS_ACCELERATOR"] == "cpu" and not p["CUDA_VISIBLE_DEVICES"], p
            whole = [i for p in seen if p["gpus"] >= 1 for i in p["gpu_ids"]]
            assert len(whole) == len(set(whole)), (label, group)  # a whole GPU is never shared
            if label in GPU_PRESETS and group == "ppo":  # their reference and reward model share a GPU, theirs alone
                shared = {p["role"]: p["gpu_ids"] for p in seen if p["gpus"] < 1}
                assert shared["reference"] == shared["reward"] and not set(shared["reward"]) & set(whole)


def probe(role: str, gpus: float) -> dict:
    """What a process was given: its GPUs and the environment a GPU run reads."""
    import ray
    return {"role": role, "gpus": gpus, "gpu_ids": [str(i) for i in ray.get_gpu_ids()],
            "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
            "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "")}


def place_everything(out: Path) -> None:
    """Runs in the subprocess: each case's groups, one after another, on a cluster declaring 16 GPUs. A group
    asked for alike by an earlier case (the presets' roles are the same) is not placed again: a probe costs a
    process start (~1-2 s here)."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from actors.placement import role_actors

    @ray.remote
    class Probe:
        def __init__(self, role: str, gpus: float):
            self.role, self.gpus = role, gpus

        def report(self) -> dict:
            return probe(self.role, self.gpus)

    @ray.remote
    def train_probe(stage: str, gpus: float) -> dict:  # trainer.train_loop's first step, then what it was given
        os.environ.update(device_env(gpus))
        return probe(stage, gpus)

    def role_probes(roles: dict) -> list[dict]:
        """Roles that run at once, each placed by role_actors as the jobs place them."""
        started = [role_actors(Probe, role, name, lambda i: (name, role.gpus))
                   for name, role in roles.items()]
        seen = ray.get([a.report.remote() for actors, _ in started for a in actors])
        for actors, group in started:
            for a in actors:
                ray.kill(a)
            remove_placement_group(group)
        return seen

    def worker_probes(stage: str, train_cfg) -> list[dict]:
        """A stage's workers as Ray Train reserves them, a PACK placement group of its ScalingConfig's bundles
        (a real TorchTrainer takes over 30 s to start here), each probed in turn in its bundle."""
        scaling = scaling_config(train_cfg)
        group = placement_group([scaling.resources_per_worker] * scaling.num_workers, strategy="PACK")
        ray.get(group.ready(), timeout=60)
        options = {"num_cpus": 0, "num_gpus": scaling.resources_per_worker.get("GPU", 0)}
        seen = [ray.get(train_probe.options(**options, scheduling_strategy=PlacementGroupSchedulingStrategy(group, i))
                        .remote(stage, train_cfg.gpus_per_worker)) for i in range(scaling.num_workers)]
        remove_placement_group(group)
        return seen

    ray.init(address="local", num_cpus=128, num_gpus=16, include_dashboard=False, log_to_driver=False)
    placed, done = {}, {}
    for label, groups in CASES:
        cfg = load_config(CONFIGS[label])
        roles = {"rollout": cfg.ppo.rollout, "reference": cfg.ppo.reference, "reward": cfg.ppo.reward_model,
                 "learner": cfg.ppo.learner, "eval-rollout": cfg.eval.rollout, "judge": cfg.eval.reward_model}
        placed[label] = {}
        for group, members in groups.items():
            if group in ("pretrain", "sft", "rm"):
                train_cfg = getattr(cfg, group)
                key = (group, repr(scaling_config(train_cfg)), train_cfg.gpus_per_worker)
                done[key] = done.get(key) or worker_probes(group, train_cfg)
            else:
                asked = {name: roles[name] for name, _ in members}
                key = repr(asked)
                done[key] = done.get(key) or role_probes(asked)
            placed[label][group] = done[key]
    ray.shutdown()
    (out / "placed.json").write_text(json.dumps(placed))


if __name__ == "__main__":
    place_everything(Path(sys.argv[1]))
