import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Tests read the real corpora through the configurable data root (../shared/data by default).
DATA_ROOT = Path(os.environ.get("CLINICALGPT_DATA_ROOT", REPO.parent / "shared" / "data"))


def cluster_settings() -> dict[str, str]:
    """The Ray system settings cluster.yaml's head starts with (`RAY_<setting>=<value>`, Ray's lower-case names),
    for the tests' own clusters to run as users' do."""
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    return dict(re.findall(r"\b(RAY_[a-z_]+)=(\S+)", " ".join(config["head_start_ray_commands"])))


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The corpora; without them a test that reads them is skipped, except in CI, where that is a failure."""
    if not (DATA_ROOT / "README.md").exists():
        message = f"corpora not found at {DATA_ROOT}: set CLINICALGPT_DATA_ROOT"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return DATA_ROOT


def pytest_collection_modifyitems(items):
    """What a test is, by marker (pyproject.toml): one on the session's Ray cluster is an integration test; one marked
    neither integration, e2e nor chaos is a unit test."""
    for item in items:
        if not any(item.get_closest_marker(m) for m in ("integration", "e2e", "chaos")):
            item.add_marker(pytest.mark.integration if "ray_session" in item.fixturenames else pytest.mark.unit)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole session, with its dashboard as init_ray starts one (its API, and the
    service-discovery file Prometheus reads); shut down (not `ray stop`) at the end."""
    import ray
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", num_cpus=4, include_dashboard=True, log_to_driver=False)  # as init_ray
    yield ray
    ray.shutdown()


def dashboard_api(path: str, **params):
    """GET from the session cluster's dashboard API, with the cluster's token (Ray 2.60 turns token auth on)."""
    import httpx
    import ray
    token = Path.home() / ".ray" / "auth_token"
    headers = {"Authorization": f"Bearer {token.read_text().strip()}"} if token.exists() else {}
    return httpx.get(f"http://{ray._private.worker.get_dashboard_url()}{path}", params=params, headers=headers,
                     timeout=30).json()


# The Grafana dashboard's queries (monitoring/grafana-dashboard.json) by the run that feeds them: Serve's, PPO's,
# and the training stages' (their figures and their Ray Data input stream; a DPO run has every one).
def dashboard_queries(group: str) -> list[str]:
    dashboard = json.loads((REPO / "monitoring" / "grafana-dashboard.json").read_text())
    queries = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    return [q for q in queries if query_group(q) == group]


def query_group(query: str) -> str:
    return "serve" if "ray_serve_" in query else "ppo" if "ray_clinicalgpt_ppo_" in query else "training"


class Prometheus:
    """A Prometheus server (Debian's package) run with monitoring/prometheus.yml and its alert rules, its service
    discovery pointed at the file the session cluster's dashboard keeps, scraping every 2 s instead of 10 so that
    a short test run is seen."""

    def __init__(self, folder: Path, session_dir: str):
        import yaml
        config = yaml.safe_load((REPO / "monitoring" / "prometheus.yml").read_text())
        config["global"] = {"scrape_interval": "2s", "evaluation_interval": "2s"}
        discovery = f"{session_dir}/prom_metrics_service_discovery.json"
        config["scrape_configs"][0]["file_sd_configs"][0]["files"] = [discovery]
        (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
        (folder / "alerts.yml").write_text((REPO / "monitoring" / "alerts.yml").read_text())
        self.url = f"http://127.0.0.1:{free_ports(1)[0]}"
        with (folder / "prometheus.log").open("w") as log:
            self.process = subprocess.Popen(
                ["prometheus", f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'data'}",
                 f"--web.listen-address={self.url.removeprefix('http://')}"], stdout=log, stderr=subprocess.STDOUT)

    def api(self, path: str, **params) -> dict:
        import httpx
        deadline = time.time() + 60
        while True:
            try:
                response = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=30)
                return response.raise_for_status().json()["data"]
            except (httpx.TransportError, httpx.HTTPStatusError):  # starting (not listening, then 503)
                if time.time() > deadline or self.process.poll() is not None:
                    raise
                time.sleep(1)

    def series(self, query: str, since: float) -> list[dict]:
        """The query's series over [since, now], a point every 2 s (a range query, as Grafana's panels make)."""
        return self.api("query_range", query=query, start=since, end=time.time(), step=2)["result"]

    def check_panels(self, group: str, since: float) -> dict[str, int]:
        """Each of the dashboard's queries of the group returns data for [since, now]: query -> its points. Waits
        for the scrape after the run and a rate()'s window."""
        deadline, points, queries = time.time() + 90, {}, dashboard_queries(group)
        while time.time() < deadline:
            points = {q: sum(len(s["values"]) for s in self.series(q, since)) for q in queries}
            if all(points.values()):
                break
            time.sleep(3)
        assert points and all(points.values()), points
        return points


