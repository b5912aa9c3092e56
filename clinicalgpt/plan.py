"""What a preset asks of a GPU cluster, worked out before anything starts and without loading a weight:
the rules the jobs check (an engine's GPUs, the weight-sync path), and the plan `jobs/plan.py` prints: per
stage, its actors and Ray Train workers, their CPUs and GPUs, and each one's GPU memory estimated from the
model's shape. A plan that cannot fit in GPU memory or cannot be placed on the cluster lists its problems.

Memory per GPU, in GB (10^9 bytes), for b rows of s tokens, h hidden, a heads, L layers, V vocabulary entries,
w bytes a weight or activation (2 in bf16); docs/sizing.md works the numbers through:
  weights       parameters x w (a tensor-parallel engine: its share)
  gradients     trainable parameters x w, sharded over the workers (ZeRO-2)
  optimizer     trainable parameters x 12: the fp32 master copy and Adam's two moments, sharded (ZeRO-2)
  activations   L x s b h (34 + 5 a s / h) x w/2 (Korthikanti et al. 2022; eager attention, nothing
                recomputed); with gradient checkpointing L x s b h w (each layer's input) plus one layer's
                full set; a forward pass without gradients: one layer's full set
  logits        b x (positions scored) x V x (w + 8): the model's logits, their fp32 copy, its log-softmax; the
                PPO learner's x (w + 16): also the copy at the sampling temperature, the softmax for the entropy
                and the gradients (measured on an H200: bench/gpu_learner_memory.py, docs/sizing.md)
  kv_cache      a vLLM engine: what its memory_fraction of the GPU leaves after its weights and runtime
  runtime       RUNTIME_GB per GPU process: CUDA context, NCCL and DeepSpeed buffers, the allocator's slack
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, PretrainedConfig

from . import rl
from .config import Config, EngineConfig, LoraSettings, RoleConfig
from .modeling import apply_lora, pushed_tensors
from .reward_functions import parse_reward
from .reward_model import stage_config
from .runtime import device_env
from .trainer import ZERO_STAGE, scaling_config

GB = 1e9
# Measured on an H200 (bench/gpu_learner_memory.py): a CUDA context and workspaces of 0.8 GB, and PyTorch's caching
# allocator reserving 0.9-2.8 GB over its peak allocation; NCCL's and DeepSpeed's buffers come on top, unmeasured.
RUNTIME_GB = 4.0
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# The config.json fields the plan reads of the presets' hub models: a plan needs neither a download nor the hub.
KNOWN_MODELS = {
    "bigscience/bloom-7b1": {"model_type": "bloom", "n_layer": 30, "hidden_size": 4096, "n_head": 32,
                             "vocab_size": 250880},
    "Qwen/Qwen2.5-7B-Instruct": {"model_type": "qwen2", "num_hidden_layers": 28, "hidden_size": 3584,
                                 "num_attention_heads": 28, "num_key_value_heads": 4, "intermediate_size": 18944,
                                 "vocab_size": 152064, "tie_word_embeddings": False},
}
# What each stage's driver holds: never a model (tests/test_layout.py checks where weights load).
DRIVERS = {
    "pretrain": "Ray Train's controller, the Ray Data stream's plan, eval_rows held-out rows",
    "sft": "Ray Train's controller, the Ray Data stream's plan, eval_rows held-out rows",
    "rm": "Ray Train's controller, the pairs (a few MB); held-out accuracy: a Ray task on a worker's resources",
    "judge": "as rm's",
    "dpo": "Ray Train's controller, the pairs with their reference log-probs (a few MB); the reference pass and the "
           "held-out report: Ray Data actors and Ray tasks on the workers' resources",
    "ppo": "the controller: prompts, tokenizer, a step's experience; weights go learner -> engines, not via the driver",
    "eval": "the items, tokenizers and answers, the judge's scores",
    "serve": "the application's builder; a serve.adapter is merged by a Ray task on a replica's resources",
}


def check_engine(engine: EngineConfig, gpus: float, name: str) -> None:
    """An engine that spans several GPUs (tensor parallel) gets exactly that many, whole, from its role."""
    if engine.tensor_parallel > 1 and gpus != engine.tensor_parallel:
        raise SystemExit(f"{name}: engine.tensor_parallel={engine.tensor_parallel} spans {engine.tensor_parallel} "
                         f"GPUs, but each engine gets gpus={gpus:g}: set the role's gpus (ppo.rollout.gpus, "
                         f"eval.rollout.gpus, serve.gpus) to {engine.tensor_parallel}")


def weight_sync_mode(cfg: Config) -> str:
    """ppo.weight_sync resolved. auto takes the path that has run: the NCCL broadcast has never run (no GPU
    has been available to this project; docs/gpu.md), so until it has, auto is object_store on GPUs too.
    nccl is opt-in and needs whole GPUs for the rollout and learner roles, and one GPU per engine."""
    ppo = cfg.ppo
    whole_gpus = ppo.rollout.gpus >= 1 and ppo.learner.gpus >= 1
    if ppo.weight_sync == "auto":
        return "object_store"
    if ppo.weight_sync not in ("object_store", "nccl"):
        raise SystemExit(f"ppo.weight_sync={ppo.weight_sync!r}: one of auto, object_store, nccl")
    if ppo.weight_sync == "nccl" and not whole_gpus:
        raise SystemExit(f"ppo.weight_sync=nccl needs whole GPUs for the rollout and learner roles (ppo.rollout.gpus="
                         f"{ppo.rollout.gpus:g}, ppo.learner.gpus={ppo.learner.gpus:g}): NCCL cannot join two processes "
                         "on one GPU; colocated roles and CPUs use ppo.weight_sync=object_store")
    if ppo.weight_sync == "nccl" and ppo.engine.tensor_parallel > 1:
        raise SystemExit(f"ppo.weight_sync=nccl broadcasts into one GPU per engine, and ppo.engine.tensor_parallel="
                         f"{ppo.engine.tensor_parallel} spreads each engine over {ppo.engine.tensor_parallel}: "
                         "use ppo.weight_sync=object_store")
    return ppo.weight_sync


@dataclass
class Cluster:
    gpus_per_node: int
    nodes: int
    gpu_memory_gb: float = 80.0

    @classmethod
    def parse(cls, text: str, gpu_memory_gb: float = 80.0) -> Cluster:
        """`8x1`: GPUs per node x nodes."""
        match = re.fullmatch(r"(\d+)x(\d+)", text)
        if not match:
            raise SystemExit(f"cluster={text!r}: GPUs per node x nodes, e.g. 8x1")
        return cls(int(match[1]), int(match[2]), gpu_memory_gb)

    def __str__(self) -> str:
        return f"{self.gpus_per_node}x{self.nodes}"

    def budget_gb(self, gpus: float) -> float:
        """The GPU memory of an actor with `gpus` GPUs, per GPU: its share of one, or a whole one."""
        return min(gpus, 1.0) * self.gpu_memory_gb


@dataclass
class Actor:
    """One row of the plan: the actors (or Ray Train workers) of one kind in a stage, and what one of them
    holds. Actors of the same stage run at the same time."""

    stage: str
    role: str
    count: int
    cpus: float
    gpus: float
    dtype: str
    memory: dict[str, float]  # GB per GPU by component (without GPUs: host memory, not checked)
    budget_gb: float  # its GPU memory per GPU (0: none)
    zero: int | None = None
    checkpointing: bool | None = None
    env: dict[str, str] = field(default_factory=dict)
    note: str = ""
    problem: str = ""  # besides memory over budget

    @property
    def total_gb(self) -> float:
        return sum(self.memory.values())


# Parameter counts by (model config, classifier, LoRA settings), for the process: a 7B model's modules take a second
# to build even on the meta device, and each plan asks for the same few.
_COUNTED: dict[tuple[str, bool, str], dict[str, int]] = {}


@dataclass
class Model:
    """The model's shape and parameter counts, from its modules on PyTorch's meta device (shapes without
    memory or weights)."""

    config: PretrainedConfig

    @property
    def layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def hidden(self) -> int:
        return self.config.hidden_size

    @property
    def heads(self) -> int:
        return self.config.num_attention_heads

    def parameters(self, classifier: bool = False, lora: LoraSettings | None = None) -> dict[str, int]:
        """The causal LM's or the classifier's (reward model, critic) parameters: all, trainable (with the
        LoRA adapter: its own) and pushed (what a PPO weight push carries: modeling.pushed_tensors)."""
        key = (self.config.to_json_string(), classifier, repr(lora))
        if key not in _COUNTED:
            config = copy.deepcopy(self.config)
            config.num_labels = 1
            with torch.device("meta"):
                model = (AutoModelForSequenceClassification if classifier else AutoModelForCausalLM).from_config(config)
                if lora is not None:
                    model = apply_lora(model, lora, task_type="SEQ_CLS" if classifier else "CAUSAL_LM")
            total = sum(p.numel() for p in model.parameters())
            _COUNTED[key] = {"all": total, "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                            "pushed": sum(t.numel() for _, t, _ in pushed_tensors(model))}
        return _COUNTED[key]

    def kv_bytes_per_token(self, w: int) -> int:
        """Keys and values of one token in every layer."""
        kv_heads = getattr(self.config, "num_key_value_heads", None) or self.heads
        head_dim = getattr(self.config, "head_dim", None) or self.hidden // self.heads
        return 2 * self.layers * kv_heads * head_dim * w

    def layer_activations(self, rows: int, tokens: int, w: int) -> float:
        """What one layer keeps for its backward pass (Korthikanti et al. 2022, at w bytes an activation)."""
        s, b, h = tokens, rows, self.hidden
        return s * b * h * (34 + 5 * self.heads * s / h) * w / 2

    def activations(self, rows: int, tokens: int, w: int, checkpointing: bool) -> float:
        if checkpointing:
            return self.layers * tokens * rows * self.hidden * w + self.layer_activations(rows, tokens, w)
        return self.layers * self.layer_activations(rows, tokens, w)

    def logits(self, rows: int, positions: int, w: int, learner: bool = False) -> float:
        return rows * positions * self.config.vocab_size * (w + (16 if learner else 8))


def model_config(cfg: Config) -> PretrainedConfig:
    """The model's config.json (model.path a local folder), or the shape of a known hub model."""
    folder = Path(cfg.model_path)
    if (folder / "config.json").exists():
        return AutoConfig.from_pretrained(folder)
    if cfg.model.path in KNOWN_MODELS:
        fields = dict(KNOWN_MODELS[cfg.model.path])
        return AutoConfig.for_model(fields.pop("model_type"), **fields)
    raise SystemExit(f"the plan needs the shape of {cfg.model_path}: point model.path at a local folder with its "
                     f"config.json, or use one of {', '.join(KNOWN_MODELS)}")


