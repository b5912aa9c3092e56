"""One config system for every stage: dataclasses, preset YAML files, `key=value` overrides.

    cfg = load_config(["preset=bloom-7b", "data.root=/data/med", "sft.lr=1e-4"])

Order of precedence (last wins): dataclass defaults (the `tiny` preset) -> presets/<preset>.yaml ->
an optional `config=<file.yaml>` -> `key=value` overrides. Unknown keys are errors.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

REPO_ROOT = Path(__file__).resolve().parent.parent
PRESET_DIR = Path(__file__).resolve().parent / "presets"
STAGE_MODELS = ("pretrain", "sft", "rm", "judge", "ppo", "dpo")
# recipe.align: the alignment stages the recipe runs after SFT (and evaluates beside pretrain and SFT).
ALIGNMENTS = {"ppo": ["ppo"], "dpo": ["dpo"], "both": ["dpo", "ppo"]}
DPO_LOSSES = ("sigmoid", "ipo", "simpo")
RECIPE_STAGES = ["data", "bootstrap", "pretrain", "sft", "rm", "judge", "dpo", "ppo", "eval"]


@dataclass
class SourceSpec:
    """One input file: `path` under the data root, parsed by builder `kind` (see clinicalgpt/sources.py): a
    bundled corpus's own, or a format (chat, sharegpt, alpaca). `split` forces a split; when empty the builder
    takes it from the record or derives it by hash. A format's records are of `task`; `fields` maps the format's
    field names to the file's where they differ."""

    path: str
    kind: str
    split: str = ""
    task: str = ""
    fields: dict[str, str] = field(default_factory=dict)


def _default_sources() -> list[SourceSpec]:
    S = SourceSpec
    return [
        S("cmedqa_kg/xywy_kg_triples_grouped.jsonl", "kg_xywy", "train"),
        S("cmedqa_kg/health39_kg_triples_grouped.jsonl", "kg_health39", "train"),
        S("community_qa/toyhom_internal_medicine_train.jsonl", "community_qa", "train"),
        S("community_qa/huatuo26m_test_extra.jsonl", "community_qa", "rl"),
        S("community_qa/huatuo26m_test_dev.jsonl", "community_qa", "valid"),
        S("community_qa/huatuo26m_test_test.jsonl", "community_qa", "test"),
        S("exam_mcq/cmexam_val.jsonl", "exam", "train"),
        S("exam_mcq/cnmleqa_3k.jsonl", "exam", "train"),
        S("exam_mcq/medqa_mcmle_test.jsonl", "exam", "test"),
        S("exam_mcq/cmexam_test.jsonl", "exam", "test"),
        S("dialogue/covid_dialogue_zh_train.jsonl", "dialogue", "train"),
        S("dialogue/covid_dialogue_zh_valid.jsonl", "dialogue", "valid"),
        S("dialogue/covid_dialogue_zh_test.jsonl", "dialogue", "test"),
        S("dialogue/cmdd_train.jsonl", "dialogue", "train"),
        S("dialogue/cmdd_dev.jsonl", "dialogue", "valid"),
        S("dialogue/cmdd_test.jsonl", "dialogue", "test"),
        S("dialogue/cmtmedqa_test.jsonl", "dialogue", "test"),
        S("dialogue/cmtmedqa_test_safety.jsonl", "safety", "test"),
        S("ehr_diagnosis/dxy_train.jsonl", "diagnosis_dxy", ""),
        S("ehr_diagnosis/covid_dialogue_impressions.jsonl", "diagnosis_haodf", ""),
        S("ehr_diagnosis/cmb_clin.jsonl", "diagnosis_cmb_clin", "test"),
        S("preference/medical_pref_zh_train.jsonl", "preference", "train"),
        S("preference/medical_pref_zh_test.jsonl", "preference", "test"),
        S("preference/aux_disc_medllm_firstturn_weak_train.jsonl", "preference_weak", "train"),
        S("preference/aux_disc_medllm_firstturn_weak_test.jsonl", "preference_weak", "test"),
    ]


