"""Recall and precision of the de-identification rules (data.deidentify, clinicalgpt/deidentify.py) on real record
text from the corpora under the data root (diagnosis records and dialogues).

Recall: details of every kind, in the variants hospital text holds, including ones the rules were not written
against (full-width digits, spaces and dashes inside numbers, 15-digit and bad-checksum IDs, dates in Chinese
numerals, names without a marker, rarer surnames), planted one per text at a sentence boundary; a detail is caught
when the replaced spans cover it. Precision, per kind: the details caught over every replacement of the kind in the
planted texts, where a replacement outside the planted detail counts as a false positive even if it is a real detail
of the corpus (they are listed for review). Writes <out>.md and <out>.json.

    .venv/bin/python scripts/deidentify_eval.py [--data-root DIR] [--per-variant 100] [--out docs/deidentification]
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import sys
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clinicalgpt.config import load_config  # noqa: E402
from clinicalgpt.deidentify import detail_spans  # noqa: E402

TEXT_FILES = ["ehr_diagnosis/cmb_clin.jsonl", "ehr_diagnosis/covid_dialogue_impressions.jsonl",
              "ehr_diagnosis/dxy_train.jsonl", "dialogue/cmdd_train.jsonl", "dialogue/covid_dialogue_zh_train.jsonl"]
STRUCTURED = ("id_number", "phone", "email", "record_number", "birth_date", "address")
TARGETS = {**{k: 0.98 for k in STRUCTURED}, "name": 0.9}
PRECISION_TARGET = 0.95

REGIONS = ["110105", "310104", "440305", "420106", "510107", "330106", "370202", "210203"]
COMMON_SURNAMES = "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董"
RARE_SURNAMES = ["欧阳", "司马", "上官", "诸葛", "乔", "岳", "祁", "阎", "庞", "康"]  # outside the rules' list
GIVEN = "伟芳娜秀英敏静丽强磊军洋勇艳杰娟涛明超秀兰霞平刚桂英华建国志红玉兰海燕"
CN_DIGITS = "〇一二三四五六七八九"
CITIES = [("北京市", "海淀区", "中关村大街"), ("上海市", "浦东新区", "张江路"), ("广东省深圳市", "南山区", "科技园路"),
          ("湖北省武汉市", "武昌区", "中南路"), ("四川省成都市", "武侯区", "人民南路")]


def full_width(s: str) -> str:
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in s)


def id18(rng: random.Random, bad_checksum: bool = False) -> str:
    born = datetime.date(1940, 1, 1) + datetime.timedelta(days=rng.randrange(25000))
    body = rng.choice(REGIONS) + born.strftime("%Y%m%d") + f"{rng.randrange(1000):03d}"
    weights = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2]
    check = "10X98765432"[sum(int(d) * w for d, w in zip(body, weights)) % 11]
    if bad_checksum:
        check = rng.choice([c for c in "0123456789" if c != check])
    return body + check


def mobile(rng: random.Random) -> str:
    return "1" + rng.choice("3456789") + "".join(rng.choice("0123456789") for _ in range(9))


def cn_date(d: datetime.date) -> str:
    def number(n: int) -> str:  # 1-31 in Chinese numerals
        tens, ones = divmod(n, 10)
        return CN_DIGITS[n] if n < 10 else ("" if tens == 1 else CN_DIGITS[tens]) + "十" + (CN_DIGITS[ones] if ones else "")
    return "".join(CN_DIGITS[int(c)] for c in str(d.year)) + f"年{number(d.month)}月{number(d.day)}日"


def birth(rng: random.Random) -> datetime.date:
    return datetime.date(1940, 1, 1) + datetime.timedelta(days=rng.randrange(25000))


def name(rng: random.Random) -> str:
    return rng.choice(COMMON_SURNAMES) + "".join(rng.choice(GIVEN) for _ in range(rng.choice((1, 2))))


def address(rng: random.Random) -> str:
    city, district, road = rng.choice(CITIES)
    return f"{city}{district}{road}{rng.randrange(1, 999)}号" + rng.choice(["", f"{rng.randrange(1, 30)}栋{rng.randrange(1, 6)}单元"])


def grouped(digits: str, cuts: tuple[int, ...], sep: str) -> str:
    """The digits with `sep` at each cut: grouped("13812345678", (3, 7), "-") == "138-1234-5678"."""
    bounds = (0, *cuts, len(digits))
    return sep.join(digits[a:b] for a, b in zip(bounds, bounds[1:]))


def ymd(d: datetime.date) -> str:
    return f"{d.year}年{d.month}月{d.day}日"


# kind -> variant -> (the snippet to plant, {} where the detail goes; rng -> the detail)
VARIANTS: dict[str, dict] = {
    "id_number": {
        "18 digits": ("身份证号{}", id18),
        "no marker": ("证件{}已登记", id18),
        "full-width": ("身份证：{}", lambda r: full_width(id18(r))),
        "spaces inside": ("身份证号 {}", lambda r: grouped(id18(r), (6, 14), " ")),
        "dashes inside": ("身份证号{}", lambda r: grouped(id18(r), (6, 14), "-")),
        "15 digits (old)": ("身份证号{}", lambda r: (lambda s: s[:6] + s[8:17])(id18(r))),
        "bad checksum": ("身份证号{}", lambda r: id18(r, bad_checksum=True)),
    },
    "phone": {
        "mobile": ("电话{}", mobile),
        "+86": ("联系方式{}", lambda r: "+86 " + mobile(r)),
        "dashes 3-4-4": ("手机{}", lambda r: grouped(mobile(r), (3, 7), "-")),
        "spaces 3-4-4": ("手机 {}", lambda r: grouped(mobile(r), (3, 7), " ")),
        "full-width": ("电话：{}", lambda r: full_width(mobile(r))),
        "landline": ("座机{}", lambda r: f"0{r.randrange(10, 999)}-{r.randrange(2, 9)}{r.randrange(10**6, 10**7)}"),
        "landline (area)": ("电话{}", lambda r: f"(0{r.randrange(10, 99)}){r.randrange(2, 9)}{r.randrange(10**6, 10**7)}"),
    },
    "email": {
        "plain": ("邮箱{}", lambda r: f"patient{r.randrange(10**5)}@163.com"),
        "dotted": ("请发至 {} 谢谢", lambda r: f"zhang.san+{r.randrange(99)}@hospital.org.cn"),
    },
    "record_number": {
        "病案号 digits": ("病案号：{}", lambda r: str(r.randrange(10**5, 10**8))),
        "住院号 letters": ("住院号 {}", lambda r: f"ZY{r.randrange(10**7, 10**8)}"),
        "门诊号 full-width": ("门诊号{}", lambda r: full_width(str(r.randrange(10**6, 10**9)))),
        "就诊卡号 dash": ("就诊卡号:{}", lambda r: f"A-{r.randrange(10**5, 10**6)}"),
    },
    "name": {
        "姓名：": ("姓名：{}", name),
        "患者 (marker)": ("患者{}，", name),
        "患儿 (marker)": ("患儿{}，", name),
        "X某 (no marker)": ("{}昨日来诊", lambda r: r.choice(COMMON_SURNAMES) + r.choice(["某", "某某"])),
        "X先生/女士 (no marker)": ("{}您好", lambda r: r.choice(COMMON_SURNAMES) + r.choice(["先生", "女士"])),
        "rare surname, 姓名：": ("姓名：{}", lambda r: r.choice(RARE_SURNAMES) + r.choice(GIVEN)),
        "rare surname, 患者": ("患者{}，", lambda r: r.choice(RARE_SURNAMES) + r.choice(GIVEN)),
    },
    "birth_date": {
        "出生日期 年月日": ("出生日期：{}", lambda r: ymd(birth(r))),
        "出生于 dashes": ("出生于{}", lambda r: birth(r).isoformat()),
        "生日 Chinese numerals": ("生日：{}", lambda r: cn_date(birth(r))),
        "出生年月 slashes": ("出生年月：{}", lambda r: birth(r).strftime("%Y/%m/%d")),
        "出生 8 digits": ("出生：{}", lambda r: birth(r).strftime("%Y%m%d")),
    },
    "address": {
        "住址：": ("住址：{}", address),
        "家住": ("家住{}", address),
        "现住址": ("现住址:{}", address),
    },
}


def corpus_texts(data_root: Path) -> list[str]:
    """Every line's strings, joined: what the rules see of a record."""
    def strings(v):
        if isinstance(v, str):
            yield v
        elif isinstance(v, (list, dict)):
            for x in (v.values() if isinstance(v, dict) else v):
                yield from strings(x)
    texts = []
    for f in TEXT_FILES:
        for line in open(data_root / f, encoding="utf-8"):
            text = "\n".join(strings(json.loads(line)))
            if len(text) >= 20:
                texts.append(text)
    return texts


