"""The resource plan (jobs/plan.py, clinicalgpt/plan.py): its figures against ones worked out by hand from the
model's shape, both 7B presets fitting 80 GB GPUs on one and two 8-GPU nodes, and refusals that say which
stage is over by how much, and which cannot be placed. No weight is loaded: the shapes come from config.json
fields, the parameter counts from modules on PyTorch's meta device."""

import json

import psutil
import pytest
from transformers import AutoModelForCausalLM, Qwen2Config

from clinicalgpt.config import load_config
from clinicalgpt.plan import Cluster, check_engine, place, weight_sync_mode
from jobs import plan

GB = 1e9


def row(result: dict, stage: str, role: str) -> dict:
    (found,) = [a for a in result["actors"] if (a["stage"], a["role"]) == (stage, role)]
    return found


def test_bloom_7b_lora_sft_worker_by_hand():
    result = plan.main(["preset=bloom-7b"])
    assert result["parameters"] == 7_069_016_064  # BLOOM-7b1
    layers, h, heads, vocab, s, b = 30, 4096, 32, 250_880, 1024, 4  # seq.max_len 1024, sft.micro_batch 4
    lora = layers * 8 * ((h + 3 * h) + (h + h))  # r 8 on query_key_value (h -> 3h) and dense (h -> h)
    assert lora == 5_898_240
    layer = s * b * h * (34 + 5 * heads * s / h)  # Korthikanti et al., 2-byte activations
    by_hand = {"weights": (7_069_016_064 + lora) * 2,  # bf16, the adapter included
               "gradients": lora * 2 / 8, "optimizer": lora * 12 / 8,  # ZeRO-2 over the 8 workers
               "activations": layers * s * b * h * 2 + layer,  # gradient checkpointing: each layer's input
               "logits": b * s * vocab * (2 + 4 + 4), "runtime": 4 * GB}
    sft = row(result, "sft", "worker")
    assert sft["memory"] == {k: round(v / GB, 2) for k, v in by_hand.items()}
    assert sft["total_gb"] == pytest.approx(sum(by_hand.values()) / GB, abs=0.02)  # 28.7 GB
    assert (sft["count"], sft["cpus"], sft["gpus"], sft["zero"], sft["checkpointing"]) == (8, 8, 1, 2, True)
    assert sft["env"] == {"DS_ACCELERATOR": "cuda"} and sft["budget_gb"] == 80
    # PPO: the reference and the reward model share a GPU; the rollout engine takes 0.85 of its own.
    assert row(result, "ppo", "reference")["budget_gb"] == 40
    rollout = row(result, "ppo", "rollout")
    assert rollout["total_gb"] == pytest.approx(0.85 * 80, abs=0.02)
    kv = (0.85 * 80 * GB - 7_069_016_064 * 2 - 4 * GB) / (2 * layers * h * 2)  # keys and values, every layer, bf16
    assert f"KV cache for {kv:,.0f} tokens" in rollout["note"] and kv > 64 * 1024  # the whole step at once
    assert result["weight_sync"] == "object_store"
    assert result["weight_push_gb"] == round(layers * (h * 3 * h + h * h + 3 * h + h) * 2 / GB, 2)  # attention: weights, biases


def test_bloom_7b_ppo_learner_by_hand():
    """A rank's policy and critic, recomputing activations, and the learner's logits at 18 bytes a value (measured
    on an H200 by bench/gpu_learner_memory.py: 39.8 GB peak allocated with recomputation, 76.0 GB without)."""
    learner = row(plan.main(["preset=bloom-7b"]), "ppo", "learner")
    layers, h, heads, vocab, s, b, positions = 30, 4096, 32, 250_880, 1024, 16 // 4, 512 + 1  # logits_to_keep
    layer = s * b * h * (34 + 5 * heads * s / h)
    assert learner["checkpointing"] is True
    assert learner["memory"]["activations"] == round((layers * s * b * h * 2 + layer) / GB, 2)
    assert learner["memory"]["logits"] == round(b * positions * vocab * (2 + 16) / GB, 2)  # 9.27 GB
    assert 39.8 < learner["total_gb"] - learner["memory"]["runtime"] < 39.8 * 1.1  # the measured peak, +10% at most


def test_qwen_parameters_from_the_shape_match_a_model_built_from_the_same_config(tmp_path):
    result = plan.main(["preset=qwen2.5-7b"])
    assert result["parameters"] == 7_615_616_512  # Qwen2.5-7B, untied embeddings
    # A local folder's config.json is read as it is: here a small model, counted against the model itself.
    config = Qwen2Config(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    config.save_pretrained(tmp_path / "small")
    result = plan.main(["preset=qwen2.5-7b", f"model.path={tmp_path / 'small'}"])
    assert result["parameters"] == sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())


