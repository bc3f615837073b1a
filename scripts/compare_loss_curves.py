#!/usr/bin/env python3
"""Does a fast path train like the path it replaced? Compare the per-step training losses of benchmark rows.

    python scripts/benchmark_training_step.py --families F --steps 50 --output curves.json \\
        --variant plan="FLAGS" --variant eager="FLAGS without --compile" \\
        --variant eager_half="the same at half the micro-batch"
    python scripts/compare_loss_curves.py curves.json --reference eager --noise eager_half

Every run starts from the same weights and reads the same batches (same seed), so the curves differ only by
arithmetic. The noise variant computes the same function as the reference with its sums in another order
(half the micro-batch, twice the accumulation): how far its curve strays from the reference's is what
rounding alone does to that many steps of bf16 training. That can be almost nothing (a transformer's forward
does not depend on the micro-batch), so the tolerance has a floor: rounding the loss itself to bf16 once (unit
roundoff 2^-8, relative). A variant is within noise when at every step its distance from the reference is at
most the larger of NOISE_FACTOR times the noise variant's largest and that floor; a wrong gradient shows as a
gap that grows with the steps, far beyond both. Prints one table; exit status 1 when a variant is not within
noise or a run is missing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

#: Two perturbations of the same size stray by comparable, not equal, amounts: one sample's spread.
NOISE_FACTOR = 2.0
#: bf16's unit roundoff: the relative error of rounding one value to bf16.
BF16_UNIT_ROUNDOFF = 2.0 ** -8


def largest_gap(curve: list[float], reference: list[float]) -> float:
    return max(abs(a - b) for a, b in zip(curve, reference))


def compare(rows: list[dict], reference: str, noise: str) -> list[dict]:
    """One verdict per (round, family, size, variant) other than the reference and the noise."""
    runs = {(r.get("round", 1), r["family"], r["size"], r["variant"]): r.get("losses") for r in rows}
    verdicts = []
    for (round_index, family, size, variant), curve in runs.items():
        if variant in (reference, noise, "stock"):
            continue
        key = (round_index, family, size)
        base, noisy = runs.get((*key, reference)), runs.get((*key, noise))
        verdict = {"round": round_index, "family": family, "size": size, "variant": variant}
        if not (curve and base and noisy):
            missing = [name for name, c in ((variant, curve), (reference, base), (noise, noisy)) if not c]
            verdicts.append({**verdict, "verdict": f"missing: {', '.join(missing)}"})
            continue
        if not len(curve) == len(base) == len(noisy):  # a run that stopped early
            verdicts.append({**verdict, "verdict": f"steps differ: {len(curve)}, {len(base)} ({reference}), "
                                                   f"{len(noisy)} ({noise})"})
            continue
        gap, noise_gap = largest_gap(curve, base), largest_gap(noisy, base)
        within = all(abs(a - b) <= max(NOISE_FACTOR * noise_gap, BF16_UNIT_ROUNDOFF * abs(b))
                     for a, b in zip(curve, base))
        verdicts.append({**verdict, "steps": len(curve), "max_gap": gap, "noise_max_gap": noise_gap,
                         "bf16_floor": BF16_UNIT_ROUNDOFF * min(map(abs, base)),
                         "final_loss": curve[-1], "reference_final_loss": base[-1],
                         "verdict": "within noise" if within else "NOT within noise"})
    return verdicts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", type=Path, help="a JSON file of scripts/benchmark_training_step.py")
    parser.add_argument("--reference", required=True, help="the variant the others are compared with")
    parser.add_argument("--noise", required=True, help="the reference with its sums in another order")
    args = parser.parse_args()
    verdicts = compare(json.loads(args.rows.read_text())["rows"], args.reference, args.noise)
    columns = ("round", "family", "size", "variant", "steps", "max_gap", "noise_max_gap", "bf16_floor",
               "final_loss", "reference_final_loss", "verdict")
    print("| " + " | ".join(columns) + " |")
    for verdict in verdicts:
        cells = (f"{v:.4f}" if isinstance(v, float) else str(v) for v in (verdict.get(c, "-") for c in columns))
        print("| " + " | ".join(cells) + " |")
    return 0 if verdicts and all(v["verdict"] == "within noise" for v in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