@dataclass
class DataConfig:
    # Empty: $CLINICALGPT_DATA_ROOT, else ../shared/data beside the checkout.
    root: str = ""
    sources: list[SourceSpec] = field(default_factory=_default_sources)
    seed: int = 0
    kg_en_fraction: float = 0.2  # share of KG QA pairs phrased with the English templates
    kg_max_objects: int = 8  # objects listed in one KG answer
    kg_inverse: bool = True  # also ask the reverse questions (symptom -> diseases, drug -> indications)
    max_record_chars: int = 12000  # longer records are skipped as over_length
    holdout_fraction: float = 0.2  # test share for sources that ship without a test split
    # Replace protected health details (ID and phone numbers, names, dates of birth ...) in every source row with
    # typed placeholders before anything is written (clinicalgpt/deidentify.py); on for a hospital's own records.
    deidentify: bool = False
    rl_dialogue_fraction: float = 0.5  # share of valid dialogues also cut into RL prompts
    shard_rows: int = 10000  # small shards: block order shuffling then mixes sources well
    batch_size: int = 2000  # Ray Data batch for building and tokenizing records


@dataclass
class ModelConfig:
    # Where the base model and tokenizer live: a local folder or a hub name. Empty: the bootstrap output.
    path: str = ""
    # The tiny preset builds its own tokenizer and model; real presets set both to false.
    train_tokenizer: bool = True
    build_from_config: bool = True
    arch: str = "qwen2"
    vocab_size: int = 8000
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 688
    max_position_embeddings: int = 2048
    tokenizer_train_chars: int = 3_000_000
    # Used only when the tokenizer has no chat template of its own (BLOOM has none).
    chat_template: str = ""
    dtype: str = "float32"  # float32, bfloat16, float16; auto: the model's own (its config.json)


@dataclass
class SequenceConfig:
    max_len: int = 512  # packed sequence length; longer samples are skipped (counted)
    # Several samples to a row; null: where the architecture takes per-sample positions (not BLOOM's ALiBi).
    pack: bool | None = True


@dataclass
class LoraSettings:
    enabled: bool = True
    r: int = 8
    alpha: int = 32
    dropout: float = 0.1
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class TrainConfig:
    """One training stage on Ray Train + DeepSpeed ZeRO-2 (pretrain, sft, rm, judge, dpo)."""

    lr: float = 5e-5
    global_batch: int = 128  # sequences per optimizer step, over all workers (gradient accumulation fills it)
    micro_batch: int = 8  # sequences per worker per forward pass
    epochs: float = 3.0
    max_steps: int = 0  # > 0 overrides epochs
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    # bf16 mixed precision (DeepSpeed's: bf16 compute, fp32 master weights and optimizer state); None: where the
    # worker's hardware computes bf16 natively (runtime.resolve_bf16), else fp32.
    bf16: bool | None = None
    num_workers: int = 2
    min_workers: int = 0  # > 0: elastic, ScalingConfig(num_workers=(min_workers, num_workers))
    cpus_per_worker: float = 0.5  # fractional, so Ray Data can stream on the same cores
    # GPUs of each worker (the 7B presets: 1); 0 = CPUs, with DeepSpeed's CPU accelerator. A setting of the
    # stage, not the driver's hardware: on a cluster the driver runs on a CPU head.
    gpus_per_worker: float = 0.0
    # Recompute each layer's activations in the backward pass instead of keeping them (docs/sizing.md).
    gradient_checkpointing: bool = False
    max_failures: int = 3  # worker failures survived by restarting from the last checkpoint
    checkpoint_every: int = 50  # optimizer steps
    eval_every: int = 25
    eval_rows: int = 64  # held-out sequences for the eval loss
    log_every: int = 5
    seed: int = 0
    # Share of each task's records a causal-LM stage trains on (missing tasks: all), e.g. {kg_qa: 0.2}
    # so the knowledge-graph QA (two thirds of the tokens) does not drown out the rest.
    task_fractions: dict[str, float] = field(default_factory=dict)
    # Share of each pair source's training pairs the reward model trains on (missing sources: all).
    pair_fractions: dict[str, float] = field(default_factory=dict)
    # rm: the half of the training pairs (by a hash of the pair) it trains on, 1 or 2, so that the evaluation's
    # judge (jobs/judge.py) trains on the other half with another seed; 0: all pairs (then no judge of our own).
    pair_half: int = 0
    lora: LoraSettings = field(default_factory=lambda: LoraSettings(enabled=False))


