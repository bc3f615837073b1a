"""What a run says while it trains, on rank 0: log.jsonl, TensorBoard scalars and progress on stderr."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tqdm import tqdm

from efficientllm_metrics import Validation, atomic_file, bits_per_byte

LOG_FILE = "log.jsonl"


def read_log(path: Path) -> list[dict]:
    """The records of a run's log.jsonl (none if it is missing). A record cut short by a killed process, the
    last line only, is left out."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class RunLog:
    """One record per optimizer step and per validation in ``log.jsonl``, the same as TensorBoard scalars, and
    progress: a bar on a terminal, else a plain line at the first step and every tenth of the run. Every
    method does nothing on ranks other than 0."""

    def __init__(self, output: Path, label: str, is_main: bool):
        self.output = output
        self.label = label
        self.is_main = is_main
        self._writer = None
        self._progress = None
        self._every = 1
        self._total = 0

    def say(self, message: str) -> None:
        if self.is_main:
            tqdm.write(f"[{self.label}] {message}", file=sys.stderr)

    def keep_until(self, step: int) -> None:
        """Drop records past ``step`` (a resumed run is about to redo those steps)."""
        path = self.output / LOG_FILE
        if self.is_main and path.exists():
            with atomic_file(path) as handle:  # a crash here leaves the old log whole
                handle.writelines(json.dumps(record) + "\n" for record in read_log(path) if record["step"] <= step)

    def open(self, first_step: int, total_steps: int) -> None:
        """Start TensorBoard and the progress display before the loop."""
        if not self.is_main:
            return
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(str(self.output / "tensorboard"))
        # disable=None hides the bar when stderr is not a terminal (the sweep's logs), which get plain lines.
        self._progress = tqdm(total=total_steps, initial=first_step, disable=None, desc=self.label, unit="step")
        self._every = max(1, total_steps // 10)
        self._total = total_steps

    def step(self, record: dict, device_readings: dict[str, float]) -> None:
        """One optimizer step: step, loss, lr, grad_norm, step_s, tokens_per_s (the first step of a process also
        triton_compilations, triton_compile_s and triton_compiled_kernels, where Triton can say, and
        kernel_warmup_wait_s or kernel_warmup_error where a helper compiled library kernels); the device's latest
        readings. TensorBoard gets the record's numbers; log.jsonl all of it."""
        if not self.is_main:
            return
        self._append(record)
        if self._writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):  # not the helper's error, not kernel names
                    self._writer.add_scalar(f"train/{key}", value, record["step"])
            for name, value in device_readings.items():
                self._writer.add_scalar(f"device/{name}", value, record["step"])
        if self._progress is None:
            return
        self._progress.update(1)
        self._progress.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}")
        if self._progress.disable and (record["step"] % self._every == 0 or record["step"] == 1):
            compiled = (f" ({record['triton_compile_s']:.1f} s of it compiling Triton kernels in this process: "
                        f"{record['triton_compilations']})") if record.get("triton_compilations") else ""
            self.say(f"step {record['step']}/{self._total}: loss {record['loss']:.3f}, {record['step_s']:.2f} s"
                     f"{compiled}, {record['tokens_per_s']:,.0f} tokens/s")

    def validation(self, step: int, validation: Validation) -> None:
        """One validation: its mean loss (nats per token) and BPB, also said on stderr."""
        if not self.is_main:
            return
        bpb = bits_per_byte(validation.mean_loss_nats, validation.tokens, validation.utf8_bytes)
        self._append({"step": step, "val_loss": validation.mean_loss_nats, "val_bpb": bpb})
        self.say(f"step {step}: validation loss {validation.mean_loss_nats:.4f}, BPB {bpb:.4f} "
                 f"({validation.tokens:,} tokens)")
        if self._writer is not None:
            self._writer.add_scalar("val/loss", validation.mean_loss_nats, step)
            self._writer.add_scalar("val/bpb", bpb, step)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.close()
        if self._writer is not None:
            self._writer.close()
        self._progress = self._writer = None

    def _append(self, record: dict) -> None:
        with open(self.output / LOG_FILE, "a") as handle:
            handle.write(json.dumps(record) + "\n")
