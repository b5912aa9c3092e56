"""De-identification (data.deidentify): protected health details in the source rows replaced by typed
placeholders before anything is written, counted per kind.

Rules, not a model: resident ID numbers (18 digits with a valid checksum or birth date, 15-digit old ones),
phone numbers, e-mail addresses, record numbers after their markers (病案号, 住院号, 门诊号 ...), names after
markers (姓名, 患者 ...) and as 张某 / 王先生, dates of birth after markers (in digits or Chinese numerals) and
addresses after markers; in a structured record, the whole value of a field named for one of these (姓名, 电话,
住址 ...). Digits may be full-width and have spaces or dashes inside. Recall and precision, and what they miss:
docs/deidentification.md (scripts/deidentify_eval.py) and docs/data.md.
"""

from __future__ import annotations

import re
from collections import Counter

PLACEHOLDERS = {"id_number": "[身份证号]", "phone": "[电话]", "email": "[邮箱]", "record_number": "[病历号]",
                "name": "[姓名]", "birth_date": "[出生日期]", "address": "[地址]"}

# Full-width ASCII (Ａ-ｚ, ０-９, －, ：...) read as ASCII; one character for one, so spans stay where they were.
_HALF_WIDTH = {c: c - 0xFEE0 for c in range(0xFF01, 0xFF5F)} | {0x3000: 0x20}

_SEP = r"[ \-]?"  # a space or dash inside a number


def _digits(n: int, last: str = r"\d") -> str:
    """n digits with an optional separator between any two (the last may be another class)."""
    return r"\d" + (_SEP + r"\d") * (n - 2) + _SEP + last


_ID18 = re.compile(r"(?<![\dA-Za-z])" + _digits(18, r"[\dXx]") + r"(?![\dA-Za-z])")
_ID15 = re.compile(r"(?<![\dA-Za-z])" + _digits(15) + r"(?![\dA-Za-z])")
_MOBILE = re.compile(r"(?<![\dA-Za-z])(?:\+?86" + _SEP + r")?1[3-9]\d(?:" + _SEP + r"\d){8}(?![\dA-Za-z])")
_LANDLINE = re.compile(r"(?<![\dA-Za-z])(?:\(0\d{2,3}\)|0\d{2,3})" + _SEP + r"[2-9]\d{2,3}" + _SEP + r"\d{4}(?!\d)")
# Tried only where a run of address characters starts: from inside one it is the same match, found again after a
# scan to the run's end (a 200,000-letter line took 42 s).
_EMAIL = re.compile(r"(?<![A-Za-z0-9._%+\-])[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}")
_AFTER = r"\s*(?:[:：是为]\s*)?"  # between a marker and its value
_RECORD = re.compile(r"(?:病案号|住院号|门诊号|病历号|就诊号|登记号|住院号码|病案号码|门诊号码|就诊卡号|医保卡号|ID号)"
                     + _AFTER + r"([A-Za-z0-9][A-Za-z0-9\- ]{2,22}[A-Za-z0-9])")
_CN_NUM = "〇零一二三四五六七八九十"
_DATE = (r"(?:\d{4}\s*[年\-/.]\s*\d{1,2}\s*[月\-/.]\s*\d{1,2}\s*[日号]?"
         r"|[" + _CN_NUM + r"]{4}年[" + _CN_NUM + r"]{1,2}月[" + _CN_NUM + r"]{1,3}[日号]"
         r"|\d{8}(?!\d))")
_BIRTH = re.compile(r"(?:出生日期|出生年月日|出生年月|出生于|生日|出生)" + _AFTER + r"(" + _DATE + r")")
# An address: after its marker, up to punctuation, holding a place word (市, 区, 路, 号 ...).
_ADDRESS = re.compile(r"(?:家庭住址|现住址|住址|地址|家住|现住|户籍地址|居住地)" + _AFTER
                      + r"((?=[^，,。；;、\n\s]*[省市区县镇乡村路街道号弄巷楼室])[^，,。；;、\n\s的]{4,40})")
# Common surnames (the hundred most frequent cover ~85% of people), single-character ones, and compound ones.
_SURNAMES = ("王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘蒋蔡余杜叶程苏魏吕丁任沈"
             "姚卢姜崔钟谭陆汪范金石廖贾夏韦付方白邹孟熊秦邱江尹薛闫段雷侯龙史陶黎贺顾毛郝龚邵万钱严覃武戴莫孔向汤")
