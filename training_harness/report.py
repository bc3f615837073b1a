"""Collect the sweep's results into the paper table (LaTeX), a CSV, a text report and plots.

    python scripts/collect_attention_free_results.py \\
        --results_dir ./experiments/attention_free_benchmark/results \\
        --output_dir ./experiments/attention_free_benchmark/tables

Runs that failed, ran out of memory, are missing or whose results are corrupt appear as such,
with the reason; a metric that could not be measured shows why.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure  # figures drawn straight to files: no pyplot, no display backend

from efficientllm_metrics import RESULTS_FILE, ResultsError, read_results
from training_harness.registry import SIZES, family_names, get_family
from training_harness.run_log import LOG_FILE, read_log

#: Table metrics: column, header, format, whether lower is better.
TABLE_METRICS = [
    ("ppl", "PPL", "{:.2f}", True),
    ("amu_gb", "AMU (GB)", "{:.2f}", True),
    ("al_s_per_iter", "AL (s/iter)", "{:.3f}", True),
    ("tt_tokens_per_param_s", "TT (tokens/param/s)", "{:.2e}", False),
    ("aec_w", "AEC (W)", "{:.1f}", True),
]
CSV_COLUMNS = ["model", "display_name", "size", "preset", "status", "reason", "params", "context", "steps",
               "world_size", "device_name", "kernel_path", "micro_batch_size", "accumulation_steps",
               "activation_checkpointing", "compile", "attention", "ppl", "bpb", "amu_gb", "peak_memory_gb",
               "allocator_peak_allocated_gb", "al_s_per_iter", "al_p90_s", "tt_tokens_per_param_s", "tokens_per_s",
               "aec_w", "energy_j", "energy_j_per_token", "mfu", "tokens", "window_s", "measured_iterations",
               "warmup_iterations", "energy_integral_over_counter"]
MIN_WINDOW_ITERATIONS, MIN_WINDOW_S = 30, 30.0


def display_name(model: str) -> str:
    return get_family(model).display_name if model in family_names() else model


def load_run(folder: Path, model: str, size: str) -> dict:
    """One row: the results file's values, or a status saying why there are none."""
    row = {"model": model, "size": size, "display_name": display_name(model), "reason": ""}
    try:
        results = read_results(folder)
    except FileNotFoundError:
        return {**row, "status": "missing", "reason": f"no {RESULTS_FILE} in {folder}"}
    except ResultsError as error:
        return {**row, "status": "corrupt", "reason": f"{error.path.name}: {error.problem}"}
    provenance = results.get("provenance") or {}
    methods = provenance.get("methods") or {}
    cross_check = results.get("energy_cross_check") or {}
    row.update({key: results.get(key) for key in CSV_COLUMNS if key in results})
    row.update({
        "status": results.get("status", "corrupt"),
        "reason": results.get("error") or "",
        "al_p90_s": (results.get("latency") or {}).get("p90_s"),
        "measured_iterations": provenance.get("measured_iterations"),
        "warmup_iterations": provenance.get("warmup_iterations"),
        "energy_integral_over_counter": cross_check.get("integral_over_counter"),
        "null_reasons": {key: methods.get(key, "not recorded") for key, *_ in TABLE_METRICS
                         if results.get(key) is None},
        "sampler_errors": sum(sum(h.get("errors", {}).values()) for h in (provenance.get("sampler_health") or {})
                              .values()),
    })
    return row


def discover(results_dir: Path, configs_dir: Path | None) -> list[tuple[Path, str, str]]:
    """(folder, model, size) of every run: the configs' runs (so missing ones show) plus any result folders."""
    names = {p.name for p in results_dir.iterdir() if p.is_dir()} if results_dir.exists() else set()
    if configs_dir is not None and configs_dir.exists():
        names |= {p.stem for p in configs_dir.glob("*.json")}
    runs = []
    for name in names:
        model, _, size = name.partition("_")
        runs.append((results_dir / name, model, size))
    order = {m: i for i, m in enumerate(family_names())}
    return sorted(runs, key=lambda r: (SIZES.index(r[2]) if r[2] in SIZES else 99, order.get(r[1], 99), r[1]))


def format_params(params) -> str:
    if params is None or (isinstance(params, float) and math.isnan(params)):
        return "unknown"
    for scale, suffix, digits in ((1e9, "B", 2), (1e6, "M", 1), (1e3, "K", 0)):
        if params >= scale:
            return f"{params / scale:.{digits}f}{suffix}"
    return str(int(params))


def format_context(context) -> str:
    if not isinstance(context, (int, float)) or math.isnan(context):
        return "--"
    return f"{int(context) // 1024}K" if context >= 1024 and int(context) % 1024 == 0 else str(int(context))


def latex_escape(text: str) -> str:
    for char, escaped in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("$", r"\$"), ("#", r"\#"),
                          ("_", r"\_"), ("{", r"\{"), ("}", r"\}"), ("~", r"\textasciitilde{}"),
                          ("^", r"\textasciicircum{}")):
        text = text.replace(char, escaped)
    return text


