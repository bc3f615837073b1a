"""Cost against context length: every family at one size, from 2K to 32K tokens per sequence, with the same
tokens per optimizer step at every length. It writes one config per family and length, trains them through
the sweep driver (so a rerun resumes and skips finished runs), then writes the rows as JSON, a Markdown table
with the crossover points, and figures of tokens/s, peak memory and energy per token against context.

    python -m training_harness.context_sweep --devices cuda:0 --steps 30
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import StrMethodFormatter

from efficientllm_metrics import RESULTS_FILE, ResultsError, read_results, write_json_atomic
from training_harness.config import TrainConfig
from training_harness.figures import Quantity, family_styles, legend_outside, save
from training_harness.flags import program_name
from training_harness.registry import get_family, resolve_families
from training_harness.sweep import gpu_plan
from training_harness.tokenization import tokenizer_name

CONTEXTS = (2048, 4096, 8192, 16384, 32768)
TOKENS_PER_STEP = 65_536
PLAN_CONTEXT = 8192  # the context the families' GPU plans were fitted at
#: Families whose sequence mixing is attention: the ones the attention-free families are measured against.
ATTENTION_FAMILIES = ("qwen", "pythia")
#: A lead counts only beyond this fraction: back-to-back rounds of one workload spread by about 3 % (docs/device.md).
NOISE = 0.03
ROOT = Path(__file__).resolve().parents[1]


PLOTTED = [Quantity("tokens_per_s", "throughput (tokens / s)", lower=False),
           Quantity("peak_memory_gb", "peak GPU memory (GB)"),
           Quantity("energy_j_per_token", "energy per token (mJ)", scale=1e3)]


def context_plan(model: str, size: str, context: int, tokens_per_step: int) -> dict:
    """Training settings at ``context``: the family's GPU plan at 8K, keeping its tokens per micro-batch (the
    activations it was fitted to), and recomputing activations where one sequence alone holds more."""
    plan = gpu_plan(model, size)
    tokens_per_micro = plan.get("micro_batch_size", 1) * PLAN_CONTEXT
    batch = tokens_per_step // context
    micro = max(1, min(batch, tokens_per_micro // context))
    settings = {**plan, "batch_size": batch, "micro_batch_size": micro,
                "activation_checkpointing": plan.get("activation_checkpointing", False)}
    if context > tokens_per_micro:  # more activations than the plan's: recompute every block
        settings.pop("checkpoint_blocks", None)
        settings["activation_checkpointing"] = True
    return settings


def run_name(model: str, context: int) -> str:
    return f"{model}_ctx{context}"


def generate(models: list[str], size: str, contexts: list[int], tokens_per_step: int, steps: int, preset: str,
             data_root: str, tokenizers: dict[str, str], output_dir: Path) -> list[Path]:
    """One config per family and context; the plan is the GPU plan adapted per length on real shapes."""
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for model in models:
        tokenizer = tokenizers.get(model) or get_family(model).default_tokenizer
        for context in contexts:
            if tokens_per_step % context:
                raise ValueError(f"{tokens_per_step} tokens per step is not a whole number of {context}-token "
                                 "sequences")
            plan = context_plan(model, size, context, tokens_per_step) if preset != "tiny" else {
                "batch_size": tokens_per_step // context}
            config = TrainConfig(model=model, model_size=size, preset=preset, seq_len=context, max_steps=steps,
                                 data_path=str(Path(data_root) / tokenizer_name(tokenizer)), tokenizer=tokenizer,
                                 eval_windows=1, final_checkpoint=False, **plan)
            values = {key: value for key, value in config.to_dict().items() if value not in (None, "")}
            path = output_dir / f"{run_name(model, context)}.json"
            write_json_atomic(path, values)  # a driver on another GPU may be reading the folder
            written.append(path)
    return written


def collect(experiment: Path) -> pd.DataFrame:
    """One row per config: its results, or the status and reason why there are none (out of memory: 'does
    not fit')."""
    rows = []
    for config_path in sorted((experiment / "configs").glob("*.json")):
        config = json.loads(config_path.read_text())
        row = {"model": config["model"], "display_name": get_family(config["model"]).display_name,
               "context": config["seq_len"], "micro_batch_size": config.get("micro_batch_size"),
               "activation_checkpointing": config.get("activation_checkpointing", False)}
        try:
            results = read_results(experiment / "results" / config_path.stem)
        except FileNotFoundError:
            rows.append({**row, "status": "missing", "reason": f"no {RESULTS_FILE}"})
            continue
        except ResultsError as error:
            rows.append({**row, "status": "corrupt", "reason": error.problem})
            continue
        reason = "does not fit: " + (results.get("error") or "") if results["status"] == "oom" else \
            results.get("error") or ""
        rows.append({**row, "status": results["status"], "reason": reason,
                     **{key: results.get(key) for key in ("params", "tokens_per_s", "al_s_per_iter", "amu_gb",
                                                          "peak_memory_gb", "energy_j_per_token", "mfu",
                                                          "device_name") if key in results},
                     **{key: results[key] for key in ("micro_batch_size", "activation_checkpointing")
                        if results.get(key) is not None}})
    return pd.DataFrame(rows)


def crossovers(frame: pd.DataFrame, noise: float = NOISE) -> list[dict]:
    """For each attention-free family, transformer and plotted quantity: the shortest measured context from
    which the attention-free family is better by more than ``noise`` (a fraction) at every longer one too
    (None: never, or not measured)."""
    done = frame[frame["status"] == "completed"]
    found = []
    for quantity in (q for q in PLOTTED if q.key in done):
        table = done.pivot_table(index="context", columns="model", values=quantity.key, aggfunc="first")
        for free in (m for m in table.columns if m not in ATTENTION_FAMILIES):
            for attention in (m for m in table.columns if m in ATTENTION_FAMILIES):
                pair = table[[free, attention]].dropna()
                if quantity.lower:
                    better = pair[free] < pair[attention] * (1 - noise)
                else:
                    better = pair[free] > pair[attention] * (1 + noise)
                crossing = None
                for context in reversed(pair.index):
                    if not better[context]:
                        break
                    crossing = int(context)
                found.append({"quantity": quantity.key, "family": free, "against": attention,
                              "from_context": crossing, "contexts_compared": [int(c) for c in pair.index]})
    return found


def _cell(value, fmt: str, scale: float = 1.0) -> str:
    """A measured value, or n/m where it could not be measured (the results say why)."""
    return "n/m" if value is None or pd.isna(value) else fmt.format(value * scale)


def markdown(frame: pd.DataFrame, crossings: list[dict]) -> str:
    lines = ["| family | context | micro-batch | ckpt | tokens/s | AL s/iter | AMU GB | peak GB | mJ/token | MFU |",
             "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in frame.sort_values(["context"]).itertuples():
        setup = f"| {row.display_name} | {row.context:,} | {row.micro_batch_size} | " \
                f"{'yes' if row.activation_checkpointing else 'no'} |"
        if row.status != "completed":
            lines.append(f"{setup} {row.status}: {row.reason} | | | | | |")
            continue
        cells = [_cell(row.tokens_per_s, "{:,.0f}"), _cell(row.al_s_per_iter, "{:.3f}"), _cell(row.amu_gb, "{:.1f}"),
                 _cell(row.peak_memory_gb, "{:.1f}"), _cell(row.energy_j_per_token, "{:.2f}", 1e3),
                 _cell(row.mfu, "{:.3f}")]
        lines.append(f"{setup} {' | '.join(cells)} |")
    lines += ["", f"Crossovers: the shortest context from which the attention-free family is better by more than "
              f"{NOISE:.0%} (run-to-run spread) at every longer measured one.", ""]
    names = {m: get_family(m).display_name for m in frame["model"].unique()}
    for crossing in crossings:
        where = f"from {crossing['from_context']:,} tokens" if crossing["from_context"] else "at no measured length"
        lines.append(f"- {crossing['quantity']}: {names[crossing['family']]} passes {names[crossing['against']]} "
                     f"{where}")
    return "\n".join(lines) + "\n"


def plot(frame: pd.DataFrame, output_dir: Path) -> list[Path]:
    """One figure per quantity against context on a log-2 axis, one line per family in its usual style."""
    done = frame[frame["status"] == "completed"]
    styles = family_styles(list(frame["model"]))
    contexts = sorted(done["context"].unique())
    ticks = [f"{c // 1024}K" if c % 1024 == 0 else str(c) for c in contexts]
    written = []
    for quantity in (q for q in PLOTTED if q.key in done):
        figure = Figure(figsize=(6, 3.6))
        axis = figure.subplots()
        for model, group in sorted(done.groupby("model"), key=lambda item: styles[item[0]].order):
            group = group.sort_values("context").dropna(subset=[quantity.key])
            if group.empty:
                continue
            axis.plot(group["context"], group[quantity.key] * quantity.scale, color=styles[model].color,
                      marker=styles[model].marker, label=group["display_name"].iloc[0])
        axis.set_xscale("log", base=2)
        axis.set_xticks(contexts, ticks)
        axis.minorticks_off()
        axis.yaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
        axis.set(xlabel="context (tokens per sequence)", ylabel=quantity.label)
        axis.grid(alpha=0.3)
        legend_outside(axis)
        written += save(figure, output_dir, f"context_{quantity.key}")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=program_name("training_harness.context_sweep"),
                                     description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--devices", default="cuda:0", help="the driver's devices: cuda:N (one GPU) or cpu")
    parser.add_argument("--models", default="paper",
                        help="comma-separated families, 'paper' (the study's four) or 'all'")
    parser.add_argument("--size", default="0.5B", help="nominal size")
    parser.add_argument("--preset", default="paper", help="shapes (docs/models.md)")
    parser.add_argument("--contexts", default=",".join(map(str, CONTEXTS)), help="comma-separated lengths")
    parser.add_argument("--tokens_per_step", type=int, default=TOKENS_PER_STEP,
                        help="tokens per optimizer step at every length")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run (the first 10 %% warm up)")
    parser.add_argument("--data_root", default="experiments/data", help="folder of prepared data per tokenizer")
    parser.add_argument("--qwen_tokenizer", default=None, help="Qwen2.5's (None: its hub tokenizer)")
    parser.add_argument("--neox_tokenizer", default=None, help="the GPT-NeoX families' (None: the hub's)")
    parser.add_argument("--experiment_dir", type=Path, default=Path("experiments/context_sweep"),
                        help="configs, results, logs and the collected outputs")
    parser.add_argument("--collect_only", action="store_true", help="only collect what has run")
    args = parser.parse_args(argv)
    try:
        models = resolve_families(args.models)
    except ValueError as error:
        parser.error(str(error))
    if not args.collect_only:
        tokenizers = {m: args.neox_tokenizer for m in models if m != "qwen" and args.neox_tokenizer}
        if args.qwen_tokenizer:
            tokenizers["qwen"] = args.qwen_tokenizer
        contexts = [int(c) for c in args.contexts.split(",") if c]
        generate(models, args.size, contexts, args.tokens_per_step, args.steps, args.preset, args.data_root,
                 tokenizers, args.experiment_dir / "configs")
        env = {**os.environ, "EXPERIMENT_DIR": str(args.experiment_dir.resolve())}
        # The driver's exit code says whether every run completed; a run that does not fit is a row, not an
        # error, so collection goes on either way.
        subprocess.run(["bash", str(ROOT / "scripts" / "run_all_attention_free_experiments.sh"), "dsw",
                        args.devices, str(args.steps)], env=env, check=False)
    frame = collect(args.experiment_dir)
    if frame.empty:
        print(f"error: no configs in {args.experiment_dir / 'configs'}", file=sys.stderr)
        return 2
    crossings = crossovers(frame)
    write_json_atomic(args.experiment_dir / "context_results.json",
                      {"rows": json.loads(frame.to_json(orient="records")), "crossovers": crossings})
    (args.experiment_dir / "context_table.md").write_text(markdown(frame, crossings))
    plot(frame, args.experiment_dir)
    print(f"{len(frame)} runs ({(frame['status'] == 'completed').sum()} completed) -> {args.experiment_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
