"""Does the data job's memory stay flat as the corpus grows? Runs jobs/data.py on the corpora as they
are (1x, the baseline) and on a copy whose knowledge graphs, the bulk of the records, are repeated k
times with renamed subjects (so every copy builds new, non-duplicate records), and prints peak memory,
wall time and records for each, with the ratios against 1x.

    .venv/bin/python bench/data_memory.py [--scales 1 3] [--data-root ../shared/data]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def scaled_root(src: Path, k: int, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("cmedqa_kg"))
    (dst / "cmedqa_kg").mkdir()
    for f in (src / "cmedqa_kg").glob("*.jsonl"):
        with open(f, encoding="utf-8") as inp, open(dst / "cmedqa_kg" / f.name, "w", encoding="utf-8") as out:
            for line in inp:
                obj = json.loads(line)
                for copy in range(k):
                    out.write(json.dumps({**obj, "s": obj["s"] + (f"（{copy}）" if copy else "")},
                                         ensure_ascii=False) + "\n")
    return dst


def run(data_root: Path, run_root: Path) -> dict:
    subprocess.run([sys.executable, str(REPO / "jobs" / "data.py"), f"data.root={data_root}", f"run_root={run_root}"],
                   check=True, stdout=subprocess.DEVNULL, env={**os.environ, "RAY_ADDRESS": ""})
    return json.loads((run_root / "tiny" / "data" / "manifest.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scales", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in args.scales:
            root = args.data_root if k == 1 else scaled_root(args.data_root, k, Path(tmp) / f"x{k}")
            m = run(root, Path(tmp) / f"runs{k}")
            rows.append((k, m["totals"]["records"], m["job_seconds"], m["peak_memory_gb"]))
            print(f"{k}x corpus: {rows[-1][1]:,} records, {rows[-1][2]} s, peak {rows[-1][3]} GB", flush=True)
    base = rows[0]
    print("\n| corpus | records | wall s | peak GB | records / 1x | peak / 1x |\n|---|---|---|---|---|---|")
    for k, n, s, gb in rows:
        print(f"| {k}x | {n:,} | {s} | {gb} | {n / base[1]:.2f} | {gb / base[3]:.2f} |")


if __name__ == "__main__":
    main()
