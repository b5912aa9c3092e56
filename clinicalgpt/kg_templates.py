"""Knowledge-graph triples -> QA pairs with templates (the paper's cMedQA-KG, Appendix B).

Each relation kind has a family of question phrasings and one answer pattern, in Chinese and English.
The phrasing and the language are picked per (graph, subject, relation) by a seeded hash, so a rebuild
gives the same pairs. Inverse families ask from the object's side (symptom -> diseases, drug ->
indications, check -> diseases) and are built after grouping triples by object.
"""

from __future__ import annotations

from .records import hash_fraction

# Relation names of both graphs mapped to one relation kind.
RELATION_KIND = {
    "has_symptom": "symptom",
    "need_check": "check",
    "has_complication": "complication",
    "treat_way": "treatment",
    "treatment": "treatment",
    "common_drug": "drug",
    "has_drug": "drug",
    "belongs_to_department": "department",
    "department_is": "department",
    "good_food": "good_food",
    "avoid_food": "avoid_food",
    "recommand_recipes": "recipe",
    "alias_is": "alias",
    "part_is": "body_part",
    "susceptible_people": "susceptible",
    "infectious": "infectious",
    "transmission_way": "transmission",
    "medical_insurance": "insurance",
    "treat_cycle": "treat_cycle",
    "cure_rate": "cure_rate",
    "cure_prob": "cure_rate",
    "treat_cost": "cost",
    "disease_ratio": "prevalence",
}

# kind -> (zh questions, zh answer, en questions, en answer). {s}: subject, {o}: joined objects.
TEMPLATES: dict[str, tuple[list[str], str, list[str], str]] = {
    "symptom": (
        ["{s}有哪些症状？", "{s}的典型表现是什么？", "得了{s}会出现什么症状？", "{s}患者一般有哪些临床表现？"],
        "{s}的常见症状和表现包括{o}。",
        ["What are the symptoms of {s}?", "What are the typical manifestations of {s}?",
         "What symptoms does a patient with {s} usually have?"],
        "Common symptoms and manifestations of {s} include {o}.",
    ),
    "check": (
        ["诊断{s}需要做哪些检查？", "怀疑{s}应该做什么检查？", "{s}要查什么项目？"],
        "诊断{s}通常需要做以下检查：{o}。",
        ["Which tests are needed to diagnose {s}?", "What examinations should be done if {s} is suspected?"],
        "Diagnosing {s} usually involves the following tests: {o}.",
    ),
    "complication": (
        ["{s}可能引起哪些并发症？", "{s}会伴随哪些疾病？", "{s}有什么并发症？"],
        "{s}可能伴发的疾病和并发症有{o}。",
        ["What complications can {s} cause?", "Which diseases can accompany {s}?"],
        "Possible complications and accompanying diseases of {s} include {o}.",
    ),
    "treatment": (
        ["{s}怎么治疗？", "{s}有哪些治疗方法？", "得了{s}该如何治疗？"],
        "{s}的治疗方式包括{o}。",
        ["How is {s} treated?", "What are the treatment options for {s}?"],
        "Treatment options for {s} include {o}.",
    ),
    "drug": (
        ["{s}常用什么药？", "治疗{s}可以用哪些药物？", "{s}吃什么药好？"],
        "治疗{s}的常用药物有{o}。请在医生指导下用药。",
        ["Which drugs are commonly used for {s}?", "What medication can treat {s}?"],
        "Drugs commonly used for {s} include {o}. Take them under a doctor's guidance.",
    ),
    "department": (
        ["{s}应该挂哪个科？", "{s}属于哪个科室？", "得了{s}去医院看什么科？"],
        "{s}属于{o}，建议到相应科室就诊。",
        ["Which department treats {s}?", "Which clinic should a patient with {s} visit?"],
        "{s} is treated by {o}.",
    ),
    "good_food": (
        ["{s}患者宜吃什么？", "{s}病人适合吃哪些食物？"],
        "{s}患者宜吃的食物有{o}。",
        ["What foods are recommended for patients with {s}?"],
        "Foods recommended for patients with {s} include {o}.",
    ),
    "avoid_food": (
        ["{s}患者忌吃什么？", "{s}病人不能吃哪些食物？"],
        "{s}患者应避免的食物有{o}。",
        ["What foods should patients with {s} avoid?"],
        "Patients with {s} should avoid {o}.",
    ),
    "recipe": (
        ["{s}患者有哪些推荐食谱？", "{s}病人可以做什么食疗？"],
        "适合{s}患者的食谱有{o}。",
        ["Which recipes are recommended for patients with {s}?"],
        "Recipes suited to patients with {s} include {o}.",
    ),
    "alias": (
        ["{s}又叫什么？", "{s}还有哪些别名？"],
        "{s}又称{o}。",
        ["What other names does {s} have?"],
        "{s} is also known as {o}.",
    ),
    "body_part": (
        ["{s}的发病部位在哪里？", "{s}主要影响身体哪个部位？"],
        "{s}的发病部位是{o}。",
        ["Which part of the body does {s} affect?"],
        "{s} affects the {o}.",
    ),
    "susceptible": (
        ["哪些人容易得{s}？", "{s}的易感人群有哪些？"],
        "{s}的易感人群：{o}。",
        ["Who is susceptible to {s}?"],
        "People susceptible to {s}: {o}.",
    ),
    "infectious": (
        ["{s}会传染吗？", "{s}有传染性吗？"],
        "{s}：{o}。",
        ["Is {s} infectious?"],
        "{s}: {o}.",
    ),
    "transmission": (
        ["{s}是怎么传播的？", "{s}的传播途径是什么？"],
        "{s}的传播途径：{o}。",
        ["How is {s} transmitted?"],
        "Transmission of {s}: {o}.",
    ),
    "insurance": (
        ["{s}属于医保疾病吗？", "{s}能报医保吗？"],
        "{s}是否属于医保疾病：{o}。",
        ["Is {s} covered by medical insurance?"],
        "Medical insurance coverage of {s}: {o}.",
    ),
    "treat_cycle": (
        ["{s}一般要治疗多久？", "{s}的治疗周期是多长？"],
        "{s}的治疗周期一般为{o}。",
        ["How long does treatment of {s} usually take?"],
        "Treatment of {s} usually takes {o}.",
    ),
    "cure_rate": (
        ["{s}的治愈率是多少？", "{s}能治好吗？"],
        "{s}的治愈率约为{o}。",
        ["What is the cure rate of {s}?"],
        "The cure rate of {s} is about {o}.",
    ),
    "cost": (
        ["{s}治疗费用大概多少？", "治{s}要花多少钱？"],
        "{s}的治疗费用：{o}。",
        ["How much does treatment of {s} cost?"],
        "Treatment cost of {s}: {o}.",
    ),
    "prevalence": (
        ["{s}的患病比例是多少？", "{s}常见吗？"],
        "{s}的患病比例约为{o}。",
        ["How common is {s}?"],
        "The prevalence of {s} is about {o}.",
    ),
}

