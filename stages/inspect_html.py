"""`selpipe inspect CACHE --html FILE [--policy MODEL]`: see which tokens Selective-DPO selects.

Renders a few preference pairs of a score cache as one self-contained HTML page (inline CSS, no
scripts, no external assets), every completion token shaded:

- with a policy: by its alignment score, `r - p` on the chosen side and `p - r` on the rejected
  side (orange: the policy under-rates a chosen token or over-rates a rejected one; blue: the
  opposite), and the tokens of the top-k mask boxed, exactly as `selpipe train` would select them
  at this policy (`selpipe.pipeline.selection`);
- without one: by the reference log-prob alone (darker: less likely), nothing selected.

Hovering a token shows its id and numbers. Tokens are decoded one by one with the policy's
tokenizer, or the reference's as the manifest names it, looked up on this machine only (never the
Hub); either is checked against the cache's tokenizer fingerprint. Only the sampled rows' row
groups are read, so a cache of any size renders in little memory. The page is written atomically,
only where no file stands or an earlier page of this tool does (marked by its first line), and
never inside the cache.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from selpipe.pipeline.atomic import write_text_atomic
from selpipe.pipeline.batching import collate_pairs
from selpipe.pipeline.cache import check_tokenizer, sample_rows
from selpipe.pipeline.cache_summary import open_checked, reading
from selpipe.pipeline.config import ConfigError
from selpipe.pipeline.errors import storage_errors
from selpipe.pipeline.logprobs import completion_logprobs, to_padded
from selpipe.pipeline.model import load_causal_lm
from selpipe.pipeline.selection import alignment_scores, top_k_mask
from selpipe.pipeline.tokenization import load_tokenizer, pad_id, tokenizer_fingerprint

# The page's first line: what marks a file as a page this tool wrote (and so may rewrite).
GENERATOR = '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><meta name="generator" content="selpipe inspect">'

SIDES = ("chosen", "rejected")

STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; background: #fff; }
h1 { font-size: 20px; margin: 0 0 4px; }
.meta { color: #555; font-size: 13px; margin-bottom: 12px; }
.legend span { display: inline-block; padding: 1px 6px; margin-right: 8px; border-radius: 3px; }
.pair { border: 1px solid #ddd; border-radius: 6px; padding: 10px 12px; margin: 12px 0; }
.pair h2 { font-size: 13px; font-weight: 600; margin: 0 0 6px; color: #444; }
.prompt { font-family: ui-monospace, monospace; font-size: 13px; color: #555; margin-bottom: 6px; white-space: pre-wrap; }
.side { display: flex; gap: 8px; align-items: baseline; margin: 4px 0; }
.label { width: 70px; flex: none; font-size: 12px; font-weight: 600; }
.label.chosen { color: #1a7f37; } .label.rejected { color: #b42318; }
.tokens { font-family: ui-monospace, monospace; font-size: 14px; line-height: 2.1; white-space: pre-wrap; }
.tok { padding: 2px 0; border-radius: 2px; }
.tok.sel { outline: 2px solid #111; outline-offset: -1px; }
.tok.truth { text-decoration: underline wavy #b42318; text-underline-offset: 4px; }
"""


@torch.no_grad()
def _selection(policy: str, rows: list[dict[str, Any]], pad_id: int, top_k: float) -> dict[str, dict[str, torch.Tensor]]:
    """Per side: policy log-probs, alignment scores, completion mask and top-k mask [B, L], as training computes them."""
    model = load_causal_lm(policy, dtype=torch.float32, flag="--policy")
    model.eval()
    batch = collate_pairs(rows, pad_id)
    flat = completion_logprobs(model, batch.input_ids, batch.attention_mask, batch.target_mask)
    policy_logps, mask = to_padded(flat, batch.completion_lengths)
    out = {}
    for side, part in zip(SIDES, (slice(0, len(rows)), slice(len(rows), None))):
        scores = alignment_scores(policy_logps[part], batch.reference[part], chosen=side == "chosen")
        out[side] = {"policy": policy_logps[part], "scores": scores, "mask": mask[part],
                     "selected": top_k_mask(scores, mask[part], top_k)}
    return out