def plant(text: str, snippet: str, rng: random.Random) -> tuple[str, int]:
    """The text with the snippet inserted at a sentence boundary, and where the snippet starts."""
    bounds = [0] + [i + 1 for i, c in enumerate(text) if c in "。！？\n"]
    at = rng.choice(bounds)
    return text[:at] + snippet + "。" + text[at:], at


def measure(texts: list[str], per_variant: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    rows, by_kind = [], defaultdict(Counter)
    for kind, variants in VARIANTS.items():
        for variant, (template, make) in variants.items():
            caught = 0
            for _ in range(per_variant):
                detail = make(rng)
                planted, at = plant(rng.choice(texts), template.format(detail), rng)
                start = at + template.index("{}")
                end = start + len(detail)
                spans = detail_spans(planted)
                covered = {i for s, e, _ in spans for i in range(s, e)}
                hit = all(i in covered for i in range(start, end) if planted[i] not in " -")
                caught += hit
                by_kind[kind]["planted"] += 1
                by_kind[kind]["caught"] += hit
                for s, e, k in spans:  # replacements outside the planted detail
                    if e <= start or s >= end:
                        by_kind[k]["elsewhere"] += 1
                    elif k == kind:
                        by_kind[k]["on_detail"] += 1
            rows.append({"kind": kind, "variant": variant, "planted": per_variant, "recall": caught / per_variant})
    kinds = {}
    for kind, c in by_kind.items():
        precision = c["on_detail"] / max(1, c["on_detail"] + c["elsewhere"])
        kinds[kind] = {"planted": c["planted"], "recall": c["caught"] / max(1, c["planted"]),
                       "replaced_elsewhere": c["elsewhere"], "precision": precision, "recall_target": TARGETS[kind]}
    return {"kinds": kinds, "variants": rows}


def unplanted(texts: list[str]) -> list[dict]:
    """Every replacement in the real texts as they are: a false positive or a real detail of the corpus."""
    found = []
    for text in texts:
        for s, e, k in detail_spans(text):
            found.append({"kind": k, "text": text[s:e], "context": text[max(0, s - 10):e + 6].replace("\n", " ")})
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default="", help="the corpora (default: data.root, $CLINICALGPT_DATA_ROOT)")
    ap.add_argument("--per-variant", type=int, default=100)
    ap.add_argument("--out", default="docs/deidentification")
    args = ap.parse_args()
    data_root = Path(args.data_root) if args.data_root else load_config([]).data_root
    texts = corpus_texts(data_root)
    result = {**measure(texts, args.per_variant), "texts": len(texts), "chars": sum(map(len, texts)),
              "unplanted": unplanted(texts), "date": datetime.date.today().isoformat(),
              "command": "python scripts/deidentify_eval.py " + " ".join(sys.argv[1:])}
    Path(args.out + ".json").write_text(json.dumps(result, ensure_ascii=False, indent=2))
    lines = ["# De-identification: recall and precision on real record text", "",
             f"Generated {result['date']} by `{result['command']}` from {len(texts):,} texts "
             f"({result['chars']:,} characters) of {', '.join(TEXT_FILES)}. Rules: `clinicalgpt/deidentify.py`; "
             f"what they are and what they miss: [data.md](data.md#de-identification).", "",
             "## Per kind", "", "| kind | planted | recall | target | replaced elsewhere | precision |",
             "|---|---|---|---|---|---|"]
    for kind, k in result["kinds"].items():
        lines.append(f"| {kind} | {k['planted']} | {k['recall']:.3f} | >= {k['recall_target']} | "
                     f"{k['replaced_elsewhere']} | {k['precision']:.3f} |")
    lines += ["", f"Precision target >= {PRECISION_TARGET}; it counts every replacement outside the planted detail "
              "as a false positive, the corpus's own details too (listed below).", "",
              "## Per variant", "", "| kind | variant | recall |", "|---|---|---|"]
    lines += [f"| {r['kind']} | {r['variant']} | {r['recall']:.2f} |" for r in result["variants"]]
    lines += ["", f"## What the rules replace in the corpus text with nothing planted ({len(result['unplanted'])})", "",
              "| kind | replaced | context |", "|---|---|---|"]
    lines += [f"| {u['kind']} | {u['text']} | {u['context']} |" for u in result["unplanted"]]
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:8 + len(result["kinds"])]))


if __name__ == "__main__":
    main()
