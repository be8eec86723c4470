"""pipeline/cache_summary.py: what `selpipe inspect` (and a finished score-ref) prints."""

import numpy as np
import pytest

from selpipe.pipeline.cache import load_manifest, read_rows
from selpipe.pipeline.cache_summary import describe_cache, format_summary


def test_the_distribution_is_numpy_over_every_cached_log_prob(demo_cache):
    """Golden values from the rows themselves: every chosen and rejected log-prob of the 96 rows, as
    float32 (how they are stored), through np.quantile's linear interpolation."""
    manifest = load_manifest(demo_cache)
    values = np.concatenate([np.asarray(row[f"{side}_ref_logps"], dtype=np.float32)
                             for row in read_rows(demo_cache, manifest) for side in ("chosen", "rejected")])
    report = describe_cache(demo_cache)
    dist = report["ref_logp_distribution"]
    assert dist["tokens_sampled"] == values.size == manifest["totals"]["completion_tokens"]
    assert dist["min"] == float(values.min()) and dist["q50"] == pytest.approx(float(np.quantile(values, 0.5)), abs=0)
    assert report["totals"] == manifest["totals"]


def test_the_summary_text_golden():
    report = {"cache": "c", "schema_version": 1, "reference": {"model": "ref", "dtype": "float32"},
              "backend": {"name": "hf", "version": "4.0"},
              "totals": {"rows": 3, "rows_read": 5, "truncated": 1, "shards": 2, "skipped": {"too_long": 2},
                         "prompt_tokens": 30, "completion_tokens": 40, "bytes": 2_000_000, "bytes_per_completion_token": 50000.0},
              "ref_logp_distribution": {"tokens_sampled": 40, "mean": -1.5, "min": -9.0, "q01": -8.0, "q50": -1.0}}
    assert format_summary(report) == (
        "cache        c (schema v1)\n"
        "reference    ref (float32), backend hf 4.0\n"
        "rows         3 scored of 5 read, 1 truncated, 2 shards\n"
        "skipped      too_long: 2\n"
        "tokens       30 prompt, 40 completion\n"
        "size         2.000 MB, 50000.00 bytes per completion token\n"
        "ref log-p    mean=-1.500  min=-9.000  q01=-8.000  q50=-1.000")
