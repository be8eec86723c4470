"""bench/reproduce.py end to end at toy size (slow), and the planted task's ground truth (fast).

The slow test checks the pipeline, not the outcome: with a few optimizer steps on untrained
models no claim can be expected to hold or fail.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
for folder in (ROOT, ROOT / "bench"):  # `data/` and `bench/` are folders of scripts, not installed packages
    sys.path.insert(0, str(folder))

from data.planted import check, completion_token_ids, generate_pairs, parse_answer  # noqa: E402
from reproduce_models import build_task_tokenizer  # noqa: E402


def test_planted_pairs_record_the_tokens_that_decide(tmp_path):
    tokenizer = build_task_tokenizer(tmp_path / "tokenizer")
    rows = generate_pairs(200, seed=5, id_prefix="t", tokenizer=tokenizer)
    assert rows == generate_pairs(200, seed=5, id_prefix="t", tokenizer=tokenizer)
    deciding = tokens = 0
    for row in rows:
        assert check(row["prompt"], row["chosen"]) and not check(row["prompt"], row["rejected"])
        chosen, rejected = parse_answer(row["chosen"]), parse_answer(row["rejected"])
        differing = [i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b]
        for side, answer in (("chosen", chosen), ("rejected", rejected)):
            ids, _ = completion_token_ids(tokenizer, row[side])
            assert ids == tokenizer(row[side], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            assert [tokenizer.decode([ids[t]]).strip() for t in row[f"{side}_deciding"]] == [answer[i] for i in differing]
            deciding += len(row[f"{side}_deciding"])
            tokens += len(ids)
    assert 0.05 <= deciding / tokens <= 0.15


@pytest.mark.slow
def test_reproduce_smoke_writes_the_report(tmp_path):
    import reproduce

    report = reproduce.main(["--smoke", "--runs", str(tmp_path / "runs"), "--docs", str(tmp_path / "docs"), "--no-screenshot"])
    text = report.read_text()
    for heading in ("## Verdicts", "## Selection quality at the start", "## Training: plain DPO against Selective-DPO",
                    "## Cost: one stage one, many runs"):
        assert heading in text
    assert "| strong | 1 (DPO) |" in text and "| strong | 0.4 |" in text and "| weak | 0.4 |" in text
    for image in ("reproduce-k-sweep.png", "reproduce-selection.png"):
        assert (tmp_path / "docs" / "img" / image).stat().st_size > 0
    results = [json.loads(p.read_text()) for p in (tmp_path / "runs" / "train").glob("*/result.json")]
    assert sorted((r["reference"], r["k"]) for r in results) == [("strong", 0.4), ("strong", 1.0), ("weak", 0.4)]
    for result in results:
        assert 0.0 <= result["task_accuracy"] <= 1.0 and 0.0 <= result["preference_accuracy"] <= 1.0
        assert (tmp_path / "runs" / "train" / Path(result["command"][result["command"].index("--output") + 1]).name / "model").is_dir()
