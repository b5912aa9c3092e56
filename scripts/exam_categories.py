"""Coverage and precision of the derived exam categories (ExamCategorizer, clinicalgpt/evaluation/metrics.py) on an
exam file without category labels (by default the MCMLE test questions under the data root).

Coverage: the share of questions given a category (not "Other"), per category. Precision: a seeded random sample of
the categorized questions, each judged by a person (recorded in <out>-checked.json: item id -> the category judged,
whether it is right, and the better one when not); a judgement counts only while the rules still assign the category
that was judged, so a change of the rules shows as unchecked rows until they are judged again. Writes <out>.md and
<out>.json.

    .venv/bin/python scripts/exam_categories.py [--data-root DIR] [--file exam_mcq/medqa_mcmle_test.jsonl]
        [--sample 50] [--seed 99] [--out docs/exam-categories] [--checked FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clinicalgpt.config import load_config  # noqa: E402
from clinicalgpt.evaluation.metrics import UNCATEGORIZED, ExamCategorizer  # noqa: E402

COVERAGE_TARGET, PRECISION_TARGET = 0.7, 0.8


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", default="")
    parser.add_argument("--file", default="exam_mcq/medqa_mcmle_test.jsonl")
    parser.add_argument("--sample", type=int, default=50)
    parser.add_argument("--seed", type=int, default=99)
    parser.add_argument("--out", default="docs/exam-categories")
    parser.add_argument("--checked", default="", help="the judgements (default: <out>-checked.json)")
    args = parser.parse_args(argv)
    cfg = load_config([f"data.root={args.data_root}"] if args.data_root else [])
    categorizer = ExamCategorizer.from_kg([cfg.data_root / s.path for s in cfg.data.sources if s.kind.startswith("kg_")])
    rows = [json.loads(line) for line in (cfg.data_root / args.file).read_text(encoding="utf-8").splitlines()]
    assigned = {r["id"]: categorizer.category(r["id"], r["question"], r["options"]) for r in rows}
    counts = Counter(assigned.values())
    categorized = [r for r in rows if assigned[r["id"]] != UNCATEGORIZED]
    sample = random.Random(args.seed).sample(categorized, min(args.sample, len(categorized)))

    checked_file = Path(args.checked or f"{args.out}-checked.json")
    checked = json.loads(checked_file.read_text(encoding="utf-8")) if checked_file.exists() else {}
    judged = [checked[r["id"]] for r in sample if checked.get(r["id"], {}).get("category") == assigned[r["id"]]]
    result = {"file": args.file, "questions": len(rows), "categorized": len(categorized),
              "coverage": len(categorized) / len(rows),
              "per_category": {c: {"questions": n, "share": n / len(rows)} for c, n in counts.most_common()},
              "sample": len(sample), "seed": args.seed, "judged": len(judged),
              "precision": sum(j["correct"] for j in judged) / len(judged) if judged else None}

    command = "scripts/exam_categories.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = ["# Derived exam categories on unlabelled questions", "",
             f"Generated {datetime.date.today()} by `.venv/bin/python {command.strip()}`, from `{args.file}` under the "
             f"data root. How the categories are derived: [evaluation.md](evaluation.md).", "",
             f"**Coverage**: {result['categorized']:,} of {result['questions']:,} questions categorized = "
             f"**{result['coverage']:.1%}** (target {COVERAGE_TARGET:.0%}).", "",
             f"**Precision**: {sum(j['correct'] for j in judged)} of {len(judged)} judged assignments right = "
             + (f"**{result['precision']:.2f}**" if judged else "-") + f" (target {PRECISION_TARGET}), on a random "
             f"sample of {len(sample)} categorized questions (seed {args.seed}), each judged by hand: right when the "
             "category is one a person would file the question under.", "",
             "| category | questions | share |", "|---|---|---|"]
    lines += [f"| {c} | {v['questions']:,} | {v['share']:.1%} |" for c, v in result["per_category"].items()]
    lines += ["", "## The judged sample", "", "| item | category | question (start) | right | better |", "|---|---|---|---|---|"]
    for r in sample:
        judgement = checked.get(r["id"], {})
        current = judgement.get("category") == assigned[r["id"]]
        right = ("yes" if judgement["correct"] else "no") if current else "unchecked"
        lines.append(f"| {r['id']} | {assigned[r['id']]} | {r['question'][:28].replace('|', '/')}… | {right} | "
                     f"{judgement.get('better', '') if current else ''} |")
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    Path(f"{args.out}.json").write_text(json.dumps(result, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    print("\n".join(lines[:8]))
    return result


if __name__ == "__main__":
    main()