@pytest.fixture(scope="module")
def prometheus(ray_session, tmp_path_factory):
    """A real Prometheus scraping the session cluster for the tests of a module, or None where it is not installed (a
    warning; under CI=true a failure: .ci/run installs it). Not for the session: scraping every 2 s takes 2% of this
    2-core machine, and it starts in a second."""
    import ray
    if shutil.which("prometheus") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("prometheus is not installed (.ci/run installs Debian's package)")
        warnings.warn("prometheus is not installed: the Grafana dashboard's queries are not checked")
        yield None
        return
    server = Prometheus(tmp_path_factory.mktemp("prometheus"), ray._private.worker._global_node.get_session_dir_path())
    assert server.api("status/buildinfo")["version"]
    yield server
    server.process.terminate()
    server.process.wait(timeout=60)


@pytest.fixture(scope="session")
def built(ray_session, data_root, tmp_path_factory):
    """The data job and the tiny model bootstrap on the real corpora, once per session: (cfg, manifest)."""
    from clinicalgpt.config import load_config
    from jobs import bootstrap, data
    argv = [f"run_root={tmp_path_factory.mktemp('runs')}", f"data.root={data_root}"]
    manifest = data.main(argv)
    bootstrap.main(argv + ["check_vllm=false"])
    return load_config(argv), manifest


SHORT = ["global_batch=16", "micro_batch=8", "eval_rows=32", "log_every=2"]