# Inverse families: asked about an object (symptom, drug, check); the answer lists subjects (diseases).
INVERSE_TEMPLATES: dict[str, tuple[list[str], str, list[str], str]] = {
    "symptom": (
        ["出现{s}可能是什么病？", "{s}是哪些疾病的表现？", "哪些疾病会引起{s}？"],
        "{s}可见于以下疾病：{o}。需要结合其他症状和检查判断，必要时就医。",
        ["What diseases can cause {s}?", "{s} can be a sign of which diseases?"],
        "{s} can be seen in {o}. Other symptoms and tests are needed to tell them apart.",
    ),
    "drug": (
        ["{s}能治什么病？", "{s}的适应症有哪些？", "{s}主要用于治疗哪些疾病？"],
        "{s}常用于治疗{o}。请遵医嘱使用。",
        ["What is {s} used to treat?", "What are the indications of {s}?"],
        "{s} is commonly used to treat {o}. Use it as prescribed.",
    ),
    "check": (
        ["{s}可以用来诊断哪些疾病？", "什么病需要做{s}？"],
        "{s}常用于以下疾病的诊断：{o}。",
        ["Which diseases is {s} used to diagnose?"],
        "{s} is used in the diagnosis of {o}.",
    ),
}


def clean_objects(objects: list[str]) -> list[str]:
    """Drop empty and truncated ("...") objects, keep order, remove repeats."""
    seen, out = set(), []
    for o in objects:
        o = (o or "").strip()
        if o and not o.endswith("...") and o not in seen:
            seen.add(o)
            out.append(o)
    return out


def join_objects(objects: list[str], lang: str, cap: int) -> str:
    """Join a list naturally ("A、B和C" / "A, B and C"), capped with 等 / "and others"."""
    shown, more = objects[:cap], len(objects) > cap
    if lang == "zh":
        text = shown[0] if len(shown) == 1 else "、".join(shown[:-1]) + "和" + shown[-1]
        return text + ("等" if more else "")
    if more:
        return ", ".join(shown) + " and others"
    return shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + " and " + shown[-1]


def render_qa(kind: str, subject: str, objects: list[str], *, inverse: bool, seed: int, en_fraction: float,
              cap: int) -> tuple[str, str, str]:
    """(question, answer, lang) for one grouped triple, phrasing chosen by a seeded hash."""
    zh_q, zh_a, en_q, en_a = (INVERSE_TEMPLATES if inverse else TEMPLATES)[kind]
    key = (str(seed), kind, subject, "inv" if inverse else "fwd")
    lang = "en" if hash_fraction("lang", *key) < en_fraction else "zh"
    questions, answer = (en_q, en_a) if lang == "en" else (zh_q, zh_a)
    question = questions[int(hash_fraction("phrase", *key) * len(questions))]
    objs = join_objects(objects, lang, cap)
    return question.format(s=subject), answer.format(s=subject, o=objs), lang
