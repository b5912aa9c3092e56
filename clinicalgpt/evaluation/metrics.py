"""The clinical evaluation's metrics: conversation metrics on Chinese characters, exam answer extraction
and categories, diagnosis matching with knowledge-graph synonyms, the pairwise judges' verdicts, and the
health of the answers themselves (empty, cut off, repeating).

Metrics come from well-kept libraries configured for Chinese: every text is split into characters
(whitespace dropped) and handed over as space-separated tokens, so that BLEU (sacrebleu), GLEU (nltk)
and ROUGE (rouge-score) all see the same tokens.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from pathlib import Path

import numpy as np

# --- medical conversation -----------------------------------------------------------------------


def char_tokens(text: str) -> list[str]:
    return [c for c in text if not c.isspace()]


class _CharTokenizer:
    """rouge-score's tokenizer interface, over characters (its default keeps only [a-z0-9] words)."""

    def tokenize(self, text: str) -> list[str]:
        return char_tokens(text)


def conversation_scores(hypotheses: list[str], references: list[str], resamples: int = 0,
                        seed: int = 0) -> dict[str, float | dict]:
    """Corpus BLEU-1..4 (cumulative, sacrebleu, 0-100), corpus GLEU (nltk, 0-100) and mean ROUGE-1/2/L
    F1 (rouge-score, 0-100) of model replies against the real doctor turns; with `resamples`, each one's 95%
    interval under "ci" (bootstrap_interval's)."""
    from nltk.translate.gleu_score import corpus_gleu
    from rouge_score.rouge_scorer import RougeScorer
    from sacrebleu.metrics import BLEU
    hyp_chars = [char_tokens(h) for h in hypotheses]
    ref_chars = [char_tokens(r) for r in references]
    joined_h, joined_r = [" ".join(h) for h in hyp_chars], [" ".join(r) for r in ref_chars]
    scores, ci = {}, {}
    for n in (1, 2, 3, 4):
        bleu = BLEU(tokenize="none", max_ngram_order=n)
        scores[f"bleu{n}"] = bleu.corpus_score(joined_h, [joined_r]).score
        if resamples > 1:
            # The per-reply statistics sacrebleu's own bootstrap resamples (its interval is mean -+ a half-width).
            stats = np.array(bleu._extract_corpus_statistics(joined_h, [joined_r]))
            ci[f"bleu{n}"] = bootstrap_interval(lambda idx: np.array(
                [bleu._compute_score_from_stats(list(stats[i].sum(0))).score for i in idx]), len(stats), resamples, seed)
    scores["gleu"] = 100 * corpus_gleu([[r] for r in ref_chars], hyp_chars)
    rouge = RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=_CharTokenizer())
    per_item = [rouge.score(r, h) for h, r in zip(hypotheses, references)]
    for kind in ("rouge1", "rouge2", "rougeL"):
        values = np.array([100 * s[kind].fmeasure for s in per_item])
        scores[kind] = float(values.mean()) if len(values) else 0.0
        if resamples > 1:
            ci[kind] = bootstrap_interval(lambda idx: values[idx].mean(axis=1), len(values), resamples, seed)
    if resamples > 1:
        # GLEU pools each reply's matching n-grams over the corpus's: a reply's share of both, from nltk's score of
        # the reply alone times its n-gram count (the larger of the reply's and the reference's 1- to 4-grams).
        grams = np.array([max(_gram_count(len(h)), _gram_count(len(r))) for h, r in zip(hyp_chars, ref_chars)])
        matches = np.array([corpus_gleu([[r]], [h]) for h, r in zip(hyp_chars, ref_chars)]) * grams
        ci["gleu"] = bootstrap_interval(lambda idx: 100 * matches[idx].sum(1) / np.maximum(grams[idx].sum(1), 1),
                                        len(grams), resamples, seed)
        scores["ci"] = ci
    return scores


def _gram_count(length: int, longest: int = 4) -> int:
    return sum(max(0, length - n + 1) for n in range(1, longest + 1))


def bootstrap_interval(statistic, n: int, resamples: int, seed: int = 0, level: float = 0.95) -> list[float] | None:
    """The percentile interval of a statistic over `resamples` bootstrap resamples of n items: statistic maps an
    array of (resamples, n) item indices to one value per resample. None without items."""
    if n == 0:
        return None
    indices = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    values = statistic(indices)
    return [float(np.quantile(values, (1 - level) / 2)), float(np.quantile(values, (1 + level) / 2))]


