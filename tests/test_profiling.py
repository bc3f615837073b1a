"""The compile log of a process's Triton kernels, against a stand-in for Triton's listener knob (the CPU build
of torch has no Triton); timed steps with their energy window."""

import sys
import threading
import time
import types

import pytest

from training_harness.profiling import ENERGY_METRICS, TritonCompileLog, measured_steps


def fake_triton(monkeypatch, listener=None) -> types.SimpleNamespace:
    compilation = types.SimpleNamespace(listener=listener)
    knobs = types.SimpleNamespace(compilation=compilation)
    monkeypatch.setitem(sys.modules, "triton", types.SimpleNamespace(knobs=knobs))
    return compilation


def compile_event(compilation, microseconds: int, cache_hit: bool = False) -> None:
    compilation.listener(src=None, metadata={"name": "kernel"}, metadata_group={},
                         times=types.SimpleNamespace(total=microseconds), cache_hit=cache_hit)


def test_counts_compilations_not_cache_hits_and_gives_the_listener_back(monkeypatch):
    heard = []
    previous = lambda **event: heard.append(event["cache_hit"])  # noqa: E731
    compilation = fake_triton(monkeypatch, previous)
    log = TritonCompileLog().start()
    compile_event(compilation, 2_500_000)
    compile_event(compilation, 1_000_000, cache_hit=True)  # loaded from the disk cache: nothing compiled
    compile_event(compilation, 500_000)
    assert log.stop() == {"triton_compilations": 2, "triton_compile_s": 3.0}
    assert heard == [False, True, False]  # a listener set before still heard everything
    assert compilation.listener is previous
    assert log.stop() == {}


def test_without_triton_it_hears_nothing_and_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton raises ImportError
    assert TritonCompileLog().start().stop() == {}
    monkeypatch.setitem(sys.modules, "triton", types.SimpleNamespace(knobs=types.SimpleNamespace()))
    assert TritonCompileLog().start().stop() == {}  # a Triton older than the listener


def test_measured_steps_times_each_step_and_says_why_a_cpu_run_has_no_energy():
    calls = []
    times, energy = measured_steps(lambda: calls.append(time.sleep(0.01)), 3, tokens_per_step=8, cuda_indices=[])
    assert len(calls) == 3 and len(times) == 3 and min(times) >= 0.01
    assert set(ENERGY_METRICS) <= set(energy) and all(energy[name] is None for name in ENERGY_METRICS)
    assert "CPU" in energy["energy_reasons"]["energy_j_per_token"]
    assert "no GPU" in energy["energy_reasons"]["sm_clock_mean_mhz"]


def test_measured_steps_stops_its_sampler_when_a_step_fails():
    running = threading.active_count()

    def out_of_memory():
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        measured_steps(out_of_memory, 3, tokens_per_step=8, cuda_indices=[])
    assert threading.active_count() == running