def in_gb(memory: dict[str, float]) -> dict[str, float]:
    return {k: round(v / GB, 2) for k, v in memory.items()}


def runtime(gpus: float) -> float:
    return RUNTIME_GB * GB if gpus else 0.0


def training_workers(cfg: Config, stage: str, model: Model, cluster: Cluster) -> Actor:
    """A Ray Train worker of a stage, as the stage's ScalingConfig asks for it. ZeRO-2 shards over the
    fewest workers the stage may run on (min_workers when elastic)."""
    train_cfg = stage_config(cfg, stage) if stage in ("rm", "judge") else getattr(cfg, stage)
    resources = scaling_config(train_cfg).resources_per_worker
    gpus = resources.get("GPU", 0.0)
    dtype = training_dtype(cfg, train_cfg)
    w, shards, classifier = DTYPE_BYTES[dtype], train_cfg.min_workers or train_cfg.num_workers, stage in ("rm", "judge")
    counts = model.parameters(classifier, train_cfg.lora)
    pairs = stage in ("rm", "judge", "dpo")  # chosen and rejected at once
    rows, tokens = train_cfg.micro_batch * (2 if pairs else 1), cfg.seq.max_len
    # DPO's logits: the reply positions only, a reply at most half a row (reward_model.TokenizePairs).
    positions = tokens // 2 if stage == "dpo" else tokens
    memory = {"weights": counts["all"] * w, "gradients": counts["trainable"] * w / shards,
              "optimizer": counts["trainable"] * 12 / shards,
              "activations": model.activations(rows, tokens, w, train_cfg.gradient_checkpointing),
              "logits": 0.0 if classifier else model.logits(rows, positions, w), "runtime": runtime(gpus)}
    trained = f"LoRA, {counts['trainable'] / 1e6:.1f} M trainable" if train_cfg.lora.enabled else "all parameters"
    return Actor(stage, "worker", train_cfg.num_workers, resources["CPU"], gpus, dtype, in_gb(memory),
                 cluster.budget_gb(gpus), ZERO_STAGE, train_cfg.gradient_checkpointing, device_env(gpus),
                 f"{trained}; micro-batch {rows} x {tokens} tokens")


