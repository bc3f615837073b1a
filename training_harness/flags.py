"""The one way a config dataclass becomes command-line flags: a flag per field, typed by its annotation, with
the field's ``help`` metadata and its default in the help text."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from pathlib import Path

#: Set by a wrapper script to its own name, so that --help shows the command the user typed.
PROGRAM_VARIABLE = "EFFICIENTLLM_PROGRAM"


def _flag_type(annotation):
    """``int | None`` -> int: the type argparse converts a flag's text to."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if args else annotation


def program_name(module: str) -> str | None:
    """The name ``--help`` gives the command: the wrapper script that ran it, ``python -m <module>`` when run
    that way, else None (argparse's own: a script's or console command's name)."""
    if os.environ.get(PROGRAM_VARIABLE):
        return os.environ[PROGRAM_VARIABLE]
    if sys.argv and Path(sys.argv[0]).with_suffix("").parts[-2:] == tuple(module.split(".")[-2:]):
        return f"python -m {module}"
    return None


def dataclass_parser(config_class: type, description: str, prog: str | None = None) -> argparse.ArgumentParser:
    """A parser with ``--<field>`` for every field of ``config_class``. Flags not given are absent from the
    parsed namespace (so that a config file or the dataclass's own defaults fill them); ``--help`` shows each
    default."""
    parser = argparse.ArgumentParser(prog=prog, description=description, argument_default=argparse.SUPPRESS)
    hints = typing.get_type_hints(config_class)
    for item in dataclasses.fields(config_class):
        kind = _flag_type(hints[item.name])
        default = item.default if item.default is not dataclasses.MISSING else None
        help_text = item.metadata.get("help", "")
        if default not in (None, ""):
            help_text += f" (default: {default})"
        if kind is bool:
            parser.add_argument(f"--{item.name}", action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(f"--{item.name}", type=kind, help=help_text, choices=item.metadata.get("choices"))
    return parser
