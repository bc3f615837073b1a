"""The compile log of a process's Triton kernels, against a stand-in for Triton's listener knob (the CPU build
of torch has no Triton); timed steps with their energy window; where a profiled step's GPU waited."""

import gzip
import json
import sys
import threading
import time
import types

import pytest
import torch

from training_harness.profiling import (
    ENERGY_METRICS,
    STEP_LABEL,
    TritonCompileLog,
    gpu_kernels,
    measured_steps,
    profile_steps,
    step_idle,
)


def fake_triton(monkeypatch, listener=None) -> types.SimpleNamespace:
    compilation = types.SimpleNamespace(listener=listener)
    knobs = types.SimpleNamespace(compilation=compilation)
    monkeypatch.setitem(sys.modules, "triton", types.SimpleNamespace(knobs=knobs))
    return compilation


def compile_event(compilation, name: str, microseconds: int, cache_hit: bool = False) -> None:
    compilation.listener(src=None, metadata={"name": name}, metadata_group={},
                         times=types.SimpleNamespace(total=microseconds), cache_hit=cache_hit)


def test_counts_compilations_not_cache_hits_and_gives_the_listener_back(monkeypatch):
    heard = []
    previous = lambda **event: heard.append(event["cache_hit"])  # noqa: E731
    compilation = fake_triton(monkeypatch, previous)
    log = TritonCompileLog().start()
    compile_event(compilation, "chunk_h", 500_000)
    compile_event(compilation, "chunk_o", 1_000_000, cache_hit=True)  # loaded from the disk cache
    compile_event(compilation, "chunk_o", 2_000_000)
    compile_event(compilation, "chunk_h", 250_000)  # another specialization of the same kernel
    assert log.stop() == {"triton_compilations": 3, "triton_compile_s": 2.75,
                          "triton_compiled_kernels": {"chunk_o": 2.0, "chunk_h": 0.75}}
    assert heard == [False, True, False, False]  # a listener set before still heard everything
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


def test_step_idle_counts_overlapping_kernels_once_and_names_the_longest_wait():
    steps = [(0.0, 100.0), (100.0, 200.0)]  # microseconds
    kernels = [(70.0, 90.0, "c"), (10.0, 30.0, "a"), (20.0, 40.0, "b"),  # a and b overlap on two streams
               (100.0, 195.0, "d")]
    first, second = step_idle(steps, kernels)
    assert first == pytest.approx({"wall_s": 100e-6, "gpu_busy_s": 50e-6, "longest_idle_s": 30e-6, "idle_before": "c"})
    assert second == pytest.approx({"wall_s": 100e-6, "gpu_busy_s": 95e-6, "longest_idle_s": 5e-6,
                                    "idle_before": "step end"})


def test_gpu_kernels_leave_out_the_spans_of_host_ranges_on_the_gpu_timeline():
    def event(name, device_type, annotation=False):
        return types.SimpleNamespace(name=name, device_type=device_type, is_user_annotation=annotation)

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    events = [event(STEP_LABEL, cpu), event(STEP_LABEL, cuda, True), event("Optimizer.step#AdamW.step", cuda, True),
              event("multi_tensor_apply_kernel", cuda), event("aten::mm", cpu), event("Memcpy DtoD", cuda)]
    assert [kernel.name for kernel in gpu_kernels(events)] == ["multi_tensor_apply_kernel", "Memcpy DtoD"]


def test_profile_steps_reports_every_step_and_a_cpu_step_as_all_waiting():
    profile = profile_steps(lambda: time.sleep(0.02), 3, top=5, step_s=0.02)
    assert profile["gpu_kernel_s_per_step"] == 0 and profile["top_kernels"] == []
    assert len(profile["steps"]) == 3
    for step in profile["steps"]:
        assert step["wall_s"] >= 0.02 and step["gpu_busy_s"] == 0
        assert step["longest_idle_s"] == step["wall_s"] and step["idle_before"] == "step end"


def test_profile_steps_writes_a_gzipped_chrome_trace_with_each_step_labelled(tmp_path):
    trace = tmp_path / "steps.json.gz"
    profile_steps(lambda: torch.ones(64, 64) @ torch.ones(64, 64), 2, top=3, step_s=0.01, trace=str(trace))
    with gzip.open(trace, "rt") as file:
        events = json.load(file)["traceEvents"]
    assert sum(event.get("name") == STEP_LABEL for event in events) == 2
    assert any(event.get("name") == "aten::mm" for event in events)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_profile_steps_puts_each_gpu_kernel_in_its_step_and_names_the_wait_for_the_host():
    matrix = torch.randn(4096, 4096, device="cuda")

    def step():
        with torch.profiler.record_function("products"):  # on the GPU's timeline too, as AdamW's step range is
            for _ in range(4):
                matrix @ matrix
        time.sleep(0.1)  # host work after the launches: the GPU waits until the step's end

    step()  # cuBLAS's first call, which starts slowly, before the profile, as a run's timed steps come first
    profile = profile_steps(step, 2, top=3, step_s=0.1)
    assert profile["top_kernels"] and len(profile["steps"]) == 2
    assert {"products", STEP_LABEL}.isdisjoint(kernel["name"] for kernel in profile["top_kernels"])
    busy = sum(step["gpu_busy_s"] for step in profile["steps"])
    assert busy == pytest.approx(2 * profile["gpu_kernel_s_per_step"], rel=0.1)  # each kernel inside its step
    for step in profile["steps"]:
        assert step["idle_before"] == "step end" and 0.05 < step["longest_idle_s"] < step["wall_s"]