def stage_args(stage: str, steps: int, **extra) -> list[str]:
    extra = {"max_steps": steps, "eval_every": max(1, steps // 2), "checkpoint_every": steps, **extra}
    return [f"{stage}.{a}" for a in SHORT] + [f"{stage}.{k}={v}" for k, v in extra.items()]


def history(cfg, stage: str) -> list[dict]:
    return [json.loads(x) for x in (cfg.stage_dir(stage) / "history.jsonl").read_text().splitlines()]


def isolated_run(cfg, tmp_path: Path, shared=("data", "base")) -> Path:
    """A separate run folder that shares the built data and models (links)."""
    run_root = tmp_path / "runs"
    (run_root / cfg.preset).mkdir(parents=True)
    for name in shared:
        (run_root / cfg.preset / name).parent.mkdir(parents=True, exist_ok=True)
        (run_root / cfg.preset / name).symlink_to(cfg.run_dir / name)
    return run_root


@pytest.fixture(scope="session")
def trained(built):
    """Short pretrain, SFT, reward-model and judge runs on the built data, once per session: (cfg, summaries).
    In fp32 on every machine (bf16, the default where the hardware has it, is the chaos tests'): the barely trained
    models are the same everywhere, and PPO's learning test from them does not hang on bf16's rounding (from the
    bf16-trained SFT model of an AVX512-BF16 machine its greedy answers stayed at the token limit for 20 steps)."""
    from jobs import judge, pretrain, rm, sft
    cfg, _ = built
    argv = [f"run_root={cfg.run_dir.parent}", f"data.root={cfg.data_root}"]
    summaries = {"pretrain": pretrain.main(argv + stage_args("pretrain", 16, lr=3e-3, bf16="false")),
                 "sft": sft.main(argv + stage_args("sft", 2, bf16="false")),
                 "rm": rm.main(argv + stage_args("rm", 4, bf16="false")),
                 "judge": judge.main(argv + stage_args("rm", 2, bf16="false"))}
    return cfg, summaries


# Small steps: 8 prompts x 4 samples, responses up to 24 tokens; the rule rewards a 6-token answer. The
# session's SFT model is barely trained (near-uniform next-token distributions), hence the high lr.
SMALL_PPO = ["ppo.prompts_per_step=8", "ppo.samples_per_prompt=4", "ppo.minibatch=16", "ppo.max_new_tokens=24",
             "ppo.eval_prompts=8", "ppo.reward=length:6", "ppo.lr=2e-3"]


def ppo_args(run_root: Path, cfg, steps: int, *extra: str) -> list[str]:
    return [f"run_root={run_root}", f"data.root={cfg.data_root}", f"ppo.steps={steps}", "ppo.eval_every=10",
            "ppo.checkpoint_every=10", *SMALL_PPO, *extra]


def wait_for_step(path: Path, step: int, proc: subprocess.Popen, after: int = 0, timeout: float = 400) -> None:
    """Wait until a history row past the first `after` rows reaches `step`."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        rows = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
        if any(r["step"] >= step for r in rows[after:]):
            return
        time.sleep(1)
    raise AssertionError(f"step {step} not reached (job exit code {proc.poll()})")


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A cluster started the way a user starts one (`ray start --head`), once for a module's submitted jobs (not for
    the session: idle, it takes 4% of this 2-core machine; it answers in 7 s), stopped through its own process
    (SIGTERM to `--block` shuts down what it started; never `ray stop`): (ray cli, dashboard url, env). Not SIGINT:
    a shell without job control (a script's `... &`) starts its background commands with SIGINT ignored, and so
    the head. No drain on the way out: no traffic to drain."""
    tmp_path = tmp_path_factory.mktemp("ray_head")
    ray_cli = str(Path(sys.executable).parent / "ray")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", **cluster_settings()}
    env.pop("RAY_ADDRESS", None)
    gcs, dashboard, agent, metrics = free_ports(4)
    with (tmp_path / "head.log").open("w") as log:
        head = subprocess.Popen(
            [ray_cli, "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dashboard}",
             f"--dashboard-agent-listen-port={agent}", f"--metrics-export-port={metrics}", "--num-cpus=4",
             "--disable-usage-stats"], env=env, stdout=log, stderr=subprocess.STDOUT)
    yield ray_cli, f"http://127.0.0.1:{dashboard}", env
    head.terminate()
    head.wait(timeout=120)


def submit_job(ray_head, cwd: Path, *command: str, runtime_env: dict | None = None) -> str:
    """`ray job submit --working-dir <repo> [--runtime-env-json ...] -- <command>` against the ray_head cluster:
    its output. The head takes a while to accept jobs: retried until one is submitted (then never again)."""
    ray_cli, url, env = ray_head
    extra = ["--runtime-env-json", json.dumps(runtime_env)] if runtime_env else []
    submit = [ray_cli, "job", "submit", "--address", url, "--working-dir", str(REPO), *extra, "--", *command]
    deadline = time.time() + 180
    while True:
        done = subprocess.run(submit, env=env, capture_output=True, text=True, cwd=cwd)
        out = done.stdout + done.stderr
        if "raysubmit_" in out or time.time() > deadline:
            return out
        time.sleep(5)


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for sock in socks:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in socks]
    for sock in socks:
        sock.close()
    return ports


def scrape_metrics(names: set[str], endpoints: list[str] | None = None, timeout: float = 60,
                   ready=lambda found: True) -> dict[str, list]:
    """Prometheus samples of the given metrics, read from every node's metrics endpoint (host:port; by
    default those of the connected cluster) as Prometheus would (monitoring/prometheus.yml) and polled
    until all appear and ready(samples) holds (Ray exports every few seconds, so a value can lag):
    name -> [Sample(name, labels, value), ...]."""
    import httpx
    import ray
    from prometheus_client.parser import text_string_to_metric_families
    endpoints = endpoints or [f"{n['NodeManagerAddress']}:{n['MetricsExportPort']}" for n in ray.nodes()]
    deadline, found = time.time() + timeout, {}
    while time.time() < deadline:
        found = {}
        for endpoint in endpoints:
            try:
                text = httpx.get(f"http://{endpoint}/metrics", timeout=10).text
            except httpx.TransportError:  # a node that is down, as Prometheus marks a target
                continue
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name in names:
                        found.setdefault(sample.name, []).append(sample)
        if names <= set(found) and ready(found):
            break
        time.sleep(2)
    return found


@contextmanager
def chat_endpoint(answer):
    """A minimal OpenAI-compatible chat endpoint on a free local port, for the clients of one (evaluation candidates,
    judges): answer(request body) -> (status, text); a 200 is a chat completion carrying the text, any other status
    an error in OpenAI's shape. Yields the base URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            status, text = answer(body)
            reply = ({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                      "choices": [{"index": 0, "finish_reason": "stop",
                                   "message": {"role": "assistant", "content": text}}]} if status == 200
                     else {"error": {"message": text, "type": "server_error"}})
            data = json.dumps(reply, ensure_ascii=False).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/v1"
    finally:
        server.shutdown()