def best_per_size(frame: pd.DataFrame) -> dict[tuple[str, str], float]:
    """(size, metric) -> the best value among completed runs."""
    best = {}
    done = frame[frame["status"] == "completed"]
    for size, group in done.groupby("size"):
        for key, _, _, lower in TABLE_METRICS:
            values = pd.to_numeric(group.get(key), errors="coerce").dropna() if key in group else pd.Series()
            if len(values):
                best[(size, key)] = values.min() if lower else values.max()
    return best


def hardware(frame: pd.DataFrame) -> str:
    names = sorted({f"{row.world_size or 1}x {row.device_name}" for row in frame.itertuples()
                    if isinstance(row.device_name, str)})
    return ", ".join(names) or "unknown hardware"


def to_latex(frame: pd.DataFrame) -> str:
    best = best_per_size(frame)
    notes: dict[str, int] = {}  # reason -> footnote number
    lines = [r"\begin{table}[t]", r"\centering", r"\small", r"\begin{tabular}{llrrrrrrr}", r"\toprule",
             "Method & Size & Parameters & Context & " + " & ".join(h for _, h, _, _ in TABLE_METRICS) + r" \\",
             r"\midrule"]
    for index, (size, group) in enumerate(frame.groupby("size", sort=False)):
        if index:
            lines.append(r"\midrule")
        for row in group.itertuples():
            cells = [latex_escape(row.display_name), size, format_params(row.params), format_context(row.context)]
            if row.status != "completed":
                reason = latex_escape(f"{row.status.upper()}: {row.reason}"[:90])
                cells.append(rf"\multicolumn{{{len(TABLE_METRICS)}}}{{l}}{{\textit{{{reason}}}}}")
            else:
                for key, _, fmt, _ in TABLE_METRICS:
                    value = getattr(row, key, None)
                    if value is None or (isinstance(value, float) and math.isnan(value)):
                        number = notes.setdefault(row.null_reasons.get(key, "not measured"), len(notes) + 1)
                        cells.append(rf"n/m\textsuperscript{{{number}}}")
                    else:
                        text = fmt.format(value)
                        cells.append(rf"\textbf{{{text}}}" if best.get((size, key)) == value else text)
            lines.append(" & ".join(cells) + r" \\")
    window = "after warm-up (first 10\\% of iterations, at least 3), over the rest of the run"
    caption = (f"Attention-free mechanisms pretrained on FineWeb-Edu ({latex_escape(hardware(frame))}). "
               f"AMU in GB = $10^9$ bytes of device memory, time-averaged; AL per optimizer iteration; "
               f"TT in tokens per parameter per second; AEC in watts over all GPUs of a run. "
               f"Metrics measured {window}. Best per size in bold.")
    lines += [r"\bottomrule", r"\end{tabular}"]
    if notes:
        lines.append(r"\par\footnotesize n/m: not measured. "
                     + "; ".join(f"{number}: {latex_escape(reason)}" for reason, number in notes.items()))
    lines += [rf"\caption{{{caption}}}", r"\label{tab:attention-free}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def published_rank(model: str, key: str) -> str:
    ranks = get_family(model).published_ranks if model in family_names() else None
    return f"published {ranks[key]}" if ranks else "not in the study"


def rank_table(frame: pd.DataFrame) -> list[str]:
    """Our mean rank per metric over the sizes where every family of the table completed, beside the study's."""
    done = frame[frame["status"] == "completed"]
    models = list(dict.fromkeys(frame["model"]))
    lines = []
    for key, header, _, lower in TABLE_METRICS:
        ranks: dict[str, list[float]] = {}
        for _, group in done.groupby("size"):
            values = pd.to_numeric(group[key], errors="coerce") if key in group else None
            if values is None or values.isna().any() or len(group) < len(models):
                continue
            for model, rank in zip(group["model"], values.rank(ascending=lower, method="min")):
                ranks.setdefault(model, []).append(rank)
        cells = []
        for model in models:
            ours = f"{sum(ranks[model]) / len(ranks[model]):.1f}" if model in ranks else "n/a (incomplete sizes)"
            cells.append(f"{display_name(model)} {ours} ({published_rank(model, key)})")
        lines.append(f"  {header}: " + "; ".join(cells))
    return lines


def anomalies(frame: pd.DataFrame) -> list[str]:
    found = []
    for row in frame.itertuples():
        label = f"{row.display_name} {row.size}"
        if row.status != "completed":
            found.append(f"{label}: {row.status} - {row.reason or 'no reason recorded'}")
            continue
        iterations = getattr(row, "measured_iterations", None)
        window = getattr(row, "window_s", None)
        if iterations is not None and window is not None and not (
                iterations >= MIN_WINDOW_ITERATIONS and window >= MIN_WINDOW_S):
            found.append(f"{label}: short measured window ({iterations} iterations, {window:.1f} s)")
        for key, reason in (row.null_reasons or {}).items():
            found.append(f"{label}: {key} not measured - {reason}")
        ratio = getattr(row, "energy_integral_over_counter", None)
        if ratio is not None and not math.isnan(ratio) and abs(ratio - 1) > 0.1:
            found.append(f"{label}: integrated power differs from the energy counter by {ratio - 1:+.1%}")
        if getattr(row, "sampler_errors", 0):
            found.append(f"{label}: {row.sampler_errors} sampler read errors (see provenance)")
        if isinstance(row.kernel_path, str) and "slow" in row.kernel_path:
            found.append(f"{label}: ran the slow reference path ({row.kernel_path})")
    return found or ["none"]


def report(frame: pd.DataFrame) -> str:
    best = best_per_size(frame)
    lines = ["Attention-free mechanisms benchmark", "", "Setup",
             f"  hardware: {hardware(frame)}",
             f"  runs: {len(frame)} ({(frame['status'] == 'completed').sum()} completed)",
             "  metrics: after warm-up; AMU in GB = 10^9 bytes; AEC over all GPUs of a run", "", "Winners per size"]
    for size in frame["size"].drop_duplicates():
        group = frame[(frame["size"] == size) & (frame["status"] == "completed")]
        for key, header, fmt, _ in TABLE_METRICS:
            if (size, key) in best:
                winner = group[pd.to_numeric(group[key], errors="coerce") == best[(size, key)]]["display_name"]
                lines.append(f"  {size} {header}: {', '.join(winner)} ({fmt.format(best[(size, key)])})")
    lines += ["", "Ranking (ours: mean rank over sizes where every family completed; 1 = best; published: the "
              "attention-free table of EfficientLLM, arXiv 2505.13840)", *rank_table(frame),
              "", "Anomalies", *(f"  {a}" for a in anomalies(frame)), ""]
    return "\n".join(lines)


def plot_losses(frame: pd.DataFrame, results_dir: Path, output_dir: Path) -> list[Path]:
    written = []
    for size in frame["size"].drop_duplicates():
        figure = Figure(figsize=(6, 4))
        axis = figure.subplots()
        plotted = False
        for row in frame[frame["size"] == size].itertuples():
            records = read_log(results_dir / f"{row.model}_{size}" / LOG_FILE)
            steps = [r["step"] for r in records if "loss" in r]
            if steps:
                axis.plot(steps, [r["loss"] for r in records if "loss" in r], label=row.display_name)
                plotted = True
        if plotted:
            axis.set(xlabel="optimizer step", ylabel="training loss (nats/token)", title=f"Training loss, {size}")
            axis.legend()
            path = output_dir / f"loss_curves_{size}.png"
            figure.savefig(path, dpi=120, bbox_inches="tight")
            written.append(path)
    return written


def plot_metrics(frame: pd.DataFrame, output_dir: Path) -> list[Path]:
    done = frame[frame["status"] == "completed"]
    written = []
    for key, header, _, _ in TABLE_METRICS:
        if key not in done or pd.to_numeric(done[key], errors="coerce").isna().all():
            continue
        table = done.pivot_table(index="size", columns="display_name", values=key, aggfunc="first")
        table = table.reindex([s for s in SIZES if s in table.index])
        figure = Figure(figsize=(6, 4))
        axis = table.plot.bar(ax=figure.subplots(), rot=0)
        axis.set(ylabel=header, title=f"{header} by size")
        path = output_dir / f"{key}.png"
        figure.savefig(path, dpi=120, bbox_inches="tight")
        written.append(path)
    return written


def collect(results_dir: Path, output_dir: Path, configs_dir: Path | None) -> pd.DataFrame:
    runs = discover(results_dir, configs_dir)
    frame = pd.DataFrame([load_run(*run) for run in runs], columns=[*CSV_COLUMNS, "null_reasons", "sampler_errors"])
    frame["null_reasons"] = frame["null_reasons"].apply(lambda v: v if isinstance(v, dict) else {})
    output_dir.mkdir(parents=True, exist_ok=True)
    frame[CSV_COLUMNS].to_csv(output_dir / "attention_free_results.csv", index=False)
    (output_dir / "attention_free_table.tex").write_text(to_latex(frame))
    (output_dir / "attention_free_report.txt").write_text(report(frame))
    plot_losses(frame, results_dir, output_dir)
    plot_metrics(frame, output_dir)
    return frame


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results_dir", type=Path, default=Path("experiments/attention_free_benchmark/results"))
    parser.add_argument("--output_dir", type=Path, default=Path("experiments/attention_free_benchmark/tables"))
    parser.add_argument("--configs_dir", type=Path, default=None,
                        help="the sweep's configs, so runs that never wrote results show as missing "
                             "(default: configs/ beside the results folder)")
    args = parser.parse_args(argv)
    configs_dir = args.configs_dir or args.results_dir.parent / "configs"
    frame = collect(args.results_dir, args.output_dir, configs_dir)
    if frame.empty:
        print(f"error: no runs in {args.results_dir} (and no configs in {configs_dir})", file=sys.stderr)
        return 2
    print(f"{len(frame)} runs ({(frame['status'] == 'completed').sum()} completed) -> {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
