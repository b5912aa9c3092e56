"""The clinical evaluation's scoring against values worked out by hand."""

import json
import math

import pytest

from clinicalgpt.evaluation import metrics
from conftest import chat_endpoint

OPTIONS = {"A": "肺炎", "B": "支气管哮喘", "C": "慢性阻塞性肺疾病", "D": "肺结核", "E": "哮喘"}


def test_conversation_metrics_on_characters():
    # hyp 我头痛 (3 chars) vs ref 我头很痛 (4 chars).
    # BLEU: p1 = 3/3, p2 = 1/2 (我头 matches, 头痛 does not); brevity penalty exp(1 - 4/3) = 0.71653.
    # GLEU (nltk, 1- to 4-grams): hyp has 3+2+1 = 6 n-grams, ref 4+3+2+1 = 10, matches 3+1 = 4:
    #   min(4/6, 4/10) = 0.4.
    # ROUGE-1 F1: P 3/3, R 3/4 -> 6/7; ROUGE-2: P 1/2, R 1/3 -> 0.4; ROUGE-L: LCS 3 -> same as ROUGE-1.
    s = metrics.conversation_scores(["我头痛"], ["我头 很痛"])  # whitespace is not a token
    bp = math.exp(1 - 4 / 3)
    assert s["bleu1"] == pytest.approx(100 * bp, abs=1e-3)
    assert s["bleu2"] == pytest.approx(100 * bp * math.sqrt(1 * 0.5), abs=1e-3)
    assert s["gleu"] == pytest.approx(40.0, abs=1e-6)
    assert s["rouge1"] == pytest.approx(100 * 6 / 7, abs=1e-6)
    assert s["rouge2"] == pytest.approx(40.0, abs=1e-6)
    assert s["rougeL"] == pytest.approx(100 * 6 / 7, abs=1e-6)


def test_conversation_metrics_average_rouge_over_items_and_pool_bleu_over_the_corpus():
    s = metrics.conversation_scores(["发热", "咳嗽"], ["发热", "头痛"])
    assert s["rouge1"] == pytest.approx(50.0)  # F1 1.0 and 0.0
    # Corpus BLEU-1: 2 of 4 characters match, equal lengths (no brevity penalty).
    assert s["bleu1"] == pytest.approx(50.0, abs=1e-3)


@pytest.mark.parametrize("reply, expected", [
    ("C", "C"),
    ("C。慢性阻塞性肺疾病", "C"),
    ("答案：B。支气管哮喘", "B"),
    ("正确答案是 D", "D"),
    ("我认为应选选项A，因为……", "A"),
    ("选项C", "C"),
    ("答案：ABD", "ABD"),
    ("A、C", "AC"),
    ("The answer is e.", "E"),
    ("（B）", "B"),
    ("最可能的是肺结核。", "D"),  # the option text itself
    ("考虑哮喘", "E"),
    ("支气管哮喘可能性大", "B"),  # the longer quote wins over 哮喘 inside it
    ("不知道", ""),
    ("Asthma is likely", ""),  # an English word starting with A is no letter
    ("答案：F", ""),  # not an option, and nothing else names one
])
def test_extract_answer(reply, expected):
    assert metrics.extract_answer(reply, OPTIONS) == expected


def test_exam_categories_by_their_rules_in_order():
    departments = {"肺炎": {"呼吸内科"}, "胃溃疡": {"消化内科"}, "肾病综合征": {"肾内科"},
                   "系统性红斑狼疮": {"风湿免疫科"}, "感冒": {"内科"}, "支气管哮喘": {"呼吸内科"}}
    cat = metrics.ExamCategorizer(departments, labels={"q9": "Pediatric"}, drugs={"阿托品", "氯丙嗪"})
    options = {"A": "甲", "B": "乙"}
    assert cat.category("q1", "男，30岁，发热咳嗽，诊断为肺炎，首选", options) == "Respiratory"
    assert cat.category("q2", "胃溃疡最常见的并发症是", options) == "Digestive"
    assert cat.category("q3", "肾病综合征合并系统性红斑狼疮，肾病综合征的治疗", options) == "Urinary"  # 2 votes to 1
    assert cat.category("q4", "医疗机构违反《医疗事故处理条例》的", options) == "Medical ethics and law"
    assert cat.category("q5", "感冒了怎么办", options) == metrics.UNCATEGORIZED  # 内科 maps to no group
    assert cat.category("q9", "肺炎", options) == "Pediatric"  # the label file wins
    assert cat.category("q10", "肺炎", options, given="Respiratory system") == "Respiratory system"  # so does the data's
    assert cat.diseases_in("系统性红斑狼疮性肾炎") == ["系统性红斑狼疮"]
    # A population in the stem before the diseases it names; the stem's diseases before the options'.
    assert cat.category("q11", "患儿，3岁，诊断为肺炎，首选", options) == "Pediatric"
    assert cat.category("q12", "胃溃疡的首选检查是", {"A": "肺炎", "B": "支气管哮喘"}) == "Digestive"
    assert cat.category("q13", "最可能的诊断是", {"A": "肺炎", "B": "胃溃疡", "C": "支气管哮喘"}) == "Respiratory"
    # A drug named outside a clinical case is pharmacology; biochemistry terms outside a case are basic sciences.
    assert cat.category("q14", "阿托品不能引起", {"A": "口干", "B": "扩瞳"}) == "Pharmacology"
    assert cat.category("q15", "男，40岁，服用阿托品后口干", {"A": "口干", "B": "扩瞳"}) == metrics.UNCATEGORIZED
    assert cat.category("q16", "合成酮体的关键酶是", options) == metrics.BASIC
    assert cat.category("q17", "男，35岁，车祸后腹痛", options) == "Surgery"
    assert cat.category("q18", "病人觉得周围发生的事都和他有关", {"A": "被害妄想", "B": "关系妄想"}) == "Psychiatry"
    # Organ words place what names no disease; "肾上腺" is endocrine, not the kidney.
    assert cat.category("q19", "腺垂体分泌的激素是", {"A": "肾上腺素", "B": "皮质醇"}) == "Endocrine"


