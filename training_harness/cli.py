"""The command line every ``train_<family>_fineweb.py`` script runs."""

from __future__ import annotations

import sys

from training_harness.config import parse_config
from training_harness.errors import EXIT_USAGE, ConfigError, DataError
from training_harness.registry import get_family
from training_harness.run import train


def main(family: str, argv: list[str] | None = None) -> int:
    """Parse the flags for ``family``, train, and return the exit code (errors as one line)."""
    try:
        display = get_family(family).display_name
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    description = f"Pretrain {display} on FineWeb-Edu and measure PPL, AMU, AL, TT and AEC."
    try:
        return train(parse_config(argv, family, description))
    except (ConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE


def console() -> int:
    """``efficientllm-train FAMILY [flags]`` (or ``python -m training_harness.cli``): any registered family."""
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        print("usage: efficientllm-train FAMILY [flags]; FAMILY --help lists the flags", file=sys.stderr)
        return EXIT_USAGE
    return main(sys.argv[1], sys.argv[2:])


if __name__ == "__main__":
    sys.exit(console())
