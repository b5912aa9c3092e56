"""Stage 8: serve the clinical model on Ray Serve, an OpenAI-compatible endpoint (clinicalgpt/serving.py).

    python jobs/serve.py [serve.model=ppo|sft|/path/to/model] [serve.adapter=/path/to/lora] [key=value ...]
    serve run jobs/serve.yaml        # the same application from its Serve config; `serve deploy` on a cluster

Deploys the application of jobs/serve.yaml (its replicas and autoscaling, its overrides followed by these)
on a local Ray cluster, or the one at $RAY_ADDRESS, prints how to query it and serves until Ctrl-C.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import ray
import yaml
from ray import serve

from clinicalgpt.config import load_config
from clinicalgpt.runtime import init_ray
from clinicalgpt.serving import chat_app, load_api_keys

SERVE_YAML = Path(__file__).resolve().parent / "serve.yaml"


def main(argv: list[str], port: int = 0) -> str:
    """Deploy (on `port`, else the config file's) and return the endpoint's base URL."""
    spec = yaml.safe_load(SERVE_YAML.read_text())
    app = spec["applications"][0]
    cfg = load_config([*app["args"]["overrides"], *argv])
    init_ray(cfg)
    started = time.time()
    http = {**spec["http_options"], **({"port": port} if port else {})}
    serve.start(http_options=http)
    serve.run(chat_app(cfg, app["args"]["deployment_config"], http["host"]), name=app["name"],
              route_prefix=app["route_prefix"])
    url = f"http://127.0.0.1:{http['port']}"
    key = "-H \"Authorization: Bearer $" + cfg.serve.api_key_env + "\" " if load_api_keys(cfg.serve) else ""
    print(f"[serve] {cfg.serve.model_name} ({cfg.stage_model(cfg.serve.model)}) up in {time.time() - started:.0f}s "
          f"at {url}/v1 (OpenAI API; health {url}/health)\n"
          f"  curl {url}/v1/chat/completions {key}-H 'Content-Type: application/json' "
          f"-d '{{\"model\": \"{cfg.serve.model_name}\", \"messages\": [{{\"role\": \"user\", \"content\": \"高血压患者可以吃党参吗？\"}}]}}'",
          flush=True)
    return url


if __name__ == "__main__":
    main(sys.argv[1:])
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
