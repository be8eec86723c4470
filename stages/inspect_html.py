"""`selpipe inspect CACHE --html FILE [--policy MODEL]`: see which tokens Selective-DPO selects.

Renders a few preference pairs of a score cache as one self-contained HTML page (inline CSS, no
scripts, no external assets), every completion token shaded:

- with a policy: by its alignment score, `r - p` on the chosen side and `p - r` on the rejected
  side (orange: the policy under-rates a chosen token or over-rates a rejected one; blue: the
  opposite), and the tokens of the top-k mask boxed, exactly as `selpipe train` would select them
  at this policy (`selpipe.pipeline.selection`);
- without one: by the reference log-prob alone (darker: less likely), nothing selected.

Hovering a token shows its id and numbers. Tokens are decoded one by one with the policy's
tokenizer (or the reference's, from the manifest); a policy whose tokenizer differs from the
cache's (by the manifest's fingerprint) is refused. Only the sampled rows' row groups are read,
so a cache of any size renders in little memory.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from selpipe.pipeline.batching import collate_pairs
from selpipe.pipeline.cache import check_tokenizer, load_manifest
from selpipe.pipeline.config import ConfigError
from selpipe.pipeline.logprobs import completion_logprobs, to_padded
from selpipe.pipeline.selection import alignment_scores, top_k_mask
from selpipe.pipeline.tokenization import tokenizer_fingerprint
from selpipe.pipeline.tokenization import load_tokenizer, pad_id
from selpipe.pipeline.cache import sample_rows

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
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
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


def render_html(cache_dir: str | Path, out_file: str | Path, policy: str | Path | None = None, samples: int = 8,
                top_k: float = 0.4, seed: int = 0, *,
                deciding: Mapping[str, Mapping[str, list[int]]] | None = None) -> Path:
    """Write an HTML page of `samples` random pairs (by `seed`) of the cache; returns its path.

    With `policy` (a model directory) tokens are shaded by alignment score and the top-`top_k`
    mask is boxed; without it they are shaded by reference log-prob. `deciding` optionally maps a
    row id to {"chosen": [...], "rejected": [...]} completion token positions known to decide the
    preference (a planted task's ground truth); those get a wavy underline.
    """
    if samples < 1:
        raise ConfigError(f"--samples must be at least 1; got {samples}")
    if not 0.0 < top_k <= 1.0:
        raise ConfigError(f"--top-k must be in (0, 1]; got {top_k}")
    cache_dir, out_file = Path(cache_dir), Path(out_file)
    manifest = load_manifest(cache_dir)
    if policy is not None:
        tokenizer = load_tokenizer(str(policy))
        # The page decodes cached ids with the policy's tokenizer and scores them with the policy.
        check_tokenizer(cache_dir, manifest, tokenizer_fingerprint(tokenizer))
    else:
        tokenizer = load_tokenizer(manifest["reference"]["model"], manifest["reference"]["revision"])
    picked = sample_rows(cache_dir, manifest, samples, seed)
    padding = pad_id(tokenizer)

    per_side = _selection(str(policy), picked, padding, top_k) if policy is not None and picked else {}
    # Colour saturates at the 95th percentile of |value|, so one extreme token does not wash out the rest.
    if per_side:
        shown = torch.cat([v["scores"][v["mask"]].abs() for v in per_side.values()])
    else:
        shown = torch.tensor([-v for row in picked for side in SIDES for v in row[f"{side}_ref_logps"]])
    scale = float(torch.quantile(shown, 0.95)) if shown.numel() else 0.0

    pairs_html = []
    for index, row in enumerate(picked):
        side_html = []
        truth = (deciding or {}).get(row["id"], {})
        for side in SIDES:
            spans = []
            for t, (token, ref) in enumerate(zip(row[f"{side}_ids"], row[f"{side}_ref_logps"])):
                text = tokenizer.decode([token])
                if per_side:
                    score = float(per_side[side]["scores"][index, t])
                    logp = float(per_side[side]["policy"][index, t])
                    selected = bool(per_side[side]["selected"][index, t])
                    title = f"id {token}  ref {ref:.3f}  policy {logp:.3f}  score {score:+.3f}" + ("  selected" if selected else "")
                    spans.append(_token_span(text, _shade(score, scale, True), selected, t in truth.get(side, ()), title))
                else:
                    title = f"id {token}  ref {ref:.3f}"
                    spans.append(_token_span(text, _shade(ref, scale, False), False, t in truth.get(side, ()), title))
            side_html.append(f'<div class="side"><div class="label {side}">{side}</div>'
                             f'<div class="tokens">{"".join(spans)}</div></div>')
        prompt = tokenizer.decode(row["prompt_ids"])
        pairs_html.append(f'<div class="pair"><h2>{html.escape(row["id"])}</h2>'
                          f'<div class="prompt">{html.escape(prompt)}</div>{"".join(side_html)}</div>')

    if per_side:
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
    page = (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>selpipe: token selection</title>"
        f"<style>{STYLE}</style></head><body>"
        f"<h1>Token selection: {html.escape(str(cache_dir))}</h1>"
        f"<div class=\"meta\">reference {html.escape(str(manifest['reference']['model']))}; "
        f"{len(picked)} of {manifest['totals']['rows']} pairs (seed {seed}); {mode}</div>"
        f"<div class=\"legend\">{legend}</div>{''.join(pairs_html)}</body></html>\n"
    )
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(page, encoding="utf-8")
    return out_file
