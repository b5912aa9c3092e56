"""What every job does around its work: connect to (or start) Ray, and measure peak memory."""

from __future__ import annotations

import os
import threading
import time

import psutil
import ray

from .config import Config

# Set before Ray starts so that every worker inherits them.
JOB_ENV = {
    "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),  # silences DeepSpeed's probe on CPU hosts
    "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),  # models come from local paths
    "TOKENIZERS_PARALLELISM": "false",  # Ray Data already runs tokenizers in parallel
    "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
}


def init_ray(cfg: Config) -> None:
    """Join the cluster at ray.address / $RAY_ADDRESS (as under `ray job submit`), else start a local one."""
    os.environ.update(JOB_ENV)
    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env={"env_vars": JOB_ENV})
    else:
        ray.init(num_cpus=cfg.ray.num_cpus or None, runtime_env={"env_vars": JOB_ENV})


class PeakMemory:
    """Samples system memory in use while the block runs; `peak_gb` is the peak above the level at
    entry, so it counts the driver and every Ray process the job starts."""

    def __init__(self, interval: float = 0.2):
        self.interval, self.peak_gb = interval, 0.0
        self._stop = threading.Event()

    def _sample(self):
        while not self._stop.is_set():
            used = psutil.virtual_memory().used
            self.peak_gb = max(self.peak_gb, (used - self._base) / 2**30)
            time.sleep(self.interval)

    def __enter__(self):
        self._base = psutil.virtual_memory().used
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