def _shade(value: float, scale: float, diverging: bool) -> str:
    """Background colour: orange for positive, blue for negative (or grey darkness), by |value| / scale."""
    strength = min(1.0, abs(value) / scale) if scale > 0 else 0.0
    alpha = round(0.08 + 0.8 * strength, 3) if strength > 0 else 0.0
    if not diverging:
        return f"rgba(90, 90, 90, {alpha})"
    return f"rgba(240, 120, 20, {alpha})" if value > 0 else f"rgba(40, 110, 230, {alpha})"


def _token_span(text: str, background: str, selected: bool, deciding: bool, title: str) -> str:
    classes = "tok" + (" sel" if selected else "") + (" truth" if deciding else "")
    shown = html.escape(text.replace("\n", "\u21b5\n"))
    return f'<span class="{classes}" style="background:{background}" title="{html.escape(title)}">{shown}</span>'


def check_page_path(out_file: Path, cache_dir: Path) -> None:
    """The page goes where nothing but an earlier page of this tool stands, and outside the cache."""
    if out_file.is_symlink():
        raise ConfigError(f"--html {out_file}: is a symbolic link; give a new file (selpipe will not write through a link)")
    resolved, cache = out_file.resolve(), cache_dir.resolve()
    if resolved == cache or cache in resolved.parents:
        raise ConfigError(f"--html {out_file}: is inside the cache {cache_dir}; write the page outside it")
    if not out_file.exists():
        return
    if not out_file.is_file():
        raise ConfigError(f"--html {out_file}: exists and is not a file; give a new file")
    with open(out_file, "rb") as handle:
        head = handle.read(len(GENERATOR.encode()))
    if head != GENERATOR.encode():
        raise ConfigError(f"--html {out_file}: exists and is not a page selpipe wrote; give a new file (selpipe will "
                          f"not overwrite a file it did not create)")


def _page_tokenizer(cache_dir: Path, manifest: dict[str, Any], policy: str | Path | None) -> Any:
    """The tokenizer that decodes the cache's ids, checked against its fingerprint: the policy's,
    else the reference's, looked up on this machine only (no Hub)."""
    if policy is not None:
        tokenizer = load_tokenizer(str(policy))
        # The page decodes cached ids with the policy's tokenizer and scores them with the policy.
        check_tokenizer(cache_dir, manifest, tokenizer_fingerprint(tokenizer))
        return tokenizer
    reference = manifest["reference"]
    model = reference.get("model")
    try:
        tokenizer = load_tokenizer(str(model), reference.get("revision"), local_only=True)
    except ConfigError:
        raise ConfigError(f"{cache_dir}: the cache's reference model {model!r} is not on this machine as given "
                          f"(a relative path resolves from where score-ref ran); to decode the tokens, run from there "
                          f"or give --policy MODEL, a model with the cache's tokenizer") from None
    check_tokenizer(cache_dir, manifest, tokenizer_fingerprint(tokenizer))
    return tokenizer


def _color_scale(per_side: dict[str, dict[str, torch.Tensor]], picked: list[dict[str, Any]]) -> float:
    """Colour saturates at the 95th percentile of |value|, so one extreme token does not wash out the rest."""
    if per_side:
        shown = torch.cat([v["scores"][v["mask"]].abs() for v in per_side.values()])
    else:
        shown = torch.tensor([-v for row in picked for side in SIDES for v in row[f"{side}_ref_logps"]])
    return float(torch.quantile(shown, 0.95)) if shown.numel() else 0.0


def _side_spans(row: dict[str, Any], index: int, side: str, tokenizer: Any, per_side: dict[str, Any], scale: float,
                truth: Mapping[str, list[int]]) -> str:
    spans = []
    for t, (token, ref) in enumerate(zip(row[f"{side}_ids"], row[f"{side}_ref_logps"])):
        text, deciding = tokenizer.decode([token]), t in truth.get(side, ())
        if per_side:
            score = float(per_side[side]["scores"][index, t])
            logp = float(per_side[side]["policy"][index, t])
            selected = bool(per_side[side]["selected"][index, t])
            title = f"id {token}  ref {ref:.3f}  policy {logp:.3f}  score {score:+.3f}" + ("  selected" if selected else "")
            spans.append(_token_span(text, _shade(score, scale, True), selected, deciding, title))
        else:
            spans.append(_token_span(text, _shade(ref, scale, False), False, deciding, f"id {token}  ref {ref:.3f}"))
    return "".join(spans)