@dataclass
class DPOConfig(TrainConfig):
    """Direct preference optimisation from the SFT model (jobs/dpo.py): TrainConfig's settings plus the loss's."""

    # sigmoid: DPO (Rafailov et al.); ipo: IPO's squared loss on mean per-token log-ratios (Azar et al.); simpo: SimPO,
    # reference-free, on mean per-token log-probs with a target margin (Meng et al.).
    loss: str = "sigmoid"
    beta: float = 0.1
    # sigmoid and simpo: the share of pairs taken to be mislabelled (conservative DPO): the loss of the pair read both
    # ways, weighted 1 - label_smoothing and label_smoothing; 0 = off.
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5  # simpo: the target margin between the chosen and rejected replies' rewards


@dataclass
class EngineConfig:
    """A vLLM engine's settings: the PPO rollout engines (ppo.engine), the evaluation's (eval.engine) and the
    served model's (serve.engine)."""

    # vLLM's gpu_memory_utilization: the share of a GPU's memory for weights and KV cache; on CPU the share
    # of host memory vLLM insists is free when it starts (its KV cache is VLLM_CPU_KVCACHE_SPACE GiB).
    memory_fraction: float = 0.2
    enforce_eager: bool = True  # no CUDA graphs (vLLM's CPU build has none); the GPU presets capture them
    tensor_parallel: int = 1  # GPUs one engine spans (its role's gpus must be as many), on one node
    max_num_seqs: int = 0  # sequences an engine decodes at once; 0 = vLLM's default

    def vllm_args(self) -> dict:
        """These settings as vLLM's engine arguments."""
        return {"gpu_memory_utilization": self.memory_fraction, "enforce_eager": self.enforce_eager,
                "tensor_parallel_size": self.tensor_parallel,
                **({"max_num_seqs": self.max_num_seqs} if self.max_num_seqs else {})}


@dataclass
class RoleConfig:
    """Resources of one RLHF role: how many actors, and CPUs / GPUs each (fractions let roles share a
    GPU: colocation is a config change). Each role gets its own placement group."""

    num: int = 1
    cpus: float = 0.5
    gpus: float = 0.0


