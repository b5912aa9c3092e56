"""The DPO family: each loss's value and rewards, the task's loss on a model that is its own reference (log 2, no
margin), a step on it raising the chosen reply over the rejected one, and the held-out report, checked by hand; then
jobs/dpo.py from the session's SFT model."""

import json
import math
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from transformers import AutoModelForCausalLM

from clinicalgpt import dpo, reward_model
from clinicalgpt.config import DPOConfig, ModelConfig, load_config
from clinicalgpt.modeling import build_config
from clinicalgpt.tokenizer import load_tokenizer, train_tokenizer
from conftest import history, scrape_metrics, stage_args

DPO_METRICS = {f"ray_clinicalgpt_train_{m}" for m in ("margin", "eval_accuracy", "chosen_logp", "eval_rejected_logp")}

# Summed log-probs of one pair: the policy's and the reference's, chosen first; the replies are 2 and 4 tokens long.
POLICY, REFERENCE, LENGTHS = (-10.0, -12.0), (-11.0, -11.0), (2.0, 4.0)


def losses(**settings):
    as_tensors = lambda pair: tuple(torch.tensor([x], dtype=torch.float64) for x in pair)  # noqa: E731
    loss, chosen, rejected = dpo.preference_loss(as_tensors(POLICY), as_tensors(REFERENCE), as_tensors(LENGTHS),
                                                 DPOConfig(**settings))
    return loss.item(), chosen.item(), rejected.item()


def test_sigmoid_is_dpo_with_its_rewards_and_label_smoothing_reads_the_pair_both_ways():
    # rewards 0.1 * (-10 + 11) = 0.1 and 0.1 * (-12 + 11) = -0.1: margin 0.2
    assert losses(loss="sigmoid", beta=0.1) == pytest.approx((math.log(1 + math.exp(-0.2)), 0.1, -0.1))
    smoothed = 0.9 * math.log(1 + math.exp(-0.2)) + 0.1 * math.log(1 + math.exp(0.2))
    assert losses(loss="sigmoid", beta=0.1, label_smoothing=0.1)[0] == pytest.approx(smoothed)


def test_ipo_is_the_squared_distance_of_the_per_token_log_ratio_margin_from_half_over_beta():
    # per token: chosen (-10 + 11) / 2 = 0.5, rejected (-12 + 11) / 4 = -0.25; (0.75 - 1 / 0.2)^2
    assert losses(loss="ipo", beta=0.1) == pytest.approx(((0.75 - 5) ** 2, 0.05, -0.025))


def test_simpo_needs_no_reference_and_asks_for_a_margin_of_gamma_in_mean_log_prob():
    # rewards 2 * -10 / 2 = -10 and 2 * -12 / 4 = -6; z = -10 + 6 - 0.5
    assert losses(loss="simpo", beta=2.0, simpo_gamma=0.5) == pytest.approx((math.log(1 + math.exp(4.5)), -10, -6))
    smoothed = 0.8 * math.log(1 + math.exp(4.5)) + 0.2 * math.log(1 + math.exp(-4.5))
    assert losses(loss="simpo", beta=2.0, simpo_gamma=0.5, label_smoothing=0.2)[0] == pytest.approx(smoothed)
    assert dpo.preference_loss((torch.zeros(1), torch.zeros(1)), None, (torch.ones(1), torch.ones(1)),
                               DPOConfig(loss="simpo"))[0].item() == pytest.approx(math.log(1 + math.exp(0.5)))


def test_an_unknown_loss_or_alignment_is_refused():
    with pytest.raises(SystemExit, match="dpo.loss='kto': one of sigmoid, ipo, simpo"):
        load_config(["dpo.loss=kto"])
    with pytest.raises(SystemExit, match="recipe.align='rlhf': one of ppo, dpo, both"):
        load_config(["recipe.align=rlhf"])
    assert load_config(["recipe.align=both"]).eval.models == ["pretrain", "sft", "dpo", "ppo"]
    assert load_config(["recipe.align=both", "eval.models=[sft,dpo]"]).eval.models == ["sft", "dpo"]


def test_the_recipe_runs_the_alignment_stages_it_is_asked_for():
    first = ["data", "bootstrap", "pretrain", "sft"]
    assert load_config([]).recipe_stages() == [*first, "rm", "judge", "ppo", "eval"]
    assert load_config(["recipe.align=dpo"]).recipe_stages() == [*first, "judge", "dpo", "eval"]
    assert load_config(["recipe.align=both"]).recipe_stages() == [*first, "rm", "judge", "dpo", "ppo", "eval"]
    assert load_config(["recipe.align=dpo", "eval.judge=openai"]).recipe_stages() == [*first, "dpo", "eval"]