# --- medical exam -------------------------------------------------------------------------------

_LETTERS = "A-H"
_SEPARATORS = r"[\s、,，和及与/]*"
_RUN = rf"((?:[{_LETTERS}]{_SEPARATORS})+)(?![a-zA-Z])"  # letters, not the start of a word ("Asthma")
_MARKED = re.compile(rf"(?:答案|正确答案|正确选项|故选|应选|选项|选择|answer(?: is)?)\s*(?:是|为|应为)?\s*[：:]?\s*{_RUN}",
                     re.IGNORECASE)
_LEADING = re.compile(rf"^\s*[（(]?{_RUN}[)）]?(?:$|[\s。.．、:：;；,，])")


def extract_answer(text: str, options: dict[str, str]) -> str:
    """The option letters a free-text exam reply chooses, sorted ("" when it names none): a marked
    answer ("答案：C", "选项C", "answer is B"), else letters leading the reply ("C", "A、C。..."), else the
    options whose text the reply quotes (the longest quotes win over the options they contain)."""
    text = unicodedata.normalize("NFKC", text)
    for pattern in (_MARKED, _LEADING):
        match = pattern.search(text)
        if match:
            letters = {c.upper() for c in match.group(1) if c.upper() in options}
            if letters:
                return "".join(sorted(letters))
    quoted = [k for k, v in options.items() if v and v in text]
    kept = [k for k in quoted if not any(options[k] != options[o] and options[k] in options[o] for o in quoted)]
    return "".join(sorted(kept))


# Exam categories: the paper's groups and the others the exam's sections make, reproducibly, from what a question
# names. Rules in order: a label the data or a label file gives; in the stem, words that make the question about a
# subject whatever disease it names (law and ethics, preventive medicine, psychology), psychiatric terms, poisoning, a
# patient population (children, pregnancy), trauma, and (unless the stem is a clinical case) basic-science terms; the
# knowledge graphs' departments of the diseases the stem names; pharmacology words, or (unless a case) a drug the
# knowledge graphs name; the diseases the options name; psychiatric terms anywhere; then, for a clinical case, surgical and organ words before the basic sciences' terms, otherwise
# after them. Measured on the MCMLE test questions: docs/exam-categories.md.
DEPARTMENT_GROUPS = [
    ("Respiratory", ("呼吸",)),
    ("Digestive", ("消化", "肝", "胃肠", "肛肠")),
    ("Urinary", ("肾", "泌尿")),
    ("Rheumatic immune", ("风湿", "免疫")),
    ("Hematologic", ("血液",)),
    ("Cardiovascular", ("心内", "心血管", "心胸")),
    ("Endocrine", ("内分泌",)),
    ("Neurology", ("神经",)),
    ("Pediatric", ("儿科", "小儿", "新生儿")),
    ("Obstetrics and gynecology", ("妇", "产科")),
    ("Infectious", ("传染", "感染")),
    ("Oncology", ("肿瘤",)),
    ("Psychiatry", ("精神", "心理")),
    ("Dermatology", ("皮肤", "性病")),
    ("ENT, eye and oral", ("耳鼻", "眼", "口腔", "五官")),
    ("Surgery", ("外科", "骨科")),
]
SUBJECT_GROUPS = [  # in the stem
    ("Medical ethics and law", ("伦理", "法律", "法规", "条例", "《", "规定", "卫生行政", "执业", "医疗事故", "知情同意",
                                "医德", "医患", "医务人员", "医疗机构", "人体实验", "受试者", "医学道德", "患者的权利",
                                "违反", "宣言", "有利原则", "不伤害", "公正原则", "自主原则", "尊重原则", "医生的义务",
                                "医生的权利")),
    ("Preventive medicine", ("流行病学", "流行过程", "流行强度", "疾病预防控制", "发病率", "患病率", "死亡率", "队列研究",
                             "病例对照", "抽样", "统计", "标准差", "标准误", "置信区间", "假设检验", "职业病", "食物中毒",
                             "筛检", "灵敏度", "特异度", "一级预防", "二级预防", "三级预防", "相对危险度", "暴发")),
    ("Medical psychology", ("心理治疗", "心理咨询", "心理防御", "心理应激", "应激", "人格", "医学模式", "心身", "防御机制",
                            "行为疗法", "精神分析", "心理学", "心理评估", "心理测验", "病人角色", "气质", "性格",
                            "心理门诊", "心理活动")),
]
POISONING = ("Poisoning", ("中毒", "农药", "敌百虫", "有机磷", "一氧化碳", "煤气"))
POPULATION_GROUPS = [  # in the stem
    ("Pediatric", ("患儿", "小儿", "婴儿", "新生儿", "男孩", "女孩", "男婴", "女婴", "幼儿", "儿童", "前囟", "乳牙")),
    ("Obstetrics and gynecology", ("妊娠", "孕", "分娩", "产后", "产妇", "胎儿", "胎盘", "月经", "子宫", "卵巢", "阴道",
                                   "宫颈", "绝经", "闭经", "避孕", "流产", "羊水")),
]
PHARMACOLOGY = ("药理", "作用机制", "不良反应", "药物的", "首选药", "禁忌证", "受体", "阻断", "拮抗", "半衰期", "生物利用度",
                "首过", "治疗指数", "抗菌谱", "耐药", "抗生素")
