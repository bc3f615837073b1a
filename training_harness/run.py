"""One run end to end: the run folder's lock, the trainer under the monitor, the outcome, and the one results
file (a completed result outlives failed attempts, each of which is logged)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from efficientllm_metrics import (
    RESULTS_FILE,
    Monitor,
    RankMeasurement,
    ResultsError,
    Run,
    completed_steps,
    default_warmup_iterations,
    gather_measurements,
    read_results,
    summarize,
    unmeasured,
    write_json_atomic,
)
from training_harness import distributed
from training_harness.config import TrainConfig
from training_harness.errors import EXIT_FAILED, EXIT_NAN, EXIT_OOM, ConfigError
from training_harness.locks import exclusive
from training_harness.run_log import LOG_FILE
from training_harness.trainer import NonFiniteLoss, Outcome, StopRequest, Trainer

ATTEMPTS_FILE = "attempts.jsonl"


def steps_done(output_dir: Path) -> int | None:
    """Steps of a completed run in ``output_dir``, or None (no run, another outcome, or unreadable results)."""
    try:
        return completed_steps(read_results(output_dir))
    except (OSError, ResultsError):
        return None


def oom_details(context: distributed.ProcessContext) -> dict:
    if not context.cuda_indices:
        return {}
    index = context.device.index
    return {"memory_allocated_gb": torch.cuda.memory_allocated(index) / 1e9,
            "memory_reserved_gb": torch.cuda.memory_reserved(index) / 1e9,
            "max_memory_allocated_gb": torch.cuda.max_memory_allocated(index) / 1e9}


def train(config: TrainConfig) -> int:
    """Run one configuration end to end; returns the process exit code."""
    output = Path(config.output_dir)
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"--output_dir {output}: cannot create it ({error.strerror})") from None
    if not os.access(output, os.W_OK | os.X_OK):
        raise ConfigError(f"--output_dir {output}: not writable by this user; choose another folder")
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun's other processes: rank 0 holds the folder's lock
        exit_code = _train(config, output)
    else:
        with exclusive(output, "a run folder"):
            exit_code = _train(config, output)
    if distributed.launched_world_size() > 1:
        distributed.exit_process(exit_code)
    return exit_code


def _train(config: TrainConfig, output: Path) -> int:
    done = steps_done(output)
    if done is not None and done >= config.max_steps:
        print(f"{output}: already completed ({done} steps); nothing to do", file=sys.stderr)
        return 0
    if (output / LOG_FILE).exists() and not config.resume:
        print(f"{output} holds an earlier run; pass --resume to continue it or choose another --output_dir",
              file=sys.stderr)
        return EXIT_FAILED
    context = distributed.setup(config.device)
    trainer = Trainer(config, context)
    monitor: Monitor | None = None
    measurement: RankMeasurement | None = None
    try:
        with StopRequest() as stop:  # from setup on: a signal while it builds stops the run before its first step
            trainer.setup()
            warmup = config.warmup_iterations
            if warmup is None:
                warmup = default_warmup_iterations(config.max_steps - trainer.step)
            monitor = Monitor(context.cuda_indices, warmup, config.sample_interval_s, context.rank)
            outcome = trainer.run(monitor, stop)
            measurement = monitor.stop()  # the window ends before the final evaluation
            if outcome.status == "completed":
                trainer.finish()
    except torch.cuda.OutOfMemoryError as error:
        outcome = Outcome("oom", EXIT_OOM, str(error).splitlines()[0], oom_details(context))
    except NonFiniteLoss as error:
        outcome = Outcome("nan", EXIT_NAN, str(error))
    except Exception as error:  # recorded in the results, then re-raised for the traceback
        outcome = Outcome("failed", EXIT_FAILED, f"{type(error).__name__}: {error}")
        _write_results(trainer, monitor, measurement, outcome)
        raise
    finally:
        trainer.close()
    _write_results(trainer, monitor, measurement, outcome)
    distributed.teardown()
    if outcome.error:
        print(f"{outcome.status}: {outcome.error}", file=sys.stderr)
    elif context.is_main:
        print(f"{outcome.status}: results in {output / RESULTS_FILE}", file=sys.stderr)
    return outcome.exit_code


def _write_results(trainer: Trainer, monitor: Monitor | None, measurement: RankMeasurement | None,
                   outcome: Outcome) -> None:
    """Every rank hands its measurement to rank 0, which writes the one results file."""
    if monitor is not None:
        measurement = measurement or monitor.stop()  # a run that raised has not stopped its monitor yet
        monitor.write_timeline(trainer.output)
    measurements = gather_measurements(measurement) if measurement is not None else None
    if not trainer.context.is_main:
        return
    header = trainer.header(outcome)
    description = trainer.description
    if measurements is None or description is None:
        document = unmeasured(header, description.params if description else None)
    else:
        reason = "validation not run: the run did not complete" if trainer.validation is None else ""
        run = Run(measurements, description.params, description.flops_per_token, trainer.validation, reason)
        document = summarize(run, header)
    _record_attempt(trainer.output, document)
    if document["status"] != "completed" and steps_done(trainer.output) is not None:
        trainer.log.say(f"this attempt ended {document['status']}; the completed results in "
                        f"{trainer.output / RESULTS_FILE} stay, and the attempt is in {ATTEMPTS_FILE}")
        return
    write_json_atomic(trainer.output / RESULTS_FILE, document)


def _record_attempt(output: Path, document: dict) -> None:
    """One line per attempt on a run folder: when, how it ended and why, how far it got."""
    line = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "status": document["status"],
            "error": document.get("error"), "steps": document.get("steps"), "ppl": document.get("ppl")}
    with open(output / ATTEMPTS_FILE, "a") as handle:
        handle.write(json.dumps(line) + "\n")
