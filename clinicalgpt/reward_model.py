"""The reward model: the SFT model with a scalar head on the last non-pad token's final hidden state,
trained on pairs with the rank loss -log sigma(r(prompt, chosen) - r(prompt, rejected)).

Pairs come from the preference corpora (AI-judged) and from pairs built here where the corpora hold
ground truth, because factual errors are what a clinical reward model must catch (kg_pairs, exam_pairs).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch

from .config import Config, TrainConfig
from .kg_templates import render_qa
from .modeling import DTYPES, apply_lora
from .records import hash_fraction
from .trainer import Task, export_hf

CONSTRUCTED_TEST_FRACTION = 0.05
# Shares of KG records (250k) turned into each kind of swap pair and of exam records (9k) turned into wrong
# option pairs: about 3.5k pairs of each kind, as many as the AI-judged preference pairs, so no one kind
# drowns out the others in training or in the overall held-out accuracy.
KG_PAIR_FRACTION = 0.02
EXAM_PAIR_FRACTION = 0.4
# Relation kinds whose answers are estimates (cure rate, cost, duration, prevalence, insurance, yes/no):
# another disease's value is often not wrong, so they make no factual-error pairs.
ESTIMATE_KINDS = {"cure_rate", "cost", "treat_cycle", "prevalence", "insurance", "infectious"}
# Kinds with no same-kind swaps: the food lists are near-arbitrary picks of common foods, and treatment
# ways and susceptible groups come from a handful of values most diseases share (药物治疗, 无特定人群), so
# another disease's is seldom wrong. Listing them as another kind still is a wrong-kind pair.
NO_SWAP_KINDS = {"good_food", "avoid_food", "recipe", "treatment", "susceptible"}
# Constructed KG source -> whether its wrong facts are of the question's own kind.
KG_SWAPS = {"constructed/kg_swap": True, "constructed/kg_wrong_kind": False}
# A pair's group: the ranked set (one prompt's responses) it comes from, "" for a lone pair; its weight, 1 / the
# pairs of its group, so that each prompt counts once in the loss (InstructGPT's ranked comparisons).
PAIR_SCHEMA = pa.schema([(c, pa.string()) for c in ("prompt", "chosen", "rejected", "source", "split", "group")]
                        + [("weight", pa.float32())])


def pair_row(prompt: str, chosen: str, rejected: str, source: str, key: str, seed: int) -> dict:
    split = "test" if hash_fraction("rm-split", str(seed), key) < CONSTRUCTED_TEST_FRACTION else "train"
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "source": source, "split": split, "group": "",
            "weight": 1.0}


def kg_swap_sources(record_id: str, meta: dict, seed: int) -> list[str]:
    """The constructed sources a KG record is drawn for: a hashed share of the records for each."""
    if meta["kind"] in ESTIMATE_KINDS:
        return []
    return [source for source, same_kind in KG_SWAPS.items() if not (same_kind and meta["kind"] in NO_SWAP_KINDS)
            and hash_fraction(source, str(seed), record_id) < KG_PAIR_FRACTION]


def disease_departments(kg: ray.data.Dataset) -> dict[str, list[str]]:
    """Disease -> the departments that treat it, from the graphs' department records."""
    rows = kg.filter(lambda r: json.loads(r["meta"])["kind"] == "department").select_columns(["meta"]).take_all()
    out = defaultdict(set)
    for meta in (json.loads(r["meta"]) for r in rows):
        out[meta["subject"]].update(meta["objects"])
    return {disease: sorted(d) for disease, d in out.items()}


