"""One training loop for every stage, on Ray Train with DeepSpeed ZeRO-2.

    driver:  fit(cfg, task, train_config, train_ds, total_steps, eval_rows) -> TorchTrainer(W workers)
    worker:  deepspeed.initialize (ZeRO-2, torch AdamW, warmup + decay), stream the train shard,
             gradient accumulation up to the global batch, clipping, periodic eval and checkpoints
             (ray.train.report), resume from ray.train.get_checkpoint(), export in HF format.

A stage is a `Task`: how to build the model from the previous stage's export and how to compute the
loss of a batch. Causal-LM stages (pretrain, SFT) and the reward model share everything else.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from .config import Config, TrainConfig
from .modeling import DTYPES, enable_gradient_checkpointing
from .runtime import device_env, resolve_bf16

CKPT_TAG = "step"  # not "latest": DeepSpeed's own pointer file is called latest
# ZeRO-2 shards the optimizer state and the gradients; ZeRO-3 would also shard the weights, which the exports,
# the LoRA merge and the weight pushes to the rollout engines read whole.
ZERO_STAGE = 2


class Task:
    """What differs between stages: the model and the loss. Methods run inside the workers."""

    name = "task"
    shuffle_rows = True  # False: the stream's row order is kept (it comes grouped, e.g. by length)
    metrics: tuple[str, ...] = ()  # what loss() reports beside the loss; averaged over the held-out rows too

    def build_model(self, cfg: Config, train_cfg: TrainConfig) -> torch.nn.Module:
        raise NotImplementedError

    def loss(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float], int]:
        """(loss, metrics, tokens processed) for one micro-batch."""
        raise NotImplementedError

    def export(self, model: torch.nn.Module, cfg: Config, out: Path) -> None:
        """Save the trained model in Hugging Face format for the next stage, vLLM and serving."""
        raise NotImplementedError


def export_hf(model: torch.nn.Module, cfg: Config, out: Path, adapter_dir: Path | None = None) -> None:
    """Save a trained model in Hugging Face format with the tokenizer, in the preset's dtype (model.dtype, whatever
    precision trained it); a PEFT model is merged first (its adapter saved to adapter_dir when given), as vLLM's
    BLOOM takes no LoRA."""
    from .tokenizer import load_tokenizer
    model = model.to(DTYPES[cfg.model.dtype])  # before the merge, so that it adds the LoRA delta in that dtype
    if hasattr(model, "merge_and_unload"):
        if adapter_dir is not None:
            model.save_pretrained(adapter_dir)
        model = model.merge_and_unload()
    model.save_pretrained(out)
    load_tokenizer(cfg.model_path, cfg.model.chat_template).save_pretrained(out)


def causal_lm_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float], int]:
    """Mean -log p over the labelled tokens of packed rows (position_ids restart per sample)."""
    kwargs = {"input_ids": batch["input_ids"], "use_cache": False}
    if "position_ids" in batch and model_takes_positions(model):
        kwargs["position_ids"] = batch["position_ids"]
    logits = model(**kwargs).logits.float()
    # The labels shifted one to the left (the last position has none), not the logits: slicing them would copy a
    # (rows x positions x vocabulary) tensor and zero-fill another in the backward pass (8-10% of the tiny preset's
    # forward and backward passes).
    labels = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=-100)
    return loss, {}, int(batch["num_tokens"].sum()) if "num_tokens" in batch else labels[:, :-1].numel()


def model_takes_positions(model) -> bool:
    """BLOOM (ALiBi) has no position_ids; rotary models do. `model` may be a DeepSpeed engine."""
    return getattr(model, "module", model).config.model_type != "bloom"


def zero2_config(micro_batch: int, accumulation: int, lr: float, weight_decay: float, grad_clip: float,
                 bf16: bool) -> dict:
    """DeepSpeed ZeRO stage 2 with torch's AdamW (DeepSpeed's FusedAdam would JIT-compile for minutes on CPU)."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": grad_clip,
        # Rigid ZeRO checkpoints: DeepSpeed 0.19.8 fails to restore elastic ones saved with torch AdamW
        # (assert BASE_OPTIMIZER_STATE_STEP), so a resume needs the same number of workers for now.
        "zero_optimization": {"stage": ZERO_STAGE, "elastic_checkpoint": False},
        "bf16": {"enabled": bf16},
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": weight_decay, "torch_adam": True}},
        "steps_per_print": 10**9,
    }


