"""The documentation: a short README with its architecture picture, links that lead somewhere, and a
results page that scripts/results.py writes from a run's JSON files (never typed by hand)."""

import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def relative_links(text: str) -> list[str]:
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # links inside code blocks are not links
    links = [m.group(1) for m in LINK.finditer(text)]
    return [u for u in links if not re.match(r"^[a-z][a-z0-9+.-]*:", u) and not u.startswith("#")]


def test_readme_is_short_and_draws_the_architecture():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 150
    assert "```mermaid" in text
    for command in ("scripts/recipe.sh", "scripts/test.sh"):
        assert command in text


def test_every_relative_link_points_to_a_file():
    broken = []
    for page in PAGES:
        for link in relative_links(page.read_text(encoding="utf-8")):
            target = (page.parent / link.split("#")[0]).resolve()
            if not target.exists():
                broken.append(f"{page.relative_to(REPO)}: {link}")
    assert not broken, broken


def test_link_finder():
    text = "[a](docs/a.md) [b](https://x.org) ![c](img/c.png) [d](#top)\n```\n[e](nowhere.md)\n```"
    assert relative_links(text) == ["docs/a.md", "img/c.png"]


def write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")


def test_results_page_from_a_run_folder(tmp_path):
    run = tmp_path / "runs" / "tiny"
    write(run / "recipe.json", {"command": "scripts/recipe.sh preset=tiny", "commit": "abcdef1234567890",
                                "started": "2026-12-05T08:00:00+00:00", "finished": "2026-12-05T08:50:00+00:00",
                                "seconds": 3001.0, "stages": {"pretrain": 554.4, "sft": 303.0, "ppo": 270.3}})
    write(run / "pretrain" / "summary.json", {"steps": 120, "first_eval_loss": 9.0471, "last_eval_loss": 6.5379,
                                              "mean_tokens_per_s": 2263.2})
    write(run / "pretrain" / "lineage.json", {
        "stage": "pretrain", "command": "python jobs/pretrain.py preset=tiny", "commit": "abcdef1234567890",
        "dirty": False, "config": {}, "data_manifest_sha256": "0123456789abcdef", "seed": {"data": 0, "pretrain": 7},
        "packages": {}, "machine": {"platform": "Linux", "cpu": "x86_64", "logical_cores": 2, "memory_gib": 7.8,
                                    "gpus": []},
        "started": "2026-12-05T08:05:00+00:00", "finished": "2026-12-05T08:14:14+00:00", "seconds": 554.4})
    (run / "pretrain" / "curves.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    # PPO rerun alone after the recipe finished (e.g. with new settings): its own time, said so.
    write(run / "ppo" / "lineage.json", {"stage": "ppo", "command": "python jobs/ppo.py", "commit": "fedcba9876543210",
                                         "started": "2026-12-05T09:10:00+00:00", "seconds": 261.2})
    write(run / "rm" / "accuracy.json", {"overall": 0.6492, "length_baseline": 0.5262, "base_likelihood": 0.5097,
                                         "pairs": 667, "per_source": {"constructed/kg_swap": {
                                             "accuracy": 0.5526, "length_baseline": 0.4956,
                                             "base_likelihood": 0.4912, "pairs": 114, "train_pairs": 481}}})
    write(run / "ppo" / "summary.json", {"steps": 20, "first_reward": -1.1672, "last_reward": -0.3362,
                                         "first_eval_reward": -0.6023, "last_eval_reward": 0.0688,
                                         "last_eval_kl": 4.7545, "samples_per_s": 5.659})
    write(run / "dpo" / "accuracy.json", {"overall": 0.5812, "margin": 0.0423, "chosen_logp_change": -1.25,
                                          "rejected_logp_change": -3.5, "sft_likelihood": 0.4913, "pairs": 664,
                                          "per_source": {"constructed/kg_wrong_kind": {
                                              "accuracy": 0.6507, "margin": 0.0812, "chosen_logp_change": -0.5,
                                              "rejected_logp_change": -2.75, "sft_likelihood": 0.5311, "pairs": 209,
                                              "train_pairs": 1690}}})
    write(run / "eval" / "results.json", {"models": ["sft", "ppo"], "items": {"exam": 400},
                                          "families": {"exam": {"sft": {"accuracy": 0.1825}, "ppo": {"accuracy": 0.1725}},
                                                       "qa": {"ppo vs sft": {"win": 0.5, "tie": 0.17, "lose": 0.33}},
                                                       "bias": {"ppo": {
                                                           "likelihood": {"mean": 3.1429, "spread": 0.5,
                                                                          "consistency": 0.25, "modal_point": [2, 0.75]},
                                                           "generated": {"mean": None, "spread": None,
                                                                         "consistency": None, "modal_point": None,
                                                                         "parsed": 0.0}}}}})
    (run / "bench").mkdir()
    table = "SFT throughput, preset tiny\n\n| system | tokens/s |\n|---|---|\n| ours | 2,776 |\n"
    (run / "bench" / "sft_throughput.md").write_text(table)
    out = tmp_path / "docs" / "results.md"
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "results.py"), "--run-dir", str(run),
                           "--out", str(out)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    page = out.read_text(encoding="utf-8")
    assert "### sft_throughput" in page and "| ours | 2,776 |" in page  # a benchmark's table, as it wrote it
    assert f"`.venv/bin/python bench/sft_throughput.py run_root={run.parent}`" in page
    for figure in ("9.047 → 6.538", "554 s", "303 s", "3,001 s", "2026-12-05 08:05 UTC", "`abcdef1234`",
                   "Linux, x86_64, 2 cores, 8 GiB, no GPU", "`python jobs/pretrain.py preset=tiny`", "pretrain 7",
                   "0.649", "0.526", "0.510", "`constructed/kg_swap`", "0.553", "-1.167 → -0.336",
                   "-0.602 → 0.069", "4.75", "5.66", "0.182", "0.172", "ppo vs sft", "0.50",
                   "| `constructed/kg_wrong_kind` | 209 | 1,690 | 0.651 | 0.081 | -0.50 | -2.75 | 0.531 |"):
        assert figure in page, figure
    assert "## DPO" in page and "`dpo/summary.json`: not recorded." in page
    assert "| `ppo` | likelihood | 3.14 | 0.50 | 0.25 | 2 (75%) | - |" in page  # no bias row for sft: not run
    assert "| `ppo` | generated | - | - | - | - | 0.00 |" in page
    assert "| ppo | 261 s (rerun alone, after the recipe) |" in page and "| sft | 303 s |" in page
    assert "[curves.png](results/pretrain-curves.png)" in page
    assert (tmp_path / "docs" / "results" / "pretrain-curves.png").exists()
    # What the run did not write is said so, not guessed: no data manifest, no SFT summary, no lineage.
    assert "`data/manifest.json`: not recorded." in page
    assert "`sft/summary.json`: not recorded." in page
    assert page.count("not recorded") >= 5
    for link in relative_links(page):  # the curves it copied beside the page, and its sibling pages
        assert (out.parent / link).exists() or (REPO / "docs" / link).exists(), link


def test_results_page_from_an_older_run_without_lineage(tmp_path):
    run = tmp_path / "tiny"
    write(run / "sft" / "summary.json", {"steps": 60, "first_eval_loss": 6.618, "last_eval_loss": 6.2294})
    out = tmp_path / "results.md"
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "results.py"), "--run-dir", str(run),
                           "--out", str(out)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    page = out.read_text(encoding="utf-8")
    assert "6.618 → 6.229" in page
    assert "| command | not recorded |" in page and "| total time | not recorded |" in page
    assert "## DPO" not in page and "| dpo |" not in page  # a run that did not align with DPO
    assert "| sft | not recorded | not recorded | not recorded | not recorded |" in page
    assert "No benchmark was run on them" in page
