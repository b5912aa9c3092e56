"""Builders: one parsed JSON line of a source file -> records in the common schema.

Each builder takes (obj, source, split, cfg) and returns a list of records, or raises Skip(reason)
for input it cannot use; the pipeline counts and reports every reason. `split` is the split the
config forces for the file ("" lets the builder decide).
"""

from __future__ import annotations

import re
from functools import partial
from typing import Callable

from .config import DataConfig, SourceSpec
from .kg_templates import RELATION_KIND, clean_objects, render_qa
from .records import Skip, hash_fraction, make_record, stable_id

EXAM_INSTRUCTION = "以下是医师资格考试的选择题，请选出正确答案。"
DIAGNOSIS_INSTRUCTION = "请根据以上病历信息，给出最可能的诊断。"


def _text(obj: dict, key: str) -> str:
    """A required non-empty string field."""
    if key not in obj or obj[key] is None:
        raise Skip(f"missing_field:{key}")
    value = obj[key]
    if not isinstance(value, str):
        raise Skip(f"bad_type:{key}")
    value = value.strip()
    if not value:
        raise Skip("empty_text")
    return value


def _id(obj: dict, source: str, *content: str) -> str:
    return str(obj.get("id") or f"{source.split('/')[-1]}-{stable_id(*content)}")


def _split(split: str, obj: dict) -> str:
    split = split or obj.get("split") or ""
    split = {"dev": "valid", "validate": "valid", "validation": "valid", "val": "valid"}.get(split, split)
    if split not in ("train", "valid", "rl", "test"):
        raise Skip("unknown_split")
    return split


# --- knowledge graphs -------------------------------------------------------------------------

