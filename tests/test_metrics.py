"""The metrics package on synthetic timelines through a fake GPU backend (CPU only)."""

import json
import math
import time

import pytest

from efficientllm_metrics import (
    SCHEMA_VERSION,
    GpuInfo,
    Monitor,
    ResultsError,
    Run,
    RunHeader,
    Validation,
    atomic_folder,
    default_warmup_iterations,
    read_results,
    summarize,
    write_json_atomic,
)
from efficientllm_metrics.formulas import integrate, model_flops_utilization

COMPLETED = RunHeader(status="completed", model="toy", size="0.5B")


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class FakeGpu:
    """Memory steps from 1 GB to 3 GB at t=5 s; power is 100 + 10 t W; the SM clock 2000 - 10 t MHz; no energy
    counter."""

    def __init__(self, clock, fail_power_after=None):
        self.clock = clock
        self.gpus = [GpuInfo(0, "NVIDIA H100 80GB HBM3", "GPU-fake-0")]
        self.fail_power_after = fail_power_after

    def read(self, gpu, field):
        t = self.clock()
        if field == "memory_used_bytes":
            return 1e9 if t < 5 else 3e9
        if field == "power_w":
            if self.fail_power_after is not None and t > self.fail_power_after:
                raise RuntimeError("NVML_ERROR_GPU_IS_LOST")
            return 100.0 + 10.0 * t
        if field == "sm_clock_mhz":
            return 2000.0 - 10.0 * t
        return 1.0

    def energy_j(self, gpu):
        raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")

    def provenance(self):
        return {"driver_version": "fake"}


def run_fake_training(clock, backend, iterations=6, warmup=2, seconds=(1.0,), tokens=100):
    """Each iteration lasts seconds[i % len] and is sampled every 0.5 s."""
    monitor = Monitor([], warmup_iterations=warmup, sample_interval_s=0.5, backend=backend, clock=clock)
    monitor.start(thread=False)
    for i in range(iterations):
        duration = seconds[i % len(seconds)] if i >= warmup else 10.0
        for _ in range(int(duration / 0.5)):
            clock.now += 0.5
            monitor.sampler.sample_once()
        monitor.iteration_done(tokens)
    return monitor, monitor.stop()


def test_exact_metrics_on_synthetic_timeline():
    clock = FakeClock()
    monitor, measurement = run_fake_training(clock, FakeGpu(clock))
    # Warm-up: 2 iterations of 10 s, so the window is [20, 24]; memory is 3 GB throughout.
    doc = summarize(Run([measurement], params=1000, flops_per_token=6000.0,
                        validation=Validation(math.log(20.0), tokens=50, utf8_bytes=200, bytes_source="given")),
                    COMPLETED)
    assert doc["window_s"] == pytest.approx(4.0)
    assert doc["al_s_per_iter"] == pytest.approx(1.0)
    assert doc["tokens"] == 400
    assert doc["amu_gb"] == pytest.approx(3.0)
    assert doc["tt_tokens_per_param_s"] == pytest.approx(400 / 1000 / 4.0)
    # Power 100 + 10 t integrated over [20, 24]: 400 + 5 * (24^2 - 20^2) = 1280 J.
    assert doc["energy_j"] == pytest.approx(1280.0)
    assert doc["aec_w"] == pytest.approx(320.0)
    assert doc["energy_j_per_token"] == pytest.approx(1280.0 / 400)
    assert doc["sm_clock_mean_mhz"] == pytest.approx(2000.0 - 10.0 * 22)  # the clock's mean over [20, 24]
    assert "counter unsupported" in doc["provenance"]["methods"]["energy_j"]
    assert doc["ppl"] == pytest.approx(20.0)
    assert doc["bpb"] == pytest.approx(math.log(20.0) * 50 / (math.log(2) * 200))
    assert doc["mfu"] == pytest.approx(6000.0 * 100 / 989.4e12)
    assert doc["energy_cross_check"] is None  # no counter to check against
    assert doc["provenance"]["measured_iterations"] == 4


def test_memory_step_inside_window_is_time_weighted():
    clock = FakeClock()
    _, measurement = run_fake_training(clock, FakeGpu(clock), iterations=6, warmup=0, seconds=(1.0,))
    # Window [0, 6]: samples every 0.5 s, 1 GB up to 4.5 s, 3 GB from 5 s; the trapezoid ramps in between.
    expected = (1e9 * 4.5 + (1e9 + 3e9) / 2 * 0.5 + 3e9 * 1.0) / 6.0
    assert measurement.gpus[0].memory_mean_bytes == pytest.approx(expected)
    assert measurement.gpus[0].memory_peak_bytes == 3e9


