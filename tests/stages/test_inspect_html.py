"""render_html: the token-selection page of `selpipe inspect CACHE --html FILE`."""

from __future__ import annotations

import html
import json
import re

import demo  # data/demo.py, put on sys.path by tests/conftest.py
import pytest

from selpipe.pipeline.cache import CacheError, load_manifest, read_rows
from selpipe.pipeline.config import ConfigError, ScoreConfig
from selpipe.stages.inspect_html import render_html
from selpipe.stages.score_ref import run_score_ref

from ..conftest import run_cli


@pytest.fixture(scope="module")
def scored(models, tmp_path_factory):
    """A cache scored by the tiny reference; the differently seeded `other` model plays the policy."""
    root = tmp_path_factory.mktemp("inspect")
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in demo.generate_pairs(6, seed=3, id_prefix="p")))
    run_score_ref(ScoreConfig(input=str(data), output=str(root / "cache"), model=str(models["reference"]),
                              max_length=64, max_prompt_length=32, progress=False))
    return {"cache": root / "cache", "policy": models["other"]}


def _assert_self_contained(page: str) -> None:
    assert not re.search(r"https?://|<script|<link|\bsrc=|@import|url\(", page)


def test_with_policy_shades_by_score_and_marks_the_top_k(scored, tmp_path):
    out = render_html(scored["cache"], tmp_path / "page.html", policy=scored["policy"], samples=3, top_k=0.4, seed=0)
    page = out.read_text()
    assert out == tmp_path / "page.html"
    assert page.count('class="pair"') == 3
    _assert_self_contained(page)
    # Every completion token of the shown pairs is on the page, decoded.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(scored["policy"])
    rows = list(read_rows(scored["cache"], load_manifest(scored["cache"])))
    shown = [row for row in rows if html.escape(row["id"]) in page]
    assert len(shown) == 3
    for row in shown:
        for token in row["chosen_ids"] + row["rejected_ids"]:
            assert f">{html.escape(tokenizer.decode([token]))}</span>" in page
    # The marks: per response, about 40% of its tokens are boxed (ties may add a few).
    completion_tokens = sum(len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in shown)
    selected = len(re.findall(r'class="tok sel[ "]', page))
    assert 0.4 * completion_tokens - 6 <= selected <= completion_tokens
    assert selected < completion_tokens
    assert "score" in page and "selected" in page


def test_without_policy_shades_by_reference_logprob_and_selects_nothing(scored, tmp_path):
    page = render_html(scored["cache"], tmp_path / "ref.html", samples=2).read_text()
    _assert_self_contained(page)
    assert page.count('class="pair"') == 2
    assert 'class="tok sel' not in page.split("</style>")[1].split('class="pair"', 1)[1]
    assert "reference log-prob" in page


def test_deciding_positions_are_underlined(scored, tmp_path):
    rows = list(read_rows(scored["cache"], load_manifest(scored["cache"])))
    truth = {row["id"]: {"chosen": [0], "rejected": [1]} for row in rows}
    page = render_html(scored["cache"], tmp_path / "truth.html", policy=scored["policy"], samples=2,
                       deciding=truth).read_text()
    pairs = page.split('class="pair"', 1)[1]  # past the legend
    assert len(re.findall(r'class="tok[a-z ]* truth"', pairs)) == 4


def test_reads_only_the_sampled_rows_deterministically(demo_cache, monkeypatch, tmp_path):
    """The sample comes from the manifest's row counts; whole shards (let alone the whole cache) are never read."""
    import pyarrow.parquet as pq

    from selpipe.pipeline.cache import sample_rows

    def refuse(*args, **kwargs):
        raise AssertionError("read a whole shard")

    monkeypatch.setattr(pq, "read_table", refuse)
    manifest = load_manifest(demo_cache)
    expected = [row["id"] for row in sample_rows(demo_cache, manifest, 3, seed=7)]
    first = render_html(demo_cache, tmp_path / "a.html", samples=3, seed=7).read_text()
    again = render_html(demo_cache, tmp_path / "b.html", samples=3, seed=7).read_text()
    assert first == again
    assert re.findall(r'<div class="pair"><h2>([^<]*)</h2>', first) == expected
    assert "3 of 96 pairs (seed 7)" in first


@pytest.mark.parametrize(("settings", "message"), [
    ({"top_k": 0.0}, r"--top-k must be in \(0, 1\]; got 0.0"),
    ({"top_k": 1.5}, r"--top-k must be in \(0, 1\]; got 1.5"),
    ({"samples": 0}, "--samples must be at least 1; got 0"),
])
def test_bad_settings_are_refused(scored, tmp_path, settings, message):
    with pytest.raises(ConfigError, match=message):
        render_html(scored["cache"], tmp_path / "x.html", policy=scored["policy"], **settings)
    assert not (tmp_path / "x.html").exists()


