"""De-identification (data.deidentify): typed placeholders for each kind of detail, worked by hand, and the recall
and precision targets measured as scripts/deidentify_eval.py measures them, on real record text."""

import importlib.util

import pytest

from clinicalgpt.deidentify import deidentify, deidentify_value
from conftest import REPO

spec = importlib.util.spec_from_file_location("deidentify_eval", REPO / "scripts" / "deidentify_eval.py")
evaluation = importlib.util.module_from_spec(spec)
spec.loader.exec_module(evaluation)


@pytest.mark.parametrize("text, expected, kinds", [
    ("身份证号110105199003071237，", "身份证号[身份证号]，", {"id_number": 1}),  # checksum 7 (GB 11643), by hand
    ("证件 １１０１０５ １９９００３０７ １２３７", "证件 [身份证号]", {"id_number": 1}),  # full-width, spaces inside
    ("旧证110105900307123", "旧证[身份证号]", {"id_number": 1}),  # 15 digits, born 1990-03-07
    ("编号123456789012345678", "编号123456789012345678", {}),  # 18 digits, bad checksum, no birth date: kept
    ("手机138-1234-5678或+86 139 1234 5678", "手机[电话]或[电话]", {"phone": 2}),
    ("座机(010)62751234", "座机[电话]", {"phone": 1}),
    ("发至 zhang.san@163.com 谢谢", "发至 [邮箱] 谢谢", {"email": 1}),
    ("住院号：ZY20230012，门诊号１２３４５６", "住院号：[病历号]，门诊号[病历号]", {"record_number": 2}),
    ("姓名：欧阳明华，男", "姓名：[姓名]，男", {"name": 1}),
    ("患者王小明，45岁；患者出现发热，患者高龄。", "患者[姓名]，45岁；患者出现发热，患者高龄。", {"name": 1}),
    ("刘某某昨日来诊，张先生您好", "[姓名]昨日来诊，[姓名]您好", {"name": 2}),
    ("出生日期：一九九〇年三月七日，生日1990-03-07", "出生日期：[出生日期]，生日[出生日期]", {"birth_date": 2}),
    ("家住武汉市武昌区中南路12号，咳嗽三天", "家住[地址]，咳嗽三天", {"address": 1}),
    ("家住的那么远，居住地、也没有", "家住的那么远，居住地、也没有", {}),  # no place word: not an address
])
def test_each_kind_becomes_its_placeholder(text, expected, kinds):
    out, counts = deidentify(text)
    assert out == expected and dict(counts) == kinds


def test_every_string_of_a_record_and_every_field_named_for_a_detail_is_deidentified():
    from collections import Counter
    counts = Counter()
    record = {"姓名": "乔木", "联系电话": 13812345678, "messages": [{"role": "user", "content": "我的电话13812345678"}],
              "age": 45, "出生日期": ""}
    assert deidentify_value(record, counts) == {"姓名": "[姓名]", "联系电话": "[电话]", "messages": [
        {"role": "user", "content": "我的电话[电话]"}], "age": 45, "出生日期": ""}
    assert counts == {"name": 1, "phone": 2}


def test_recall_and_precision_meet_their_targets_on_real_record_text(data_root):
    texts = evaluation.corpus_texts(data_root)
    result = evaluation.measure(texts, per_variant=40, seed=1)
    for kind, k in result["kinds"].items():
        assert k["recall"] >= k["recall_target"], (kind, k)
        assert k["precision"] >= evaluation.PRECISION_TARGET, (kind, k)
    # The stated limit: a rare single-character surname after 患者 (no marker of a name only) is often missed.
    rare = next(r for r in result["variants"] if r["variant"] == "rare surname, 患者")
    assert rare["recall"] < 1