PSYCHIATRIC = ("妄想", "幻觉", "错觉", "强迫", "恐惧", "焦虑", "抑郁", "躁狂", "精神分裂", "癔症", "分离性", "情绪高涨",
               "精神发育", "精神失常")
# A drug's name in the knowledge graphs without its salt and dosage form: "盐酸肾上腺素注射液" -> "肾上腺素".
_DOSAGE_FORM = re.compile(r"(?:肠溶|缓释|控释|分散|泡腾|咀嚼)?(?:片|胶囊|软胶囊|注射液|颗粒|口服液|糖浆|丸|滴眼液|软膏|乳膏|凝胶|散|"
                          r"酊|喷雾剂|栓|混悬液|溶液|气雾剂|贴|膏|合剂|滴丸|粉|针)$")
_SALT = re.compile(r"^(?:注射用|复方|盐酸|硫酸|枸橼酸|马来酸|甲磺酸|磷酸|醋酸|琥珀酸|富马酸|苯磺酸|氢溴酸|酒石酸|乳酸|葡萄糖酸|碳酸)+")
TRAUMA = ("车祸", "外伤", "骨折", "烧伤", "创伤", "摔伤", "刀伤", "撞伤", "骑跨伤", "坠落")
SURGICAL = ("手术", "术后", "切口", "麻醉", "清创", "缝合", "引流", "脱位", "疝", "破裂") + TRAUMA
ORGAN_GROUPS = [  # "肾上腺" is endocrine, not the kidney: Endocrine is checked first
    ("Endocrine", ("甲状腺", "血糖", "胰岛素", "糖尿病", "肾上腺", "垂体")),
    ("Cardiovascular", ("心脏", "心肌", "心电图", "冠状", "心律", "心率", "心动过速", "室速", "房颤", "血压", "心音", "杂音",
                        "心衰", "心包", "动脉")),
    ("Respiratory", ("肺", "呼吸", "气管", "胸腔", "咳嗽", "咳痰")),
    ("Digestive", ("胃", "肠", "肝", "胆", "胰", "食管", "腹泻", "便血", "黄疸")),
    ("Urinary", ("肾", "尿", "膀胱", "前列腺")),
    ("Neurology", ("神经", "脑", "脊髓", "意识", "瘫痪", "抽搐")),
    ("Hematologic", ("贫血", "血红蛋白", "白细胞", "骨髓", "出血")),
]
BASIC_SCIENCES = ("酶", "代谢", "氧化", "核苷酸", "氨基酸", "蛋白质", "嘌呤", "嘧啶", "脂肪酸", "胆固醇", "维生素", "DNA", "RNA",
                  "基因", "转录", "复制", "脂蛋白", "糖原", "糖酵解", "三羧酸", "抗体", "抗原", "补体", "免疫应答", "淋巴细胞",
                  "T细胞", "B细胞", "细胞因子", "超敏反应", "电位", "神经递质", "炎症", "坏死", "肉芽", "化生", "变性", "栓塞",
                  "细菌", "病毒", "芽孢", "革兰", "细胞外液", "渗透压", "酸碱", "凝血", "生理", "正常人")
