"""The bias family's keying and direction, proven with scripted candidates whose attitudes are known, answering
through the endpoint path (an OpenAI-compatible server in the test); the answers' chunked store (reused after a
crash, torn lines skipped, failed requests retried or dropped and counted); bootstrap intervals by hand."""

import json
import threading

import numpy as np
import pytest

from clinicalgpt.config import load_config
from clinicalgpt.evaluation import bias, metrics
from clinicalgpt.evaluation.items import AnswerStore, Candidate, answer, load_items
from clinicalgpt.evaluation.run import drop_failed
from clinicalgpt.evaluation.scoring import score_bias_family, score_judged
from conftest import chat_endpoint

STATEMENTS = {i["statement"]: i for i in map(json.loads, bias.BUNDLED_ITEMS.read_text(encoding="utf-8").splitlines())}
STATEMENTS_BY_ID = {i["id"]: s for s, i in STATEMENTS.items()}
KNOWN = {"mental_illness": 5, "hiv": 1, "hepatitis_b": 4, "disability": 2, "old_age": 3, "rural_migrants": 5,
         "gender": 4}  # the scripted candidate's attitude toward each group


def scripted_reply(prompt: str, mode: str) -> str:
    """What a candidate with the KNOWN attitudes says (in varied formats), or one that agrees with everything;
    it refuses every clinicians'-colleagues item."""
    item = STATEMENTS[prompt.split("说法：")[1].split("\n")[0]]
    if mode == "acquiescent":
        return "5 非常同意"
    if item["dimension"] == "colleagues":
        return "作为AI，我无法表态。"
    point = KNOWN[item["group"]] if item["keying"] == "reverse" else 6 - KNOWN[item["group"]]
    return [f"{point}", f"我选{point}。", f"{point}（{bias.SCALE[point]}）", bias.SCALE[point]][len(prompt) % 4]


@pytest.fixture
def endpoint():
    """A scripted OpenAI-compatible chat endpoint: state["mode"] picks the candidate, state["fail"] statements it
    answers with a 500 (state["fail_once"]: only the first time); every request is counted."""
    state = {"mode": "known", "fail": set(), "fail_once": set(), "requests": 0}
    lock = threading.Lock()

    def answer(body):
        prompt = body["messages"][-1]["content"]
        with lock:
            state["requests"] += 1
            once = next((s for s in state["fail_once"] if s in prompt), None)
            state["fail_once"].discard(once)
        if once or any(s in prompt for s in state["fail"]):
            return 500, "scripted failure"
        return 200, scripted_reply(prompt, state["mode"])

    with chat_endpoint(answer) as url:
        yield url, state


def eval_cfg(url, tmp_path, *extra):
    return load_config([f"run_root={tmp_path}", "eval.families=[bias]", "eval.endpoints.scripted.url=" + url,
                        "eval.endpoints.scripted.model=scripted", "eval.models=[scripted]", "eval.chunk_items=16",
                        "eval.retries=1", *extra])


def no_engines():
    raise AssertionError("an endpoint candidate starts no engine")


def test_bias_scores_recover_a_scripted_candidates_known_attitudes(endpoint, tmp_path):
    url, state = endpoint
    cfg = eval_cfg(url, tmp_path)
    items = load_items(cfg)
    assert len(items["bias"]) == 84 and {r["meta"]["keying"] for r in items["bias"]} == {"forward", "reverse"}
    candidate = Candidate("scripted", endpoint=cfg.eval.endpoints["scripted"])
    store = AnswerStore(tmp_path / "items.jsonl")
    answers, reused = answer(cfg, candidate, items, store, no_engines)
    result, rows = score_bias_family(cfg, items["bias"], answers["bias"])
    generated = result["generated"]
    # Every group's mean is the attitude the candidate holds, whichever way its items are keyed (colleagues refused).
    assert generated["per_group"] == pytest.approx({g: float(a) for g, a in KNOWN.items()})
    assert generated["mean"] == pytest.approx(np.mean(list(KNOWN.values())))
    assert generated["spread"] == 4 and generated["consistency"] == 1.0 and generated["pairs"] == 35
    assert generated["refusals"] == pytest.approx(14 / 84) and generated["parsed"] == pytest.approx(70 / 84)
    assert "colleagues" not in generated["per_dimension"] and "likelihood" not in result  # an endpoint has none
    assert generated["ci"]["mean"][0] < generated["mean"] < generated["ci"]["mean"][1]
    assert reused == 0 and state["requests"] == 84

    # One that agrees with everything: 1 on each forward item, 5 on each reverse one; no pair consistent.
    state["mode"] = "acquiescent"
    fresh = AnswerStore(tmp_path / "acquiescent.jsonl")
    result, _ = score_bias_family(cfg, items["bias"], answer(cfg, candidate, items, fresh, no_engines)[0]["bias"])
    assert result["generated"]["mean"] == 3.0 and result["generated"]["consistency"] == 0.0
    assert result["generated"]["modal_point"] == [5, 1.0]  # a response set, not an attitude

    # Rerun on the first store, as after a crash that tore its last line: every whole chunk reused, nothing asked.
    store.close()
    with open(tmp_path / "items.jsonl", "a") as f:
        f.write('{"chunk": "torn')
    state["mode"], asked = "known", state["requests"]
    again = AnswerStore(tmp_path / "items.jsonl")
    assert again.torn == 1
    rerun, reused = answer(cfg, candidate, items, again, no_engines)
    assert reused == 84 and state["requests"] == asked and rerun == answers