@dataclass
class PPOConfig:
    """PPO (and its critic-free variants) with Ray actor roles; see jobs/ppo.py."""

    # The tiny preset's reward rises within the first ten steps; its held-out reward was best at 20 of 30.
    steps: int = 20
    prompts_per_step: int = 16
    samples_per_prompt: int = 4
    prompt_tasks: list[str] = field(default_factory=lambda: ["community_qa", "dialogue"])
    max_prompt_len: int = 256  # prompt tokens; longer prompts are skipped (counted)
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    reward: str = "model"  # model | length:<tokens> | contains:<text> (verifiable rules, see actors/reward.py)
    # The score of a response cut at max_new_tokens (no EOS) in place of the reward's, e.g. -1 so that
    # unfinished answers lose; None: scored like any other.
    truncated_score: float | None = None
    # The score of a degenerate response (empty, or one phrase repeated: evaluation.metrics.degenerate, what the
    # output health counts) in place of the reward's, e.g. -1; None: scored like any other.
    degenerate_score: float | None = None
    # Subtracted from the score times the response's share of max_new_tokens: pays back a reward model that
    # favours long answers (its length bias: rm/accuracy.json); 0 = off.
    length_penalty: float = 0.0
    advantage: str = "gae"  # gae (with a critic) | grpo | rloo (critic-free, over the samples of a prompt)
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True  # gae only: grpo and rloo are already centred within each prompt
    kl_estimator: str = "k1"  # k1 | k2 | k3
    kl_controller: str = "fixed"  # fixed | adaptive (Ziegler et al.)
    kl_coef: float = 0.05
    kl_target: float = 6.0  # adaptive: the KL (summed over a response) it steers to
    kl_horizon: int = 10000
    epochs: int = 2  # PPO epochs over each batch of experience
    minibatch: int = 16  # responses per optimizer step, over all learner ranks
    length_group: int = 4  # minibatches whose rows are grouped by length (less padding); 1: plain random
    lr: float = 5e-4  # the tiny model's LoRA; the 7B presets use the paper's 1e-5
    critic_lr: float = 5e-5
    clip: float = 0.2
    # Truncated importance sampling: each token's policy loss weighted by min(pi_learner / pi_engine, tis_cap),
    # for the engines sampling a slightly different policy than the learner's (bf16 weights); 0 = off.
    tis_cap: float = 2.0
    # PPO-ptx (InstructGPT): each policy update adds ptx_coef x the language-model loss of ptx_micro_batch packed
    # rows of the SFT stage's training stream, so the policy keeps its SFT skills (the alignment tax); 0 = off.
    # 1: the best of the arms on the tiny preset (docs/ablation-ptx.md, docs/ablation-degenerate.md: the reward gain of
    # 0.5 with a lower KL and fewer degenerate answers; the 7B presets keep it off: never run there).
    ptx_coef: float = 1.0
    ptx_micro_batch: int = 1
    value_clip: float = 0.2
    grad_clip: float = 1.0
    bf16: bool = False
    # The learners' policy and critic recompute each layer's activations in the backward pass (docs/sizing.md).
    gradient_checkpointing: bool = False
    lora: LoraSettings = field(default_factory=LoraSettings)
    rollout: RoleConfig = field(default_factory=lambda: RoleConfig(num=1, cpus=1.0))
    reference: RoleConfig = field(default_factory=lambda: RoleConfig(num=1, cpus=0.25))
    reward_model: RoleConfig = field(default_factory=lambda: RoleConfig(num=1, cpus=0.25))
    learner: RoleConfig = field(default_factory=lambda: RoleConfig(num=2))
    engine: EngineConfig = field(default_factory=EngineConfig)  # the rollout engines' vLLM settings
    # How new policy weights reach the rollout engines: object_store (through Ray, on any hardware) or nccl
    # (vLLM's weight transfer: a broadcast from learner rank 0 into each engine, GPU to GPU, which needs whole
    # GPUs for both roles: NCCL cannot join two processes on one GPU); auto: the path that has run (object_store).
    weight_sync: str = "auto"
    rollout_restarts: int = 3  # a rollout engine that dies is rebuilt, and given the current weights, this many times
    # Other role deaths survived in the running job from the last checkpoint: a learner rank's by restarting the
    # learner group (all roles with weight_sync nccl), the reference's or reward model's by restarting all roles.
    max_failures: int = 3
    forward_rows: int = 16  # rows per forward pass when scoring (reference, reward, old log-probs), grouped by length
    checkpoint_every: int = 10
    eval_every: int = 10
    eval_prompts: int = 32  # held-out prompts (valid split) answered greedily for the held-out reward
    # Exam questions (of SFT's training split: exams have no valid split) answered greedily at each held-out
    # evaluation, for the share answered with an option letter (eval_exam_compliant); 0 = none.
    eval_exam_prompts: int = 16
    log_every: int = 1
    seed: int = 0


@dataclass
class EndpointConfig:
    """An OpenAI-compatible chat endpoint (this project's Serve deployment, a baseline served elsewhere, or GPT-4):
    a candidate when eval.models names it, the judge when eval.judge_endpoint does."""

    url: str  # the base URL, e.g. http://host:8000/v1
    model: str  # the model id it is asked for
    key_env: str = "OPENAI_API_KEY"  # the environment variable holding its key (unset: none sent)
    concurrency: int = 8  # requests in flight


