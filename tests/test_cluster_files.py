"""The cluster definitions and monitoring configs parse and say what the README promises: cluster.yaml
passes the Ray cluster launcher's own validation (what `ray up` checks before it contacts the cloud),
the KubeRay RayJob runs the pinned Ray with GPU workers that autoscale, Prometheus finds Ray's nodes
through its service-discovery file."""

import copy
import re

import pytest
import ray
import yaml
from jsonschema import ValidationError
from ray.autoscaler._private.util import prepare_config, validate_config

from conftest import REPO, cluster_settings


def load(name: str) -> dict:
    return yaml.safe_load((REPO / name).read_text())


def launcher_check(config: dict) -> dict:
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_the_launchers_validation():
    config = launcher_check(load("cluster.yaml"))
    head, gpu = config["available_node_types"][config["head_node_type"]], config["available_node_types"]["gpu_worker"]
    assert head["resources"]["GPU"] == 0 and 1 <= gpu["min_workers"] < gpu["max_workers"] <= config["max_workers"]
    assert any("CLINICALGPT_EXTRAS=gpu" in c for c in config["setup_commands"])  # official vLLM on GPU nodes
    start = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert "ray stop" not in start  # never: it kills every Ray process on the host
    assert start.count("RAY_AUTH_MODE=token") == 2 and "~/.ray/auth_token" in config["file_mounts"]
    assert "--metrics-export-port=8080" in start and "--dashboard-host=0.0.0.0" in start
    # A lost node is marked dead after 5 refused health checks a second apart (Ray's default: 3 s apart); the
    # GCS runs them, on the head; the RayJob's head runs with the same.
    assert cluster_settings() == {"RAY_health_check_period_ms": "1000"}
    rayjob_head = load("k8s/rayjob.yaml")["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert all({"name": k, "value": v} in rayjob_head["containers"][0]["env"] for k, v in cluster_settings().items())

    broken = load("cluster.yaml")
    broken["available_node_types"]["gpu_worker"]["min_worker"] = 1  # a typo the launcher must refuse
    with pytest.raises(ValidationError):
        launcher_check(broken)


def test_the_rayjob_manifest_runs_the_pinned_ray_with_autoscaling_gpu_workers():
    job = load("k8s/rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["spec"]["entrypoint"].startswith("python jobs/ppo.py preset=bloom-7b")
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__ and cluster["enableInTreeAutoscaling"]
    (workers,) = cluster["workerGroupSpecs"]
    assert 1 <= workers["minReplicas"] <= workers["replicas"] <= workers["maxReplicas"]
    pods = [cluster["headGroupSpec"]["template"]["spec"], workers["template"]["spec"]]
    for pod in pods:
        (container,) = pod["containers"]
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token" and "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]
        mounts = {m["name"] for m in container["volumeMounts"]}
        assert mounts <= {v["name"] for v in pod["volumes"]} and "shared" in mounts
    assert workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
    # The image is built from this checkout's Dockerfile with the GPU extra.
    assert re.search(r"CLINICALGPT_EXTRAS=gpu", (REPO / "Dockerfile").read_text())


def test_prometheus_discovers_ray_nodes_from_rays_file():
    config = load("monitoring/prometheus.yml")
    (job,) = config["scrape_configs"]
    assert job["file_sd_configs"][0]["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]


def test_the_alert_rules_load_with_prometheus_config_and_watch_exported_metrics():
    from clinicalgpt.rlhf.log import METRICS as PPO_METRICS
    config = load("monitoring/prometheus.yml")
    rules = [r for f in config["rule_files"] for g in load(f"monitoring/{f}")["groups"] for r in g["rules"]]
    watched = {name for r in rules for name in re.findall(r"\bray_[a-z_]+", r["expr"])}
    assert {r["alert"] for r in rules} == {"PPOOutputsCollapsing"}
    assert watched == {"ray_clinicalgpt_ppo_health_alarm"} and "health_alarm" in PPO_METRICS


def test_the_grafana_dashboard_plots_only_metrics_the_project_exports():
    """Every series it queries is one the training stages, PPO, Ray Data or Serve export (the scrape
    tests in test_training.py, test_ppo.py and test_serve.py read those from a live cluster)."""
    import json
    from clinicalgpt.trainer import METRICS as TRAIN_METRICS
    from clinicalgpt.rlhf.log import METRICS as PPO_METRICS
    exported = ({f"ray_clinicalgpt_train_{m}" for m in TRAIN_METRICS} | {f"ray_clinicalgpt_ppo_{m}" for m in PPO_METRICS}
                | {"ray_serve_num_http_requests_total", "ray_serve_num_http_error_requests_total",
                   "ray_serve_http_request_latency_ms_bucket", "ray_serve_deployment_queued_queries",
                   "ray_data_operator_queued_blocks"})
    dashboard = json.loads((REPO / "monitoring" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    queried = {name for e in exprs for name in re.findall(r"\bray_[a-z_]+", e)}
    assert queried and queried <= exported, queried - exported
    titles = {p["title"] for p in dashboard["panels"]}
    assert {"Training loss", "Reward", "KL to the SFT policy", "Latency"} <= titles