BASIC = "Basic medical sciences"
# Terms that make a question that is not a clinical case about biochemistry, immunology, microbiology or physiology.
BASIC_SUBJECT = ("酶", "核苷酸", "氨基酸", "嘌呤", "嘧啶", "DNA", "RNA", "转录", "糖酵解", "三羧酸", "抗体", "抗原", "补体",
                 "超敏反应", "T细胞", "B细胞", "细胞因子", "细菌", "病毒", "芽孢", "革兰", "电位", "神经递质", "正常人")
CLINICAL_CASE = re.compile(r"[男女]性?[，,、]?\s*\d+\s*岁|\d+\s*岁[，,]?\s*[男女]|患者|病人")
UNCATEGORIZED = "Other"


def _named(words: tuple[str, ...], text: str) -> bool:
    return any(w in text for w in words)


class ExamCategorizer:
    """Question -> category, reproducibly, by the rules above: a label file's entry (a JSON object, item id ->
    category) or the item's own label first."""

    def __init__(self, disease_departments: dict[str, set[str]], labels: dict[str, str] | None = None,
                 drugs: set[str] = frozenset()):
        self.labels, self.drugs = labels or {}, {d for d in drugs if len(d) >= 3}
        self.disease_groups = {}
        for disease, departments in disease_departments.items():
            groups = {g for d in departments for g, keys in DEPARTMENT_GROUPS if any(k in d for k in keys)}
            if len(disease) >= 2 and groups:
                self.disease_groups[disease] = groups
        self.longest = max((len(d) for d in self.disease_groups), default=0)

    @classmethod
    def from_kg(cls, kg_files: list[Path], label_file: str = "") -> "ExamCategorizer":
        departments: dict[str, set[str]] = {}
        drugs = set()
        for path in kg_files:
            with open(path, encoding="utf-8") as f:
                for line in f:
                    row = json.loads(line)
                    if row.get("p") in ("belongs_to_department", "department_is"):
                        departments.setdefault(row["s"], set()).update(row["o"])
                    elif row.get("p") in ("has_drug", "common_drug"):
                        drugs.update(_SALT.sub("", _DOSAGE_FORM.sub("", re.split(r"[(（]", d)[0])) for d in row["o"])
        labels = json.loads(Path(label_file).read_text(encoding="utf-8")) if label_file else {}
        return cls(departments, labels, drugs)

    def diseases_in(self, text: str) -> list[str]:
        """KG disease names in the text, longest first, none inside another found name."""
        found, taken = [], [False] * len(text)
        for size in range(min(self.longest, len(text)), 1, -1):
            for start in range(len(text) - size + 1):
                if not any(taken[start:start + size]) and text[start:start + size] in self.disease_groups:
                    found.append(text[start:start + size])
                    taken[start:start + size] = [True] * size
        return found

    def department_vote(self, text: str) -> str | None:
        """The group most of the named diseases' departments fall in (ties: the earlier in DEPARTMENT_GROUPS)."""
        votes = Counter(g for d in self.diseases_in(text) for g in self.disease_groups[d])
        order = [g for g, _ in DEPARTMENT_GROUPS]
        return min(votes, key=lambda g: (-votes[g], order.index(g))) if votes else None

    def category(self, item_id: str, stem: str, options: dict[str, str], given: str = "") -> str:
        """The category of a question: its stem (the question without its options) and options."""
        if item_id in self.labels or given:
            return self.labels.get(item_id) or given
        everything, case = stem + "\n" + "\n".join(options.values()), bool(CLINICAL_CASE.search(stem))
        stem_rules = SUBJECT_GROUPS + [("Psychiatry", PSYCHIATRIC), POISONING] + POPULATION_GROUPS + [("Surgery", TRAUMA)]
        for group, words in stem_rules + ([] if case else [(BASIC, BASIC_SUBJECT)]):
            if _named(words, stem):
                return group
        by_stem = self.department_vote(stem)
        if by_stem:
            return by_stem
        if _named(PHARMACOLOGY, stem) or (not case and _named(self.drugs, stem)):
            return "Pharmacology"
        by_options = self.department_vote("\n".join(options.values()))
        if by_options:
            return by_options
        if _named(PSYCHIATRIC, everything):
            return "Psychiatry"
        clinical = [("Surgery", SURGICAL)] + ORGAN_GROUPS
        rules = clinical + [(BASIC, BASIC_SCIENCES)] if case else [(BASIC, BASIC_SCIENCES)] + clinical
        return next((group for group, words in rules if _named(words, everything)), UNCATEGORIZED)


