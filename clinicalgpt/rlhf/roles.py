"""The PPO roles as one object: the rollout engines with the weight-version protocol, the frozen reference,
the reward and the learner group, each in its placement group, started and shut down together (the learner group
also restarts alone, after one of its ranks died)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import ray

from actors.learner import LearnerGroup
from actors.placement import role_actors
from actors.reference import ReferenceActor
from actors.reward import RewardActor
from actors.rollout import RolloutActor, StaleWeights

from ..config import Config
from ..plan import check_engine, weight_sync_mode
from ..tokenizer import load_tokenizer


class RolloutGroup:
    """The rollout engines and the version of the policy weights they must hold. Each push from the
    learner bumps the version; an engine asked to generate at a version it does not hold (Ray rebuilt it
    from the SFT weights after it died) gets the current weights pushed to it and is asked again."""

    def __init__(self, engines: list, learner, weight_sync: str):
        self.engines, self.learner, self.weight_sync = engines, learner, weight_sync  # learner: rank 0
        self.version = 0
        self.weights = None  # object_store: the weights pushed last (an ObjectRef), for engines that restart

    def generate(self, prompts: list[list[int]], n: int, max_new_tokens: int, temperature: float, top_p: float,
                 seed: int) -> list[dict]:
        """n samples per prompt, in prompt order, from the engines (prompts split between them)."""
        chunks = np.array_split(np.arange(len(prompts)), len(self.engines))
        calls = [(engine, [prompts[i] for i in c], seed + int(c[0])) for engine, c in zip(self.engines, chunks) if len(c)]

        def call(engine, part: list, part_seed: int):
            return engine.generate.remote(part, n, max_new_tokens, temperature, top_p, part_seed, self.version)

        refs, parts = [call(*c) for c in calls], []
        for c, ref in zip(calls, refs):
            try:
                parts.append(ray.get(ref))
            except (ray.exceptions.RayActorError, StaleWeights):  # the engine died, or came back with old weights
                self.restore(c[0])
                parts.append(ray.get(call(*c)))
        return [s for part in parts for s in part]

    def push_weights(self) -> None:
        """The learner's current policy into every engine, as the next version."""
        self.version += 1
        if self.weight_sync == "nccl":
            ray.get(self.learner.send_weights.remote())
            ray.get([e.set_weights_version.remote(self.version) for e in self.engines])
            return
        self.weights = self.learner.policy_weights.remote()  # kept in the object store for restarts
        ray.get([e.load_weights.remote(self.weights, self.version) for e in self.engines])

    def open_transfers(self) -> None:
        """weight_sync=nccl: an NCCL group between learner rank 0 and each engine."""
        ray.get([self.learner.open_weight_transfer.remote(i, e) for i, e in enumerate(self.engines)])

    def restore(self, engine) -> None:
        """A rollout engine that died is rebuilt by Ray with its starting weights: wait for it, push the current."""
        started = time.time()
        while True:
            try:
                ray.get(engine.__ray_ready__.remote())
                break
            except ray.exceptions.ActorUnavailableError:  # still being rebuilt (a dead one for good raises ActorDiedError)
                if time.time() - started > 600:
                    raise
                time.sleep(1)
        if self.weight_sync == "nccl":  # the rebuilt engine joins a new group with learner rank 0
            index = self.engines.index(engine)
            ray.get(self.learner.open_weight_transfer.remote(index, engine))
            if self.version:
                ray.get(self.learner.send_weights.remote(index))
                ray.get(engine.set_weights_version.remote(self.version))
        elif self.weights is not None:
            ray.get(engine.load_weights.remote(self.weights, self.version))
        print(f"[ppo] a rollout engine was restarted; weights version {self.version} pushed to it "
              f"({time.time() - started:.1f}s)", flush=True)

    def shutdown(self) -> None:
        for engine in self.engines:
            try:
                ray.get(engine.shutdown.remote())
            except ray.exceptions.RayActorError:  # already gone
                pass


@dataclass
class Roles:
    rollout: RolloutGroup
    reference: list
    reward: list
    learners: LearnerGroup
    groups: list  # their placement groups
    tokenizer: object  # the policy's: pads batches, decodes the held-out answers

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def actors(self) -> list:
        return self.rollout.engines + self.reference + self.reward + self.learners.ranks

    def dead(self) -> list:
        """The role actors that are gone (a dead learner rank takes its peers' collectives down with it)."""
        pings = [a.__ray_ready__.remote() for a in self.actors]
        answered, _ = ray.wait(pings, num_returns=len(pings), timeout=60)  # the silent ones are busy or hung, but there
        dead = []
        for actor, ping in zip(self.actors, pings):
            if ping in answered:
                try:
                    ray.get(ping)
                except ray.exceptions.RayActorError:
                    dead.append(actor)
        return dead

    def restart_learners(self, cfg: Config, policy: str, critic: str | None) -> None:
        """A new learner group in place of the old one (killed), from the starting weights (resume() then loads
        the last checkpoint into it and pushes it to the engines); the engines, reference and reward go on."""
        for rank in self.learners.ranks:
            ray.kill(rank)
        ray.util.remove_placement_group(self.learners.group)
        self.learners = LearnerGroup(cfg, policy, critic)
        self.rollout.learner = self.learners.ranks[0]
        self.groups[-1] = self.learners.group

    def shutdown(self) -> None:
        self.rollout.shutdown()
        for actor in self.actors:
            ray.kill(actor)
        for group in self.groups:
            ray.util.remove_placement_group(group)


def start_roles(cfg: Config, policy: str, reward_model: str, critic: str | None) -> Roles:
    """Every role started from the given model folders (the critic: None for a critic-free estimator)."""
    ppo = cfg.ppo
    max_len = ppo.max_prompt_len + ppo.max_new_tokens
    sync = weight_sync_mode(cfg)
    check_engine(ppo.engine, ppo.rollout.gpus, "ppo.rollout")
    rollout, g1 = role_actors(RolloutActor, ppo.rollout, "rollout", lambda i: (
        policy, max_len, ppo.seed + i, ppo.engine, cfg.model.dtype, "nccl" if sync == "nccl" else ""),
        max_restarts=ppo.rollout_restarts)
    reference, g2 = role_actors(ReferenceActor, ppo.reference, "reference", lambda i: (
        policy, cfg.model.dtype, ppo.forward_rows))
    reward, g3 = role_actors(RewardActor, ppo.reward_model, "reward", lambda i: (
        ppo.reward, reward_model, cfg.model.dtype, ppo.forward_rows))
    learners = LearnerGroup(cfg, policy, critic)  # the other roles start meanwhile
    ray.get([a.__ray_ready__.remote() for a in rollout + reference + reward])  # a role that fails to start fails here
    engines = RolloutGroup(rollout, learners.ranks[0], sync)
    if sync == "nccl":
        engines.open_transfers()
    return Roles(engines, reference, reward, learners, [g1, g2, g3, learners.group], load_tokenizer(policy))
