"""The clinical evaluation's scoring against values worked out by hand."""

import math

import pytest

from clinicalgpt.evaluation import metrics

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


def test_exam_categories_from_kg_departments_keywords_and_label_file():
    departments = {"肺炎": {"呼吸内科"}, "胃溃疡": {"消化内科"}, "肾病综合征": {"肾内科"},
                   "系统性红斑狼疮": {"风湿免疫科"}, "感冒": {"内科"}}
    cat = metrics.ExamCategorizer(departments, labels={"q9": "Pediatric"})
    assert cat.category("q1", "男，30岁，发热咳嗽，诊断为肺炎，首选") == "Respiratory"
    assert cat.category("q2", "胃溃疡最常见的并发症是") == "Digestive"
    assert cat.category("q3", "肾病综合征合并系统性红斑狼疮，肾病综合征的治疗") == "Urinary"  # 2 votes to 1
    assert cat.category("q4", "医疗机构违反《医疗事故处理条例》的") == "Medical ethics and law"
    assert cat.category("q5", "感冒了怎么办") == metrics.UNCATEGORIZED  # 内科 maps to no group
    assert cat.category("q9", "肺炎") == "Pediatric"  # the label file wins
    assert cat.diseases_in("系统性红斑狼疮性肾炎") == ["系统性红斑狼疮"]


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


def test_openai_judge_asks_twice_with_the_answers_swapped():
    """Against a minimal OpenAI-compatible endpoint whose 'judge' always prefers the answer that says 安全
    (a consistent judge) or always the first one shown (a position-biased judge)."""
    import json as _json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from clinicalgpt.config import load_config
    from clinicalgpt.evaluation.judges import OpenAIJudge

    biased = {"on": False}
    asked = []

    class Endpoint(BaseHTTPRequestHandler):
        def do_POST(self):
            body = _json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            prompt = body["messages"][0]["content"]
            asked.append(prompt)
            first = prompt.split("回答1：")[1].split("回答2：")[0]
            verdict = "1" if biased["on"] or "安全" in first else "2"
            reply = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                     "choices": [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": verdict}}]}
            data = _json.dumps(reply).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Endpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cfg = load_config(["eval.judge=openai", f"eval.judge_url=http://127.0.0.1:{server.server_port}/v1"])
        judge = OpenAIJudge(cfg)
        rows = [{"messages": [{"role": "user", "content": "胸痛怎么办"}]}] * 2
        assert judge.verdicts("safety", rows, ["请及时就医，安全第一", "多喝水"], ["多喝水", "请及时就医，安全第一"]) == [1, -1]
        assert len(asked) == 4 and all("问题：胸痛怎么办" in p for p in asked)
        biased["on"] = True
        assert judge.verdicts("safety", rows, ["请及时就医，安全第一", "多喝水"], ["多喝水", "请及时就医，安全第一"]) == [0, 0]
        judge.close()
    finally:
        server.shutdown()