def _kg(graph: str) -> Callable:
    def build(obj: dict, source: str, split: str, cfg: DataConfig) -> list[dict]:
        subject, relation = _text(obj, "s"), _text(obj, "p")
        if not isinstance(obj.get("o"), list):
            raise Skip("missing_field:o")
        kind = RELATION_KIND.get(relation)
        if kind is None:
            raise Skip("unknown_relation")
        objects = clean_objects(obj["o"])
        if not objects:
            raise Skip("empty_text")
        question, answer, lang = render_qa(kind, subject, objects, inverse=False, seed=cfg.seed,
                                           en_fraction=cfg.kg_en_fraction, cap=cfg.kg_max_objects)
        meta = {"graph": graph, "relation": relation, "kind": kind, "lang": lang, "subject": subject,
                "objects": objects[: cfg.kg_max_objects]}
        return [make_record(f"kg-{graph}-{stable_id(subject, relation)}", "kg_qa", source, split or "train",
                            [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                            meta=meta)]
    return build


def kg_inverse_record(graph: str, kind: str, obj_name: str, subjects: list[str], source: str,
                      cfg: DataConfig) -> dict:
    """An inverse QA pair: the object (symptom, drug, check) asked about, diseases answered."""
    question, answer, lang = render_qa(kind, obj_name, subjects, inverse=True, seed=cfg.seed,
                                       en_fraction=cfg.kg_en_fraction, cap=cfg.kg_max_objects)
    meta = {"graph": graph, "relation": f"inverse:{kind}", "kind": kind, "lang": lang, "subject": obj_name,
            "objects": subjects[: cfg.kg_max_objects]}
    return make_record(f"kg-{graph}-inv-{stable_id(kind, obj_name)}", "kg_qa", source, "train",
                       [{"role": "user", "content": question}, {"role": "assistant", "content": answer}], meta=meta)


INVERSE_KINDS = ("symptom", "drug", "check")


# --- question answering -------------------------------------------------------------------------

def community_qa(obj: dict, source: str, split: str, cfg: DataConfig) -> list[dict]:
    question, answer = _text(obj, "question"), _text(obj, "answer")
    meta = {k: obj[k] for k in ("department",) if obj.get(k)}
    return [make_record(_id(obj, source, question, answer), "community_qa", source, _split(split, obj),
                        [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                        meta=meta)]


def format_exam_question(question: str, options: dict[str, str]) -> str:
    lines = [EXAM_INSTRUCTION, question] + [f"{k}. {v}" for k, v in options.items()]
    return "\n".join(lines)


def exam(obj: dict, source: str, split: str, cfg: DataConfig, task: str = "exam",
         fields: dict | None = None) -> list[dict]:
    """Exam questions: `question`; `options`, a dict of letters, a list (lettered A, B ...) or absent with one field
    per letter (a CSV's columns A, B ...); `answer`, a letter or letters; optional `explanation`, `category`."""
    name = {k: (fields or {}).get(k, k) for k in ("question", "options", "answer", "explanation", "category")}
    question = _text(obj, name["question"])
    options = obj.get(name["options"])
    if isinstance(options, list):
        options = {chr(ord("A") + i): v for i, v in enumerate(options)}
    elif options is None:
        options = {k: obj[k] for k in "ABCDEFGH" if obj.get(k) not in (None, "")}
    if not isinstance(options, dict) or len(options) < 2:
        raise Skip(f"missing_field:{name['options']}")
    options = {str(k).strip().upper(): str(v).strip() for k, v in sorted(options.items())}
    if any(not v for v in options.values()):
        raise Skip("empty_text")
    answer = "".join(sorted(set(re.sub(r"[,，、;；\s]", "", _text(obj, name["answer"]).upper()))))
    if not answer or any(letter not in options for letter in answer):
        raise Skip("answer_not_in_options")
    reply = f"答案：{answer}。" + "；".join(options[a] for a in answer)
    explanation = str(obj.get(name["explanation"]) or "").strip()
    if explanation:
        reply += f"\n解析：{explanation}"
    meta = {"answer": answer, "options": options, "multi_answer": len(answer) > 1}
    meta.update({k: obj[k] for k in ("year", "question_type") if obj.get(k) is not None})
    if obj.get(name["category"]) is not None:
        meta["category"] = obj[name["category"]]
    item_id = _id(obj, source, question)
    return [make_record(item_id, "exam", source, _format_split(split, obj, source, item_id, cfg),
                        [{"role": "user", "content": format_exam_question(question, options)},
                         {"role": "assistant", "content": reply}], meta=meta)]


# --- dialogue -----------------------------------------------------------------------------------

def turn_messages(turns: list, role_key: str, text_key: str, roles: dict[str, str]) -> list[dict]:
    """Turns -> chat messages: each turn's role mapped by `roles`, texts stripped, empty turns dropped,
    consecutive turns of one role merged; a system message only first."""
    messages: list[dict] = []
    for turn in turns:
        if not isinstance(turn, dict) or turn.get(role_key) not in roles:
            raise Skip("bad_turn")
        text = turn.get(text_key) or ""
        if not isinstance(text, str):
            raise Skip(f"bad_type:{text_key}")
        role, text = roles[turn[role_key]], text.strip()
        if not text:
            continue
        if role == "system" and messages:
            raise Skip("bad_turn")
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n" + text
        else:
            messages.append({"role": role, "content": text})
    return messages


def dialogue_messages(turns: list) -> list[dict]:
    """A bundled dialogue's turns -> chat messages (turn_messages: patient=user, doctor=assistant), leading doctor
    greetings (no patient context yet) removed."""
    messages = turn_messages(turns, "role", "text", {"patient": "user", "doctor": "assistant"})
    while messages and messages[0]["role"] == "assistant":
        messages = messages[1:]
    return messages


def cut_at_doctor_turn(messages: list[dict], seed: int, item_id: str) -> list[dict]:
    """The dialogue up to a seeded random doctor turn, which becomes the reference (paper 3.2)."""
    doctor_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    k = doctor_turns[int(hash_fraction("cut", str(seed), item_id) * len(doctor_turns))]
    return messages[: k + 1]


def dialogue(obj: dict, source: str, split: str, cfg: DataConfig) -> list[dict]:
    if not isinstance(obj.get("turns"), list):
        raise Skip("missing_field:turns")
    messages = dialogue_messages(obj["turns"])
    if not any(m["role"] == "assistant" for m in messages):
        raise Skip("no_doctor_reply")
    item_id = _id(obj, source, *(m["content"] for m in messages))
    meta = {k: obj[k] for k in ("department", "sub_department") if obj.get(k)}
    return dialogue_records(messages, item_id, source, _split(split, obj), cfg, meta)


def dialogue_records(messages: list[dict], item_id: str, source: str, split: str, cfg: DataConfig,
                     meta: dict) -> list[dict]:
    """A dialogue's records: whole for training; cut at a seeded doctor turn for evaluation (test) and, for a
    share of the valid ones, as PPO prompts (rl)."""
    if split == "test":
        cut = cut_at_doctor_turn(messages, cfg.seed, item_id)
        meta["cut_turn"] = len(cut) - 1
        return [make_record(item_id, "dialogue", source, "test", cut, meta=meta)]
    records = [make_record(item_id, "dialogue", source, split, messages, meta=meta)]
    if split == "valid" and hash_fraction("rl", str(cfg.seed), item_id) < cfg.rl_dialogue_fraction:
        cut = cut_at_doctor_turn(messages, cfg.seed, item_id)
        records.append(make_record(item_id + "-rl", "dialogue", source, "rl", cut, meta=meta))
    return records


def safety(obj: dict, source: str, split: str, cfg: DataConfig) -> list[dict]:
    messages = dialogue_messages(obj.get("turns") or [])
    if len(messages) < 2:
        raise Skip("no_doctor_reply")
    return [make_record(_id(obj, source, messages[0]["content"]), "safety", source, _split(split, obj),
                        messages[:2])]


# --- diagnosis ----------------------------------------------------------------------------------

def _diagnosis_record(obj, source, split, notes: str, diagnosis: str, group: str, reply: str | None = None):
    item_id = _id(obj, source, notes)
    messages = [{"role": "user", "content": f"{notes}\n{DIAGNOSIS_INSTRUCTION}"},
                {"role": "assistant", "content": reply or f"诊断：{diagnosis}"}]
    return make_record(item_id, "diagnosis", source, split, messages,
                       meta={"diagnosis": diagnosis, "disease_group": group})


def _holdout_split(split: str, obj: dict, source: str, cfg: DataConfig) -> str:
    """Sources without a test split get one by a seeded hash of the record id."""
    if split:
        return split
    key = str(obj.get("id") or obj.get("consult_id") or "")
    return "test" if hash_fraction("holdout", str(cfg.seed), source, key) < cfg.holdout_fraction else "train"


def diagnosis_dxy(obj: dict, source: str, split: str, cfg: DataConfig) -> list[dict]:
    report, diagnosis = _text(obj, "self_report"), _text(obj, "diagnosis")
    symptoms = {**(obj.get("explicit_symptoms") or {}), **(obj.get("implicit_symptoms") or {})}
    findings = "、".join(f"{name}（{'有' if present else '无'}）" for name, present in symptoms.items())
    notes = f"主诉：{report}" + (f"\n症状：{findings}" if findings else "")
    group = obj.get("disease_group") or "unknown"
    return [_diagnosis_record(obj, source, _holdout_split(split, obj, source, cfg), notes, diagnosis, group)]


def diagnosis_haodf(obj: dict, source: str, split: str, cfg: DataConfig) -> list[dict]:
    record = obj.get("record")
    if not isinstance(record, dict):
        raise Skip("missing_field:record")
    notes = "\n".join(f"{k}：{str(v).strip()}" for k, v in record.items() if v and str(v).strip())
    if not notes:
        raise Skip("empty_text")
    impression = _text(obj, "preliminary_impression")
    group = str(record.get("疾病") or "unknown").strip()
    return [_diagnosis_record(obj, source, _split(split, obj), notes, impression, group)]


def diagnosis_cmb_clin(obj: dict, source: str, split: str, cfg: DataConfig) -> list[dict]:
    title, notes = _text(obj, "title"), _text(obj, "record")
    index = obj.get("diagnosis_qa_index")
    qa = obj.get("qa") or []
    if index is None or not (0 <= index < len(qa)):
        raise Skip("no_diagnosis_question")
    group, _, diagnosis = title.partition("-")
    group = group.replace("案例分析", "").strip() or "unknown"
    question, answer = str(qa[index].get("question", "")).strip(), str(qa[index].get("answer", "")).strip()
    if not question or not answer:
        raise Skip("empty_text")
    rec = _diagnosis_record(obj, source, split or "test", notes, diagnosis.strip() or title, group, reply=answer)
    rec["messages"][0]["content"] = f"{notes}\n{question}"
    return [rec]


# --- preference ---------------------------------------------------------------------------------

# Template leaks that identify a model (README caveat: MING answers start with "Helper：" and lose
# 89% of pairs); stripped so the reward model cannot learn the tag instead of the content.
LEAKED_PREFIXES = ("Helper：", "Helper:", "helper：", "helper:")


def _strip_leaks(text: str) -> str:
    for prefix in LEAKED_PREFIXES:
        if text.startswith(prefix):
            return text[len(prefix):].lstrip()
    return text


def _conversation(value, name: str) -> list[dict]:
    """A preference field as chat messages: a string is one message (an assistant reply), a list is messages."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": value.strip()}] if value.strip() else []
    if isinstance(value, list):
        return turn_messages(value, "role", "content", CHAT_ROLES)
    raise Skip(f"missing_field:{name}" if value is None else f"bad_type:{name}")


def preference(obj: dict, source: str, split: str, cfg: DataConfig, task: str = "preference",
               fields: dict | None = None, weak: bool = False) -> list[dict]:
    """Preference pairs: `prompt`, `chosen`, `rejected`, each a string or a list of chat messages; chosen and
    rejected may be whole conversations ending in the reply (their shared opening is then the prompt). The
    prompt is one user message: the reward model scores single-turn prompts, others are skipped as multi_turn_prompt."""
    name = {k: (fields or {}).get(k, k) for k in ("prompt", "chosen", "rejected")}
    chosen, rejected = (_conversation(obj.get(name[k]), name[k]) for k in ("chosen", "rejected"))
    if not chosen or not rejected or chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise Skip("empty_text")
    prompt = obj.get(name["prompt"])
    prompt = [{"role": "user", "content": prompt.strip()}] if isinstance(prompt, str) else \
        turn_messages(prompt, "role", "content", CHAT_ROLES) if isinstance(prompt, list) else chosen[:-1]
    if chosen[:-1] not in ([], prompt) or rejected[:-1] not in ([], prompt):
        raise Skip("prompts_differ")
    if not prompt or prompt[-1]["role"] != "user" or not prompt[-1]["content"]:
        raise Skip(f"missing_field:{name['prompt']}")
    if len(prompt) > 1:
        raise Skip("multi_turn_prompt")
    chosen, rejected = _strip_leaks(chosen[-1]["content"]), _strip_leaks(rejected[-1]["content"])
    if not chosen or not rejected:
        raise Skip("empty_text")
    if chosen == rejected:
        raise Skip("identical_pair")
    raw_meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
    meta = {"subset": obj.get("source", "") if isinstance(obj.get("source"), str) else "", "weak_label": weak,
            "model_chosen": raw_meta.get("model_chosen"), "model_rejected": raw_meta.get("model_rejected")}
    item_id = _id(obj, source, prompt[-1]["content"], chosen, rejected)
    return [make_record(item_id, "preference", source, _format_split(split, obj, source, item_id, cfg),
                        [prompt[-1], {"role": "assistant", "content": chosen}], rejected=rejected, meta=meta)]


def ranked(obj: dict, source: str, split: str, cfg: DataConfig, task: str = "preference",
           fields: dict | None = None) -> list[dict]:
    """Ranked responses (the paper's reward-model data: rankings of K answers): `prompt`, a string or one user
    message; `responses`, K strings best first, or in any order with `scores` (higher is better; equal scores make
    no pair). Every pair of differently ranked responses is a preference record; a prompt's pairs share its split
    and, as `group` in meta, its reward-model half, sampling and weight (each prompt counts once: InstructGPT)."""
    name = {k: (fields or {}).get(k, k) for k in ("prompt", "responses", "scores")}
    prompt = obj.get(name["prompt"])
    if isinstance(prompt, list):
        messages = turn_messages(prompt, "role", "content", CHAT_ROLES)
        if len(messages) != 1 or messages[0]["role"] != "user":
            raise Skip("multi_turn_prompt")
        prompt = messages[0]["content"]
    if not isinstance(prompt, str) or not prompt.strip():
        raise Skip(f"missing_field:{name['prompt']}" if not prompt else f"bad_type:{name['prompt']}")
    responses = obj.get(name["responses"])
    if not isinstance(responses, list) or len(responses) < 2 or not all(isinstance(r, str) for r in responses):
        raise Skip(f"missing_field:{name['responses']}" if responses is None else f"bad_type:{name['responses']}")
    responses = [_strip_leaks(r.strip()) for r in responses]
    if not all(responses):
        raise Skip("empty_text")
    scores = obj.get(name["scores"])
    if scores is None:
        scores = [-rank for rank in range(len(responses))]
    elif not isinstance(scores, list) or len(scores) != len(responses) or \
            not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in scores):
        raise Skip(f"bad_type:{name['scores']}")
    pairs = [(i, j) for i in range(len(responses)) for j in range(len(responses))
             if scores[i] > scores[j] and responses[i] != responses[j]]
    if not pairs:
        raise Skip("no_ranked_pair")
    item_id = _id(obj, source, prompt.strip(), *responses)
    split = _format_split(split, obj, source, item_id, cfg)
    meta = {"subset": "", "weak_label": False, "group": item_id, "group_pairs": len(pairs)}
    return [make_record(f"{item_id}-{i}-{j}", "preference", source, split,
                        [{"role": "user", "content": prompt.strip()}, {"role": "assistant", "content": responses[i]}],
                        rejected=responses[j], meta=meta) for i, j in pairs]


# --- the ecosystem's formats: a user's own data -------------------------------------------------------

CHAT_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def _format_split(split: str, obj: dict, source: str, item_id: str, cfg: DataConfig) -> str:
    """The spec's split, else the record's own, else test for a seeded data.holdout_fraction of the items."""
    if split or obj.get("split"):
        return _split(split, obj)
    return "test" if hash_fraction("holdout", str(cfg.seed), source, item_id) < cfg.holdout_fraction else "train"


def _turns(obj: dict, fields: dict, key: str, role_key: str, text_key: str, roles: dict[str, str]) -> list[dict]:
    """The record's list of turns (under its mapped field names) as chat messages (turn_messages)."""
    key, role_key, text_key = (fields.get(k, k) for k in (key, role_key, text_key))
    if not isinstance(obj.get(key), list):
        raise Skip(f"missing_field:{key}")
    return turn_messages(obj[key], role_key, text_key, roles)


def _chat_records(messages: list[dict], obj: dict, source: str, split: str, cfg: DataConfig,
                  task: str) -> list[dict]:
    """A user's chat as records of `task`: trailing turns after the last assistant reply dropped (nothing to learn
    from them)."""
    while messages and messages[-1]["role"] != "assistant":
        messages = messages[:-1]
    if not any(m["role"] == "user" for m in messages):
        raise Skip("no_assistant_reply" if not messages else "no_user_turn")
    item_id = _id(obj, source, *(m["content"] for m in messages))
    split = _format_split(split, obj, source, item_id, cfg)
    if task == "dialogue":
        return dialogue_records(messages, item_id, source, split, cfg, {})
    return [make_record(item_id, task, source, split, messages)]


def chat(obj: dict, source: str, split: str, cfg: DataConfig, task: str, fields: dict) -> list[dict]:
    """OpenAI chat: `messages`, each {`role`: system|user|assistant, `content`}; trains on every assistant turn."""
    messages = _turns(obj, fields, "messages", "role", "content", CHAT_ROLES)
    return _chat_records(messages, obj, source, split, cfg, task)


def sharegpt(obj: dict, source: str, split: str, cfg: DataConfig, task: str, fields: dict) -> list[dict]:
    """ShareGPT: `conversations`, each {`from`: system|human|gpt, `value`}."""
    messages = _turns(obj, fields, "conversations", "from", "value", SHAREGPT_ROLES)
    return _chat_records(messages, obj, source, split, cfg, task)


def alpaca(obj: dict, source: str, split: str, cfg: DataConfig, task: str, fields: dict) -> list[dict]:
    """Alpaca: `instruction`, optional `input` (appended to it on a new line), `output`."""
    name = {k: fields.get(k, k) for k in ("instruction", "input", "output")}
    instruction, output = _text(obj, name["instruction"]), _text(obj, name["output"])
    extra = obj.get(name["input"]) or ""
    if not isinstance(extra, str):
        raise Skip(f"bad_type:{name['input']}")
    user = instruction + ("\n" + extra.strip() if extra.strip() else "")
    return _chat_records([{"role": "user", "content": user}, {"role": "assistant", "content": output}],
                         obj, source, split, cfg, task)


def text(obj: dict, source: str, split: str, cfg: DataConfig, task: str, fields: dict) -> list[dict]:
    """Plain documents for domain pretraining: `text`. Training split only; a document longer than
    data.max_record_chars is cut at line breaks into several records. Each is kept as one user message, so that
    the test-overlap key (its opening characters) applies to it too."""
    body, limit = _text(obj, fields.get("text", "text")), cfg.max_record_chars
    lines = [line[i:i + limit] for line in body.splitlines(keepends=True) for i in range(0, len(line), limit)]
    pieces = [""]
    for line in lines:
        if len(pieces[-1]) + len(line) > limit:
            pieces.append("")
        pieces[-1] += line
    pieces = [p.strip() for p in pieces if p.strip()]
    item_id = _id(obj, source, body)
    return [make_record(item_id if len(pieces) == 1 else f"{item_id}-{i}", "text", source, "train",
                        [{"role": "user", "content": p}]) for i, p in enumerate(pieces)]


def diagnosis(obj: dict, source: str, split: str, cfg: DataConfig, task: str, fields: dict) -> list[dict]:
    """Diagnosis records: the notes in `record`, a string or an object of named note fields (`fields: {record:
    主诉,现病史}` takes them from several fields), `diagnosis`, optional `disease_group`."""
    names = fields.get("record", "record").split(",")
    notes = {n: obj.get(n) for n in names} if len(names) > 1 else obj.get(names[0])
    if isinstance(notes, dict):
        notes = "\n".join(f"{k}：{str(v).strip()}" for k, v in notes.items() if v is not None and str(v).strip())
    elif not isinstance(notes, str):
        raise Skip(f"missing_field:{names[0]}" if notes is None else f"bad_type:{names[0]}")
    if not notes.strip():
        raise Skip("empty_text")
    label = _text(obj, fields.get("diagnosis", "diagnosis"))
    group = str(obj.get(fields.get("disease_group", "disease_group")) or "unknown").strip()
    split = _format_split(split, obj, source, _id(obj, source, notes.strip()), cfg)
    return [_diagnosis_record(obj, source, split, notes.strip(), label, group)]


# Format -> (builder, the tasks its records may be: what they train (train, valid) or evaluate (test)).
FORMATS: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "chat": (chat, ("dialogue", "community_qa")),
    "sharegpt": (sharegpt, ("dialogue", "community_qa")),
    "alpaca": (alpaca, ("dialogue", "community_qa")),
    "text": (text, ("text",)),
    "exam": (exam, ("exam",)),
    "diagnosis": (diagnosis, ("diagnosis",)),
    "preference": (preference, ("preference",)),
    "ranked": (ranked, ("preference",)),
}

# The bundled corpora that no format reads as they are.
BUILDERS: dict[str, Callable] = {
    "kg_xywy": _kg("xywy"),
    "kg_health39": _kg("health39"),
    "community_qa": community_qa,
    "dialogue": dialogue,
    "safety": safety,
    "diagnosis_dxy": diagnosis_dxy,
    "diagnosis_haodf": diagnosis_haodf,
    "diagnosis_cmb_clin": diagnosis_cmb_clin,
    "preference_weak": partial(preference, weak=True),
}


def builder_for(spec: SourceSpec) -> Callable:
    """The builder of a source, (obj, source, split, cfg) -> records: its bundled corpus's, or its format's for
    the spec's task (needed where a format's records may be of several) and field names. A ValueError says what is
    wrong with the spec."""
    if spec.kind in BUILDERS:
        return BUILDERS[spec.kind]
    if spec.kind not in FORMATS:
        raise ValueError(f"unknown kind {spec.kind!r} (formats: {', '.join(FORMATS)}; corpora: {', '.join(BUILDERS)})")
    build, tasks = FORMATS[spec.kind]
    task = spec.task or (tasks[0] if len(tasks) == 1 else "")
    if task not in tasks:
        raise ValueError(f"kind {spec.kind} needs a task, one of {', '.join(tasks)} (got {spec.task!r})")
    return partial(build, task=task, fields=spec.fields)


def may_hold_test(kind: str, split: str) -> bool:
    """Whether a source's records may land in the test split (their keys are collected before any
    training record is written, so that no test question leaks into training)."""
    return split in ("", "test") and not kind.startswith("kg_") and kind != "text"
