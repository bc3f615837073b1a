"""The benchmark scripts' bookkeeping, with the GPU measurements they make replaced by given rows."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stock_rows_given(peaks: dict, harness: dict, monkeypatch) -> tuple[list[dict], list[int]]:
    """benchmark_training_step.stock_rows against a stock model that allocates ``peaks[micro]`` GB (None: out of
    memory) at ``70 + micro`` thousand tokens/s; returns its rows and the micro-batches it timed."""
    script = load_script("benchmark_training_step")
    timed = []

    def stock_reference(family, size, micro, steps):
        timed.append(micro)
        if peaks[micro] is None:
            return {"family": family, "micro_batch_size": micro, "error": f"out of memory at micro-batch {micro}"}
        return {"micro_batch_size": micro, "tokens_per_s": 1000.0 * (70 + micro), "peak_alloc_gb": peaks[micro]}

    monkeypatch.setattr(script, "stock_reference", stock_reference)
    return script.stock_rows("qwen", "0.5B", harness, 8, 1), timed


def test_the_stock_model_is_timed_at_the_harness_micro_batch_and_at_one(monkeypatch):
    harness = {"micro": 4, "tokens_per_s": 125_000.0}
    rows, timed = stock_rows_given({4: 49.1, 1: 20.0}, harness, monkeypatch)
    assert timed == [4, 1] and [r["micro"] for r in rows] == [4, 1]
    assert harness["speedup_vs_stock"] == pytest.approx(125 / 74)
    assert harness["stock_mb1_tokens_per_s"] == 71_000.0
    assert "stock_fitting_micro" not in harness


def test_a_stock_model_beyond_an_80_gb_card_is_also_timed_at_the_largest_micro_batch_that_fits(monkeypatch):
    harness = {"micro": 8, "tokens_per_s": 105_000.0}
    rows, timed = stock_rows_given({8: None, 4: 109.1, 2: 56.6, 1: 30.3}, harness, monkeypatch)
    assert timed == [8, 4, 2, 1]
    assert [r["status"] for r in rows] == ["out of memory at micro-batch 8", "completed", "completed", "completed"]
    assert harness["speedup_vs_stock"] is None  # no stock figure at the same micro-batch
    assert harness["stock_fitting_micro"] == 2
    assert harness["speedup_vs_stock_fitting"] == pytest.approx(105 / 72)
