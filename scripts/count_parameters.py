#!/usr/bin/env python3
"""Print every family x size's real parameter count (built on the meta device) as CSV lines."""

from __future__ import annotations

import argparse
import sys

from training_harness.registry import PRESETS, SIZES, count_on_meta, family_names, get_family

COLUMNS = ("family", "size", "preset", "params", "params_vs_nominal", "layers", "d_model", "vocab_rows",
           "gflops_per_token_8k")


def rows(preset: str, seq_len: int = 8192):
    for name in family_names():
        family = get_family(name)
        for size in SIZES:
            counted = count_on_meta(family, size, preset, seq_len=seq_len)
            nominal = float(size.rstrip("B")) * 1e9
            yield {"family": name, "size": size, "preset": preset, "params": counted["params"],
                   "params_vs_nominal": f"{counted['params'] / nominal - 1:+.1%}", "layers": counted["layers"],
                   "d_model": counted["d_model"], "vocab_rows": counted["vocab_rows"],
                   "gflops_per_token_8k": f"{counted['flops_per_token'] / 1e9:.3f}"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", default="paper", choices=sorted(PRESETS), help="shapes (docs/models.md)")
    args = parser.parse_args()
    print(",".join(COLUMNS))
    for row in rows(args.preset):
        print(",".join(str(row[c]) for c in COLUMNS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
