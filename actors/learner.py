"""LearnerGroup: W ranks that train the policy (LoRA by default) and the critic with DeepSpeed ZeRO-2,
connected by torch.distributed (gloo on CPU, NCCL on GPU). The controller hands each rank its share
of the experience; DeepSpeed averages the gradients across ranks.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import ray
import torch

from clinicalgpt import rl
from clinicalgpt.config import Config
from clinicalgpt.experience import by_length, length_grouped_minibatches, response_logprobs, take_rows, token_values
from clinicalgpt.modeling import (apply_lora, enable_gradient_checkpointing, pushed_tensors, trained_weights,
                                  without_dropout)
from clinicalgpt.trainer import causal_lm_loss, export_hf, load_trained_state, save_trained_state, zero2_config


class PolicySource:
    """The policy's trained weights as vLLM's weight transfer reads them (its WeightSource protocol: what
    the broadcast will carry, then the tensors themselves): the same weights the object-store path sends,
    on the learner's device, merged one layer at a time as the broadcast goes."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def metadata(self) -> list:
        from vllm.distributed.weight_transfer.base import ParamMeta
        return [ParamMeta(name, w.dtype, tuple(w.shape)) for name, w, _ in pushed_tensors(self.model)]

    def __iter__(self):
        return trained_weights(self.model)


