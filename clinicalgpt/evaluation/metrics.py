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

# --- medical conversation -----------------------------------------------------------------------


def char_tokens(text: str) -> list[str]:
    return [c for c in text if not c.isspace()]


class _CharTokenizer:
    """rouge-score's tokenizer interface, over characters (its default keeps only [a-z0-9] words)."""

    def tokenize(self, text: str) -> list[str]:
        return char_tokens(text)


def conversation_scores(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """Corpus BLEU-1..4 (cumulative, sacrebleu, 0-100), corpus GLEU (nltk, 0-100) and mean ROUGE-1/2/L
    F1 (rouge-score, 0-100) of model replies against the real doctor turns."""
    from nltk.translate.gleu_score import corpus_gleu
    from rouge_score.rouge_scorer import RougeScorer
    from sacrebleu.metrics import BLEU
    hyp_chars = [char_tokens(h) for h in hypotheses]
    ref_chars = [char_tokens(r) for r in references]
    joined_h, joined_r = [" ".join(h) for h in hyp_chars], [" ".join(r) for r in ref_chars]
    scores = {f"bleu{n}": BLEU(tokenize="none", max_ngram_order=n).corpus_score(joined_h, [joined_r]).score
              for n in (1, 2, 3, 4)}
    scores["gleu"] = 100 * corpus_gleu([[r] for r in ref_chars], hyp_chars)
    rouge = RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=_CharTokenizer())
    per_item = [rouge.score(r, h) for h, r in zip(hypotheses, references)]
    for kind in ("rouge1", "rouge2", "rougeL"):
        scores[kind] = 100 * sum(s[kind].fmeasure for s in per_item) / max(1, len(per_item))
    return scores


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


# Exam categories: the paper's groups (and the others the data supports), matched on the clinical
# departments that the knowledge graphs give for the diseases a question names. Checked in order.
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
# Questions about law and ethics or drugs name no disease; their own words place them.
KEYWORD_GROUPS = [
    ("Medical ethics and law", ("伦理", "法律", "法规", "条例", "卫生行政", "执业", "医疗事故", "知情同意", "医德")),
    ("Pharmacology", ("药理", "作用机制", "不良反应", "药物的", "首选药", "禁忌证")),
]
UNCATEGORIZED = "Other"


class ExamCategorizer:
    """Question -> category, reproducibly: a label file's entry if given (a JSON object, item id ->
    category), else the keyword groups, else the most common department group of the KG diseases named
    in the question and its options."""

    def __init__(self, disease_departments: dict[str, set[str]], labels: dict[str, str] | None = None):
        self.labels = labels or {}
        self.disease_groups = {}
        for disease, departments in disease_departments.items():
            groups = {g for d in departments for g, keys in DEPARTMENT_GROUPS if any(k in d for k in keys)}
            if len(disease) >= 2 and groups:
                self.disease_groups[disease] = groups
        self.longest = max((len(d) for d in self.disease_groups), default=0)

    @classmethod
    def from_kg(cls, kg_files: list[Path], label_file: str = "") -> "ExamCategorizer":
        departments: dict[str, set[str]] = {}
        for path in kg_files:
            with open(path, encoding="utf-8") as f:
                for line in f:
                    row = json.loads(line)
                    if row.get("p") in ("belongs_to_department", "department_is"):
                        departments.setdefault(row["s"], set()).update(row["o"])
        labels = json.loads(Path(label_file).read_text(encoding="utf-8")) if label_file else {}
        return cls(departments, labels)

    def diseases_in(self, text: str) -> list[str]:
        """KG disease names in the text, longest first, none inside another found name."""
        found, taken = [], [False] * len(text)
        for size in range(min(self.longest, len(text)), 1, -1):
            for start in range(len(text) - size + 1):
                if not any(taken[start:start + size]) and text[start:start + size] in self.disease_groups:
                    found.append(text[start:start + size])
                    taken[start:start + size] = [True] * size
        return found

    def category(self, item_id: str, question: str) -> str:
        if item_id in self.labels:
            return self.labels[item_id]
        for group, keys in KEYWORD_GROUPS:
            if any(k in question for k in keys):
                return group
        votes = Counter(g for d in self.diseases_in(question) for g in self.disease_groups[d])
        if not votes:
            return UNCATEGORIZED
        order = [g for g, _ in DEPARTMENT_GROUPS]
        return min(votes, key=lambda g: (-votes[g], order.index(g)))


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