def kg_pairs(batch: pa.Table, seed: int, kg_en_fraction: float, cap: int, departments: dict) -> pa.Table:
    """Ray Data map over shuffled KG records -> (prompt, chosen, rejected, source, split) pairs: the same
    question answered with another record's facts.

    kg_swap: facts of the same kind from a disease of another department (a neighbour's checks or drugs
    are often right too, the graphs being incomplete; a dermatology drug for a heart disease is not);
    kg_wrong_kind: facts of another kind (drugs listed as symptoms)."""
    kg = [(r, m) for r, m in ((r, json.loads(r["meta"])) for r in batch.to_pylist()) if m["kind"] not in ESTIMATE_KINDS]

    def kind(meta):  # an inverse question (symptom -> diseases) lists another kind of object
        return meta["kind"], meta["relation"].startswith("inverse:")

    def departments_of(meta):  # of the subject, or of the diseases an inverse answer lists
        diseases = meta["objects"] if kind(meta)[1] else [meta["subject"]]
        return {d for disease in diseases for d in departments.get(disease, ())}

    def wrong_for(meta, donor, same_kind):
        if (kind(donor) == kind(meta)) != same_kind or set(donor["objects"]) & set(meta["objects"]):
            return False
        if not same_kind:
            return True
        own, other = departments_of(meta), departments_of(donor)
        return bool(own and other and not own & other)

    rows = []
    for i, (r, meta) in enumerate(kg):
        for source in kg_swap_sources(r["id"], meta, seed):
            donor = next((m for _, m in kg[i + 1:] + kg[:i] if wrong_for(meta, m, KG_SWAPS[source])), None)
            if donor is None:
                continue
            _, rejected, _ = render_qa(meta["kind"], meta["subject"], donor["objects"], inverse=kind(meta)[1],
                                       seed=seed, en_fraction=kg_en_fraction, cap=cap)
            rows.append(pair_row(r["messages"][0]["content"], r["messages"][-1]["content"], rejected, source,
                                 r["id"], seed))
    return pa.Table.from_pylist(rows, schema=PAIR_SCHEMA)


def exam_pairs(batch: pa.Table, seed: int) -> pa.Table:
    """Ray Data map: exam records -> pairs whose rejected answer names a wrong option."""
    rows = []
    for r in batch.to_pylist():
        if hash_fraction("constructed/exam", str(seed), r["id"]) >= EXAM_PAIR_FRACTION:
            continue
        meta = json.loads(r["meta"])
        wrong = sorted(set(meta["options"]) - set(meta["answer"]))
        if not wrong:
            continue
        letter = wrong[int(hash_fraction("wrong", r["id"]) * len(wrong))]
        chosen = r["messages"][-1]["content"].split("\n")[0]  # "答案：C。<text>" without the explanation
        rows.append(pair_row(r["messages"][0]["content"], chosen, f"答案：{letter}。{meta['options'][letter]}",
                             "constructed/exam_wrong_option", r["id"], seed))
    return pa.Table.from_pylist(rows, schema=PAIR_SCHEMA)


def preference_pairs(batch: pa.Table) -> pa.Table:
    """Ray Data map: preference records -> pairs (the source is the corpus subset, e.g. pulse_eval/WebMedQA)."""
    rows = batch.to_pylist()
    metas = [json.loads(r["meta"]) for r in rows]
    return pa.table({
        "prompt": [r["messages"][0]["content"] for r in rows],
        "chosen": [r["messages"][-1]["content"] for r in rows],
        "rejected": [r["rejected"] for r in rows],
        "source": [m.get("subset") or r["source"] for r, m in zip(rows, metas)],
        "split": [r["split"] for r in rows],
        "group": [m.get("group", "") for m in metas],
        "weight": [1.0 / m.get("group_pairs", 1) for m in metas],
    }, schema=PAIR_SCHEMA)


def in_half(batch: pa.Table, half: int) -> pa.Table:
    """Ray Data map: the pairs of one half (1 or 2), by a hash of the pair (of its ranked set: its group) that no
    seed changes, so the reward model and the judge train on disjoint halves."""
    columns = [batch.column(c).to_pylist() for c in ("group", "prompt", "chosen", "rejected")]
    keep = [(hash_fraction("rm-half", *([group] if group else pair)) < 0.5) == (half == 1)
            for group, *pair in zip(*columns)]
    return batch.filter(pa.array(keep, type=pa.bool_()))