def test_endpoint_errors_are_retried_then_dropped_for_every_candidate_and_asked_again(endpoint, tmp_path):
    url, state = endpoint
    cfg = eval_cfg(url, tmp_path)
    items = load_items(cfg)
    statements = [STATEMENTS_BY_ID[r["id"]] for r in items["bias"][:3]]
    state["fail_once"] = {statements[0]}  # a transient error: the client's retry answers it
    state["fail"] = {statements[1], statements[2]}  # fails every time
    candidate = Candidate("scripted", endpoint=cfg.eval.endpoints["scripted"])
    store = AnswerStore(tmp_path / "items.jsonl")
    answers, _ = answer(cfg, candidate, items, store, no_engines)
    assert state["requests"] == 84 + 1 + 2 * cfg.eval.retries  # the transient one once more, the failing ones twice
    errors = [a for a in answers["bias"] if "error" in a]
    assert len(errors) == 2 and all("InternalServerError" in a["error"] for a in errors)
    # The chunk with the failures is not saved: a rerun asks it again. The others are.
    assert len(store.chunks) == 84 // 16
    dropped = drop_failed(items, {"scripted": answers, "other": {"bias": [dict(a) for a in answers["bias"]]}})
    assert dropped == {"bias": {"endpoint error (scripted)": 2, "endpoint error (other)": 2}}
    assert len(items["bias"]) == 82 and len(answers["bias"]) == 82


@pytest.mark.parametrize("reply, read", [
    ("4", 4), ("4 同意", 4), ("我选2。", 2), ("5（非常同意）", 5), ("非常不同意", 1), ("我不同意这个说法", 2),
    ("完全同意", 5), ("不确定", 3), ("同意", 4), ("１", 1),  # full-width digits are normalized
    ("作为AI，我无法表态。", "refusal"), ("这个问题因人而异", "unparsed"), ("10", "unparsed"), ("2.5", "unparsed"),
])
def test_reading_a_scale_answer(reply, read):
    assert bias.read_answer(reply) == read


def test_attitude_keying_likelihood_and_pair_consistency_by_hand():
    assert bias.attitude(5, "forward") == 1 and bias.attitude(5, "reverse") == 5 and bias.attitude(2, "forward") == 4
    assert bias.likeliest_point({"1": -3.0, "2": -1.5, "3": -0.7, "4": -2.0, "5": -4.0}) == 3
    item = lambda group, dim, keying: {"meta": {"group": group, "dimension": dim, "keying": keying,  # noqa: E731
                                                "pair": f"{group}.{dim}"}}
    items = [item("hiv", "benevolence", "forward"), item("hiv", "benevolence", "reverse"),
             item("gender", "benevolence", "forward"), item("gender", "benevolence", "reverse")]
    # hiv: 2 and 4 (two points apart: inconsistent); gender: 5 and 4 (consistent).
    summary = bias.attitude_summary(items, [2, 4, 5, 4])
    assert summary["per_group"] == {"gender": 4.5, "hiv": 3.0} and summary["spread"] == 1.5
    assert summary["mean"] == 3.75 and summary["consistency"] == 0.5 and summary["pairs"] == 2
    assert bias.attitude_summary(items, [2, None, 5, 4])["pairs"] == 1  # a pair needs both sides scored


def test_an_items_file_with_an_unpaired_or_unkeyed_item_is_refused(tmp_path):
    rows = [{"id": "a", "group": "g", "dimension": "d", "keying": "forward", "pair": "p", "statement": "s"}]
    (tmp_path / "one.jsonl").write_text(json.dumps(rows[0]))
    with pytest.raises(SystemExit, match="one forward and one reverse"):
        bias.load_bias_items(str(tmp_path / "one.jsonl"))
    (tmp_path / "bad.jsonl").write_text(json.dumps({**rows[0], "keying": "sideways"}))
    with pytest.raises(SystemExit, match="keying"):
        bias.load_bias_items(str(tmp_path / "bad.jsonl"))


def test_bootstrap_intervals():
    constant = metrics.bootstrap_interval(lambda idx: np.full(len(idx), 7.0), 10, 100)
    assert constant == [7.0, 7.0]
    values = np.array([0, 1] * 50, dtype=float)
    low, high = metrics.bootstrap_interval(lambda idx: values[idx].mean(1), 100, 2000, seed=1)
    # The mean of 100 fair coin flips: standard error 0.05, so about 0.5 -+ 1.96 * 0.05.
    assert low == pytest.approx(0.402, abs=0.02) and high == pytest.approx(0.598, abs=0.02)
    assert metrics.bootstrap_interval(lambda idx: values[idx].mean(1), 100, 2000, seed=1) == [low, high]
    assert metrics.bootstrap_interval(np.mean, 0, 10) is None
    cfg = load_config(["eval.bootstrap=500"])
    judged = score_judged(cfg, [1, 1, 0, -1, None])
    assert judged["win"] == 0.5 and judged["judge_failed"] == 1 and judged["items"] == 4
    assert judged["ci"]["win"][0] < 0.5 < judged["ci"]["win"][1]


def test_conversation_intervals_pool_gleu_over_the_resampled_corpus():
    scores = metrics.conversation_scores(["我头痛", "发热三天", "咳嗽"], ["我头很痛", "发热两天", "咳嗽有痰"], 200)
    for key in ("bleu1", "bleu4", "gleu", "rouge1", "rougeL"):
        low, high = scores["ci"][key]
        assert low <= scores[key] + 1e-9 and scores[key] <= high + 1e-9, key
