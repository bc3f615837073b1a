"""scripts/compare_loss_curves.py: a fast path's curve against its reference, judged by rounding noise."""

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def curve(offset: float = 0.0, drift: float = 0.0, wiggle: float = 0.0) -> list[float]:
    return [10 * math.exp(-step / 20) + 2 + offset + drift * step + wiggle * math.sin(step) for step in range(50)]


def compare(tmp_path, rows: list[dict]) -> subprocess.CompletedProcess:
    path = tmp_path / "rows.json"
    path.write_text(json.dumps({"rows": rows}))
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "compare_loss_curves.py"), str(path),
                           "--reference", "eager", "--noise", "eager_half"], capture_output=True, text=True)


def row(variant: str, losses: list[float]) -> dict:
    return {"round": 1, "family": "qwen", "size": "0.5B", "variant": variant, "losses": losses}


def test_a_curve_as_close_as_rounding_noise_passes_and_a_drifting_one_fails(tmp_path):
    rows = [row("eager", curve()), row("eager_half", curve(wiggle=0.01)), row("plan", curve(wiggle=-0.012)),
            row("broken", curve(drift=0.002)), {**row("stock", []), "losses": None}]
    result = compare(tmp_path, rows)
    lines = {line.split(" | ")[3]: line for line in result.stdout.splitlines()[1:]}
    assert result.returncode == 1
    assert set(lines) == {"plan", "broken"}  # the reference, the noise and the stock model are not judged
    assert lines["plan"].endswith("| within noise |")
    assert lines["broken"].endswith("| NOT within noise |") and "| 0.0980 |" in lines["broken"]


def test_a_gap_below_bf16_rounding_of_the_loss_passes_where_the_reordering_noise_is_nil(tmp_path):
    rows = [row("eager", curve()), row("eager_half", curve()), row("plan", curve(offset=0.005)),
            row("broken", curve(offset=0.02))]  # the floor: 2^-8 x the lowest loss, ~2.0, is ~0.008
    lines = {line.split(" | ")[3]: line for line in compare(tmp_path, rows).stdout.splitlines()[1:]}
    assert lines["plan"].endswith("| within noise |") and lines["broken"].endswith("| NOT within noise |")


def test_every_judged_variant_within_noise_exits_zero_and_a_missing_reference_does_not(tmp_path):
    assert compare(tmp_path, [row("eager", curve()), row("eager_half", curve(wiggle=0.01)),
                              row("plan", curve(offset=0.015))]).returncode == 0
    result = compare(tmp_path, [row("eager_half", curve()), row("plan", curve())])
    assert result.returncode == 1 and "missing: eager |" in result.stdout
    result = compare(tmp_path, [row("eager", curve()), row("eager_half", curve()), row("plan", curve()[:30])])
    assert result.returncode == 1 and "steps differ: 30, 50 (eager), 50 (eager_half) |" in result.stdout