def training_dtype(cfg: Config, train_cfg) -> str:
    """What a training stage computes in: bf16 when set, or left to the hardware (auto) on GPUs, which have it."""
    gpus = train_cfg.gpus_per_worker
    return "bfloat16" if train_cfg.bf16 or (train_cfg.bf16 is None and gpus) else cfg.model.dtype


def engine_actors(stage: str, role_name: str, role: RoleConfig, engine: EngineConfig, model: Model, dtype: str,
                  max_len: int, cluster: Cluster, load: str = "") -> Actor:
    """vLLM engines: each takes memory_fraction of every GPU it spans, for its share of the weights first and
    the KV cache after; it must hold one whole sequence (vLLM refuses to start otherwise)."""
    check_engine(engine, role.gpus, f"{stage}.{role_name}")
    w, tp = DTYPE_BYTES[dtype], engine.tensor_parallel
    memory = {"weights": model.parameters()["all"] * w / tp}
    note = f"vLLM, tensor parallel {tp}, {'eager' if engine.enforce_eager else 'CUDA graphs'}"
    problem = ""
    if role.gpus:
        memory["runtime"] = runtime(role.gpus)
        memory["kv_cache"] = engine.memory_fraction * cluster.gpu_memory_gb * GB - memory["weights"] - memory["runtime"]
        tokens = max(memory["kv_cache"], 0) / (model.kv_bytes_per_token(w) / tp)
        note += f"; KV cache for {tokens:,.0f} tokens, sequences up to {max_len}" + (f" ({load})" if load else "")
        if tokens < max_len:
            problem = (f"{stage} {role_name}: engine.memory_fraction {engine.memory_fraction:g} leaves a KV cache for "
                       f"{tokens:,.0f} tokens, less than one sequence of {max_len}")
    return Actor(stage, role_name, role.num, role.cpus, role.gpus, dtype, in_gb(memory), cluster.budget_gb(role.gpus),
                 env=device_env(role.gpus), note=note, problem=problem)


