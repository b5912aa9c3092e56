"""One placement group per RLHF role, so that each role's actors are reserved and placed together."""

from __future__ import annotations

from typing import Callable

import ray
from ray.util.placement_group import PlacementGroup, placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from clinicalgpt.config import RoleConfig
from clinicalgpt.runtime import device_env


def actor_options(role: RoleConfig, name: str, group: PlacementGroup, index: int, max_restarts: int = 0) -> dict:
    """Ray options of the role's index-th actor: its bundle of the group, and the environment its own hardware
    needs (device_env: the job's environment is the same for every process and says nothing about GPUs)."""
    return {"num_cpus": role.cpus, "num_gpus": role.gpus, "name": f"{name}-{index}", "max_restarts": max_restarts,
            "runtime_env": {"env_vars": device_env(role.gpus)},
            "scheduling_strategy": PlacementGroupSchedulingStrategy(group, index)}


def role_actors(actor_class, role: RoleConfig, name: str, args: Callable[[int], tuple],
                max_restarts: int = 0) -> tuple[list, PlacementGroup]:
    """role.num actors of actor_class, the i-th built with args(i), in a placement group of role.num
    bundles of {CPU: role.cpus, GPU: role.gpus} (PACK: on as few nodes as fit); and the group.
    An actor that dies is rebuilt by Ray up to max_restarts times, in its bundle, from the same args.
    The actors build in the background: `ray.get(actor.__ray_ready__.remote())` waits for one."""
    bundle = {"CPU": role.cpus, **({"GPU": role.gpus} if role.gpus else {})}
    group = placement_group([bundle] * role.num, strategy="PACK", name=f"clinicalgpt-{name}")
    ray.get(group.ready(), timeout=300)
    actors = [actor_class.options(**actor_options(role, name, group, i, max_restarts)).remote(*args(i))
              for i in range(role.num)]
    return actors, group