def deepspeed_config(train_cfg: TrainConfig, world: int, total_steps: int) -> dict:
    accumulation = max(1, train_cfg.global_batch // (train_cfg.micro_batch * world))
    config = zero2_config(train_cfg.micro_batch, accumulation, train_cfg.lr, train_cfg.weight_decay, train_cfg.grad_clip,
                          resolve_bf16(train_cfg.bf16))
    config["scheduler"] = {"type": "WarmupDecayLR", "params": {
        "total_num_steps": total_steps, "warmup_min_lr": 0.0, "warmup_max_lr": train_cfg.lr,
        "warmup_num_steps": max(1, int(train_cfg.warmup_ratio * total_steps)), "warmup_type": "linear"}}
    return config


def _to_tensors(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v, device=device) for k, v in batch.items() if v.dtype.kind in "iufb"}  # numeric columns only


def train_loop(config: dict) -> None:
    """Runs in every Ray Train worker."""
    cfg: Config = config["cfg"]
    train_cfg: TrainConfig = config["train_config"]
    # Before DeepSpeed is imported, which picks its accelerator once, from this worker's own resources.
    os.environ.update(device_env(train_cfg.gpus_per_worker))
    import deepspeed
    from torch.utils.tensorboard import SummaryWriter

    task: Task = config["task"]
    total_steps: int = config["total_steps"]
    out_dir = Path(config["out_dir"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(train_cfg.seed)

    model = task.build_model(cfg, train_cfg)
    if train_cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, scheduler = deepspeed.initialize(model=model, model_parameters=trainable,
                                                   config=deepspeed_config(train_cfg, world, total_steps))
    if rank == 0:
        print(f"[{task.name}] {world} worker(s), {'bf16 mixed precision' if engine.bfloat16_enabled() else 'fp32'}",
              flush=True)
    eval_batch = _to_tensors(config["eval_rows"], engine.device) if config["eval_rows"] is not None else None
    step, rows_seen = 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = json.loads((Path(d) / "trainer_state.json").read_text())
            # ZeRO-2 shards the optimizer state by rank, so it only restores on the same number of workers;
            # after an elastic resize the weights restore and the Adam moments start afresh.
            same_world = state["world"] == world
            load_trained_state(engine, d, load_module_only=not same_world, load_optimizer_states=same_world,
                            load_lr_scheduler_states=same_world)
        step, rows_seen = state["step"], state["rows_seen"]
        if not same_world:
            scheduler.step(step - 1)  # the schedule goes on from the restored step (as after `step` steps)
        held_out = ""
        if eval_batch is not None:  # the restored weights' held-out loss: the one logged at that step
            restored = held_out_metrics(engine, task, eval_batch, train_cfg.micro_batch, rank, world)
            held_out = f", held-out loss {restored['eval_loss']:.4f}"
        if rank == 0:
            note = "" if same_world else f" (saved by {state['world']}: weights restored, optimizer state reset)"
            print(f"[{task.name}] resumed from step {step} on {world} worker(s){note}{held_out}", flush=True)

    writer = SummaryWriter(str(out_dir / "tensorboard")) if rank == 0 else None
    history = (out_dir / "history.jsonl").open("a", buffering=1) if rank == 0 else None
    metrics = _ray_metrics(task.name)
    shard = ray.train.get_dataset_shard("train")
    # Rows this worker skips on resume (its share of what the run had consumed), so data is not repeated.
    skip_rows = rows_seen // world
    # Throughput and ETA over the last optimizer steps (not since start: that would count start-up time).
    step_started, tokens, window, recent = time.time(), 0, [], []  # window: per micro-batch metrics
    done = step >= total_steps
    while not done:
        for np_batch in shard.iter_batches(batch_size=train_cfg.micro_batch, batch_format="numpy", drop_last=True,
                                           local_shuffle_buffer_size=train_cfg.micro_batch * 32 if task.shuffle_rows else None,
                                           local_shuffle_seed=train_cfg.seed + rank):
            if skip_rows > 0:
                skip_rows -= train_cfg.micro_batch
                continue
            engine.train()
            loss, extra, n_tokens = task.loss(engine, _to_tensors(np_batch, engine.device))
            engine.backward(loss)
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            tokens += n_tokens * world
            rows_seen += train_cfg.micro_batch * world
            window.append({"loss": loss.item(), **extra})
            if not boundary:
                continue
            step += 1
            now = time.time()
            recent = (recent + [(tokens, now - step_started)])[-10:]
            logged = {"step": step, **{k: float(np.mean([w[k] for w in window])) for k in window[0]},
                      "lr": scheduler.get_last_lr()[0], "step_seconds": now - step_started, "tokens": tokens,
                      "tokens_per_s": sum(t for t, _ in recent) / max(sum(s for _, s in recent), 1e-9)}
            window, tokens = [], 0
            if eval_batch is not None and (step % train_cfg.eval_every == 0 or step == total_steps or step == 1):
                logged.update(held_out_metrics(engine, task, eval_batch, train_cfg.micro_batch, rank, world))
            if rank == 0:
                eta = float(np.mean([s for _, s in recent])) * (total_steps - step)
                _log(task.name, logged, total_steps, eta, train_cfg.log_every, writer, metrics)
                history.write(json.dumps(logged) + "\n")
            last = step >= total_steps
            if step % train_cfg.checkpoint_every == 0 or last:
                _save_checkpoint(engine, {"step": step, "rows_seen": rows_seen, "world": world}, logged, rank)
            step_started = time.time()  # evaluation and checkpoints are not training time
            if last:
                done = True
                break
    if rank == 0:
        task.export(engine.module, cfg, out_dir / "final")
        history.close()
        writer.close()


def held_out_metrics(engine, task: Task, rows: dict[str, torch.Tensor], micro: int, rank: int,
                     world: int) -> dict[str, float]:
    """eval_loss and eval_<metric> (task.metrics): their means over the held-out rows' micro-batches, on every rank (a
    collective): each rank computes every world-th micro-batch, so the ranks share the work instead of each
    repeating all of it."""
    engine.eval()
    n = len(next(iter(rows.values())))
    names = ("loss", *task.metrics)
    total = torch.zeros(len(names), dtype=torch.float64, device=engine.device)  # this rank's sums over micro-batches
    with torch.no_grad():
        for i in range(rank * micro, n, world * micro):
            loss, metrics, _ = task.loss(engine, {k: v[i:i + micro] for k, v in rows.items()})
            total += torch.tensor([loss.item(), *(metrics[m] for m in task.metrics)], dtype=torch.float64,
                                  device=engine.device)
    torch.distributed.all_reduce(total)
    return {f"eval_{name}": float(v) / math.ceil(n / micro) for name, v in zip(names, total)}


def save_trained_state(engine, folder: str) -> None:
    """A DeepSpeed engine's trained state: without its frozen weights (with LoRA, the base model, which the
    stage loads anew from its source: 14 GB of a 7B model's checkpoint otherwise, twice for PPO's policy and critic)."""
    engine.save_checkpoint(folder, tag=CKPT_TAG, exclude_frozen_parameters=True)


def load_trained_state(engine, folder: str, **options) -> None:
    """Restore what save_trained_state wrote (options: DeepSpeed's load_checkpoint's). The frozen weights are not
    in it, so the module loads strictly only when nothing is frozen."""
    strict = all(p.requires_grad for p in engine.module.parameters())
    engine.load_checkpoint(folder, tag=CKPT_TAG, load_module_strict=strict, **options)


def _save_checkpoint(engine, state: dict, logged: dict, rank: int) -> None:
    """Every rank writes its ZeRO shard; Ray Train merges them into one checkpoint in storage and only
    registers it once all ranks have reported, so a crash mid-write never replaces the last good one."""
    with tempfile.TemporaryDirectory() as d:
        save_trained_state(engine, d)
        if rank == 0:
            (Path(d) / "trainer_state.json").write_text(json.dumps(state))
        ray.train.report(logged, checkpoint=Checkpoint.from_directory(d))


# Exported to Prometheus as ray_clinicalgpt_train_<name>{stage=...} (monitoring/grafana-dashboard.json); the stages
# on preference pairs add theirs (Task.metrics: rm and judge accuracy; DPO accuracy, margin, reply log-probs).
METRICS = {"loss": "training loss", "eval_loss": "held-out loss", "tokens_per_s": "training throughput",
           "step": "optimizer step", "accuracy": "pairwise (rm, judge) or implicit-reward (dpo) accuracy",
           "eval_accuracy": "held-out pairwise or implicit-reward accuracy", "margin": "DPO implicit-reward margin",
           "eval_margin": "held-out DPO implicit-reward margin",
           "chosen_logp": "DPO policy's mean log-prob per token of the chosen replies",
           "rejected_logp": "DPO policy's mean log-prob per token of the rejected replies",
           "eval_chosen_logp": "the same, held-out", "eval_rejected_logp": "the same, held-out"}


def _ray_metrics(stage: str) -> dict:
    from ray.util.metrics import Gauge
    tags = {"stage": stage}
    gauges = {name: Gauge(f"clinicalgpt_train_{name}", description=desc, tag_keys=("stage",))
              for name, desc in METRICS.items()}
    for g in gauges.values():
        g.set_default_tags(tags)
    return gauges


def _log(stage: str, logged: dict, total: int, eta: float, log_every: int, writer, metrics: dict) -> None:
    step = logged["step"]
    for k, v in logged.items():
        if k != "step" and isinstance(v, (int, float)):
            writer.add_scalar(f"{stage}/{k}", v, step)
            if k in metrics:
                metrics[k].set(v)
    metrics["step"].set(step)
    if step % log_every == 0 or "eval_loss" in logged or step == total:
        extra = f" eval_loss {logged['eval_loss']:.4f}" if "eval_loss" in logged else ""
        acc = f" acc {logged['accuracy']:.3f}" if "accuracy" in logged else ""
        print(f"[{stage}] step {step}/{total} loss {logged['loss']:.4f}{extra}{acc} lr {logged['lr']:.2e} "
              f"{logged['tokens_per_s']:,.0f} tok/s ETA {eta:,.0f}s", flush=True)


def fit(cfg: Config, task: Task, train_cfg: TrainConfig, train_ds: ray.data.Dataset, total_steps: int,
        eval_rows: dict[str, np.ndarray] | None) -> ray.train.Result:
    """Train `task` with Ray Train; rerunning with the same run folder resumes from its last checkpoint."""
    out_dir = cfg.stage_dir(task.name)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The workers wait on Ray Data's read and shuffle tasks (1 CPU each) and tokenizer actors (0.5):
    # without room for them beside the workers, the job would hang rather than fail.
    cpus, need = ray.cluster_resources().get("CPU", 0), (train_cfg.min_workers or train_cfg.num_workers) * train_cfg.cpus_per_worker + 1.5
    if cpus < need:
        raise SystemExit(f"the Ray cluster has {cpus:g} CPUs; {task.name} needs {need:g} (its workers plus 1.5 "
                         "for the data stream): start it with more, e.g. `ray start --head --num-cpus=4` "
                         "(logical CPUs may exceed the cores)")
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg, "train_config": train_cfg, "task": task, "total_steps": total_steps,
                           "out_dir": str(out_dir), "eval_rows": eval_rows},
        scaling_config=scaling_config(train_cfg),
        run_config=RunConfig(name=task.name, storage_path=str(out_dir / "ray_train"),
                             failure_config=FailureConfig(max_failures=train_cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
        datasets={"train": train_ds},
        # Blocks go to the workers in stream order, not to whichever worker's node holds them: each worker's rows
        # then follow from the seed on any cluster (init_ray keeps the stream itself in order).
        dataset_config=ray.train.DataConfig(enable_shard_locality=False),
    )
    return trainer.fit()


def scaling_config(train_cfg: TrainConfig) -> ScalingConfig:
    """The stage's Ray Train workers, each with cpus_per_worker CPUs and gpus_per_worker GPUs."""
    workers = (train_cfg.min_workers, train_cfg.num_workers) if train_cfg.min_workers else train_cfg.num_workers
    gpus = {"GPU": train_cfg.gpus_per_worker} if train_cfg.gpus_per_worker else {}
    return ScalingConfig(num_workers=workers, use_gpu=bool(gpus),
                         resources_per_worker={"CPU": train_cfg.cpus_per_worker, **gpus})


def steps_for(train_cfg: TrainConfig, rows: int) -> int:
    """Optimizer steps of a stage: max_steps, else epochs over `rows` sequences."""
    return train_cfg.max_steps if train_cfg.max_steps > 0 else max(1, math.ceil(train_cfg.epochs * rows / train_cfg.global_batch))


def summarize_history(path: Path) -> dict:
    """Loss curve summary; a step redone after a restart counts once (its latest value)."""
    by_step = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        row = json.loads(line)
        by_step[row["step"]] = row
    rows = [by_step[k] for k in sorted(by_step)]
    evals = [r for r in rows if "eval_loss" in r]
    return {"steps": rows[-1]["step"] if rows else 0,
            "first_eval_loss": evals[0]["eval_loss"] if evals else None,
            "last_eval_loss": evals[-1]["eval_loss"] if evals else None,
            "mean_tokens_per_s": float(np.mean([r["tokens_per_s"] for r in rows[-10:]])) if rows else None}