def _pair_html(row: dict[str, Any], index: int, tokenizer: Any, per_side: dict[str, Any], scale: float,
               truth: Mapping[str, list[int]]) -> str:
    sides = "".join(f'<div class="side"><div class="label {side}">{side}</div>'
                    f'<div class="tokens">{_side_spans(row, index, side, tokenizer, per_side, scale, truth)}</div></div>'
                    for side in SIDES)
    prompt = tokenizer.decode(row["prompt_ids"])
    return (f'<div class="pair"><h2>{html.escape(row["id"])}</h2>'
            f'<div class="prompt">{html.escape(prompt)}</div>{sides}</div>')


def _mode_and_legend(policy: str | Path | None, scale: float, top_k: float, deciding: bool) -> tuple[str, str]:
    if policy is not None:
        mode = (f"shaded by alignment score under policy <b>{html.escape(str(policy))}</b> "
                f"(colour saturates at |score| {scale:.2f}); boxed: the top {top_k:g} of each response's tokens")
        legend = (f'<span style="background:{_shade(scale, scale, True)}">policy under-rates a chosen / over-rates a rejected token</span>'
                  f'<span style="background:{_shade(-scale, scale, True)}">the opposite</span>'
                  f'<span class="tok sel">selected</span>')
    else:
        mode = f"shaded by reference log-prob (darker: less likely, saturating at {scale:.2f} nats); no policy given, so nothing is selected"
        legend = f'<span style="background:{_shade(scale, scale, False)}">unlikely under the reference</span>'
    if deciding:
        legend += '<span class="tok truth">planted deciding token</span>'
    return mode, legend


def render_html(cache_dir: str | Path, out_file: str | Path, policy: str | Path | None = None, samples: int = 8,
                top_k: float = 0.4, seed: int = 0, *,
                deciding: Mapping[str, Mapping[str, list[int]]] | None = None,
                manifest: dict[str, Any] | None = None) -> Path:
    """Write an HTML page of `samples` random pairs (by `seed`) of the cache; returns its path.

    With `policy` (a model directory) tokens are shaded by alignment score and the top-`top_k`
    mask is boxed; without it they are shaded by reference log-prob. `deciding` optionally maps a
    row id to {"chosen": [...], "rejected": [...]} completion token positions known to decide the
    preference (a planted task's ground truth); those get a wavy underline. `manifest`: the
    cache's, already checked (else it is opened and checked here). The page is written only where
    nothing stands but an earlier page of this tool (`check_page_path`).
    """
    if samples < 1:
        raise ConfigError(f"--samples must be at least 1; got {samples}")
    if not 0.0 < top_k <= 1.0:
        raise ConfigError(f"--top-k must be in (0, 1]; got {top_k}")
    cache_dir, out_file = Path(cache_dir), Path(out_file)
    check_page_path(out_file, cache_dir)
    manifest = manifest if manifest is not None else open_checked(cache_dir)
    tokenizer = _page_tokenizer(cache_dir, manifest, policy)
    with reading(cache_dir):
        picked = sample_rows(cache_dir, manifest, samples, seed)
    per_side = _selection(str(policy), picked, pad_id(tokenizer), top_k) if policy is not None and picked else {}
    scale = _color_scale(per_side, picked)
    pairs = "".join(_pair_html(row, index, tokenizer, per_side, scale, (deciding or {}).get(row["id"], {}))
                    for index, row in enumerate(picked))
    mode, legend = _mode_and_legend(policy if per_side else None, scale, top_k, bool(deciding))
    page = (
        f"{GENERATOR}<title>selpipe: token selection</title><style>{STYLE}</style></head><body>"
        f"<h1>Token selection: {html.escape(str(cache_dir))}</h1>"
        f"<div class=\"meta\">reference {html.escape(str(manifest['reference'].get('model')))}; "
        f"{len(picked)} of {manifest['totals'].get('rows')} pairs (seed {seed}); {mode}</div>"
        f"<div class=\"legend\">{legend}</div>{pairs}</body></html>\n"
    )
    with storage_errors("write the page", out_file, ConfigError):
        out_file.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out_file, page)
    return out_file
