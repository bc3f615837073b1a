#!/usr/bin/env python3
"""Collect the sweep's results into the paper table, a CSV, a report and plots (training_harness.report)."""

import sys

from training_harness.report import main

if __name__ == "__main__":
    sys.exit(main())
