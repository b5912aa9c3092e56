"""Stage 5: the reward model: the SFT model plus a scalar head, trained with the pairwise rank loss on
the medical preference pairs and on pairs constructed from ground truth (KG facts swapped for wrong
ones, exam answers naming a wrong option). Reports pairwise accuracy on held-out pairs per source.

    python jobs/rm.py [preset=tiny] [rm.max_steps=60] [key=value ...]

Output: runs/<preset>/rm/final (HF AutoModelForSequenceClassification + tokenizer), history,
tensorboard, accuracy.json / accuracy.md, summary.json.
"""

import json
import sys
from collections import Counter

import ray

from clinicalgpt.config import load_config
from clinicalgpt.packing import keep_sampled
from clinicalgpt.reward import RewardTask, length_groups, pair_dataset, pairwise_accuracy, tokenized_pairs
from clinicalgpt.runtime import init_ray
from clinicalgpt.tokenizer import load_tokenizer
from clinicalgpt.trainer import fit, steps_for, summarize_history, take_rows


def main(argv: list[str]) -> dict:
    cfg = load_config(argv)
    source = cfg.stage_dir("sft") / "final"
    if not (source / "config.json").exists():
        raise SystemExit(f"no SFT model at {source}: run jobs/sft.py preset={cfg.preset} first")
    init_ray(cfg)
    tc, out = cfg.rm, cfg.stage_dir("rm")
    pairs = pair_dataset(cfg).materialize()  # a few MB of text; both splits are read from it
    # Each source's share of its training pairs (rm.pair_fractions), by a hash of the pair.
    train = pairs.filter(lambda r: r["split"] == "train").map_batches(
        keep_sampled, batch_format="pyarrow", fn_kwargs={"fractions": dict(tc.pair_fractions), "seed": tc.seed,
                                                         "group": "source", "keys": ("prompt", "rejected"),
                                                         "salt": "rm-share"})
    train = train.materialize()  # counted twice below
    trained_on = Counter(train.select_columns(["source"]).to_pandas()["source"])
    train = train.random_shuffle(seed=tc.seed)  # sources are in blocks
    test = pairs.filter(lambda r: r["split"] == "test")
    eval_rows = take_rows(tokenized_pairs(cfg, test.random_shuffle(seed=tc.seed)), tc.eval_rows)
    pad_id = load_tokenizer(cfg.model_path).pad_token_id
    stream = tokenized_pairs(cfg, train).map_batches(
        length_groups, batch_size=tc.micro_batch * 32, batch_format="numpy",
        fn_kwargs={"micro_batch": tc.micro_batch, "pad_id": pad_id})
    result = fit(cfg, RewardTask(str(source), pad_id), tc, stream, steps_for(tc, train.count()), eval_rows)
    if result.error:
        raise SystemExit(f"[rm] training failed: {result.error}")

    accuracy = pairwise_accuracy(cfg, str(out / "final"), test, base_dir=str(source))
    for name, row in accuracy["per_source"].items():
        row["train_pairs"] = trained_on.get(name, 0)
    (out / "accuracy.json").write_text(json.dumps(accuracy, indent=2, ensure_ascii=False))
    lines = ["# Reward model: held-out pairwise accuracy", "",
             "Baselines: the longer reply wins; the SFT model (the RM's starting point) prefers the reply it finds "
             "more likely per token, i.e. what it already knows.", "",
             "| source | trained on | held-out pairs | accuracy | longer-reply baseline | SFT likelihood baseline |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {s} | {v['train_pairs']} | {v['pairs']} | {v['accuracy']:.3f} | {v['length_baseline']:.3f} | "
              f"{v['base_likelihood']:.3f} |" for s, v in accuracy["per_source"].items()]
    lines += [f"| **overall** | {sum(trained_on.values())} | {accuracy['pairs']} | **{accuracy['overall']:.3f}** | "
              f"{accuracy['length_baseline']:.3f} | {accuracy['base_likelihood']:.3f} |"]
    (out / "accuracy.md").write_text("\n".join(lines) + "\n")
    summary = {**summarize_history(out / "history.jsonl"), "accuracy": accuracy["overall"], "model": str(out / "final")}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n".join(lines))
    print(f"[rm] done: held-out loss {summary['first_eval_loss']:.3f} -> {summary['last_eval_loss']:.3f}, "
          f"pairwise accuracy {accuracy['overall']:.3f}; model -> {summary['model']}")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
    ray.shutdown()
