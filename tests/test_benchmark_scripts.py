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


class SteppedEnergyCounter:
    """A GPU's energy counter on a fake clock: it shows the energy used up to its last update, one every
    ``period`` ticks. A kernel call takes 7 ticks and 2 J; a read of the counter takes one tick, idle (1 mJ)."""

    def __init__(self, period: int = 25):
        self.period, self.tick, self.joules, self.history = period, 0, 0.0, [0.0]

    def advance(self, ticks: int, joules: float) -> None:
        for _ in range(ticks):
            self.tick += 1
            self.joules += joules / ticks
            self.history.append(self.joules)

    def call(self) -> None:
        self.advance(7, 2.0)

    def read(self) -> float:
        self.advance(1, 0.001)
        return self.history[self.tick - self.tick % self.period]


def test_kernel_energy_is_read_between_updates_of_the_counter():
    """Read at arbitrary times, a stale counter misses the calls since its last update; opened and closed on its
    updates, the window holds every call and at most one update period of idle energy."""
    script = load_script("benchmark_selective_scan")
    counter = SteppedEnergyCounter()
    counter.advance(11, 0.0)  # calls start between two updates
    per_call = script.joules_per_call(counter.call, 100, counter.read, synchronize=lambda: None)
    assert per_call == pytest.approx(2.0, abs=0.001)

    # the fake's counter does lag: read without waiting for its updates, the same calls come out short
    stale = SteppedEnergyCounter()
    stale.advance(11, 0.0)
    start = stale.read()
    for _ in range(100):
        stale.call()
    assert (stale.read() - start) / 100 < 1.98


def test_a_stuck_energy_counter_is_an_error_not_a_wait_forever():
    script = load_script("benchmark_selective_scan")
    with pytest.raises(RuntimeError, match="energy counter did not move"):
        script.next_reading(lambda: 5.0, timeout_s=0.01)


def test_a_gpu_without_an_energy_counter_is_timed_with_its_energy_unmeasured(monkeypatch):
    script = load_script("benchmark_selective_scan")

    class NoCounter:
        def energy_j(self, gpu):
            raise RuntimeError("Not Supported")

    monkeypatch.setattr(script, "open_nvml", lambda indices: (NoCounter(), None))
    monkeypatch.setattr(script.torch.cuda, "current_device", lambda: 0)
    meter = script.KernelMeter(reps=3, energy_window_s=1.0)
    assert meter.read_energy_j is None
    assert meter.energy_unmeasured == "the GPU's energy counter is unreadable (RuntimeError: Not Supported)"


@pytest.mark.parametrize("label", ["8x4x2", "8x8x2x64", "8x4x2/64", "16x4x2x64/128"])
def test_tiling_labels_name_the_tilings_they_parse_to(label):
    script = load_script("benchmark_selective_scan")
    tiling = script.parse_tiling(label)
    assert script.tiling_label(tiling) == label
    assert tiling.chunk == tiling.forward_block * tiling.forward_steps_per_thread


def test_a_tiling_whose_forward_cannot_split_the_chunk_is_refused():
    script = load_script("benchmark_selective_scan")
    with pytest.raises(ValueError, match="cannot split a chunk of 1024 steps"):
        script.parse_tiling("8x4x2/256")