@pytest.mark.parametrize("preset", ["bloom-7b", "qwen2.5-7b"])
@pytest.mark.parametrize("cluster", ["8x1", "8x2"])
def test_the_7b_presets_fit_80_gb_gpus(preset, cluster, tmp_path, capsys):
    result = plan.main([f"preset={preset}", f"cluster={cluster}", f"out={tmp_path / 'plan.json'}"])
    assert result["problems"] == [] and json.loads((tmp_path / "plan.json").read_text()) == result
    assert f"fits: each stage's actors in GPU memory and on the cluster {cluster}" in capsys.readouterr().out
    stages = {a["stage"] for a in result["actors"]}
    assert stages == {"pretrain", "sft", "rm", "judge", "ppo", "eval", "eval judge", "serve"}
    for actor in result["actors"]:
        assert actor["gpus"] > 0 and actor["total_gb"] <= actor["budget_gb"], actor
    assert set(result["drivers"]) == {"pretrain", "sft", "rm", "judge", "ppo", "eval", "serve"}
    # Both alignment paths: DPO's reference pass and workers too, each on its GPUs within its budget.
    both = plan.main([f"preset={preset}", f"cluster={cluster}", "recipe.align=both"])
    assert both["problems"] == [] and {a["stage"] for a in both["actors"]} == stages | {"dpo reference", "dpo"}
    assert all(a["gpus"] > 0 and a["total_gb"] <= a["budget_gb"] for a in both["actors"]) and "dpo" in both["drivers"]


def test_the_reviewed_setting_needs_over_100_gb_and_is_refused():
    """Full-parameter pretraining on 2 workers without gradient checkpointing, as the presets had it."""
    with pytest.raises(SystemExit, match=r"pretrain worker: ~1[01]\d\.\d GB per GPU, [23]\d\.\d GB over its 80 GB"):
        plan.main(["preset=bloom-7b", "pretrain.num_workers=2", "pretrain.gradient_checkpointing=false"])


@pytest.mark.parametrize("argv, message", [
    (["sft.micro_batch=32"], r"sft worker: ~\d+\.\d GB per GPU, \d+\.\d GB over its 80 GB"),
    (["gpu_memory_gb=40"], r"ppo learner: ~43\.9 GB per GPU, 3\.9 GB over its 40 GB"),
    (["ppo.engine.memory_fraction=0.2"], r"ppo rollout: engine.memory_fraction 0.2 leaves a KV cache for 0 tokens"),
    (["cluster=1x1"], r"pretrain needs 8 GPUs at once, 7 more than the cluster 1x1 has.*ppo needs 6 GPUs at once, "
                      r"5 more than the cluster 1x1 has"),
    (["cluster=8x2", "ppo.engine.tensor_parallel=16", "ppo.rollout.gpus=16"],
     r"ppo rollout: one actor needs 16 GPUs, 8 more than a node of the cluster 8x2 has"),
    (["ppo.learner.gpus=1.5"], r"ppo learner: 1.5 GPUs for one actor"),
])
def test_a_plan_that_cannot_fit_or_be_placed_is_refused(argv, message):
    with pytest.raises(SystemExit, match=message):
        plan.main(["preset=bloom-7b", *argv])


def test_an_engine_gets_one_whole_gpu_per_tensor_parallel_rank_and_nccl_one_gpu_per_engine():
    cfg = load_config(["preset=bloom-7b", "ppo.engine.tensor_parallel=2"])
    with pytest.raises(SystemExit, match="engine.tensor_parallel=2 spans 2 GPUs, but each engine gets gpus=1"):
        check_engine(cfg.ppo.engine, cfg.ppo.rollout.gpus, "ppo.rollout")
    check_engine(cfg.ppo.engine, 2, "ppo.rollout")
    cfg = load_config(["preset=bloom-7b", "ppo.engine.tensor_parallel=2", "ppo.rollout.gpus=2", "ppo.weight_sync=nccl"])
    with pytest.raises(SystemExit, match="nccl broadcasts into one GPU per engine.*use ppo.weight_sync=object_store"):
        weight_sync_mode(cfg)
    assert weight_sync_mode(load_config(["preset=bloom-7b", "ppo.weight_sync=nccl"])) == "nccl"


def test_placement_packs_fractions_onto_shared_gpus_and_whole_gpus_onto_one_node():
    two_nodes = Cluster(gpus_per_node=4, nodes=2)
    assert place([("rollout", 1), ("reference", 0.5), ("reward", 0.5)] + [("learner", 1)] * 5, two_nodes) == ""
    assert place([("rollout", 3), ("rollout", 3), ("learner", 2)], two_nodes) == (
        "needs 8 GPUs at once, which do not pack onto the cluster 4x2's GPUs")  # 1 GPU left on each node


def test_a_plan_of_a_7b_model_loads_no_weights():
    rss = psutil.Process().memory_info().rss
    plan.main(["preset=qwen2.5-7b"])
    assert psutil.Process().memory_info().rss - rss < 2 * GB  # its weights alone: 15 GB in bf16