def stage_config(cfg: Config, stage: str) -> TrainConfig:
    """The training settings of the reward model (rm) or of the evaluation's judge: rm's, with the other half of
    the pairs and the next seed."""
    if stage == "rm":
        return cfg.rm
    if cfg.rm.pair_half not in (1, 2):
        raise SystemExit(f"the judge trains on the half of the pairs the reward model did not: set rm.pair_half to "
                         f"1 or 2 (it is {cfg.rm.pair_half}), or judge with an endpoint (eval.judge=openai)")
    return dataclasses.replace(cfg.rm, pair_half=3 - cfg.rm.pair_half, seed=cfg.rm.seed + 1)


def pair_dataset(cfg: Config) -> ray.data.Dataset:
    """All pairs, train and test, as one stream of (prompt, chosen, rejected, source, split): the preference
    records' and those constructed from the KG and exam training records, of what the data file has."""
    from .corpus import read_records, record_files
    seed = cfg.data.seed
    parts = []
    if record_files(cfg, ["train", "test"], ["preference"]):
        parts.append(read_records(cfg, ["train", "test"], ["preference"]).map_batches(preference_pairs,
                                                                                      batch_format="pyarrow"))
    if record_files(cfg, ["train"], ["kg_qa"]):
        kg = read_records(cfg, ["train"], ["kg_qa"])
        # Shuffled, so that each batch holds diseases of every department to draw the wrong facts from.
        drawn = kg.filter(lambda r: bool(kg_swap_sources(r["id"], json.loads(r["meta"]), seed)))
        parts.append(drawn.random_shuffle(seed=seed).map_batches(
            kg_pairs, batch_format="pyarrow", batch_size=cfg.data.batch_size,
            fn_kwargs={"seed": seed, "kg_en_fraction": cfg.data.kg_en_fraction, "cap": cfg.data.kg_max_objects,
                       "departments": disease_departments(kg)}))
    if record_files(cfg, ["train"], ["exam"]):
        parts.append(read_records(cfg, ["train"], ["exam"]).map_batches(exam_pairs, batch_format="pyarrow",
                                                                        fn_kwargs={"seed": seed}))
    if not parts:
        raise FileNotFoundError("no preference, KG or exam training records to make reward-model pairs of")
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def has_pair_records(cfg: Config) -> bool:
    """Whether the data file has records pair_dataset makes pairs of (a file of evaluation sources alone may not)."""
    from .corpus import record_files
    return bool(record_files(cfg, ["train", "test"], ["preference"]) or record_files(cfg, ["train"], ["kg_qa", "exam"]))


def pair_table(cfg: Config) -> Path:
    """pair_dataset's pairs, tokenized (TokenizePairs), as Parquet under data/pairs/: built once by the data job (the
    reward model and the judge read them) and rebuilt only when what shapes them changes: the records, the seed, the
    KG answer settings, the shares above, the tokenizer and max_len."""
    import pyarrow.parquet as pq
    from .packing import built_once, records_fingerprint, tokenizer_fingerprint
    shape = {"seed": cfg.data.seed, "kg_en_fraction": cfg.data.kg_en_fraction, "kg_max_objects": cfg.data.kg_max_objects,
             "kg_pair_fraction": KG_PAIR_FRACTION, "exam_pair_fraction": EXAM_PAIR_FRACTION,
             "test_fraction": CONSTRUCTED_TEST_FRACTION, "columns": PAIR_SCHEMA.names, "records": records_fingerprint(cfg),
             "tokenizer": tokenizer_fingerprint(cfg), "max_len": cfg.seq.max_len}

    def build(partial: Path) -> dict:
        started = time.time()
        # One tokenizer actor: with two the data job peaked at 4.3 GB on a local cluster, with one 3.6.
        pair_dataset(cfg).map_batches(TokenizePairs, fn_constructor_kwargs={
            "tokenizer_path": cfg.model_path, "chat_template": cfg.model.chat_template, "max_len": cfg.seq.max_len},
            batch_format="pyarrow", batch_size=256, concurrency=1, num_cpus=0.5).write_parquet(str(partial))
        table = pq.read_table(partial, columns=["split", "source"])
        counts = Counter(zip(table.column("split").to_pylist(), table.column("source").to_pylist()))
        pairs = {split: {source: n for (s, source), n in sorted(counts.items()) if s == split} for split in ("train", "test")}
        print(f"[data] reward-model pairs: {pairs}", flush=True)
        return {"pairs": pairs, "seconds": round(time.time() - started, 1)}

    return built_once(cfg.data_dir / "pairs", shape, build)


