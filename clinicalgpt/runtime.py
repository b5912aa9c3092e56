"""What every job does around its work: connect to (or start) Ray, and measure peak memory."""

from __future__ import annotations

import json
import os
import threading

import psutil
import ray
import ray.data
from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

from .config import Config

# Set before Ray starts so that every worker inherits them. What depends on a process's hardware is set per
# actor and worker from its own resources (device_env), never here: the driver may run on a CPU head.
JOB_ENV = {
    "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),  # models come from local paths
    "TOKENIZERS_PARALLELISM": "false",  # Ray Data already runs tokenizers in parallel
    "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
    # glibc's per-thread malloc arenas keep freed memory; pooled Ray workers then hold GBs after a task.
    "MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", "2"),
    # Ray Train's print patch both prints and logs each line from a worker: every progress line twice.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    # After a node is lost, Ray Train restarts at the size the cluster seems to fit; until the GCS has marked
    # the node dead (cluster.yaml's health check: about 5 s) and Ray Data's resource view has caught up (it
    # refreshes every 20 s), that still counts the lost node, and a placement that cannot happen waits this long
    # before Train asks again (Ray's default: 60 s). Where an autoscaler adds nodes for a fixed-size stage,
    # Train retries every 5 s (a log line each) until they are up; raising it there quiets the log.
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "5"),
    # How often Ray Train's controller polls its workers, so how late it notices that they finished or failed
    # (Ray's default: 2 s); a poll is one call per worker.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"),
}


def device_env(gpus: float) -> dict[str, str]:
    """The environment of an actor or Ray Train worker with `gpus` GPUs: DeepSpeed's accelerator (cuda with GPUs,
    else cpu, which also spares CPU hosts DeepSpeed's probe). Ray sets CUDA_VISIBLE_DEVICES to the GPUs it grants."""
    return {"DS_ACCELERATOR": "cuda" if gpus > 0 else "cpu"}


def resolve_bf16(setting: bool | None) -> bool:
    """A stage's bf16 setting, or for None (auto) whether this process's device computes bf16 natively: a CUDA GPU
    that supports it, a CPU with AMX or AVX512-BF16 units. Elsewhere bf16 is emulated, slower than fp32 (2.6x on a
    Xeon without those units, docs/benchmarks.md)."""
    if setting is not None:
        return setting
    import torch
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def submitted_job_env() -> dict[str, str]:
    """The env_vars of the runtime env a `ray job submit` gave this driver (none when not submitted): Ray
    passes the job's config to its driver in $RAY_JOB_CONFIG_JSON_ENV_VAR."""
    job = json.loads(os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR, "{}"))
    return (job.get("runtime_env") or {}).get("env_vars") or {}


def driver_runtime_env(job_env: dict[str, str]) -> dict:
    """The runtime env init_ray passes to ray.init: JOB_ENV without the keys the submitted job's runtime env
    sets, which reach every process already (the job's values win), and which Ray 2.60 refuses to merge
    (ray/_private/worker.py, _merge_runtime_env: no key may be set by both)."""
    return {"env_vars": {k: v for k, v in JOB_ENV.items() if k not in job_env}}


def init_ray(cfg: Config) -> None:
    """Join the cluster at ray.address / $RAY_ADDRESS (as under `ray job submit`), else start a local one."""
    runtime_env = driver_runtime_env(submitted_job_env())
    os.environ.update(runtime_env["env_vars"])
    data_context = ray.data.DataContext.get_current()
    data_context.enable_progress_bars = False  # jobs print their own progress lines
    # The V1 Parquet reader makes one read task and block per shard; Ray 2.60's V2 reader put all shards
    # in one 270k-row block, so a stream yielded nothing until the whole corpus had been tokenized.
    data_context.use_datasource_v2 = False
    # Every stream's blocks in order (not as their tasks finish): the rows each worker trains on, the pairs and
    # the files a build writes then follow from the seeds alone, and two runs of one config give the same numbers.
    data_context.execution_options.preserve_order = True
    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=runtime_env)
    else:
        # Logical CPUs beyond the cores: training workers and the Ray Data tasks that feed them must all
        # be scheduled at once (they wait on each other), even on a 2-core machine.
        # address="local": never attach to a cluster that `ray start` left on this machine.
        ray.init(address="local", num_cpus=cfg.ray.num_cpus or max(4, os.cpu_count() or 1),
                 runtime_env=runtime_env)


class PeakMemory:
    """Peak memory of this process and all its descendants (for a local cluster: every Ray process the
    job started) while the block runs, as PSS, so pages shared between processes count once."""

    def __init__(self, interval: float = 0.5):
        self.interval, self.peak_gb = interval, 0.0
        self._stop = threading.Event()

    def _sample(self):
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_full_info().pss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            self.peak_gb = max(self.peak_gb, total / 2**30)
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
