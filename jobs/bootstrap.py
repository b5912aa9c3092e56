"""Stage 2: the base model. Presets that build their own (tiny) create it from the config with the
tokenizer trained by jobs/data.py; real presets (bloom-7b, qwen2.5-7b) only check that model.path loads.

    python jobs/bootstrap.py [preset=tiny] [key=value ...]

Then it proves the model is usable downstream: it loads with AutoModelForCausalLM / AutoTokenizer
offline and generates with transformers (a Ray task), and, unless check_vllm=false, in a vLLM rollout
engine (the evaluation's role): both on the cluster with the evaluation engine's resources, not in the driver.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import ray
import torch

from actors.rollout import RolloutEngines
from clinicalgpt.config import Config, load_config
from clinicalgpt.lineage import write_lineage, write_model_card
from clinicalgpt.modeling import build_model, count_parameters, load_model
from clinicalgpt.runtime import init_ray
from clinicalgpt.tokenizer import load_tokenizer, prompt_ids

PROMPT = [{"role": "user", "content": "高血压患者可以吃党参吗？"}]


def base_model_check(cfg: Config, prompt: list[int]) -> dict:
    """Build the base model when the preset builds its own, then load it as a user would and decode the
    prompt greedily with transformers. Runs as a Ray task: a real preset's model is loaded on the cluster."""
    path = cfg.model_path
    if cfg.model.build_from_config:
        built = build_model(cfg.model, load_tokenizer(path), seed=cfg.data.seed)
        built.save_pretrained(path)
        print(f"[bootstrap] built {cfg.model.arch} model, {count_parameters(built) / 1e6:.2f}M parameters -> {path}")
    model = load_model(path, cfg.model.dtype)
    started = time.time()
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
    return {"parameters": count_parameters(model), "transformers_ids": out[0, len(prompt):].tolist(),
            "transformers_seconds": round(time.time() - started, 2)}


def main(argv: list[str]) -> dict:
    job_started = time.time()
    check_vllm = "check_vllm=false" not in argv
    cfg = load_config([a for a in argv if not a.startswith("check_vllm=")])
    path = cfg.model_path
    if cfg.model.build_from_config and not (Path(path) / "tokenizer.json").exists():
        raise SystemExit(f"no tokenizer at {path}: run `python jobs/data.py preset={cfg.preset}` first")
    init_ray(cfg)
    tok = load_tokenizer(path, cfg.model.chat_template)
    prompt = prompt_ids(tok, PROMPT)
    role = cfg.eval.rollout
    result = {"path": path, **ray.get(ray.remote(base_model_check).options(num_cpus=role.cpus, num_gpus=role.gpus)
                                       .remote(cfg, prompt))}
    hf_ids = result["transformers_ids"]
    result["transformers_text"] = hf_text = tok.decode(hf_ids, skip_special_tokens=True)
    print(f"[bootstrap] transformers generate ok ({result['transformers_seconds']}s), token ids {hf_ids[:8]}... "
          f"(before training the text is noise: {hf_text[:24]!r})")
    if check_vllm and importlib.util.find_spec("vllm") is None:
        print("[bootstrap] WARNING: vLLM is not installed; the rollout and serving stages will fall back to "
              "transformers generation (install the cpu or gpu extra)")
    elif check_vllm:
        started = time.time()
        engines = RolloutEngines(role, cfg.eval.engine, "bootstrap", 512, cfg.eval.seed, cfg.model.dtype)
        try:
            (engine, *_) = engines.load("base", path)
            result["vllm_ids"] = ray.get(engine.generate.remote([prompt], 1, 24, 0.0, logprobs=False))[0]["ids"]
        finally:
            engines.close()
        result["vllm_text"] = tok.decode(result["vllm_ids"], skip_special_tokens=True)
        result["vllm_seconds"] = round(time.time() - started, 1)
        same = result["vllm_ids"][:8] == hf_ids[:8]
        print(f"[bootstrap] vLLM engine loaded and generated ({result['vllm_seconds']}s incl. start), token ids "
              f"{result['vllm_ids'][:8]}...: {'same' if same else 'DIFFERENT'} greedy tokens as transformers")
    write_lineage(cfg, "bootstrap", argv, job_started)
    if cfg.model.build_from_config:  # a card for the model built here, not inside someone else's model folder
        write_model_card(Path(path), cfg, "bootstrap", result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