# --- diagnosis ----------------------------------------------------------------------------------

_PUNCT = re.compile(r"[\s\W_]+")
_DIAGNOSIS_SPLIT = re.compile(r"[，,、；;。/]|(?:\s+)|和|及|伴")


def normalize(text: str) -> str:
    return _PUNCT.sub("", unicodedata.normalize("NFKC", text).lower())


def primary_diagnosis(gold: str) -> str:
    """The first diagnosis a gold label lists ("过敏性咳嗽，焦虑抑郁状态" -> "过敏性咳嗽"; "诊断：" dropped)."""
    gold = re.sub(r"^.*?(?:诊断|印象)[为是：:]\s*", "", gold.strip())
    parts = [p for p in _DIAGNOSIS_SPLIT.split(gold) if normalize(p)]
    return parts[0].strip() if parts else gold


def names_diagnosis(answer: str, gold: str, synonyms: dict[str, set[str]]) -> bool:
    """Whether the answer names the gold (primary) diagnosis or one of its KG synonyms (aliases)."""
    target = primary_diagnosis(gold)
    said = normalize(answer)
    return any(name and name in said for name in {normalize(n) for n in {target} | synonyms.get(target, set())})


def synonyms_from_kg(kg_files: list[Path]) -> dict[str, set[str]]:
    """name -> every other name of the same disease (the KG's alias relation, both directions)."""
    groups: dict[str, set[str]] = {}
    for path in kg_files:
        with open(path, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                if row.get("p") == "alias_is":
                    names = {row["s"], *row["o"]}
                    for n in names:
                        groups.setdefault(n, set()).update(names - {n})
    return groups


# --- judged QA and safety -----------------------------------------------------------------------

VERDICT = {1: "win", 0: "tie", -1: "lose"}


def combine_verdicts(first: int, swapped: int) -> int:
    """A judge asked twice, the answers swapped the second time (each verdict from the first system's
    side: 1 better, 0 tie, -1 worse): a win or loss must hold in both orders, else it is a tie."""
    return first if first == swapped else 0


def win_rates(verdicts: list[int]) -> dict[str, float]:
    n = max(1, len(verdicts))
    return {name: sum(v == k for v in verdicts) / n for k, name in VERDICT.items()} | {"items": len(verdicts)}


# --- output health ------------------------------------------------------------------------------

REPEAT_N = 4  # characters per n-gram in the repetition share: a short Chinese phrase
DEGENERATE_REPEAT = 0.5  # an answer whose n-grams repeat more than this is one phrase over and over


def _ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    chars = char_tokens(text)
    return [tuple(chars[i:i + n]) for i in range(len(chars) - n + 1)]


def repeated_share(text: str, n: int = REPEAT_N) -> float:
    """The share of a text's character n-grams (whitespace dropped) that repeat an n-gram before them: 0 when
    none does; 7/12 for "小儿治疗、" three times (12 4-grams, 5 of them distinct)."""
    grams = _ngrams(text, n)
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def distinct_n(texts: list[str], n: int) -> float:
    """distinct-n (Li et al. 2016): the distinct character n-grams of all the texts over their number."""
    grams = [g for t in texts for g in _ngrams(t, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def degenerate(answer: str) -> bool:
    """Empty (or whitespace only), or one phrase over and over: more than DEGENERATE_REPEAT of its n-grams repeat."""
    return not answer.strip() or repeated_share(answer) > DEGENERATE_REPEAT


def output_health(answers: list[str], truncated: list[bool] | None = None,
                  compliant: list[bool] | None = None) -> dict[str, float]:
    """Whether a model's answers are answers at all, as shares of the answers: empty (or whitespace only),
    truncated (cut at the token limit without an EOS, when known), degenerate (degenerate()); the mean repeated
    n-gram share; distinct-1 and -2 over all answers; and compliant, the share in the format the family asks for
    (when given: an exam letter, a named disease)."""
    n = max(1, len(answers))
    repeats = [repeated_share(a) for a in answers]
    health = {"empty": sum(not a.strip() for a in answers) / n,
              "degenerate": sum(map(degenerate, answers)) / n,
              "repeated": sum(repeats) / n, "distinct1": distinct_n(answers, 1), "distinct2": distinct_n(answers, 2)}
    if truncated is not None:
        health["truncated"] = sum(truncated) / n
    if compliant is not None:
        health["compliant"] = sum(compliant) / n
    return health
