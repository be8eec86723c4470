"""`selpipe inspect CACHE [--html FILE]`: what a score cache holds, and optionally a page of sample pairs.

The cache is opened with the checks `selpipe train` runs (layout, names confined to the cache,
checksums) before anything is read; the numbers come from `selpipe.pipeline.cache_summary`, the
page from `inspect_html`. No model is loaded unless the page is shaded by a policy.
"""

from __future__ import annotations

from typing import Any

from selpipe.pipeline.cache import check_values
from selpipe.pipeline.cache_summary import describe_cache, format_summary, open_checked, reading
from selpipe.pipeline.config import InspectConfig

from .inspect_html import check_page_path, render_html

# The cache stores token ids as int32: without a model, the widest vocabulary a cache can name.
ANY_TOKEN_ID = 2**31 - 1


def run_inspect(cfg: InspectConfig) -> tuple[dict[str, Any], str]:
    """The cache's description and the text a person reads; with `--html`, the page written too."""
    from pathlib import Path

    if cfg.html is not None:
        check_page_path(Path(cfg.html), Path(cfg.cache))  # before any cache is read: a refused path costs nothing
    # The values train checks, in the same one pass (hash while decoding), so inspect never
    # describes a cache train would refuse. Token ids are checked against the vocabulary only by
    # commands that have a model; here any id from 0 up is allowed.
    manifest = open_checked(cfg.cache, checksums=False)
    with reading(cfg.cache):
        check_values(cfg.cache, manifest, ANY_TOKEN_ID)
    report = describe_cache(cfg.cache, manifest)
    text = format_summary(report)
    if cfg.html is not None:
        written = render_html(cfg.cache, cfg.html, policy=cfg.policy, samples=cfg.samples, top_k=cfg.top_k,
                              seed=cfg.seed, manifest=manifest)
        report["html"] = str(written)
        text += f"\nwrote {written}"
    return report, text
