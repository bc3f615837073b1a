#!/usr/bin/env python3
"""Pretrain one gated_deltanet model on FineWeb-Edu under the shared harness; --help lists every flag."""

import sys

from training_harness.cli import main

if __name__ == "__main__":
    sys.exit(main("gated_deltanet"))