def test_warmup_iterations_are_excluded():
    clock = FakeClock()
    _, measurement = run_fake_training(clock, FakeGpu(clock), iterations=8, warmup=3, seconds=(0.5, 1.5))
    assert len(measurement.iteration_s) == 5
    assert all(s in (0.5, 1.5) for s in measurement.iteration_s)
    assert measurement.tokens == 500


def test_default_warmup_is_ten_percent_at_least_three():
    assert default_warmup_iterations(10) == 3
    assert default_warmup_iterations(100) == 10
    assert default_warmup_iterations(101) == 11


def test_run_shorter_than_warmup_reports_null_with_reason():
    clock = FakeClock()
    _, measurement = run_fake_training(clock, FakeGpu(clock), iterations=2, warmup=3)
    doc = summarize(Run([measurement], 1000, None, None), COMPLETED)
    assert doc["al_s_per_iter"] is None and doc["amu_gb"] is None
    assert "warm-up" in doc["provenance"]["methods"]["al_s_per_iter"]


def test_sampler_survives_nvml_error_mid_run():
    clock = FakeClock()
    _, measurement = run_fake_training(clock, FakeGpu(clock, fail_power_after=21.0), iterations=12, warmup=2)
    health = measurement.sampler_health
    assert health["errors"]["power_w@0"] >= 3
    assert "power_w@0" in health["disabled_fields"]
    assert "GPU_IS_LOST" in health["first_error"]["power_w@0"]
    # Memory kept being sampled, so AMU stands; power did not cover the window.
    assert measurement.gpus[0].memory_mean_bytes == pytest.approx(3e9)
    doc = summarize(Run([measurement], 1000, None, None), COMPLETED)
    assert doc["aec_w"] is None
    assert "sample" in doc["provenance"]["methods"]["aec_w"]


def test_sampler_thread_starts_samples_and_stops():
    monitor = Monitor([], warmup_iterations=0, sample_interval_s=0.01)
    monitor.start()
    time.sleep(0.2)
    monitor.iteration_done(10)
    measurement = monitor.stop()
    assert measurement.sample_count >= 5
    assert monitor.sampler._thread is None
    monitor.sampler.stop()  # a second stop neither fails nor samples again
    assert len(monitor.sampler.samples) == measurement.sample_count


def test_cpu_fallback_writes_valid_json_with_null_power(tmp_path):
    monitor = Monitor([], warmup_iterations=1, sample_interval_s=0.01)
    monitor.start()
    for _ in range(4):
        time.sleep(0.03)
        monitor.iteration_done(64)
    doc = summarize(Run([monitor.stop()], 10_000, 1e5, None), COMPLETED)
    path = tmp_path / "efficientllm_metrics.json"
    write_json_atomic(path, doc)
    loaded = json.loads(path.read_text())
    assert loaded["aec_w"] is None and loaded["energy_j"] is None
    assert "CPU" in loaded["provenance"]["methods"]["aec_w"]
    assert loaded["amu_gb"] > 0  # process RSS
    assert loaded["mfu"] is None and "no GPU" in loaded["provenance"]["methods"]["mfu"]
    assert loaded["sm_clock_mean_mhz"] is None and "no GPU" in loaded["provenance"]["methods"]["sm_clock_mean_mhz"]
    assert loaded["tokens"] == 3 * 64


def test_interrupted_write_leaves_previous_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    write_json_atomic(path, {"status": "completed", "ppl": 12.5})

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(json, "dump", crash)
    with pytest.raises(KeyboardInterrupt):
        write_json_atomic(path, {"status": "running"})
    assert json.loads(path.read_text()) == {"status": "completed", "ppl": 12.5}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_integral_refuses_unsampled_stretches():
    with pytest.raises(ValueError, match="no samples"):
        integrate([], [], 2.0, 3.0)
    with pytest.raises(ValueError, match="no sample"):
        integrate([0, 1, 2, 3], [0, 1, 2, 3], 0.0, 9.0, max_gap_s=2.0)
    assert integrate([0, 1, 2, 3], [0, 1, 2, 3], 0.5, 2.5, max_gap_s=1.0) == pytest.approx(3.0)
    assert integrate([0.0, 10.0], [1.0, 3.0], 2.0, 3.0) == pytest.approx(1.5)  # interpolated inside one gap