@ray.remote
class LearnerRank:
    def __init__(self, cfg: Config, rank: int, world: int):
        self.cfg, self.rank, self.world = cfg, rank, world
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.transfers = {}  # rollout engine index -> vLLM's NCCL trainer engine (rank 0, weight_sync=nccl)

    def address(self) -> tuple[str, int]:
        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def setup(self, master: tuple[str, int], policy_path: str, critic_path: str | None) -> None:
        """Join the process group, then build the DeepSpeed engines (policy, and critic unless critic-free)."""
        import deepspeed
        from transformers import AutoModelForSequenceClassification
        from clinicalgpt.modeling import DTYPES, load_model
        os.environ.update({"MASTER_ADDR": master[0], "MASTER_PORT": str(master[1]), "RANK": str(self.rank),
                           "WORLD_SIZE": str(self.world), "LOCAL_RANK": "0"})
        deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo")
        ppo = self.cfg.ppo
        micro = ppo.minibatch // self.world
        torch.manual_seed(ppo.seed)
        policy = apply_lora(load_model(policy_path, self.cfg.model.dtype), ppo.lora)
        if ppo.gradient_checkpointing:
            enable_gradient_checkpointing(policy)
        self.policy, *_ = deepspeed.initialize(
            model=policy, model_parameters=[p for p in policy.parameters() if p.requires_grad],
            config=zero2_config(micro, 1, ppo.lr, 0.0, ppo.grad_clip, ppo.bf16))
        self.critic = None
        if critic_path:
            critic, info = AutoModelForSequenceClassification.from_pretrained(
                critic_path, num_labels=1, dtype=DTYPES[self.cfg.model.dtype], output_loading_info=True)
            if info["missing_keys"]:  # a new head (no reward model): values start at 0, not at noise
                torch.nn.init.zeros_(critic.score.weight)
            critic.config.pad_token_id = policy.config.pad_token_id
            critic = apply_lora(critic, ppo.lora, task_type="SEQ_CLS")
            if ppo.gradient_checkpointing:
                enable_gradient_checkpointing(critic)
            self.critic, *_ = deepspeed.initialize(
                model=critic, model_parameters=[p for p in critic.parameters() if p.requires_grad],
                config=zero2_config(micro, 1, ppo.critic_lr, 0.0, ppo.grad_clip, ppo.bf16))
        without_dropout(self.policy, ppo.gradient_checkpointing)
        if self.critic is not None:
            without_dropout(self.critic, ppo.gradient_checkpointing)

    def logprobs_and_values(self, batch: dict, temperature: float) -> dict[str, np.ndarray]:
        """The rollout policy's own log-probs (at the sampling temperature; 0: greedy) and the critic's values
        of this rank's share."""
        rows = self.cfg.ppo.forward_rows

        def logprobs(b: dict) -> np.ndarray:
            return response_logprobs(self.policy, b, self.device, temperature=temperature).cpu().numpy()

        with torch.no_grad():
            out = {"logprobs": by_length(logprobs, batch, rows)}
            if self.critic is not None:
                out["values"] = by_length(lambda b: token_values(self.critic, b, self.device).cpu().numpy(), batch, rows)
        return out

    def train(self, batch: dict, step: int, ptx: dict | None = None) -> dict[str, float]:
        """PPO epochs over minibatches of this rank's share (every rank takes the same number of steps), the
        policy loss weighted by truncated importance sampling against the engines' log-probs (ppo.tis_cap); with
        ptx (packed LM rows, rl.ptx_rows_per_rank of them), each update also takes ppo.ptx_coef x the LM loss of
        the next ppo.ptx_micro_batch rows."""
        ppo = self.cfg.ppo
        micro = ppo.minibatch // self.world
        t = {k: torch.as_tensor(batch[k], device=self.device) for k in (
            "response_mask", "old_logprobs", "engine_logprobs", "advantages", "old_values", "returns") if k in batch}
        stats: dict[str, list[float]] = {}
        rng = np.random.default_rng([ppo.seed, step, self.rank])
        ptx_rows = iter(range(0, len(ptx["input_ids"]), ppo.ptx_micro_batch)) if ptx is not None else None
        for _ in range(ppo.epochs):
            for idx in length_grouped_minibatches(batch, micro, ppo.length_group, rng):
                sub = take_rows(batch, idx)
                mask = t["response_mask"][idx]
                old = t["old_logprobs"][idx]
                logp, entropy = response_logprobs(self.policy, sub, self.device, with_entropy=True,
                                                  temperature=ppo.temperature)
                weights, tis = (rl.truncated_is_weights(old, t["engine_logprobs"][idx], mask, ppo.tis_cap)
                                if ppo.tis_cap else (1.0, {}))
                loss, s = rl.policy_loss(logp, old, t["advantages"][idx], mask, ppo.clip, weights)
                s["policy_loss"] = loss.item()
                if ptx_rows is not None:
                    first = next(ptx_rows)
                    rows = {k: torch.as_tensor(v[first:first + ppo.ptx_micro_batch], device=self.device)
                            for k, v in ptx.items()}
                    lm_loss, _, _ = causal_lm_loss(self.policy, rows)
                    loss = loss + ppo.ptx_coef * lm_loss
                    s["ptx_loss"] = lm_loss.item()
                self.policy.backward(loss)
                self.policy.step()
                s.update(tis, entropy=float(rl.masked_mean(entropy.detach(), mask)))
                if self.critic is not None:
                    values = token_values(self.critic, sub, self.device)
                    vloss = rl.value_loss(values, t["old_values"][idx], t["returns"][idx], mask, ppo.value_clip)
                    self.critic.backward(vloss)
                    self.critic.step()
                    s["value_loss"] = vloss.item()
                for k, v in s.items():
                    stats.setdefault(k, []).append(v)
        return {k: float(np.mean(v)) for k, v in stats.items()}

    def policy_weights(self) -> dict[str, torch.Tensor]:
        """The policy's trained weights, LoRA merged, for the rollout engines (every rank holds them whole
        under ZeRO-2), each moved to host memory as soon as it is merged. With LoRA only the modules that hold
        adapted layers travel (the presets' attention: a fifth of the tiny model, under a third of a 7B)."""
        return {k: v.cpu() for k, v in trained_weights(self.policy.module)}

    def open_weight_transfer(self, index: int, engine) -> None:
        """Rank 0, ppo.weight_sync=nccl: an NCCL group with rollout engine `index` through vLLM's weight
        transfer. One group per engine, as each independent vLLM engine takes rank 1 in its own. A rebuilt
        engine gets a new group; the old one is dropped, not destroyed, as a destroy may wait on the dead peer."""
        from vllm.distributed.weight_transfer.clients import RayVLLMWeightSyncClient
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo, NCCLTrainerWeightTransferEngine
        host, port = self.address()
        self.transfers[index] = NCCLTrainerWeightTransferEngine.trainer_init(
            NCCLTrainerInitInfo(master_address=host, master_port=port, world_size=2, rank=0),
            client=RayVLLMWeightSyncClient(engine), source=PolicySource(self.policy.module))

    def send_weights(self, index: int | None = None) -> None:
        """Broadcast the current policy weights to one rollout engine's group, or to all of them."""
        for i, transfer in self.transfers.items():
            if index is None or i == index:
                transfer.send_weights()

    def greedy(self, prompt: list[int], max_new_tokens: int) -> list[int]:
        """transformers greedy decoding of the current policy (to check the rollout engines against)."""
        ids, module = torch.tensor([prompt], device=self.device), self.policy.module
        training = module.training  # train mode under gradient checkpointing (without_dropout)
        module.eval()
        try:
            with torch.no_grad():
                out = module.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=max_new_tokens)
        finally:
            module.train(training)  # a failed call must not leave the policy in eval mode for the next update
        return out[0, len(prompt):].tolist()

    def save(self, folder: str) -> None:
        save_trained_state(self.policy, str(Path(folder) / "policy"))
        if self.critic is not None:
            save_trained_state(self.critic, str(Path(folder) / "critic"))

    def load(self, folder: str) -> None:
        load_trained_state(self.policy, str(Path(folder) / "policy"))
        if self.critic is not None:
            load_trained_state(self.critic, str(Path(folder) / "critic"))

    def export(self, out: str) -> None:
        """The final policy in Hugging Face format: merged weights in out, the LoRA adapter beside it."""
        if self.rank == 0:
            export_hf(self.policy.module, self.cfg, Path(out), adapter_dir=Path(out).parent / "adapter")


class LearnerGroup:
    """W LearnerRank actors in one placement group, set up as one torch.distributed world."""

    def __init__(self, cfg: Config, policy_path: str, critic_path: str | None):
        from actors.placement import role_actors
        self.ranks, self.group = role_actors(LearnerRank, cfg.ppo.learner, "learner",
                                 lambda i: (cfg, i, cfg.ppo.learner.num))
        master = ray.get(self.ranks[0].address.remote())
        ray.get([r.setup.remote(master, policy_path, critic_path) for r in self.ranks])

    def call(self, method: str, *args) -> list:
        """The same call on every rank (collective methods: save, load, export)."""
        return ray.get([getattr(r, method).remote(*args) for r in self.ranks])