def read_pairs(folder: Path) -> pa.Table:
    """The pair table (pair_table's folder), in the order it was written: 8 MB for the tiny preset's corpora, read
    whole by the reward stage's driver, which picks its pairs from it."""
    import pyarrow.parquet as pq
    return pq.read_table(sorted(str(f) for f in folder.glob("*.parquet")))


class TokenizePairs:
    """Ray Data callable: pairs -> the same pairs with chosen/rejected token ids (the prompt in the chat template,
    then the reply and EOS; at most max_len, unpadded) and each reply's length in tokens (its last tokens; the prompt
    is cut from the left when a pair does not fit, so the replies are always scored whole)."""

    def __init__(self, tokenizer_path: str, chat_template: str, max_len: int):
        from .tokenizer import load_tokenizer
        # The pass's only actor (pair_table): its tokenizer may use the cores the pass leaves idle.
        os.environ["TOKENIZERS_PARALLELISM"] = "true"
        self.tok = load_tokenizer(tokenizer_path, chat_template)
        self.max_len = max_len

    def __call__(self, batch: pa.Table) -> pa.Table:
        from .packing import render
        heads = render(self.tok, [[{"role": "user", "content": p}] for p in batch.column("prompt").to_pylist()],
                       add_generation_prompt=True)
        prompts = self.tok(heads, add_special_tokens=False)["input_ids"]
        for side in ("chosen", "rejected"):
            replies = self.tok([r + self.tok.eos_token for r in batch.column(side).to_pylist()],
                               add_special_tokens=False)["input_ids"]
            replies = [r[: self.max_len // 2] for r in replies]
            ids = [prompt[-(self.max_len - len(reply)):] + reply for prompt, reply in zip(prompts, replies)]
            batch = batch.append_column(f"{side}_ids", pa.array(ids, type=pa.list_(pa.int32())))
            batch = batch.append_column(f"{side}_reply_len", pa.array([len(r) for r in replies], type=pa.int32()))
        return batch


def padded(pairs: pa.Table, pad_id: int, max_len: int) -> dict[str, np.ndarray]:
    """Tokenized pairs as numpy: chosen/rejected ids right-padded to max_len, the sources, and every numeric column
    as it is (the reply lengths, the weight; DPO's reference log-probs)."""
    out = {}
    for side in ("chosen", "rejected"):
        rows = pairs.column(f"{side}_ids").combine_chunks()
        ids = np.full((pairs.num_rows, max_len), pad_id, dtype=np.int64)
        ids[np.arange(max_len) < pc.list_value_length(rows).to_numpy()[:, None]] = rows.flatten().to_numpy()
        out[f"{side}_ids"] = ids
    for name, column in zip(pairs.column_names, pairs.columns):
        if pa.types.is_integer(column.type):
            out[name] = column.to_numpy().astype(np.int64)
        elif pa.types.is_floating(column.type):
            out[name] = column.to_numpy().astype(np.float32)
    out["source"] = np.array(pairs.column("source").to_pylist(), dtype=object)
    return out


def training_pairs(pairs: pa.Table, train_cfg: TrainConfig) -> pa.Table:
    """The training pairs a stage trains on: its half (pair_half) and each source's share (pair_fractions), both
    by a hash of the pair (of a ranked set's pairs: of their group, so that they stay together)."""
    from .packing import keep_sampled
    train = pairs.filter(pc.equal(pairs["split"], "train"))
    if train_cfg.pair_half:
        train = in_half(train, train_cfg.pair_half)
    # The key hashed: the group, else prompt and rejected (hash_fraction joins its parts with \x1f).
    key = [g or f"{p}\x1f{r}" for g, p, r in zip(*(train.column(c).to_pylist() for c in ("group", "prompt", "rejected")))]
    sampled = keep_sampled(train.append_column("key", pa.array(key, pa.string())), dict(train_cfg.pair_fractions),
                           train_cfg.seed, group="source", keys=("key",), salt="rm-share")
    return sampled.drop_columns(["key"])


def length_groups(batch: pa.Table, micro_batch: int, pad_id: int, max_len: int) -> dict[str, np.ndarray]:
    """Ray Data map over windows of shuffled tokenized pairs: padded, sorted by length and cut into micro-batches,
    in a random order. A micro-batch then holds pairs of about one length, so scores() trims most of the padding
    (short KG pairs no longer wait on a long preference pair), while the kinds still mix across steps."""
    rows = padded(batch, pad_id, max_len)
    lengths = np.maximum((rows["chosen_ids"] != pad_id).sum(1), (rows["rejected_ids"] != pad_id).sum(1))
    order = np.argsort(lengths, kind="stable")
    chunks = [order[i:i + micro_batch] for i in range(0, len(order), micro_batch)]
    rng = np.random.default_rng(int(lengths.sum()))  # seeded by the window's content: reruns see the same order
    order = np.concatenate([chunks[i] for i in rng.permutation(len(chunks))])
    return {k: v[order] for k, v in rows.items()}


def scores(model, ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Reward per sequence: the head at its last token that is not the pad token (the classifier's own pooling,
    as PPO scores with experience.sequence_scores); trailing all-pad columns are cut first (they cost compute,
    change nothing)."""
    width = int((ids != pad_id).sum(1).max())
    return model(input_ids=ids[:, :width], use_cache=False).logits[:, 0].float()


class RewardTask(Task):
    shuffle_rows = False  # its stream comes shuffled, then grouped by length (length_groups)
    metrics = ("accuracy",)

    def __init__(self, source: str, pad_id: int, name: str = "rm"):
        self.source, self.pad_id, self.name = source, pad_id, name  # name: rm, or judge

    def build_model(self, cfg: Config, train_cfg: TrainConfig) -> torch.nn.Module:
        from transformers import AutoModelForSequenceClassification
        model = AutoModelForSequenceClassification.from_pretrained(self.source, num_labels=1,
                                                                   dtype=DTYPES[cfg.model.dtype])
        model.config.pad_token_id = self.pad_id
        return apply_lora(model, train_cfg.lora, task_type="SEQ_CLS")

    def loss(self, model, batch):
        """-log sigmoid(r_chosen - r_rejected), a weighted mean over the pairs: a lone pair weighs 1, each of the
        C(K,2) pairs of a ranked set of K responses 1/C(K,2), so that every prompt counts once (InstructGPT)."""
        n, weight = len(batch["chosen_ids"]), batch["weight"]
        r = scores(model, torch.cat([batch["chosen_ids"], batch["rejected_ids"]]), self.pad_id)
        margin = r[:n] - r[n:]
        loss = -(weight * torch.nn.functional.logsigmoid(margin)).sum() / weight.sum()
        tokens = int((batch["chosen_ids"] != self.pad_id).sum() + (batch["rejected_ids"] != self.pad_id).sum())
        return loss, {"accuracy": float((margin > 0).float().mean())}, tokens

    def export(self, model: torch.nn.Module, cfg: Config, out: Path) -> None:
        export_hf(model, cfg, out)


def reply_logprobs(model, ids: torch.Tensor, reply_len: torch.Tensor, pad_id: int) -> torch.Tensor:
    """The summed log-prob a causal LM gives each row's reply (its last reply_len real tokens of right-padded ids)
    after the prompt before it, [B]. The rows as they are (trailing padding changes nothing under a causal mask), and
    only the positions that predict a reply token go through the vocabulary projection: a hook picks them from its
    input, so prompts and padding cost no logits (2-4x less compute on the tiny preset)."""
    from .experience import token_logprobs
    lengths = (ids != pad_id).sum(1)
    width = int(lengths.max())
    x = ids[:, :width]
    columns = torch.arange(1, width, device=ids.device)  # token t, predicted at position t - 1
    predicts = (columns >= (lengths - reply_len)[:, None]) & (columns < lengths[:, None])
    head = getattr(model, "module", model).get_output_embeddings()
    hook = head.register_forward_pre_hook(lambda _, args: (args[0][:, :-1][predicts],))
    try:
        logits = model(input_ids=x, use_cache=False).logits.float()  # [reply tokens, vocabulary]
    finally:
        hook.remove()
    rows = torch.arange(len(ids), device=ids.device)[:, None].expand_as(predicts)[predicts]
    return torch.zeros(len(ids), device=ids.device).index_add(0, rows, token_logprobs(logits, x[:, 1:][predicts]))


def reply_likelihood(model, ids: np.ndarray, reply_len: np.ndarray, pad_id: int, device: str = "cpu") -> np.ndarray:
    """Mean log-prob per token that a causal LM gives each row's reply (reply_logprobs over its length)."""
    summed = reply_logprobs(model, torch.as_tensor(ids, device=device), torch.as_tensor(reply_len, device=device), pad_id)
    return summed.cpu().numpy() / reply_len


def length_bias(chosen: np.ndarray, rejected: np.ndarray) -> dict[str, float]:
    """A reward model's length bias from (score, reply length) rows of each pair's chosen and rejected reply:
    the Pearson correlation of score and length over every reply, and the share of pairs of unequal length
    whose longer reply it scores higher (0.5 when no pair differs)."""
    both = np.concatenate([chosen, rejected])
    longer_first = np.sign(chosen[:, 1] - rejected[:, 1])
    unequal = longer_first != 0
    higher = (chosen[:, 0] > rejected[:, 0]) == (longer_first > 0)
    return {"score_length_correlation": float(np.corrcoef(both[:, 0], both[:, 1])[0, 1]),
            "prefers_longer": float(higher[unequal].mean()) if unequal.any() else 0.5}


def pair_scores(model_dir: str, base_dir: str | None, pairs: dict[str, np.ndarray], dtype: str,
                batch_size: int = 32) -> dict[str, np.ndarray]:
    """Per pair of tokenized pairs, for pairwise_accuracy: the reward model's score of each reply, each reply's
    length (tokens: whole row, and reply) and, given base_dir, the mean log-prob per token the base model (the SFT
    model the RM starts from) gives it. run_reward_stage runs it as Ray tasks on the stage's worker resources."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from .tokenizer import load_tokenizer
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=DTYPES[dtype]).to(device).eval()
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=DTYPES[dtype]).to(device).eval() if base_dir else None
    pad = load_tokenizer(model_dir).pad_token_id
    columns = ("score", "row_len", "reply_len") + (("liked",) if base else ())
    out = {k: np.zeros((len(pairs["chosen_ids"]), 2)) for k in columns}
    # Scored in order of length, so that a batch holds pairs of about one length and scores() trims most padding.
    lengths = np.maximum((pairs["chosen_ids"] != pad).sum(1), (pairs["rejected_ids"] != pad).sum(1))
    order = np.argsort(lengths, kind="stable")
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            n = len(rows)
            both = np.concatenate([pairs["chosen_ids"][rows], pairs["rejected_ids"][rows]])
            reply_lens = np.concatenate([pairs["chosen_reply_len"][rows], pairs["rejected_reply_len"][rows]])
            columns = {"score": scores(model, torch.as_tensor(both).to(device), pad).cpu().numpy(),
                       "row_len": (both != pad).sum(1), "reply_len": reply_lens}
            if base:
                columns["liked"] = reply_likelihood(base, both, reply_lens, pad, device)
            for k, v in columns.items():
                out[k][rows] = np.stack([v[:n], v[n:]], axis=1)  # column 0: chosen, 1: rejected
    return out


def pairwise_accuracy(scored: dict[str, np.ndarray], sources: np.ndarray) -> dict:
    """Held-out pairwise accuracy from pair_scores, overall and per source (the chosen reply must score higher),
    beside two baselines (ties count half): the longer reply wins, the shortcut an AI-judged corpus invites;
    and the reply the base model finds more likely per token, which is what that model already knows: a
    factual-error pair it prefers at chance is a fact it does not hold."""
    def wins(column: str) -> np.ndarray:  # 1 when the chosen reply's value is higher, 0.5 on a tie
        return (np.sign(scored[column][:, 0] - scored[column][:, 1]) + 1) / 2
    columns = {"accuracy": (scored["score"][:, 0] > scored["score"][:, 1]).astype(float),
               "length_baseline": wins("row_len"), "base_likelihood": wins("liked")}
    by_reply = [np.stack([scored["score"][:, i], scored["reply_len"][:, i]], axis=1) for i in (0, 1)]
    return {"overall": float(columns["accuracy"].mean()), "length_baseline": float(columns["length_baseline"].mean()),
            "base_likelihood": float(columns["base_likelihood"].mean()), "pairs": len(sources),
            **length_bias(*by_reply),
            "per_source": {s: {**{k: float(v[sources == s].mean()) for k, v in columns.items()},
                               "pairs": int((sources == s).sum())} for s in sorted(set(sources))}}


def accuracy_table(accuracy: dict, trained_on: Counter) -> list[str]:
    """accuracy.md: per source, the pairs trained on and held out, the accuracy and its two baselines."""
    lines = ["# Reward model: held-out pairwise accuracy", "",
             "Baselines: the longer reply wins; the SFT model (the RM's starting point) prefers the reply it finds "
             "more likely per token, i.e. what it already knows.", "",
             "| source | trained on | held-out pairs | accuracy | longer-reply baseline | SFT likelihood baseline |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {s} | {v['train_pairs']} | {v['pairs']} | {v['accuracy']:.3f} | {v['length_baseline']:.3f} | "
              f"{v['base_likelihood']:.3f} |" for s, v in accuracy["per_source"].items()]
    lines += [f"| **overall** | {sum(trained_on.values())} | {accuracy['pairs']} | **{accuracy['overall']:.3f}** | "
              f"{accuracy['length_baseline']:.3f} | {accuracy['base_likelihood']:.3f} |", "",
              f"Length bias: the score's correlation with the reply's length (tokens, every held-out reply) "
              f"{accuracy['score_length_correlation']:.3f}; the longer reply of a pair scores higher in "
              f"{accuracy['prefers_longer']:.1%} of the pairs, and is the chosen one in "
              f"{accuracy['length_baseline']:.1%} (ties count half)."]
    return lines


def length_balanced_shards(pairs: dict[str, np.ndarray], pad_id: int, shards: int) -> list[np.ndarray]:
    """The pairs' indices in `shards` parts of as much work each: every shards-th pair in order of length."""
    by_length = np.argsort((pairs["chosen_ids"] != pad_id).sum(1) + (pairs["rejected_ids"] != pad_id).sum(1),
                           kind="stable")
    return [by_length[i::shards] for i in range(shards)]


def run_reward_stage(cfg: Config, source: str, argv: list[str], stage: str = "rm") -> dict:
    """Train the reward model (stage rm) or the evaluation's judge (stage judge: stage_config) from the SFT model at
    `source` on the pairs (its half, rm.pair_half; each source's share: rm.pair_fractions), measure held-out
    pairwise accuracy, and write accuracy.json/md, summary.json and the run's lineage."""
    from .lineage import record_stage
    from .packing import files_fingerprint
    from .tokenizer import load_tokenizer
    from .trainer import fit, steps_for, summarize_history

    train_cfg = stage_config(cfg, stage)
    started, out = time.time(), cfg.stage_dir(stage)
    pad_id = load_tokenizer(cfg.model_path).pad_token_id
    pairs_dir = pair_table(cfg)
    pairs = read_pairs(pairs_dir)
    train = training_pairs(pairs, train_cfg)
    trained_on = Counter(train.column("source").to_pylist())
    # A seeded sample of the held-out pairs is the training's held-out loss, all of them the accuracy below.
    held_out = padded(pairs.filter(pc.equal(pairs["split"], "test")), pad_id, cfg.seq.max_len)
    sample = np.random.default_rng(train_cfg.seed).permutation(len(held_out["source"]))[:train_cfg.eval_rows]
    eval_rows = {k: v[sample] for k, v in held_out.items() if k != "source"}
    # Shuffled (the sources come in blocks), then grouped by length.
    tokenized = train.select(["chosen_ids", "rejected_ids", "chosen_reply_len", "rejected_reply_len", "weight", "source"])
    stream = ray.data.from_arrow(tokenized).random_shuffle(seed=train_cfg.seed).map_batches(
        length_groups, batch_size=train_cfg.micro_batch * 32, batch_format="pyarrow",
        fn_kwargs={"micro_batch": train_cfg.micro_batch, "pad_id": pad_id, "max_len": cfg.seq.max_len})
    result = fit(cfg, RewardTask(source, pad_id, stage), train_cfg, stream, steps_for(train_cfg, train.num_rows),
                 eval_rows)
    if result.error:
        raise SystemExit(f"[{stage}] training failed: {result.error}")

    # On each training worker's resources (a GPU on the real presets), now free, each task scoring a share of the
    # pairs; not in the driver (the pairs travel through the object store). Every num_workers-th pair by length to
    # each task: as much work each, so none waits on another. The SFT model's likelihoods are the same for the reward
    # model and the judge: computed once, kept beside the pairs under the SFT model's fingerprint.
    shards = length_balanced_shards(held_out, pad_id, train_cfg.num_workers)
    order = np.concatenate(shards)
    liked = pairs_dir / f"sft_likelihood-{files_fingerprint(Path(source))}.npy"
    known = liked.exists()
    task = ray.remote(pair_scores).options(num_cpus=train_cfg.cpus_per_worker, num_gpus=train_cfg.gpus_per_worker)
    scored = ray.get([task.remote(str(out / "final"), None if known else source,
                                  {k: v[rows] for k, v in held_out.items() if k != "source"}, cfg.model.dtype)
                      for rows in shards])
    scored = {k: np.concatenate([s[k] for s in scored]) for k in scored[0]}  # pairs in `order`
    if known:
        scored["liked"] = np.load(liked)[order]
    else:  # saved in the held-out pairs' own order
        by_pair = np.empty_like(scored["liked"])
        by_pair[order] = scored["liked"]
        partial = liked.with_suffix(".partial.npy")
        np.save(partial, by_pair)
        partial.rename(liked)
    accuracy = pairwise_accuracy(scored, held_out["source"][order])
    for name, row in accuracy["per_source"].items():
        row["train_pairs"] = trained_on.get(name, 0)
    (out / "accuracy.json").write_text(json.dumps(accuracy, indent=2, ensure_ascii=False))
    table = accuracy_table(accuracy, trained_on)
    (out / "accuracy.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    summary = {**summarize_history(out / "history.jsonl"), "accuracy": accuracy["overall"], "model": str(out / "final")}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    record_stage(cfg, stage, argv, started, summary)
    return summary
