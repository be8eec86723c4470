"""Build typer commands from the settings dataclasses, so flags, help and defaults have one source.

Every field becomes `--field-name`. A flag left out is `None` here and falls back to the config
file (`--config FILE`) and then to the dataclass default; the dataclass validates the result.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer

from selpipe.pipeline.config import build_config, load_config_file


def _option_type(annotation: Any) -> tuple[type, str]:
    """(click-facing type, help suffix) for a dataclass field annotation."""
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin is typing.Literal:
        return str, f" One of: {', '.join(map(str, typing.get_args(annotation)))}."
    if args and origin in (typing.Union, getattr(__import__('types'), 'UnionType', None)):
        return _option_type(args[0])
    return annotation, ""


def config_command(cls: type, run: Callable[[Any], None]) -> Callable[..., None]:
    """A function typer can register: its parameters are `--config` plus one per setting."""
    hints = typing.get_type_hints(cls)
    parameters = [inspect.Parameter(
        "config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
        default=typer.Option(None, "--config", help="JSON file of settings (keys as below); flags override it."),
    )]
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", True):
            continue
        kind, suffix = _option_type(hints[f.name])
        if f.metadata.get("argument"):
            parameters.append(inspect.Parameter(
                f.name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[kind],
                default=typer.Argument(None, help=f.metadata["help"], show_default=False),
            ))
            continue
        flag = f"--{f.name.replace('_', '-')}"
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = "" if default in ("", None) else f" [default: {default}]"
        decls = [f"{flag}/--no-{flag[2:]}"] if kind is bool else [flag]
        parameters.append(inspect.Parameter(
            f.name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[kind],
            default=typer.Option(None, *decls, help=f"{f.metadata['help']}{suffix}{shown}", show_default=False),
        ))

    def command(**kwargs: Any) -> None:
        config_file = kwargs.pop("config")
        file_values = load_config_file(config_file) if config_file else {}
        overrides = {name: value for name, value in kwargs.items() if value is not None}
        run(build_config(cls, file_values, overrides))

    command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in parameters}
    command.__doc__ = cls.__doc__
    return command