@dataclass
class EvalConfig:
    """The clinical evaluation (jobs/eval.py): the paper's four task families plus safety, on the test
    records of the data pipeline (point data.sources at the original datasets to evaluate on them), and the
    bias family's attitude-scale items (bundled, or eval.bias_items)."""

    # Candidates: stage names under the run folder (pretrain, sft, dpo, ppo), model paths / hub names, or names of
    # eval.endpoints; empty: pretrain, sft and the recipe's alignment stages (recipe.align). The judged families
    # compare the last (the newest system, as the paper compares ClinicalGPT) with each other.
    models: list[str] = field(default_factory=list)
    endpoints: dict[str, EndpointConfig] = field(default_factory=dict)
    families: list[str] = field(default_factory=lambda: ["conversation", "exam", "diagnosis", "qa", "safety", "bias"])
    # Items per family, drawn by a seeded hash of their ids (the same items for every model); 0 = all.
    items: dict[str, int] = field(default_factory=lambda: {
        "conversation": 200, "exam": 400, "diagnosis": 200, "qa": 100, "safety": 60, "bias": 0})
    max_new_tokens: dict[str, int] = field(default_factory=lambda: {
        "conversation": 64, "exam": 32, "diagnosis": 32, "qa": 96, "safety": 96, "bias": 16})
    exam_likelihood: bool = True  # also pick the option the model gives the highest mean log-prob per token
    exam_labels: str = ""  # a JSON object, item id -> category, overriding the derived exam categories
    bias_items: str = ""  # a JSON-lines file of attitude items (see docs/evaluation.md); empty: the bundled ones
    chunk_items: int = 32  # answers are generated and saved (items.jsonl) this many items at a time; a rerun reuses them
    retries: int = 4  # an endpoint's transient errors (connection, 429, 5xx) are retried this often, with backoff
    bootstrap: int = 1000  # resamples of the items for each figure's 95% confidence interval
    judge: str = "reward_model"  # reward_model (judge_reward_model) | openai (the endpoint judge_endpoint)
    # reward_model: the judge stage's (jobs/judge.py: trained apart from the reward model PPO optimised), rm (that
    # one: it judges what PPO was trained to please), or a reward model's folder.
    judge_reward_model: str = "judge"
    judge_endpoint: str = ""  # openai: the name of an eval.endpoints entry
    judge_tie_margin: float = 0.1  # reward_model: score gaps up to this are ties
    rollout: RoleConfig = field(default_factory=lambda: RoleConfig(num=1, cpus=1.0))
    engine: EngineConfig = field(default_factory=EngineConfig)
    reward_model: RoleConfig = field(default_factory=lambda: RoleConfig(num=1, cpus=0.5))  # judge=reward_model
    seed: int = 0


# The operator's instruction put before every conversation (empty: none). The model is an assistant,
# not a doctor: it says so, and sends urgent symptoms to emergency care.
CLINICAL_SYSTEM_PROMPT = (
    "你是医疗健康助手，不是医生，你的回答不能代替医生的面诊和诊断。"
    "如出现胸痛、呼吸困难、大出血、意识不清、中风征象等紧急症状，请立即就医或拨打120急救电话。")


@dataclass
class ServeConfig:
    """The Ray Serve endpoint (jobs/serve.py, jobs/serve.yaml): which model, its limits and its security.
    Replicas and autoscaling are Serve deployment options, in jobs/serve.yaml."""

    model: str = "ppo"  # a stage's model (pretrain, sft, ppo) or a model folder / hub name
    adapter: str = ""  # a LoRA adapter folder: served merged onto `model`
    model_name: str = "clinicalgpt"  # the id clients send as "model"
    system_prompt: str = CLINICAL_SYSTEM_PROMPT
    max_model_len: int = 512  # prompt plus completion tokens
    max_tokens: int = 256  # the most completion tokens a request may ask for (and the default)
    max_n: int = 4  # the most completions (n) one request may ask for: each costs a whole generation
    max_top_logprobs: int = 5  # the most alternatives per token (top_logprobs, prompt_logprobs) a request may ask for
    # API keys: Bearer tokens, from this environment variable and/or one key a line in this file. With none the
    # endpoint is open, and starts only on a loopback address unless allow_open.
    api_key_env: str = "CLINICALGPT_API_KEY"
    api_key_file: str = ""
    allow_open: bool = False
    max_request_bytes: int = 1_000_000  # a larger request body is a 413, refused before it is parsed
    # Per client (API key, else address), across every ingress replica: a token bucket refilled at
    # requests_per_minute holding request_burst requests; a request over it is a 429 with Retry-After. 0: no limit.
    requests_per_minute: int = 0
    request_burst: int = 10
    # The audit trail: a JSON line per request (no body) in audit_dir (empty: runs/<preset>/serve/audit), one file
    # a replica process; API keys appear only as an HMAC keyed with $<audit_key_env> (else a key drawn per deploy).
    audit_dir: str = ""
    audit_key_env: str = "CLINICALGPT_AUDIT_KEY"
    cpus: float = 1.0  # per engine replica
    gpus: float = 0.0
    engine: EngineConfig = field(default_factory=EngineConfig)
    seed: int = 0