@pytest.fixture(scope="module", params=["qwen2", "bloom"])
def model_and_pairs(request):
    """A small model of each kind of head (rotary positions, ALiBi) and two pairs."""
    tokenizer = train_tokenizer(["发热咳嗽头痛阿莫西林胶囊布洛芬片呼吸内科"] * 50, vocab_size=300)
    mc = ModelConfig(arch=request.param, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                     intermediate_size=64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(build_config(mc, tokenizer)).eval()
    pad = tokenizer.pad_token_id
    # Two pairs, right-padded as reward_model.padded makes them: prompt + reply, the reply's length apart.
    chosen, rejected = [[5, 9, 12, 7], [5, 9, 14, 20, 21]], [[5, 9, 30], [5, 9, 14, 8, 8, 8]]
    pairs = {"chosen_ids": np.array([r + [pad] * (8 - len(r)) for r in chosen]),
             "rejected_ids": np.array([r + [pad] * (8 - len(r)) for r in rejected]),
             "chosen_reply_len": np.array([2, 2]), "rejected_reply_len": np.array([1, 3]),
             "weight": np.array([1.0, 0.5], dtype=np.float32)}
    return model, pad, pairs


def test_pair_log_probs_are_each_replys_summed_token_log_probs(model_and_pairs):
    model, pad, pairs = model_and_pairs
    got = dpo.pair_logprobs(model, pairs, pad, "cpu", batch_size=1)
    with torch.no_grad():
        for row in range(2):
            for column, side in enumerate(("chosen", "rejected")):
                ids = [t for t in pairs[f"{side}_ids"][row] if t != pad]
                n = pairs[f"{side}_reply_len"][row]
                logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], -1)
                by_hand = sum(logp[len(ids) - n + j - 1, ids[len(ids) - n + j]].item() for j in range(n))
                assert got[row, column] == pytest.approx(by_hand, abs=1e-5)


def test_the_task_loss_is_log_2_at_its_reference_and_a_step_on_it_raises_the_chosen_reply(model_and_pairs):
    model, pad, pairs = model_and_pairs
    reference = dpo.pair_logprobs(model, pairs, pad, "cpu", batch_size=2)
    batch = {k: torch.as_tensor(v) for k, v in pairs.items()}
    batch["ref_chosen_logp"], batch["ref_rejected_logp"] = (torch.as_tensor(reference[:, i]) for i in (0, 1))
    task = dpo.DpoTask("unused", pad, DPOConfig(beta=0.5))
    loss, metrics, tokens = task.loss(model, batch)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5) and metrics["margin"] == pytest.approx(0, abs=1e-5)
    assert metrics["chosen_logp"] == pytest.approx((reference[:, 0] / pairs["chosen_reply_len"]).mean(), abs=1e-5)
    assert tokens == 4 + 5 + 3 + 6
    step = [p.detach().clone() for p in model.parameters()]
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 1e-2 * p.grad
        _, after, _ = task.loss(model, batch)
        for p, before in zip(model.parameters(), step):
            p.copy_(before)  # the module fixture's model, as it was
            p.grad = None
    assert after["margin"] > 0 and after["accuracy"] == 1.0


def test_the_held_out_report_has_accuracy_margin_log_prob_changes_and_the_sft_baseline_per_source():
    held_out = {"ref_chosen_logp": np.array([-4.0, -6.0, -3.0]), "ref_rejected_logp": np.array([-6.0, -3.0, -3.0]),
                "chosen_reply_len": np.array([2, 2, 1]), "rejected_reply_len": np.array([2, 1, 1]),
                "source": np.array(["a", "a", "b"], dtype=object)}
    policy = np.array([[-3.0, -7.0], [-7.0, -2.0], [-2.5, -3.5]])
    report = dpo.held_out_accuracy(policy, held_out, DPOConfig(beta=1.0))
    # margins (1 + 1) = 2, (-1 - 1) = -2, (0.5 + 0.5) = 1; SFT per token: -2 > -3, -3 = -3 (a tie), -3 = -3
    assert report["per_source"]["a"] == pytest.approx({"accuracy": 0.5, "margin": 0.0, "chosen_logp_change": 0.0,
                                                       "rejected_logp_change": 0.0, "sft_likelihood": 0.75, "pairs": 2})
    assert report["per_source"]["b"]["accuracy"] == 1.0 and report["per_source"]["b"]["margin"] == pytest.approx(1.0)
    assert report["overall"] == pytest.approx(2 / 3) and report["margin"] == pytest.approx(1 / 3)
    assert report["chosen_logp_change"] == pytest.approx((1 - 1 + 0.5) / 3) and report["pairs"] == 3