def scoring_actors(stage: str, role_name: str, role: RoleConfig, model: Model, dtype: str, rows: int, tokens: int,
                   positions: int, classifier: bool, cluster: Cluster) -> Actor:
    """A frozen model's forward passes without gradients (the reference, a reward model): rows of tokens, the
    logits of the last `positions` (a classifier has none over the vocabulary)."""
    w = DTYPE_BYTES[dtype]
    memory = {"weights": model.parameters(classifier)["all"] * w, "activations": model.layer_activations(rows, tokens, w),
              "logits": 0.0 if classifier else model.logits(rows, positions, w), "runtime": runtime(role.gpus)}
    return Actor(stage, role_name, role.num, role.cpus, role.gpus, dtype, in_gb(memory), cluster.budget_gb(role.gpus),
                 env=device_env(role.gpus), note=f"forward passes of {rows} x {tokens} tokens, no gradients")


def ppo_actors(cfg: Config, model: Model, cluster: Cluster) -> list[Actor]:
    ppo, dtype = cfg.ppo, cfg.model.dtype
    tokens, positions = ppo.max_prompt_len + ppo.max_new_tokens, ppo.max_new_tokens + 1  # logits_to_keep
    step = f"a step: {math.ceil(ppo.prompts_per_step * ppo.samples_per_prompt / ppo.rollout.num)} sequences an engine"
    actors = [engine_actors("ppo", "rollout", ppo.rollout, ppo.engine, model, dtype, tokens, cluster, step),
              scoring_actors("ppo", "reference", ppo.reference, model, dtype, ppo.forward_rows, tokens, positions,
                             False, cluster)]
    if parse_reward(ppo.reward)[0] == "model":
        actors.append(scoring_actors("ppo", "reward", ppo.reward_model, model, dtype, ppo.forward_rows, tokens, 0,
                                     True, cluster))
    else:
        role = ppo.reward_model
        actors.append(Actor("ppo", "reward", role.num, role.cpus, role.gpus, dtype, {}, cluster.budget_gb(role.gpus),
                            env=device_env(role.gpus), note=f"{ppo.reward}: a function, no model"))
    # The learners: the policy and (gae) the critic, each trained in turn on a rank's micro-batch.
    role, dtype = ppo.learner, "bfloat16" if ppo.bf16 else dtype
    w, rows = DTYPE_BYTES[dtype], ppo.minibatch // role.num
    trained = [model.parameters(False, ppo.lora)]
    if rl.ADVANTAGE_ESTIMATORS[ppo.advantage].uses_critic:
        trained.append(model.parameters(True, ppo.lora))
    trainable = sum(c["trainable"] for c in trained)
    memory = {"weights": sum(c["all"] for c in trained) * w, "gradients": trainable * w / role.num,
              "optimizer": trainable * 12 / role.num,
              "activations": model.activations(rows, tokens, w, ppo.gradient_checkpointing),
              "logits": model.logits(rows, positions, w, learner=True), "runtime": runtime(role.gpus)}
    actors.append(Actor("ppo", "learner", role.num, role.cpus, role.gpus, dtype, in_gb(memory),
                        cluster.budget_gb(role.gpus), ZERO_STAGE, ppo.gradient_checkpointing, device_env(role.gpus),
                        f"{'policy and critic' if len(trained) == 2 else 'policy'}; micro-batch {rows} x {tokens} tokens"))
    return actors


