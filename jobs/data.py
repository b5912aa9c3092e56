"""Stage 1: build the clinical training and evaluation sets from the corpora under the data root.

    python jobs/data.py [preset=tiny] [data.root=/path/to/corpora] [key=value ...]

Writes runs/<preset>/data/: records/<split>/<task>/*.parquet, skipped.jsonl (every skipped input line
with its reason), packed/<stream>/ (the tokenized, packed Parquet streams that pretrain and SFT read),
pairs/ (the reward model's and the judge's pairs), manifest.json and manifest.md (counts per source, task
and split; token counts; packing; pairs; skip reasons; wall time and peak memory). Presets that train their
own tokenizer (tiny) train it here on the training records, into the model folder that jobs/bootstrap.py
completes.
"""

import sys
import time

import ray

from clinicalgpt.config import load_config
from clinicalgpt.data_build import build_data, print_summary, write_manifest
from clinicalgpt.lineage import write_lineage
from clinicalgpt.runtime import PeakMemory, init_ray


def main(argv: list[str]) -> dict:
    cfg = load_config(argv)
    started = time.time()
    with PeakMemory() as mem:  # a local cluster's processes are the job's children: measured too
        init_ray(cfg)
        manifest = build_data(cfg)
    manifest.update(job_seconds=round(time.time() - started, 1), peak_memory_gb=round(mem.peak_gb, 2))
    write_manifest(manifest, cfg.data_dir)
    write_lineage(cfg, "data", argv, started)
    print_summary(manifest)
    return manifest


if __name__ == "__main__":
    main(sys.argv[1:])
    ray.shutdown()