@pytest.mark.e2e
def test_dpo_starts_at_its_reference_learns_and_reports_the_implicit_reward_per_source(trained, prometheus):
    """From the session's SFT model on a hundredth of the reward model's training pairs, three epochs of them: the
    policy starts exactly at its reference (the reference pass's log-probs are its own: loss log 2, no margin), its
    loss falls and its implicit reward comes to prefer the chosen replies, and the held-out pairs get the implicit
    reward per source; the reference pass is kept and not redone. Prometheus has the Grafana dashboard's training
    panels."""
    from jobs import dpo as dpo_job
    cfg, _ = trained
    pairs = reward_model.read_pairs(cfg.data_dir / "pairs")
    shares = [f"dpo.pair_fractions.{source}=0.01" for source in sorted(set(pairs.column("source").to_pylist()))]
    argv = [f"run_root={cfg.run_dir.parent}", f"data.root={cfg.data_root}", *shares,
            *stage_args("dpo", 12, lr=2e-3, eval_every=6)]
    # Meanwhile the node's metrics endpoint serves DPO's figures beside the loss.
    scraped = {}
    scraper = threading.Thread(target=lambda: scraped.update(scrape_metrics(DPO_METRICS, timeout=300)))
    scraper.start()
    started = time.time()
    summary = dpo_job.main(argv)
    scraper.join()
    assert DPO_METRICS <= set(scraped), scraped
    if prometheus:  # every training panel of the Grafana dashboard (loss, throughput, input stream, pairs) has data
        print("training panels, points:", prometheus.check_panels("training", started))
    assert {s.labels["stage"] for s in scraped["ray_clinicalgpt_train_margin"]} == {"dpo"}
    rows = history(cfg, "dpo")
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert rows[0]["eval_loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert rows[0]["eval_margin"] == pytest.approx(0, abs=1e-2)
    first, last = rows[:4], rows[-4:]
    assert np.mean([r["loss"] for r in last]) < np.mean([r["loss"] for r in first]) - 0.005, rows
    assert np.mean([r["accuracy"] for r in last]) > np.mean([r["accuracy"] for r in first]), rows
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"], rows
    assert all({"accuracy", "margin", "chosen_logp", "rejected_logp"} <= set(r) for r in rows)
    assert all({"eval_accuracy", "eval_chosen_logp", "eval_rejected_logp"} <= set(r) for r in rows if "eval_loss" in r)

    accuracy = json.loads((cfg.stage_dir("dpo") / "accuracy.json").read_text())
    held_out = pairs.filter(pc.equal(pairs["split"], "test"))
    assert summary["accuracy"] == accuracy["overall"] and accuracy["pairs"] == held_out.num_rows
    assert {"constructed/kg_wrong_kind", "pulse_eval/WebMedQA"} <= set(accuracy["per_source"])
    trained_on = sum(r["train_pairs"] for r in accuracy["per_source"].values())
    # a hundredth of the reward model's half
    assert 0.002 < trained_on / pc.sum(pc.equal(pairs["split"], "train")).as_py() < 0.01, trained_on
    table = (cfg.stage_dir("dpo") / "accuracy.md").read_text()
    assert "| source | trained on | held-out pairs | accuracy | margin |" in table
    merged = AutoModelForCausalLM.from_pretrained(summary["model"])
    assert not any("lora" in name for name, _ in merged.named_parameters())
    for made in ("adapter/adapter_config.json", "curves.png", "lineage.json", "final/README.md"):
        assert (cfg.stage_dir("dpo") / made).exists(), made

    # The reference pass: the SFT model's own summed log-probs, kept for the next run with the same settings.
    kept = cfg.stage_dir("dpo") / "reference" / "stream.json"
    built = kept.stat().st_mtime_ns
    run, pad = load_config(argv), load_tokenizer(cfg.model_path).pad_token_id
    selected = pa.concat_tables([reward_model.training_pairs(pairs, run.dpo), held_out])
    scored = dpo.with_reference(run, run.dpo, str(cfg.stage_dir("sft") / "final"), selected, pad)
    assert kept.stat().st_mtime_ns == built and scored.num_rows == selected.num_rows
    some = reward_model.padded(scored.slice(0, 3), pad, cfg.seq.max_len)
    sft, device = dpo.scoring_model(str(cfg.stage_dir("sft") / "final"), cfg.model.dtype, run.dpo.bf16)
    again = dpo.pair_logprobs(sft, some, pad, device, batch_size=3)  # the same precision, batches of other widths
    np.testing.assert_allclose(again, np.stack([some["ref_chosen_logp"], some["ref_rejected_logp"]], 1), rtol=1e-2)