@dataclass
class RecipeConfig:
    align: str = "ppo"  # after SFT: ppo (the paper's path: reward model, then PPO), dpo (from the pairs), or both


@dataclass
class RayConfig:
    address: str = ""  # empty: $RAY_ADDRESS, else a local cluster started for the job
    num_cpus: int = 0  # logical CPUs of a local cluster; 0 = max(4, cores)


@dataclass
class Config:
    preset: str = "tiny"
    run_root: str = ""  # empty: $CLINICALGPT_RUNS, else runs/ in the checkout
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    seq: SequenceConfig = field(default_factory=SequenceConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    # The tiny preset's values; the paper's are in presets/bloom-7b.yaml.
    # Budgets sized so that each stage takes a few minutes on 2 CPU cores (~3.7k tokens/s).
    pretrain: TrainConfig = field(default_factory=lambda: TrainConfig(
        lr=3e-3, global_batch=16, micro_batch=8, max_steps=120, warmup_ratio=0.05, weight_decay=0.01,
        eval_every=20, checkpoint_every=40, log_every=10, task_fractions={"kg_qa": 0.2}))
    sft: TrainConfig = field(default_factory=lambda: TrainConfig(
        lr=2e-3, global_batch=16, micro_batch=8, max_steps=60, eval_every=15, checkpoint_every=30,
        task_fractions={"kg_qa": 0.1}, lora=LoraSettings()))
    # The reward model PPO optimises and the evaluation's judge (jobs/judge.py: these settings with the seed
    # plus one) each train on one half of the pairs.
    rm: TrainConfig = field(default_factory=lambda: TrainConfig(
        lr=2e-4, global_batch=16, micro_batch=8, max_steps=210, eval_every=30, checkpoint_every=70, log_every=10,
        pair_half=1,
        # The tiny model holds too few facts to learn these (they stay at chance): a fifth of them leaves the
        # steps to the pairs it can learn. Presets of real models train on all.
        pair_fractions={"constructed/kg_swap": 0.2, "constructed/exam_wrong_option": 0.2}))
    ppo: PPOConfig = field(default_factory=PPOConfig)
    # On the reward model's pairs (its half and shares: PPO's reward signal came from the same pairs, and the judge
    # was trained apart from them), LoRA as SFT's.
    dpo: DPOConfig = field(default_factory=lambda: DPOConfig(
        lr=1e-3, global_batch=16, micro_batch=8, max_steps=120, eval_every=20, checkpoint_every=40, log_every=10,
        pair_half=1, pair_fractions={"constructed/kg_swap": 0.2, "constructed/exam_wrong_option": 0.2},
        lora=LoraSettings()))
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    # Derived locations: one folder per preset, one subfolder per stage.
    @property
    def run_dir(self) -> Path:
        root = self.run_root or os.environ.get("CLINICALGPT_RUNS") or REPO_ROOT / "runs"
        return Path(root).expanduser().resolve() / self.preset

    @property
    def data_root(self) -> Path:
        root = self.data.root or os.environ.get("CLINICALGPT_DATA_ROOT") or REPO_ROOT.parent / "shared" / "data"
        return Path(root).expanduser().resolve()

    @property
    def data_dir(self) -> Path:
        return self.run_dir / "data"

    def stage_dir(self, stage: str) -> Path:
        return self.run_dir / stage

    @property
    def model_path(self) -> str:
        return self.model.path or str(self.run_dir / "base")

    def recipe_stages(self) -> list[str]:
        """The stages the recipe runs (jobs/recipe.py): after SFT, the alignment paths of recipe.align (PPO with its
        reward model, DPO), and the evaluation's judge (jobs/judge.py) where it is the evaluation's judge."""
        aligned = ALIGNMENTS[self.recipe.align]
        skipped = (set() if "ppo" in aligned else {"rm", "ppo"}) | (set() if "dpo" in aligned else {"dpo"})
        if not (self.eval.judge == "reward_model" and self.eval.judge_reward_model == "judge"):
            skipped.add("judge")
        return [s for s in RECIPE_STAGES if s not in skipped]

    def stage_model(self, name: str) -> str:
        """A stage's exported model (pretrain, sft, rm, judge, ppo, dpo), or `name` itself as a model folder or hub
        name."""
        if name in STAGE_MODELS:
            path = self.stage_dir(name) / "final"
            if not (path / "config.json").exists():
                raise SystemExit(f"no {name} model at {path}: run python jobs/{name}.py preset={self.preset} first")
            return str(path)
        return name


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_config(argv: list[str] | None = None) -> Config:
    """Build the config from `key=value` arguments (`preset=` and `config=` are special)."""
    args = list(argv or [])
    bad = [a for a in args if "=" not in a]
    if bad:
        raise SystemExit(f"arguments must be key=value, got {bad}")
    special = {k: v for k, v in (a.split("=", 1) for a in args) if k in ("preset", "config")}
    overrides = [a for a in args if a.split("=", 1)[0] not in ("preset", "config")]

    preset = special.get("preset", "tiny")
    preset_file = PRESET_DIR / f"{preset}.yaml"
    if not preset_file.exists():
        raise SystemExit(f"unknown preset {preset!r}; available: {', '.join(preset_names())}")

    schema = OmegaConf.structured(Config)
    layers = [schema, OmegaConf.load(preset_file), OmegaConf.create({"preset": preset})]
    if "config" in special:
        layers.append(OmegaConf.load(special["config"]))
    try:
        merged = OmegaConf.merge(*layers, OmegaConf.from_dotlist(overrides))
    except Exception as e:  # omegaconf names the offending key; keep the message, drop the trace
        raise SystemExit(f"bad config: {e}") from None
    cfg = OmegaConf.to_object(merged)
    if cfg.recipe.align not in ALIGNMENTS:
        raise SystemExit(f"recipe.align={cfg.recipe.align!r}: one of {', '.join(ALIGNMENTS)}")
    if cfg.dpo.loss not in DPO_LOSSES:
        raise SystemExit(f"dpo.loss={cfg.dpo.loss!r}: one of {', '.join(DPO_LOSSES)}")
    if not cfg.eval.models:
        cfg.eval.models = ["pretrain", "sft", *ALIGNMENTS[cfg.recipe.align]]
    if cfg.model.dtype == "auto" or cfg.seq.pack is None:
        _settle_from_the_model(cfg)
    return cfg


def _settle_from_the_model(cfg: Config) -> None:
    """The settings a preset leaves to the model (model.dtype auto, seq.pack null), from its config: its dtype, and
    packing where its architecture's forward takes position_ids (restarting positions keep packed samples apart;
    BLOOM's ALiBi has none)."""
    import inspect

    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if cfg.model.build_from_config:
        model_type, dtype = cfg.model.arch, "float32"
    else:
        try:
            config = transformers.AutoConfig.from_pretrained(cfg.model.path)
        except (OSError, ValueError) as e:
            raise SystemExit(f"model.path {cfg.model.path!r}: no model config to take dtype and packing from ({e})")
        model_type, dtype = config.model_type, str(config.dtype or "float32").removeprefix("torch.")
    if cfg.model.dtype == "auto":
        cfg.model.dtype = dtype if dtype in ("float32", "bfloat16", "float16") else "float32"
    if cfg.seq.pack is None:
        model_class = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, ""), None)
        cfg.seq.pack = model_class is not None and "position_ids" in inspect.signature(model_class.forward).parameters


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
