"""Build typer commands from the settings dataclasses, so flags, help and defaults have one source.

Every field becomes `--field-name` (a positional argument where the field says so). A flag left
out is `None` here and falls back to the config file (`--config FILE`, JSON or YAML) and then to
the dataclass default; the dataclass validates the result. The help shows each default and marks
the settings that must be given (those whose default is empty). A list setting takes its items
comma-separated (`--adam-betas 0.9,0.95`); a setting that is a number or a word (`int |
Literal["auto"]`) takes either.

Every command also takes `--json`: stdout then holds exactly one JSON object, the command's
summary, and everything else the run prints (progress, library notices, child processes) goes
to stderr. The file descriptor itself is redirected while the command runs, so output from C
extensions and subprocesses is caught too.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import sys
import types
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape

from selpipe.pipeline.config import build_config, default_of, flag_name, load_config_file, setting_fields
from selpipe.pipeline.errors import ConfigError


@dataclass
class Report:
    """What a command returns: the summary (`--json` prints it; None prints nothing), the text a
    person reads instead (default: the summary as indented JSON), and a failure line that makes
    the exit status 1."""

    summary: Any
    text: str | None = None
    failure: str | None = None
    hard_exit: bool = False  # leave with os._exit once printed (see the vllm backend in cli/app.py)


@contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send file descriptor 1 to stderr until the block ends (Python's sys.stdout writes to it too)."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _members(annotation: Any) -> tuple[Any, ...]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return tuple(a for a in typing.get_args(annotation) if a is not type(None))
    return (annotation,)


def _list_parser(annotation: Any, default: Any) -> Callable[[str], list]:
    """Comma-separated items, each converted to the list's item type (from `list[T]`, else the default's items)."""
    args = typing.get_args(annotation)
    item = args[0] if args else (type(default[0]) if default else str)

    def parse(text: str) -> list:
        try:
            return [item(part.strip()) for part in text.split(",") if part.strip()]
        except ValueError:
            raise typer.BadParameter(f"{text!r}: give comma-separated {item.__name__} values, e.g. 0.9,0.95") from None

    return parse


def _word_or_number(number: type, words: tuple[str, ...]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        if text in words:
            return text
        try:
            return number(text)
        except ValueError:
            raise typer.BadParameter(f"{text!r} is not {'an integer' if number is int else 'a number'} "
                                     f"or {' or '.join(words)}") from None

    return parse


def _option(annotation: Any, default: Any) -> tuple[Any, dict[str, Any], str]:
    """(annotation typer sees, extra typer.Option arguments, help suffix) for a dataclass field's type."""
    members = _members(annotation)
    words = tuple(w for m in members if typing.get_origin(m) is typing.Literal for w in typing.get_args(m))
    others = [m for m in members if typing.get_origin(m) is not typing.Literal]
    first = others[0] if others else None
    if words and not others:
        return str, {}, f" One of: {', '.join(map(str, words))}."
    if typing.get_origin(first) is list or first is list:
        return str, {"parser": _list_parser(first, default), "metavar": "A,B,..."}, " Comma-separated."
    if words:
        return str, {"parser": _word_or_number(first, words), "metavar": f"{first.__name__.upper()}|{'|'.join(words)}"}, ""
    return first, {}, ""


def _shown_default(default: Any, kind: Any, flag: str) -> str:
    if kind is bool:
        return flag if default else f"--no-{flag[2:]}"
    if isinstance(default, list):
        return ",".join(map(str, default))
    return str(default)


def required_settings(cls: type) -> set[str]:
    """The settings that must be given: marked required and without a default (groups walked)."""
    return {f.name for _, f, _ in setting_fields(cls) if f.metadata.get("required") and default_of(f) in ("", None)}


def _parameter(group: str | None, f: dataclasses.Field, hint: Any, required: set[str]) -> inspect.Parameter:
    """The typer parameter of one setting: a flag (`--top-k`, `--progress/--no-progress`) or an argument."""
    default = default_of(f)
    kind, extra, suffix = _option(hint, default)
    help_text = escape(f.metadata["help"]) + suffix + (" \\[required]" if f.name in required else "")
    panel = {"rich_help_panel": f"{group} settings"} if group else {}
    if f.metadata.get("argument"):
        return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[kind], default=typer.Argument(
            None, metavar=flag_name(f), help=help_text, show_default=False, **panel))
    flag = flag_name(f)
    if f.name not in required and default not in ("", None):
        help_text += f" \\[default: {escape(_shown_default(default, kind, flag))}]"
    decls = [f"{flag}/--no-{flag[2:]}"] if kind is bool else [flag]
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[kind], default=typer.Option(
        None, *decls, help=help_text, show_default=False, **panel, **extra))


def config_command(cls: type, run: Callable[[Any], Report]) -> Callable[..., None]:
    """A function typer can register: its parameters are `--config`, `--json` and one per setting."""
    parameters = [
        inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path], default=typer.Option(
            None, "--config", help="JSON or YAML file of settings (keys as below); flags override it, it overrides the defaults.")),
        inspect.Parameter("json_output", inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=typer.Option(
            False, "--json", help="Print only the summary, as one JSON object on stdout; everything else goes to stderr.")),
    ]
    required = required_settings(cls)
    parameters += [_parameter(group, f, hint, required) for group, f, hint in setting_fields(cls)]

    def command(**kwargs: Any) -> None:
        config_file = kwargs.pop("config")
        as_json = kwargs.pop("json_output")
        file_values = load_config_file(config_file) if config_file else {}
        overrides = {name: value for name, value in kwargs.items() if value is not None}
        cfg = build_config(cls, file_values, overrides)
        with stdout_to_stderr() if as_json else nullcontext():
            report = run(cfg)
        if report.summary is None:
            pass  # a process with nothing to report (a training rank other than 0)
        elif as_json:
            typer.echo(json.dumps(report.summary, default=str))
        else:
            typer.echo(report.text if report.text is not None else json.dumps(report.summary, indent=2, default=str))
        if report.failure:
            typer.echo(report.failure, err=True)
        if report.hard_exit:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1 if report.failure else 0)
        if report.failure:
            raise typer.Exit(1)

    command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in parameters}
    command.__doc__ = cls.__doc__
    return command