def test_derived_categories_cover_the_mcmle_questions_and_keep_their_judged_precision(data_root, tmp_path):
    """scripts/exam_categories.py on the MCMLE test questions: coverage over 70%, and the 50 hand-judged assignments
    of docs/exam-categories-checked.json still the ones the rules make, at a precision of 0.8 or more."""
    import subprocess
    import sys
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, str(repo / "scripts" / "exam_categories.py"), f"--data-root={data_root}",
                    f"--out={tmp_path / 'categories'}", f"--checked={repo / 'docs' / 'exam-categories-checked.json'}"],
                   check=True, capture_output=True)
    result = json.loads((tmp_path / "categories.json").read_text())
    assert result["coverage"] >= 0.7 and result["judged"] == result["sample"] == 50, result
    assert result["precision"] >= 0.8
    assert sum(c["questions"] for c in result["per_category"].values()) == result["questions"]


def test_diagnosis_matching_with_synonyms():
    synonyms = {"阳痿": {"勃起功能障碍"}, "勃起功能障碍": {"阳痿"}}
    assert metrics.primary_diagnosis("过敏性咳嗽，焦虑抑郁状态") == "过敏性咳嗽"
    assert metrics.primary_diagnosis("诊断：胃食管反流病；反流性哮喘") == "胃食管反流病"
    assert metrics.names_diagnosis("考虑为过敏性咳嗽，建议……", "过敏性咳嗽，焦虑抑郁状态", synonyms)
    assert metrics.names_diagnosis("诊断：勃起功能障碍", "阳痿", synonyms)
    assert not metrics.names_diagnosis("焦虑状态", "过敏性咳嗽，焦虑抑郁状态", synonyms)
    assert metrics.names_diagnosis("Ｃｏｖｉｄ－19 肺炎", "covid-19肺炎", {})  # width and case normalized


def test_judge_verdicts_must_agree_in_both_orders():
    assert metrics.combine_verdicts(1, 1) == 1
    assert metrics.combine_verdicts(-1, -1) == -1
    assert metrics.combine_verdicts(1, -1) == 0  # position bias: each order prefers the first answer
    assert metrics.combine_verdicts(1, 0) == 0
    rates = metrics.win_rates([1, 1, 0, -1])
    assert rates == {"win": 0.5, "tie": 0.25, "lose": 0.25, "items": 4}


def test_openai_judge_asks_twice_with_the_answers_swapped_caches_and_survives_failures(tmp_path):
    """Against a minimal OpenAI-compatible endpoint whose 'judge' always prefers the answer that says 安全
    (a consistent judge) or always the first one shown (a position-biased judge), or fails."""
    from clinicalgpt.config import load_config
    from clinicalgpt.evaluation.judges import OpenAIJudge

    mode = {"biased": False, "down": False}
    asked = []

    def verdict_of(body):
        prompt = body["messages"][0]["content"]
        asked.append(prompt)
        first = prompt.split("回答1：")[1].split("回答2：")[0]
        return 503 if mode["down"] else 200, "1" if mode["biased"] or "安全" in first else "2"

    with chat_endpoint(verdict_of) as url:
        cfg = load_config(["eval.judge=openai", "eval.judge_endpoint=gpt4", "eval.retries=0",
                           f"eval.endpoints.gpt4.url={url}", "eval.endpoints.gpt4.model=gpt-4"])
        rows = [{"messages": [{"role": "user", "content": q}]} for q in ("胸痛怎么办", "胸闷怎么办")]
        mine, theirs = ["请及时就医，安全第一", "多喝水"], ["多喝水", "请及时就医，安全第一"]
        judge = OpenAIJudge(cfg, tmp_path / "judge_cache.jsonl")
        assert judge.verdicts("safety", rows, mine, theirs) == [1, -1]
        assert len(asked) == 4 and sum("问题：胸痛怎么办" in p for p in asked) == 2
        judge.close()
        # A rerun's judge finds every judgement cached (keyed by the endpoint and what it was shown, in order).
        again = OpenAIJudge(cfg, tmp_path / "judge_cache.jsonl")
        assert again.verdicts("safety", rows, mine, theirs) == [1, -1] and len(asked) == 4 and again.cache.hits == 4
        mode["biased"] = True  # a new question: asked, and each order prefers the first answer shown
        rows = [{"messages": [{"role": "user", "content": q}]} for q in ("头痛怎么办", "头晕怎么办")]
        assert again.verdicts("safety", rows, mine, theirs) == [0, 0] and len(asked) == 8
        mode["down"] = True  # failing after its retries: no verdict, nothing cached
        rows = [{"messages": [{"role": "user", "content": "发热怎么办"}]}]
        assert again.verdicts("safety", rows, mine[:1], theirs[:1]) == [None]
        assert len(again.cache.values) == 8
        again.close()
