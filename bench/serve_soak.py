"""A soak of the Serve endpoint with a replica killed: 16 clients for 10 minutes against two engine replicas, one of
them killed midway (ray.kill, as if its process died); error rate, p50/p99 latency and throughput before the kill,
while Serve replaces the replica, and after it is back, and the time to full capacity (two replicas running). A
request that takes longer than the client timeout counts as an error: nothing may hang.

    .venv/bin/python bench/serve_soak.py [--minutes 10] [--kill-at 0.5] [--clients 16] [--max-tokens 32] [k=v ...]

Joins the cluster at $RAY_ADDRESS, else starts a local one. Results: runs/<preset>/bench/serve_soak.{json,md,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time
from pathlib import Path

import httpx
import matplotlib
import numpy as np
import ray
from ray import serve

from clinicalgpt.config import load_config
from clinicalgpt.runtime import init_ray
from clinicalgpt.serving import chat_app

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
QUESTIONS = ["高血压患者可以吃党参吗？", "咳嗽一周了怎么办？", "糖尿病人能吃水果吗？", "孩子发烧38度要去医院吗？"]


def engine_replicas(app: str) -> tuple[str, list[dict]]:
    """The engine deployment's name and its replicas' named actors ({name, namespace})."""
    name = next(d for d in serve.status().applications[app].deployments if d.startswith("LLMServer"))
    return name, [a for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith(f"SERVE_REPLICA::{app}#{name}#")]


def running(app: str, deployment: str) -> int:
    return serve.status().applications[app].deployments[deployment].replica_states.get("RUNNING", 0)


async def clients(url: str, n: int, seconds: float, max_tokens: int, timeout: float, log: list) -> None:
    """n clients, each sending its next request when the last is answered, until `seconds` have passed; each
    request logged as (sent at, latency, ok)."""
    end = time.monotonic() + seconds

    async def client(i: int, http: httpx.AsyncClient):
        k = 0
        while time.monotonic() < end:
            body = {"model": "clinicalgpt", "max_tokens": max_tokens, "temperature": 0,
                    "messages": [{"role": "user", "content": f"{QUESTIONS[(i + k) % len(QUESTIONS)]}（{i}-{k}）"}]}
            sent = time.monotonic()
            try:
                ok = (await http.post(f"{url}/v1/chat/completions", json=body)).status_code == 200
            except httpx.HTTPError:  # a timeout included
                ok = False
            log.append((sent, time.monotonic() - sent, ok))
            k += 1

    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=n)) as http:
        await asyncio.gather(*(client(i, http) for i in range(n)))


def phase(log: list, start: float, end: float) -> dict:
    """The requests that ended in [start, end) (those in flight on the killed replica end after the kill)."""
    rows = [(lat, ok) for sent, lat, ok in log if start <= sent + lat < end]
    latencies, seconds = [lat for lat, ok in rows if ok], max(0.0, end - start)
    return {"requests": len(rows), "errors": sum(not ok for _, ok in rows),
            "error_rate": sum(not ok for _, ok in rows) / max(1, len(rows)),
            "answered_per_s": len(latencies) / max(1e-9, seconds), "seconds": seconds,
            "p50_s": float(np.percentile(latencies, 50)) if latencies else None,
            "p99_s": float(np.percentile(latencies, 99)) if latencies else None,
            "max_s": max((lat for lat, _ in rows), default=None)}


def soak(overrides: list[str], minutes: float, kill_at: float, n_clients: int, max_tokens: int,
         timeout: float) -> dict:
    cfg = load_config([*overrides, "serve.api_key_env=''", "serve.allow_open=true", f"serve.max_tokens={max_tokens}"])
    init_ray(cfg)
    port, app = 8433, "clinicalgpt"
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    started = time.monotonic()
    serve.run(chat_app(cfg, {"num_replicas": 2, "max_ongoing_requests": 64, "ray_actor_options": {"num_cpus": 0}},
                       host="127.0.0.1"), name=app, route_prefix="/")
    print(f"[soak] two engine replicas up in {time.monotonic() - started:.0f}s", flush=True)
    url, seconds, log, marks, over = f"http://127.0.0.1:{port}", minutes * 60, [], {}, threading.Event()
    deployment, replicas = engine_replicas(app)

    def kill_one_then_watch():  # until two replicas run again, or the soak is over
        time.sleep(seconds * kill_at)
        victim = replicas[0]
        marks["killed"] = time.monotonic()
        ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
        print(f"[soak] killed engine replica {victim['name']}", flush=True)
        while running(app, deployment) == 2 and not over.is_set():  # until Serve sees it gone
            time.sleep(0.2)
        while running(app, deployment) < 2 and not over.is_set():
            time.sleep(0.5)
        if over.is_set():
            return
        marks["restored"] = time.monotonic()
        back = marks["restored"] - marks["killed"]
        print(f"[soak] two replicas running again {back:.1f}s after the kill", flush=True)

    watcher = threading.Thread(target=kill_one_then_watch, daemon=True)
    watcher.start()
    begin = time.monotonic()
    asyncio.run(clients(url, n_clients, seconds, max_tokens, timeout, log))
    end = time.monotonic()
    over.set()
    watcher.join()
    serve.shutdown()
    killed, restored = marks["killed"], marks.get("restored", end)
    return {"setup": {"preset": cfg.preset, "model": cfg.stage_model(cfg.serve.model), "minutes": minutes,
                      "clients": n_clients, "max_tokens": max_tokens, "client_timeout_s": timeout, "replicas": 2,
                      "cores": os.cpu_count()},
            "time_to_full_capacity_s": restored - killed if "restored" in marks else None,
            "phases": {"before": phase(log, begin, killed), "during": phase(log, killed, restored),
                       "after": phase(log, restored, end)},
            "log": [(sent - begin, lat, ok) for sent, lat, ok in log], "killed_s": killed - begin,
            "restored_s": restored - begin}


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}"


def report(result: dict, out: Path) -> str:
    s, p = result["setup"], result["phases"]
    lines = [f"Serve soak: {s['clients']} clients for {s['minutes']} min, {s['replicas']} engine replicas, one killed "
             f"at {result['killed_s']:.0f}s; preset {s['preset']}, model {s['model']}, max_tokens {s['max_tokens']}, "
             f"client timeout {s['client_timeout_s']:.0f}s, {s['cores']} cores", "",
             "| phase | seconds | requests | errors | error rate | answered/s | p50 ms | p99 ms | slowest ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {name} | {v['seconds']:.0f} | {v['requests']} | {v['errors']} | {v['error_rate']:.3f} | "
              f"{v['answered_per_s']:.2f} | {ms(v['p50_s'])} | {ms(v['p99_s'])} | {ms(v['max_s'])} |"
              for name, v in p.items()]
    full = result["time_to_full_capacity_s"]
    lines += ["", f"time to full capacity (two replicas running again): "
                  f"{'not reached' if full is None else f'{full:.1f} s'}; every client finished"]
    md = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_soak.json").write_text(json.dumps(result, indent=1))
    (out / "serve_soak.md").write_text(md)
    fig, ax = plt.subplots(figsize=(9, 3.5))
    log = np.array(result["log"]) if result["log"] else np.zeros((0, 3))
    good = log[:, 2] == 1 if len(log) else []
    ax.scatter(log[good, 0], log[good, 1] * 1000, s=3, label="answered")
    ax.scatter(log[~good, 0], log[~good, 1] * 1000, s=8, c="red", label="error")
    for x, label in ((result["killed_s"], "replica killed"), (result["restored_s"], "two replicas again")):
        ax.axvline(x, ls="--", c="gray")
        ax.text(x, ax.get_ylim()[1] * 0.9, f" {label}", fontsize=8)
    ax.set_xlabel("seconds (request sent)")
    ax.set_ylabel("latency, ms")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "serve_soak.png", dpi=120)
    return md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--kill-at", type=float, default=0.5, help="when to kill a replica, as a share of the soak")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--timeout", type=float, default=60, help="client timeout, seconds: longer counts as an error")
    ap.add_argument("overrides", nargs="*", help="config key=value (serve.model=sft, run_root=..., preset=...)")
    args = ap.parse_args()
    result = soak(args.overrides, args.minutes, args.kill_at, args.clients, args.max_tokens, args.timeout)
    out = load_config(args.overrides).run_dir / "bench"
    print("\n" + report(result, out) + f"results -> {out}/serve_soak.{{json,md,png}}")


if __name__ == "__main__":
    main()
