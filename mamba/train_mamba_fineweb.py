#!/usr/bin/env python3
"""Pretrain one mamba model on FineWeb-Edu under the shared harness; --help lists every flag."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from training_harness.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("mamba"))
