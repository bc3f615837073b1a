"""Helpers behind the bash drivers: write sweep configs, read a run's status, record a crashed run."""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from efficientllm_metrics import RESULTS_FILE, ResultsError, RunHeader, read_results, unmeasured, write_json_atomic
from training_harness.config import SPEC_GLOBAL_BATCH, TrainConfig, read_config_file
from training_harness.errors import ConfigError, DataError
from training_harness.flags import PROGRAM_VARIABLE, program_name
from training_harness.prepare_data import read_meta
from training_harness.registry import PRESETS, SIZES, family_names, get_family, resolve_families
from training_harness.tokenization import tokenizer_name


def gpu_plan(model: str, size: str) -> dict:
    """The training settings of the family's GPU plan for one size (always compiled; the micro-batch found
    automatically where the plan names none)."""
    return {**get_family(model).gpu_plan.get(size, {}), "compile": True}


def plan_flags(model: str, size: str) -> list[str]:
    """The GPU plan for one model and size as training flags (what the benchmark scripts pass)."""
    flags = []
    for key, value in gpu_plan(model, size).items():
        flags += [f"--{key}"] if value is True else [f"--{key}", str(value)]
    return flags


#: The short-comparison protocol (docs/results.md): every family reads the same documents in the same order,
#: no text twice, and is validated every 50 steps on every window of the same held-out documents.
PROTOCOL = {"data_order": "sequential", "eval_interval": 50, "eval_windows": 0}
PROTOCOL_STEPS = 250


def repeats_data(config: TrainConfig) -> str | None:
    """A warning when the config's training budget is more than its prepared training split (text would
    repeat); None when it fits or the folder is not prepared yet."""
    try:
        train_tokens = read_meta(config.data_path)["splits"]["train"]["tokens"]
    except DataError:
        return None
    if config.training_tokens <= train_tokens:
        return None
    return (f"WARNING: {config.model} {config.model_size}: {config.max_steps} steps need {config.training_tokens:,} "
            f"training tokens, {config.training_tokens / train_tokens:.2f} passes over the {train_tokens:,} of "
            f"{config.data_path}: text repeats")


def config_name(model: str, size: str) -> str:
    return f"{model}_{size}"


def generate(models: list[str], sizes: list[str], preset: str, max_steps: int, seq_len: int, data_root: str,
             output_dir: Path, tokenizers: dict[str, str], micro_batch_size: int | None = None) -> list[Path]:
    """One JSON per model x size; each names the data folder prepared with its family's tokenizer. Real
    shapes take the GPU plan (compiled); ``micro_batch_size`` overrides its micro-batch."""
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for model in models:
        family = get_family(model)
        tokenizer = tokenizers.get(model) or family.default_tokenizer
        for size in sizes:
            plan = gpu_plan(model, size) if preset != "tiny" else {}
            if micro_batch_size:
                plan["micro_batch_size"] = min(micro_batch_size, SPEC_GLOBAL_BATCH[size])
            config = TrainConfig(
                model=model, model_size=size, preset=preset, max_steps=max_steps, seq_len=seq_len,
                data_path=str(Path(data_root) / tokenizer_name(tokenizer)), tokenizer=tokenizer,
                batch_size=SPEC_GLOBAL_BATCH[size], **PROTOCOL, **plan)
            warning = repeats_data(config)
            if warning:
                print(warning, file=sys.stderr)
            # output_dir and device belong to the driver's call, not the config.
            values = {key: value for key, value in config.to_dict().items() if value not in (None, "")}
            path = output_dir / f"{config_name(model, size)}.json"
            write_json_atomic(path, values)
            written.append(path)
    return written


def run_status(results_dir: Path, max_steps: int) -> str:
    """'completed' when the run finished at least ``max_steps``; else its status, 'missing' or 'corrupt'."""
    try:
        results = read_results(results_dir)
    except FileNotFoundError:
        return "missing"
    except (OSError, ResultsError):
        return "corrupt"
    if results["status"] == "completed" and (results.get("steps") or 0) < max_steps:
        return "shorter"
    return results["status"]


#: The line a Python traceback ends with ("torch.distributed.DistNetworkError: The server socket has failed
#: ..."), after torchrun's "[rank0]:" where it relays a worker's output.
_EXCEPTION_LINE = re.compile(r"(?:\[rank\d+\]:\s*)?([A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit)\b.*)")


def log_cause(log: str) -> str | None:
    """The last exception line of a run's log (what its traceback ends with), or None."""
    try:
        lines = Path(log).read_text(errors="replace").splitlines()
    except OSError:
        return None
    matches = (_EXCEPTION_LINE.fullmatch(line.strip()) for line in reversed(lines))
    return next((match.group(1)[:300] for match in matches if match), None)


def record_crash(results_dir: Path, name: str, exit_code: int, log: str) -> str:
    """A run that died without writing its results (a segfault, a killed process, a launcher that failed
    before the run started) still gets a row, with its log's last exception as the cause. Returns the run's
    error in one line, for the sweep's summary."""
    try:
        return read_results(results_dir).get("error") or ""  # the run wrote its own outcome
    except (OSError, ResultsError):  # none, or unreadable: this row replaces it
        pass
    model, _, size = name.rpartition("_")  # family names may hold "_"
    cause = log_cause(log)
    error = f"process exited with code {exit_code} without results{f': {cause}' if cause else ''}; see {log}"
    write_json_atomic(results_dir / RESULTS_FILE, unmeasured(RunHeader(status="failed", error=error, model=model,
                                                                       size=size), None))
    return error