def test_paused_evaluation_is_outside_the_window():
    clock = FakeClock()
    monitor = Monitor([], warmup_iterations=1, sample_interval_s=0.5, backend=FakeGpu(clock), clock=clock)
    monitor.start(thread=False)

    def advance(seconds):
        for _ in range(int(seconds / 0.5)):
            clock.now += 0.5
            monitor.sampler.sample_once()

    for step in range(5):  # the window starts after step 0 at t = 1
        advance(1.0)
        monitor.iteration_done(100)
        if step == 2:  # t = 3: a 10 s evaluation
            monitor.pause()
            advance(10.0)
            monitor.resume()
            monitor.pause()  # back to back (a checkpoint right after): an empty segment adds nothing
            monitor.resume()
    measurement = monitor.stop()
    assert measurement.iteration_s == [1.0, 1.0, 1.0, 1.0]
    assert measurement.window_s == pytest.approx(4.0)
    # Power 100 + 10 t over [1, 3] and [13, 15]: 2 * 100 + 5 * (9 - 1) + 2 * 100 + 5 * (225 - 169).
    assert measurement.gpus[0].energy_integral_j == pytest.approx(720.0)
    assert measurement.gpus[0].power_mean_w == pytest.approx(180.0)


class StalledCounterGpu(FakeGpu):
    """An energy counter that does not advance: NVML's, read twice within its update period."""

    def energy_j(self, gpu):
        return 5000.0


def test_an_energy_counter_that_did_not_advance_is_no_measurement():
    clock = FakeClock()
    _, measurement = run_fake_training(clock, StalledCounterGpu(clock))
    gpu = measurement.gpus[0]
    assert gpu.energy_counter_j is None and "did not advance over the 4.000 s window" in gpu.reasons["energy_counter_j"]
    doc = summarize(Run([measurement], params=1000, flops_per_token=None, validation=None), COMPLETED)
    assert doc["energy_j"] == pytest.approx(1280.0)  # the integral of sampled power stands in, said so
    assert "did not advance" in doc["provenance"]["methods"]["energy_j"]
    assert doc["energy_cross_check"] is None


def test_mfu_unknown_gpu_is_null_with_reason():
    value, reason = model_flops_utilization(1e9, 1e3, ["Mystery GPU"])
    assert value is None and "Mystery GPU" in reason


def test_results_round_trip_through_the_one_reader(tmp_path):
    clock = FakeClock()
    _, measurement = run_fake_training(clock, FakeGpu(clock))
    header = RunHeader(status="oom", error="CUDA out of memory", details={"memory_reserved_gb": 79.5},
                       model="toy", size="3B", steps=7)
    write_json_atomic(tmp_path / "efficientllm_metrics.json", summarize(Run([measurement], 1000, None, None), header))
    document = read_results(tmp_path)  # a run folder or the file itself
    assert document == read_results(tmp_path / "efficientllm_metrics.json")
    assert (document["status"], document["error"], document["memory_reserved_gb"]) == ("oom", "CUDA out of memory",
                                                                                         79.5)
    assert (document["model"], document["size"], document["steps"]) == ("toy", "3B", 7)
    assert document["schema_version"] == SCHEMA_VERSION


@pytest.mark.parametrize("content, message", [
    ('{"schema_version": 99, "status": "completed"}', "schema_version 99"),
    ('{"status": "completed"}', "schema_version None"),
    ('[1, 2]', "not a JSON object"),
    ('{"schema_version": 1, "status": "compl', "not valid JSON"),
    ('{"schema_version": 1}', "no status"),
])
def test_unreadable_results_raise_one_clear_error(tmp_path, content, message):
    path = tmp_path / "efficientllm_metrics.json"
    path.write_text(content)
    with pytest.raises(ResultsError, match=message):
        read_results(path)
    with pytest.raises(FileNotFoundError):
        read_results(tmp_path / "elsewhere")


def test_interrupted_folder_write_leaves_previous_folder_intact(tmp_path):
    target = tmp_path / "checkpoint"
    with atomic_folder(target) as staging:
        (staging / "weights").write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_folder(target) as staging:
        (staging / "weights").write_text("new, half written")
        raise KeyboardInterrupt
    assert (target / "weights").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