def test_a_policy_with_another_tokenizer_is_refused(scored, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    policy = tmp_path / "policy"
    shutil.copytree(scored["policy"], policy)
    tokenizer = AutoTokenizer.from_pretrained(policy)
    tokenizer.chat_template = "{{ messages }}"
    tokenizer.save_pretrained(policy)
    with pytest.raises(CacheError, match="differs in: chat_template"):
        render_html(scored["cache"], tmp_path / "x.html", policy=policy)
    with pytest.raises(ConfigError, match="cannot load a tokenizer"):
        render_html(scored["cache"], tmp_path / "x.html", policy=tmp_path / "missing")


def test_cli_refuses_bad_html_settings_in_one_line(scored, tmp_path):
    result = run_cli("inspect", scored["cache"], "--html", tmp_path / "x.html", "--top-k", "2", check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --top-k must be in (0, 1]; got 2.0"


def test_the_page_overwrites_only_an_earlier_page(scored, tmp_path):
    """--html at the cache's manifest, at one of its shards, at a user's file or through a link is refused
    and leaves the file byte for byte; an earlier page of this tool is rewritten."""
    from ..conftest import snapshot

    mine = tmp_path / "notes.html"
    mine.write_text("<p>my notes</p>")
    (tmp_path / "link.html").symlink_to(mine)
    shard = next(scored["cache"].glob("part-*.parquet"))
    before = snapshot(scored["cache"]), mine.read_text()
    for target, fragment in ((scored["cache"] / "manifest.json", "is inside the cache"), (shard, "is inside the cache"),
                             (mine, "exists and is not a page selpipe wrote"), (tmp_path / "link.html", "symbolic link")):
        with pytest.raises(ConfigError, match=fragment):
            render_html(scored["cache"], target, samples=1)
        result = run_cli("inspect", scored["cache"], "--html", target, check=False)
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and fragment in result.stderr, result.stderr
    assert (snapshot(scored["cache"]), mine.read_text()) == before
    page = render_html(scored["cache"], tmp_path / "page.html", samples=1)
    first = page.read_text()
    assert render_html(scored["cache"], page, samples=2).read_text() != first  # its own page: rewritten


def test_a_reference_path_that_does_not_resolve_here_is_one_line_without_the_hub(scored, tmp_path):
    """The manifest names the reference by a relative path that does not resolve from this working
    directory (and could be a Hub id): the page is refused at once, naming the model to pass, with
    the Hub reachable in principle (HF_HUB_OFFLINE=0): nothing is tried there."""
    import shutil
    import subprocess
    import time

    from ..conftest import BIN

    cache = tmp_path / "cache"
    shutil.copytree(scored["cache"], cache)
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["reference"]["model"] = "ref"
    (cache / "manifest.json").write_text(json.dumps(manifest))
    started = time.monotonic()
    result = subprocess.run([str(BIN / "selpipe"), "inspect", str(cache), "--html", "page.html"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120, env={**__import__("os").environ, "HF_HUB_OFFLINE": "0"})
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr[-2000:]
    assert "the cache's reference model 'ref' is not on this machine as given" in result.stderr
    assert "give --policy MODEL" in result.stderr and time.monotonic() - started < 60
    assert not (tmp_path / "page.html").exists()


def test_inspect_refuses_what_train_refuses(demo_cache, tmp_path):
    """inspect runs train's value checks in its one pass: a manifest whose row counts lie (totals
    edited to match), a NaN reference log-prob, and a shard copied in under a second name (ids
    twice) are one line, exit 2, where inspect used to print a summary (and `mean=nan`)."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from selpipe.pipeline.cache import file_sha256

    def broken(name, edit):
        copy = tmp_path / name
        shutil.copytree(demo_cache, copy)
        manifest = json.loads((copy / "manifest.json").read_text())
        edit(copy, manifest)
        (copy / "manifest.json").write_text(json.dumps(manifest))
        return copy

    def rows_lie(copy, manifest):
        manifest["shards"][0]["rows"] -= 2
        manifest["totals"]["rows"] -= 2

    def nan_logp(copy, manifest):
        shard = manifest["shards"][0]
        table = pq.read_table(copy / shard["file"])
        logps = table.column("chosen_ref_logps").to_pylist()
        logps[0][0] = float("nan")
        column = table.schema.get_field_index("chosen_ref_logps")
        table = table.set_column(column, table.schema.field(column), pa.array(logps, table.schema.field(column).type))
        pq.write_table(table, copy / shard["file"], row_group_size=4)
        size = (copy / shard["file"]).stat().st_size
        manifest["totals"]["bytes"] += size - shard["bytes"]
        shard["sha256"], shard["bytes"] = file_sha256(copy / shard["file"]), size

    def ids_twice(copy, manifest):
        first, second = manifest["shards"][0], manifest["shards"][1]
        shutil.copy(copy / first["file"], copy / second["file"])
        for total in manifest["totals"]:  # totals edited to match, as a careful forger would
            if isinstance(first.get(total), int):
                manifest["totals"][total] += first[total] - second[total]
        second.update({key: first[key] for key in first if key != "file"})

    for name, edit, says in (("rows", rows_lie, "the manifest says"), ("nan", nan_logp, "NaN"),
                             ("twice", ids_twice, "appears in more than one row")):
        cache = broken(name, edit)
        result = run_cli("inspect", cache, check=False)
        assert result.returncode == 2 and "Traceback" not in result.stderr, (name, result.stderr[-2000:])
        assert len(result.stderr.strip().splitlines()) == 1 and says in result.stderr, (name, result.stderr)
    assert run_cli("inspect", demo_cache).returncode == 0
