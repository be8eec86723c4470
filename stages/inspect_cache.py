"""`selpipe inspect CACHE [--html FILE]`: what a score cache holds, and optionally a page of sample pairs.

The cache is opened with the checks `selpipe train` runs (layout, names confined to the cache,
checksums) before anything is read; the numbers come from `selpipe.pipeline.cache_summary`, the
page from `inspect_html`. No model is loaded unless the page is shaded by a policy.
"""

from __future__ import annotations

from typing import Any

from selpipe.pipeline.cache_summary import describe_cache, format_summary, open_checked
from selpipe.pipeline.config import InspectConfig

from .inspect_html import check_page_path, render_html


def run_inspect(cfg: InspectConfig) -> tuple[dict[str, Any], str]:
    """The cache's description and the text a person reads; with `--html`, the page written too."""
    from pathlib import Path

    if cfg.html is not None:
        check_page_path(Path(cfg.html), Path(cfg.cache))  # before any cache is read: a refused path costs nothing
    manifest = open_checked(cfg.cache)
    report = describe_cache(cfg.cache, manifest)
    text = format_summary(report)
    if cfg.html is not None:
        written = render_html(cfg.cache, cfg.html, policy=cfg.policy, samples=cfg.samples, top_k=cfg.top_k,
                              seed=cfg.seed, manifest=manifest)
        report["html"] = str(written)
        text += f"\nwrote {written}"
    return report, text
