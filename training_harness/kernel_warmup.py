"""Compile a family's library kernels in a helper process while the training process compiles its own regions.

fla's and mamba-ssm's Triton kernels compile in the training process the first time each runs, one after
another, while inductor's workers compile the regions around them: RWKV-7's thirteen took ~12 s of a 34 s
first step on an H200. The helper runs the same library calls once, forward and backward, on a model of two
blocks at the run's shapes, micro-batch and precision, eagerly, and leaves the kernels in Triton's on-disk
cache (``TRITON_CACHE_DIR``, which ``start`` sets for both processes), where the training process finds them.
It changes no result: a kernel the helper has not finished yet compiles in the training process as before. The
trainer waits for the helper before its first backward, so the helper's memory is gone before the gradients and
AdamW state exist.

    python -m training_harness.kernel_warmup CONFIG_JSON MICRO_BATCH VOCAB_ROWS   (what ``start`` runs)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

#: Two blocks: RWKV-7's first block differs from the rest (it makes the value residual the others read).
WARMUP_BLOCKS = 2
LOG_NAME = "kernel_warmup.log"
#: The helper compiles a few dozen kernels; past this, something is wrong and the run should not wait.
WAIT_LIMIT_S = 300.0


@dataclass
class KernelWarmup:
    """The helper process of one run."""

    process: subprocess.Popen
    log_path: Path

    def finish(self, wait_limit_s: float = WAIT_LIMIT_S) -> dict:
        """Wait for the helper (stopping it past ``wait_limit_s``); for the first step's record,
        ``kernel_warmup_wait_s`` (what waiting cost the training process) when it finished, else
        ``kernel_warmup_error`` (why not)."""
        waiting = time.perf_counter()
        try:
            code = self.process.wait(timeout=wait_limit_s)
        except subprocess.TimeoutExpired:
            self.stop()
            return {"kernel_warmup_error": f"stopped after {wait_limit_s:.0f} s (see {self.log_path})"}
        if code != 0:
            lines = self.log_path.read_text(errors="replace").strip().splitlines() if self.log_path.exists() else []
            last = lines[-1] if lines else "no output"
            return {"kernel_warmup_error": f"exit {code}: {last} (see {self.log_path})"}
        return {"kernel_warmup_wait_s": round(time.perf_counter() - waiting, 2)}

    def stop(self) -> None:
        """End the helper now if it still runs (a run that failed before its first backward)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def wanted(config, family, context) -> bool:
    """On the first process of a CUDA run, for a family whose library kernels compile at their first launch
    (the families that pin them)."""
    return config.kernel_warmup and family.pinned_kernels is not None and bool(context.cuda_indices) \
        and context.is_main


def start(config, micro_batch: int, vocab_rows: int, log_dir: Path) -> KernelWarmup:
    """Start the helper for ``config`` (a TrainConfig) on its device; its output goes to ``log_dir``."""
    import torch

    torch.ones(1, device=config.device)  # hold the device first: a GPU in exclusive-process mode refuses the helper
    share_triton_cache(torch.device(config.device).index or 0)
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / LOG_NAME
    with log_path.open("w") as log:  # the child keeps its own descriptor
        process = subprocess.Popen(
            [sys.executable, "-m", "training_harness.kernel_warmup", json.dumps(config.to_dict()),
             str(micro_batch), str(vocab_rows)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    return KernelWarmup(process, log_path)


def share_triton_cache(device_index: int) -> None:
    """Point this process's Triton cache, and so the helper's, at the folder inductor would give it. Where
    ``TRITON_CACHE_DIR`` is not set, inductor sets it to a folder of its own cache when it builds its first kernel
    (``torch._inductor.runtime.cache_dir_utils.triton_cache_dir``), after the helper has started; a helper left
    with Triton's default (``~/.triton/cache``) compiles the library's kernels where the training process no
    longer looks, and the training process compiles every one again (9-13 s of RWKV-7's first step on an H200;
    docs/performance.md, change 53). A folder the user set is kept."""
    from torch._inductor.runtime.cache_dir_utils import triton_cache_dir

    os.environ["TRITON_CACHE_DIR"] = triton_cache_dir(device_index)


def warm(config, micro_batch: int, vocab_rows: int) -> float:
    """One forward and backward of a ``WARMUP_BLOCKS``-block model as the run builds it; returns seconds."""
    import torch

    from training_harness.registry import get_family
    from training_harness.trainer import compute_context

    started = time.perf_counter()
    device = torch.device(config.device or "cuda")
    family = get_family(config.model)
    shape = {**family.shape(config.model_size, config.preset), "layers": WARMUP_BLOCKS}
    with device:
        model = family.build(shape, vocab_rows, device.type, config.allow_slow_kernels)
    if config.precision == "bf16":
        model = model.to(torch.bfloat16)
    tokens = torch.randint(vocab_rows, (micro_batch, config.seq_len + 1), device=device)
    with compute_context(config, device):
        loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    from training_harness.config import TrainConfig

    config_json, micro_batch, vocab_rows = argv if argv is not None else sys.argv[1:]
    config = TrainConfig(**json.loads(config_json))
    seconds = warm(config, int(micro_batch), int(vocab_rows))
    print(f"{config.model} {config.model_size}, {WARMUP_BLOCKS} blocks, micro-batch {micro_batch} x "
          f"{config.seq_len} tokens: forward and backward in {seconds:.1f} s; Triton cache "
          f"{os.environ.get('TRITON_CACHE_DIR', 'Triton default')}", flush=True)
    os._exit(0)  # the kernels are on disk and the run waits for this exit: skip the interpreter's teardown


if __name__ == "__main__":
    main()