def make_plan(cfg: Config, cluster: Cluster) -> Plan:
    model = Model(model_config(cfg))
    stages = cfg.recipe_stages()
    actors = [training_workers(cfg, s, model, cluster) for s in stages if s in ("pretrain", "sft", "rm", "judge")]
    if "dpo" in stages:  # the reference pass (dpo.ReferenceLogprobs, pairs of micro_batch a forward), then training
        dpo = cfg.dpo
        role = RoleConfig(num=dpo.num_workers, cpus=dpo.cpus_per_worker, gpus=dpo.gpus_per_worker)
        actors += [scoring_actors("dpo reference", "reference", role, model, training_dtype(cfg, dpo),
                                  2 * dpo.micro_batch, cfg.seq.max_len, cfg.seq.max_len // 2, False, cluster),
                   training_workers(cfg, "dpo", model, cluster)]
    if "ppo" in stages:
        actors += ppo_actors(cfg, model, cluster)
    actors.append(engine_actors("eval", "rollout", cfg.eval.rollout, cfg.eval.engine, model, cfg.model.dtype,
                                cfg.seq.max_len, cluster))
    if cfg.eval.judge == "reward_model":  # once the engines have gone: a stage of its own
        actors.append(scoring_actors("eval judge", "reward", cfg.eval.reward_model, model, cfg.model.dtype,
                                     cfg.ppo.forward_rows, cfg.seq.max_len, 0, True, cluster))
    serve = RoleConfig(num=1, cpus=cfg.serve.cpus, gpus=cfg.serve.gpus)  # a replica; autoscaling adds more alike
    actors.append(engine_actors("serve", "replica", serve, cfg.serve.engine, model, cfg.model.dtype,
                                cfg.serve.max_model_len, cluster))
    problems = [a.problem for a in actors if a.problem]
    problems += [f"{a.stage} {a.role}: ~{a.total_gb:.1f} GB per GPU, {a.total_gb - a.budget_gb:.1f} GB over its "
                 f"{a.budget_gb:g} GB" for a in actors if a.gpus and a.total_gb > a.budget_gb]
    for stage in dict.fromkeys(a.stage for a in actors):
        why = place([(a.role, a.gpus) for a in actors if a.stage == stage for _ in range(a.count)], cluster)
        if why:
            problems.append(f"{stage} {why}")
    push = model.parameters(False, cfg.ppo.lora)["pushed"] * DTYPE_BYTES[cfg.model.dtype] / GB
    return Plan(cfg.preset, cfg.model.path or cfg.model_path, model.parameters()["all"], str(cluster),
                cluster.gpu_memory_gb, actors, weight_sync_mode(cfg), round(push, 2),
                {s: what for s, what in DRIVERS.items() if s in {a.stage.split()[0] for a in actors}}, problems)


def place(demands: list[tuple[str, float]], cluster: Cluster) -> str:
    """First fit, largest first, of each actor's GPUs ((role, GPUs) of the actors that run at once: a fraction
    of one GPU, or whole GPUs of one node) onto the cluster's: '' when all fit, else why not."""
    free = [[1.0] * cluster.gpus_per_node for _ in range(cluster.nodes)]  # per node, per GPU: what is left
    total, have = sum(g for _, g in demands), cluster.gpus_per_node * cluster.nodes
    for role, need in sorted((d for d in demands if d[1]), key=lambda d: -d[1]):
        if need > 1 and need != int(need):
            return f"{role}: {need:g} GPUs for one actor, but Ray grants a fraction of one GPU or whole GPUs"
        if need > cluster.gpus_per_node:
            return (f"{role}: one actor needs {need:g} GPUs, {need - cluster.gpus_per_node:g} more than a node of the "
                    f"cluster {cluster} has")
        if not take(free, need):
            return (f"needs {total:g} GPUs at once, {total - have:g} more than the cluster {cluster} has" if total > have
                    else f"needs {total:g} GPUs at once, which do not pack onto the cluster {cluster}'s GPUs")
    return ""


def take(free: list[list[float]], need: float) -> bool:
    if need >= 1:
        node = next((gpus for gpus in free if gpus.count(1.0) >= need), None)
        for _ in range(int(need) if node else 0):
            node[node.index(1.0)] = 0.0
        return node is not None
    fits = [(left, gpus, i) for gpus in free for i, left in enumerate(gpus) if left >= need - 1e-9]
    if fits:
        _, gpus, i = min(fits, key=lambda f: f[0])  # the fullest GPU it fits on
        gpus[i] -= need
    return bool(fits)


@dataclass
class Plan:
    preset: str
    model: str
    parameters: int
    cluster: str
    gpu_memory_gb: float
    actors: list[Actor]
    weight_sync: str
    weight_push_gb: float  # what a PPO weight push carries (with LoRA: the modules holding adapted layers)
    drivers: dict[str, str]
    problems: list[str]

    def to_json(self) -> dict:
        return {**asdict(self), "actors": [{**asdict(a), "total_gb": round(a.total_gb, 2)} for a in self.actors]}


COLUMNS = ("weights", "gradients", "optimizer", "activations", "logits", "kv_cache", "runtime")


def table(plan: Plan) -> str:
    """The plan as text: a row per kind of actor, its memory in GB per GPU; notes, drivers, the verdict."""
    titles = ("stage", "role", "n", "CPUs", "GPUs", "dtype", "ZeRO", "recompute", "DS_ACCELERATOR", *COLUMNS,
              "total", "of", "use")
    rows = [titles]
    for a in plan.actors:
        memory = [f"{a.memory[c]:.1f}" if c in a.memory else "-" for c in COLUMNS]
        rows.append((a.stage, a.role, str(a.count), f"{a.cpus:g}", f"{a.gpus:g}", a.dtype,
                     "-" if a.zero is None else str(a.zero), {None: "-", True: "on", False: "off"}[a.checkpointing],
                     a.env["DS_ACCELERATOR"], *memory, f"{a.total_gb:.1f}", f"{a.budget_gb:g}" if a.gpus else "host",
                     f"{a.total_gb / a.budget_gb:.0%}" if a.gpus else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(titles))]
    lines = [f"plan: preset {plan.preset}, {plan.model} ({plan.parameters / 1e9:.2f} B parameters), cluster "
             f"{plan.cluster} (GPUs per node x nodes) of {plan.gpu_memory_gb:g} GB GPUs; memory: GB per GPU, estimated "
             "(docs/sizing.md)", ""]
    lines += ["  ".join(v.ljust(n) if i < 9 else v.rjust(n) for i, (v, n) in enumerate(zip(r, widths))) for r in rows]
    lines += [""] + [f"{a.stage} {a.role}: {a.note}" for a in plan.actors if a.note]
    lines += [f"ppo weight sync: {plan.weight_sync}, {plan.weight_push_gb:g} GB a push", ""]
    lines += [f"driver, {stage}: {what}" for stage, what in plan.drivers.items()]
    lines += [""] + ([f"REFUSED: {p}" for p in plan.problems] or
                     [f"fits: each stage's actors in GPU memory and on the cluster {plan.cluster}"])
    return "\n".join(lines)
