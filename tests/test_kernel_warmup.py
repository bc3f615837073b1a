"""The helper that compiles a family's library kernels beside the first step: it runs, fails loudly, stops."""

import os
import subprocess
import sys
from unittest import mock

import pytest

from training_harness import kernel_warmup
from training_harness.config import TrainConfig
from training_harness.kernel_warmup import KernelWarmup


@pytest.fixture(autouse=True)
def environment_kept():
    """``start`` sets TRITON_CACHE_DIR for the rest of its process: each test gives the environment back."""
    with mock.patch.dict(os.environ):
        yield


def test_the_helper_runs_a_two_block_model_forward_and_backward(tmp_path):
    config = TrainConfig(model="rwkv", preset="tiny", seq_len=32, device="cpu")
    helper = kernel_warmup.start(config, micro_batch=2, vocab_rows=64, log_dir=tmp_path)
    record = helper.finish()
    log = (tmp_path / kernel_warmup.LOG_NAME).read_text()
    assert "kernel_warmup_wait_s" in record, log
    assert record["kernel_warmup_wait_s"] > 0
    assert "rwkv 0.5B, 2 blocks, micro-batch 2 x 32 tokens: forward and backward" in log


def test_the_helper_leaves_its_kernels_where_inductor_points_the_training_process(tmp_path, monkeypatch):
    inductor_cache = tmp_path / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(inductor_cache))
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    config = TrainConfig(model="rwkv", preset="tiny", seq_len=32, device="cpu")
    kernel_warmup.start(config, micro_batch=1, vocab_rows=64, log_dir=tmp_path).finish()
    # inductor's folder for device 0's kernels, where the training process looks once inductor has built one
    triton_cache = str(inductor_cache / "triton" / "0")
    assert os.environ["TRITON_CACHE_DIR"] == triton_cache
    assert (tmp_path / kernel_warmup.LOG_NAME).read_text().strip().endswith(f"Triton cache {triton_cache}")


def test_a_triton_cache_the_user_set_is_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "mine"))
    kernel_warmup.share_triton_cache(0)
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "mine")


def test_a_failing_helper_reports_its_last_line(tmp_path):
    config = TrainConfig(model="no_such_family", preset="tiny", seq_len=32, device="cpu")
    record = kernel_warmup.start(config, 1, 64, tmp_path).finish()
    assert record["kernel_warmup_error"].startswith("exit 1: ValueError: unknown model family 'no_such_family'")


def test_a_helper_past_its_limit_is_stopped(tmp_path):
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    record = KernelWarmup(process, tmp_path / "absent.log").finish(wait_limit_s=0.2)
    assert record["kernel_warmup_error"].startswith("stopped after 0 s")
    assert process.poll() is not None