_SURNAME = r"(?:欧阳|司马|上官|诸葛|司徒|东方|皇甫|慕容|夏侯|尉迟|令狐|公孙|[" + _SURNAMES + r"])"
_NAME_END = r"(?=[，,。；;：:\s（(、]|$|[男女]|先生|女士)"
# After a marker that only a name follows, any two to four characters; after one that often starts a sentence
# (患者出现...), a known surname.
_NAME_FIELD = re.compile(r"(?:姓名|联系人|签字人|监护人)" + _AFTER + r"([\u4e00-\u9fff]{2,4}?)" + _NAME_END)
_NAME_MARKED = re.compile(r"(?:患者|病人|患儿|病患|家属)" + _AFTER + r"(" + _SURNAME + r"[\u4e00-\u9fff]{1,2}?)" + _NAME_END)
_NAME_HONORIFIC = re.compile(_SURNAME + r"(?:某某|某|先生|女士|小姐|老先生|老太太)")
# Words after 患者 that start with a surname's character and are not names.
_NOT_NAMES = set("某某 先生 女士 小姐 高龄 高热 高烧 高压 高血压 严重 万一 方可 方便 白天 龙胆 毛病 夏天 石头 金属".split())


def _id18_valid(number: str) -> bool:
    """The checksum (GB 11643) or, for a mistyped one, a birth date that can be one."""
    weights = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2]
    check = "10X98765432"[sum(int(d) * w for d, w in zip(number[:17], weights)) % 11]
    return check == number[17].upper() or _birth_date(number[6:14])


def _birth_date(yyyymmdd: str) -> bool:
    return yyyymmdd.isdigit() and 1900 <= int(yyyymmdd[:4]) <= 2030 and 1 <= int(yyyymmdd[4:6]) <= 12 \
        and 1 <= int(yyyymmdd[6:8]) <= 31


def detail_spans(text: str) -> list[tuple[int, int, str]]:
    """(start, end, kind) of every detail found in `text`, overlaps included."""
    text = text.translate(_HALF_WIDTH)
    found = []

    def add(pattern, kind, group=0, keep=lambda s: True):
        for m in pattern.finditer(text):
            if keep(re.sub(r"[ \-]", "", m.group(group))):
                found.append((m.start(group), m.end(group), kind))

    add(_EMAIL, "email")
    add(_ID18, "id_number", keep=_id18_valid)
    add(_ID15, "id_number", keep=lambda s: _birth_date("19" + s[6:12]))
    add(_MOBILE, "phone")
    add(_LANDLINE, "phone")
    add(_RECORD, "record_number", 1, keep=lambda s: any(c.isdigit() for c in s))
    add(_BIRTH, "birth_date", 1)
    add(_ADDRESS, "address", 1)
    add(_NAME_FIELD, "name", 1)
    add(_NAME_MARKED, "name", 1, keep=lambda s: s not in _NOT_NAMES and s[1:] not in _NOT_NAMES)
    add(_NAME_HONORIFIC, "name")
    return found


def deidentify(text: str) -> tuple[str, Counter]:
    """`text` with each detail replaced by its kind's placeholder, and the count per kind. Where details overlap,
    the first and longest wins."""
    spans = sorted(detail_spans(text), key=lambda s: (s[0], -(s[1] - s[0])))
    out, counts, at = [], Counter(), 0
    for start, end, kind in spans:
        if start < at:
            continue
        out += [text[at:start], PLACEHOLDERS[kind]]
        counts[kind] += 1
        at = end
    out.append(text[at:])
    return "".join(out), counts


# A field whose name says what it holds (a CSV's or a record's column): its whole value is that kind of detail.
_FIELD_KINDS = [(re.compile(p, re.I), kind) for p, kind in [
    (r"姓名|^name$|名字", "name"), (r"身份证|id_?card|id_?number", "id_number"), (r"电话|手机|phone|mobile|tel", "phone"),
    (r"邮箱|e-?mail", "email"), (r"病案号|住院号|门诊号|病历号|就诊号|卡号|mrn", "record_number"),
    (r"出生|生日|birth", "birth_date"), (r"住址|地址|address", "address")]]


def _field_kind(key: str) -> str | None:
    return next((kind for pattern, kind in _FIELD_KINDS if pattern.search(key)), None)


def deidentify_value(value, counts: Counter):
    """A parsed JSON value with every string in it de-identified, and the whole value of a field named for a kind of
    detail (姓名, 电话, 住址 ...) replaced; keys kept. Counts are added to `counts`."""
    if isinstance(value, str):
        value, found = deidentify(value)
        counts.update(found)
        return value
    if isinstance(value, list):
        return [deidentify_value(v, counts) for v in value]
    if isinstance(value, dict):
        out = {}
        for key, v in value.items():
            kind = _field_kind(str(key))
            if kind and isinstance(v, (str, int)) and not isinstance(v, bool) and str(v).strip():
                out[key] = PLACEHOLDERS[kind]
                counts[kind] += 1
            else:
                out[key] = deidentify_value(v, counts)
        return out
    return value