def check_results(results_root: Path, required: list[str]) -> list[str]:
    """One line per run folder under ``results_root``: ok, or what is wrong (not completed, unreadable, a
    required metric null). Lines of bad runs start with FAIL."""
    lines = []
    for folder in sorted(path for path in results_root.iterdir() if path.is_dir()):
        try:
            results = read_results(folder)
        except (OSError, ResultsError) as error:
            lines.append(f"FAIL {folder.name}: {error}")
            continue
        missing = [key for key in required if results.get(key) is None]
        if results["status"] != "completed" or missing:
            lines.append(f"FAIL {folder.name}: {results['status']} {results.get('error') or ''} null: {missing}")
        else:
            lines.append(f"ok {folder.name}: PPL {results.get('ppl')}, AL {results.get('al_s_per_iter')} s/iter")
    return lines or [f"FAIL {results_root}: no run folders"]


def _csv(text: str) -> list[str]:
    return [item for item in text.split(",") if item]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=program_name("training_harness.sweep"), description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    wrapper = os.environ.get(PROGRAM_VARIABLE)  # scripts/generate_attention_free_configs.sh runs "generate"
    gen = commands.add_parser("generate", help="write one config per model x size",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                              **({"prog": wrapper} if wrapper else {}))
    gen.add_argument("--models", default="paper",
                     help="comma-separated families, 'paper' (the study's four) or 'all' (every registered one)")
    gen.add_argument("--sizes", default=",".join(SIZES), help="comma-separated nominal sizes")
    gen.add_argument("--preset", default="paper", choices=sorted(PRESETS), help="shapes (docs/models.md)")
    gen.add_argument("--max_steps", type=int, default=PROTOCOL_STEPS,
                     help="optimizer steps (the protocol's equal budget: 16.4M / 8.2M / 4.1M tokens per size)")
    gen.add_argument("--seq_len", type=int, default=8192, help="tokens per training window")
    gen.add_argument("--micro_batch_size", type=int, default=None,
                     help="instead of the GPU plan's (tiny shapes: the whole batch)")
    gen.add_argument("--data_root", default="experiments/data", help="folder of prepared data, one per tokenizer")
    gen.add_argument("--output_dir", default="experiments/attention_free_benchmark/configs",
                     help="where the configs go")
    gen.add_argument("--qwen_tokenizer", default=None, help="Qwen2.5's (None: Qwen/Qwen2.5-0.5B)")
    gen.add_argument("--neox_tokenizer", default=None,
                     help="every other family's (None: EleutherAI/pythia-410m)")
    gen.add_argument("--shared_tokenizer", default=None, help="one tokenizer for all four families")
    status = commands.add_parser("status", help="print a run's status")
    status.add_argument("results_dir", type=Path)
    status.add_argument("max_steps", type=int)
    crash = commands.add_parser("record-crash", help="write a failed result for a run that wrote none; print the "
                                                     "run's error in one line")
    crash.add_argument("results_dir", type=Path)
    crash.add_argument("name")
    crash.add_argument("exit_code", type=int)
    crash.add_argument("log")
    check = commands.add_parser("check", help="check every run's results; exit 1 if any is not completed or "
                                              "lacks a required metric")
    check.add_argument("results_root", type=Path)
    check.add_argument("--require", default="ppl,bpb,amu_gb,al_s_per_iter,tt_tokens_per_param_s,tokens_per_s",
                       help="metrics that must not be null")
    model_of = commands.add_parser("model", help="print the family a config trains")
    model_of.add_argument("config", type=Path)
    args = parser.parse_args(argv)

    if args.command == "generate":
        try:
            models = resolve_families(args.models)
        except ValueError as error:
            parser.error(str(error))
        unknown = [s for s in _csv(args.sizes) if s not in SIZES]
        if unknown:
            parser.error(f"unknown sizes: {unknown}")
        neox = args.shared_tokenizer or args.neox_tokenizer
        tokenizers = {name: neox for name in family_names() if neox}
        if args.shared_tokenizer or args.qwen_tokenizer:
            tokenizers["qwen"] = args.shared_tokenizer or args.qwen_tokenizer
        for path in generate(models, _csv(args.sizes), args.preset, args.max_steps, args.seq_len,
                             args.data_root, Path(args.output_dir), tokenizers, args.micro_batch_size):
            print(path)
    elif args.command == "status":
        print(run_status(args.results_dir, args.max_steps))
    elif args.command == "record-crash":
        print(" ".join(record_crash(args.results_dir, args.name, args.exit_code, args.log).split()))
    elif args.command == "check":
        lines = check_results(args.results_root, _csv(args.require))
        print("\n".join(f"  {line}" for line in lines))
        return 1 if any(line.startswith("FAIL") for line in lines) else 0
    else:
        try:
            print(read_config_file(args.config)["model"])
        except (ConfigError, KeyError) as error:
            print(f"error: {args.config}: {error if isinstance(error, ConfigError) else 'names no model'}",
                  file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
