"""Collect the sweep's results into the paper table (LaTeX), a CSV, a text report and plots.

    python scripts/collect_attention_free_results.py \\
        --results_dir ./experiments/attention_free_benchmark/results \\
        --output_dir ./experiments/attention_free_benchmark/tables

Runs that failed, ran out of memory, are missing or whose results are corrupt appear as such,
with the reason; a metric that could not be measured shows why.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from efficientllm_metrics import RESULTS_FILE, ResultsError, read_results
from training_harness.figures import plot_by_size, plot_curves
from training_harness.flags import program_name
from training_harness.registry import SIZES, family_names, get_family
from training_harness.run_description import CONFIG_FILE
from training_harness.run_log import LOG_FILE, read_log


@dataclass(frozen=True)
class Column:
    """A table metric: results key, header, format of the scaled value, and whether lower is better (None:
    not compared, like PPL, whose tokens differ between tokenizers)."""

    key: str
    header: str
    fmt: str
    lower: bool | None
    scale: float = 1.0


TABLE_METRICS = [
    Column("ppl", "PPL", "{:,.1f}", None),
    Column("bpb", "BPB", "{:.3f}", True),
    Column("amu_gb", "AMU (GB)", "{:.1f}", True),
    Column("al_s_per_iter", "AL (s/iter)", "{:.3f}", True),
    Column("tt_tokens_per_param_s", "TT (tokens/param/s)", "{:.2e}", False),
    Column("aec_w", "AEC (W)", "{:.0f}", True),
    Column("energy_j_per_token", "Energy (mJ/token)", "{:.1f}", True, 1e3),
]
#: The metrics ranked against the study's published ranks; quality by BPB beside its PPL rank.
RANKED = ["bpb", "amu_gb", "al_s_per_iter", "tt_tokens_per_param_s", "aec_w"]
PUBLISHED_KEY = {"bpb": "ppl"}
CSV_COLUMNS = ["model", "display_name", "size", "preset", "status", "reason", "params", "context", "steps",
               "global_batch", "world_size", "device_name", "kernel_path", "micro_batch_size", "accumulation_steps",
               "activation_checkpointing", "checkpoint_blocks", "compile", "attention", "cuda_graphs", "ppl", "bpb",
               "amu_gb", "peak_memory_gb", "allocator_peak_allocated_gb", "al_s_per_iter", "al_p90_s",
               "tt_tokens_per_param_s", "tokens_per_s", "aec_w", "energy_j", "energy_j_per_token", "sm_clock_mean_mhz",
               "mfu", "tokens", "window_s", "measured_iterations", "warmup_iterations", "energy_integral_over_counter",
               "corpus", "tokenizer", "training_tokens", "training_passes", "validation_windows", "final_train_loss",
               "final_val_loss", "train_val_gap", "commit", "dirty", "host"]
MIN_WINDOW_ITERATIONS, MIN_WINDOW_S = 30, 30.0
#: Validation loss this far (nats) above the final training loss flags memorisation.
MEMORISATION_GAP = 0.3
FINAL_LOSS_STEPS = 10


def display_name(model: str) -> str:
    return get_family(model).display_name if model in family_names() else model


def run_facts(folder: Path) -> dict:
    """What a run's config.json and log.jsonl say beyond its results: data, budget, commit, final losses."""
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        config = {}
    data, git = config.get("data") or {}, config.get("git") or {}
    records = read_log(folder / LOG_FILE)
    losses = [r["loss"] for r in records if "loss" in r][-FINAL_LOSS_STEPS:]
    validations = [r["val_loss"] for r in records if "val_loss" in r]
    final_train = sum(losses) / len(losses) if losses else None
    final_val = validations[-1] if validations else None
    return {
        "corpus": Path(data["source"]).name if data.get("source") else None,
        "tokenizer": Path(data["tokenizer"]).name if data.get("tokenizer") else None,
        "training_tokens": data.get("training_tokens"), "training_passes": data.get("training_passes"),
        "validation_windows": data.get("validation_windows"),
        "final_train_loss": final_train, "final_val_loss": final_val,
        "train_val_gap": final_val - final_train if final_train is not None and final_val is not None else None,
        "commit": git.get("commit"), "dirty": git.get("dirty"), "host": config.get("host"),
    }


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
    # Recorded values only: a crashed run's header is null where setup never got (its display name too).
    row.update({key: results[key] for key in CSV_COLUMNS if results.get(key) is not None})
    row.update(run_facts(folder))
    row.update({
        "status": results.get("status", "corrupt"),
        "reason": results.get("error") or "",
        "al_p90_s": (results.get("latency") or {}).get("p90_s"),
        "measured_iterations": provenance.get("measured_iterations"),
        "warmup_iterations": provenance.get("warmup_iterations"),
        "energy_integral_over_counter": cross_check.get("integral_over_counter"),
        "null_reasons": {column.key: methods.get(column.key, "not recorded") for column in TABLE_METRICS
                         if results.get(column.key) is None},
        "sampler_errors": sum(sum(h.get("errors", {}).values()) for h in (provenance.get("sampler_health") or {})
                              .values()),
    })
    return row


def learning_curve(folder: Path, tokens_per_step: int) -> pd.DataFrame:
    """A run's logged training loss and validation BPB by step, with the training tokens seen at each."""
    records = read_log(folder / LOG_FILE)
    curve = pd.DataFrame(records, columns=["step", "loss", "val_bpb"]).groupby("step", as_index=False).first()
    return curve.assign(tokens=curve["step"] * tokens_per_step)


def discover(results_dirs: list[Path], sizes: list[str] | None = None) -> list[tuple[Path, str, str]]:
    """(folder, model, size) of every run of every results folder, at ``sizes`` (None: all): the runs of the
    configs beside it (``../configs``, so missing ones show) plus any result folders. A run in two folders is
    an error: the table would hold one of them silently."""
    folders: dict[str, Path] = {}
    for results_dir in results_dirs:
        names = {p.name for p in results_dir.iterdir() if p.is_dir()} if results_dir.exists() else set()
        names |= {p.stem for p in (results_dir.parent / "configs").glob("*.json")}
        for name in names:
            if name in folders:
                raise ValueError(f"run {name} is in both {folders[name].parent} and {results_dir}")
            folders[name] = results_dir / name
    runs = []
    for name, folder in folders.items():
        model, _, size = name.rpartition("_")  # family names may hold "_"
        if sizes is None or size in sizes:
            runs.append((folder, model, size))
    order = {m: i for i, m in enumerate(family_names())}
    return sorted(runs, key=lambda r: (SIZES.index(r[2]) if r[2] in SIZES else 99, order.get(r[1], 99), r[1]))


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def format_params(params) -> str:
    if _missing(params):
        return "unknown"
    for scale, suffix, digits in ((1e9, "B", 2), (1e6, "M", 1), (1e3, "K", 0)):
        if params >= scale:
            return f"{params / scale:.{digits}f}{suffix}"
    return str(int(params))


def format_context(context) -> str:
    if not isinstance(context, (int, float)) or math.isnan(context):
        return "--"
    return f"{int(context) // 1024}K" if context >= 1024 and int(context) % 1024 == 0 else str(int(context))


def format_tokens(tokens) -> str:
    return "unknown" if _missing(tokens) else f"{tokens / 1e6:.1f}M"


def latex_escape(text: str) -> str:
    for char, escaped in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("$", r"\$"), ("#", r"\#"),
                          ("_", r"\_"), ("{", r"\{"), ("}", r"\}"), ("~", r"\textasciitilde{}"),
                          ("^", r"\textasciicircum{}")):
        text = text.replace(char, escaped)
    return text


def _values(frame: pd.DataFrame, key: str) -> pd.Series:
    return pd.to_numeric(frame[key], errors="coerce") if key in frame else pd.Series(float("nan"), frame.index)


def best_per_size(frame: pd.DataFrame) -> dict[tuple[str, str], float]:
    """(size, metric) -> the best value among completed runs, for the metrics that are compared."""
    best = {}
    done = frame[frame["status"] == "completed"]
    for size, group in done.groupby("size"):
        for column in TABLE_METRICS:
            values = _values(group, column.key).dropna()
            if column.lower is not None and len(values):
                best[(size, column.key)] = values.min() if column.lower else values.max()
    return best


def _distinct(frame: pd.DataFrame, key: str) -> list:
    return list(dict.fromkeys(v for v in frame[key] if not _missing(v))) if key in frame else []


def hardware(frame: pd.DataFrame) -> str:
    names = sorted({f"{int(row.world_size or 1)}x {row.device_name}" for row in frame.itertuples()
                    if isinstance(row.device_name, str)})
    return ", ".join(names) or "unknown hardware"


def setup_facts(frame: pd.DataFrame) -> dict[str, str]:
    """What every row ran with, each fact in words: hardware, corpus, budget, warm-up, commit."""
    done = frame[frame["status"] == "completed"]
    budget = "; ".join(
        f"{size}: {', '.join(format_tokens(t) for t in _distinct(group, 'training_tokens')) or 'unknown'} tokens"
        f" in {', '.join(str(int(s)) for s in _distinct(group, 'steps')) or '?'} steps"
        for size, group in done.groupby("size", sort=False))
    warmups = {(int(row.warmup_iterations), int(row.warmup_iterations + row.measured_iterations))
               for row in done.itertuples() if not _missing(row.warmup_iterations)
               and not _missing(row.measured_iterations)}
    warmup = "; ".join(f"first {w} of {n} iterations" for w, n in sorted(warmups)) or "not recorded"
    commits = [str(c)[:12] for c in _distinct(done, "commit")]
    return {"hardware": hardware(done), "corpus": ", ".join(_distinct(done, "corpus")) or "not recorded",
            "tokenizers": ", ".join(_distinct(done, "tokenizer")) or "not recorded",
            "budget": budget or "none completed", "warm-up excluded": warmup,
            "commit": ", ".join(commits) or "not recorded"}


def to_latex(frame: pd.DataFrame) -> str:
    best = best_per_size(frame)
    notes: dict[str, int] = {}  # reason -> footnote number
    lines = [r"\begin{table}[t]", r"\centering", r"\small",
             r"\begin{tabular}{llrr" + "r" * len(TABLE_METRICS) + "}", r"\toprule",
             "Method & Size & Parameters & Context & " + " & ".join(c.header for c in TABLE_METRICS) + r" \\",
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
                for column in TABLE_METRICS:
                    value = getattr(row, column.key, None)
                    if _missing(value):
                        number = notes.setdefault(row.null_reasons.get(column.key, "not measured"), len(notes) + 1)
                        cells.append(rf"n/m\textsuperscript{{{number}}}")
                    else:
                        text = column.fmt.format(value * column.scale)
                        cells.append(rf"\textbf{{{text}}}" if best.get((size, column.key)) == value else text)
            lines.append(" & ".join(cells) + r" \\")
    facts = {key: latex_escape(value) for key, value in setup_facts(frame).items()}
    caption = (f"Attention-free mechanisms pretrained from scratch on {facts['corpus']} "
               f"({facts['budget']}; tokenizers {facts['tokenizers']}) on {facts['hardware']}, "
               f"commit {facts['commit']}. PPL and BPB on the same held-out documents; PPL counts each tokenizer's "
               f"own tokens, so only BPB compares across tokenizers. AMU in GB = $10^9$ bytes of device memory, "
               f"time-averaged; AL per optimizer iteration; TT in tokens per parameter per second; AEC in watts "
               f"over all GPUs of a run. Speed, memory and energy exclude warm-up ({facts['warm-up excluded']}) "
               f"and validation. Best per size in bold (BPB, not PPL).")
    lines += [r"\bottomrule", r"\end{tabular}"]
    if notes:
        lines.append(r"\par\footnotesize n/m: not measured. "
                     + "; ".join(f"{number}: {latex_escape(reason)}" for reason, number in notes.items()))
    lines += [rf"\caption{{{caption}}}",
              r"\label{tab:attention-free}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def published_rank(model: str, key: str) -> str:
    ranks = get_family(model).published_ranks if model in family_names() else None
    published = PUBLISHED_KEY.get(key, key)
    label = f"published {published.upper()} rank" if published != key else "published"
    return f"{label} {ranks[published]}" if ranks else "not in the study"


def complete_sizes(frame: pd.DataFrame, key: str) -> tuple[list[str], list[str]]:
    """Sizes where every family of the table has a value of ``key``; and why each other size is left out."""
    models = list(dict.fromkeys(frame["model"]))
    complete, left_out = [], []
    for size, group in frame.groupby("size", sort=False):
        values = _values(group, key).where(group["status"] == "completed")
        lacking = [f"{row.display_name} {row.status if row.status != 'completed' else 'not measured'}"
                   for row, value in zip(group.itertuples(), values) if _missing(value)]
        lacking += [f"{display_name(m)} not configured" for m in models if m not in set(group["model"])]
        if lacking:
            left_out.append(f"{size} ({', '.join(lacking)})")
        else:
            complete.append(size)
    return complete, left_out


def rank_table(frame: pd.DataFrame) -> list[str]:
    """Our mean rank per metric over the sizes where every family completed, beside the study's."""
    models = list(dict.fromkeys(frame["model"]))
    lines = []
    for column in (c for c in TABLE_METRICS if c.key in RANKED):
        sizes, left_out = complete_sizes(frame, column.key)
        scope = f"over {', '.join(sizes)}" if sizes else "n/a: no size where every family has it"
        if left_out:
            scope += f"; left out: {'; '.join(left_out)}"
        ranks: dict[str, list[float]] = {}
        for size in sizes:
            group = frame[frame["size"] == size]
            for model, rank in zip(group["model"], _values(group, column.key).rank(ascending=column.lower,
                                                                                   method="min")):
                ranks.setdefault(model, []).append(rank)
        cells = [f"{display_name(m)} {sum(ranks[m]) / len(ranks[m]):.1f} ({published_rank(m, column.key)})"
                 for m in models if m in ranks]
        lines.append(f"  {column.header} ({scope}): " + ("; ".join(cells) or "-"))
    return lines


def anomalies(frame: pd.DataFrame) -> list[str]:
    """Everything that weakens a row or the table's comparison, one line each."""
    found = []
    for row in frame.itertuples():
        label = f"{row.display_name} {row.size}"
        if row.status != "completed":
            found.append(f"{label}: {row.status} - {row.reason or 'no reason recorded'}")
            continue
        iterations, window = row.measured_iterations, row.window_s
        if not _missing(iterations) and not _missing(window) and not (
                iterations >= MIN_WINDOW_ITERATIONS and window >= MIN_WINDOW_S):
            found.append(f"{label}: short measured window ({int(iterations)} iterations, {window:.1f} s)")
        for key, reason in (row.null_reasons or {}).items():
            found.append(f"{label}: {key} not measured - {reason}")
        ratio = row.energy_integral_over_counter
        if not _missing(ratio) and abs(ratio - 1) > 0.1:
            found.append(f"{label}: integrated power differs from the energy counter by {ratio - 1:+.1%}")
        if row.sampler_errors:
            found.append(f"{label}: {row.sampler_errors} sampler read errors (see provenance)")
        if isinstance(row.kernel_path, str) and "slow" in row.kernel_path:
            found.append(f"{label}: ran the slow reference path ({row.kernel_path})")
        if not _missing(row.training_passes) and row.training_passes > 1:
            found.append(f"{label}: {row.training_passes:.2f} passes over its training text (text repeated)")
        if not _missing(row.train_val_gap) and row.train_val_gap > MEMORISATION_GAP:
            found.append(f"{label}: validation loss {row.final_val_loss:.2f} is {row.train_val_gap:.2f} nats above "
                         f"the final training loss {row.final_train_loss:.2f}: memorisation")
        if row.dirty is True:
            found.append(f"{label}: ran from a checkout with uncommitted changes")
    done = frame[frame["status"] == "completed"]
    for key, what in (("device_name", "hardware"), ("host", "hosts"), ("commit", "commits"),
                      ("corpus", "training text")):
        values = _distinct(done, key)
        if len(values) > 1:
            groups = "; ".join(
                f"{str(v)[:12] if key == 'commit' else v}: "
                + ", ".join(f"{r.display_name} {r.size}" for r in done[done[key] == v].itertuples()) for v in values)
            found.append(f"rows come from different {what}: {groups}")
    if len(done) and "commit" in done and done["commit"].map(_missing).any():
        found.append("some rows record no commit")
    for size, group in done.groupby("size", sort=False):
        budgets = _distinct(group, "training_tokens")
        if len(budgets) > 1:
            found.append(f"{size}: the runs' token budgets differ ({', '.join(map(format_tokens, budgets))})")
    return found or ["none"]


def report(frame: pd.DataFrame) -> str:
    best = best_per_size(frame)
    facts = setup_facts(frame)
    lines = ["Attention-free mechanisms benchmark", "", "Setup", *(f"  {key}: {value}" for key, value in facts.items()),
             f"  runs: {len(frame)} ({(frame['status'] == 'completed').sum()} completed)",
             "  metrics: after warm-up; AMU in GB = 10^9 bytes; AEC over all GPUs of a run; PPL per token of each "
             "run's own tokenizer, BPB comparable across tokenizers", "", "Best per size"]
    for size in frame["size"].drop_duplicates():
        group = frame[(frame["size"] == size) & (frame["status"] == "completed")]
        for column in TABLE_METRICS:
            if (size, column.key) in best:
                value = best[(size, column.key)]
                winner = ", ".join(group[_values(group, column.key) == value]["display_name"])
                lines.append(f"  {size} {column.header}: {winner} ({column.fmt.format(value * column.scale)})")
    gaps = [f"  {row.display_name} {row.size}: training {row.final_train_loss:.3f}, "
            f"validation {row.final_val_loss:.3f} ({row.train_val_gap:+.3f} nats)" for row in frame.itertuples()
            if row.status == "completed" and not _missing(row.train_val_gap)]
    lines += ["", f"Final losses (training: mean of the last {FINAL_LOSS_STEPS} steps; validation: the last)", *gaps]
    lines += ["", "Ranking (ours: mean rank over the sizes where every family completed; 1 = best; published: the "
              "attention-free table of EfficientLLM, arXiv 2505.13840)", *rank_table(frame),
              "", "Anomalies", *(f"  {a}" for a in anomalies(frame)), ""]
    return "\n".join(lines)


def collect(results_dirs: list[Path], output_dir: Path, sizes: list[str] | None = None) -> pd.DataFrame:
    runs = discover(results_dirs, sizes)
    frame = pd.DataFrame([load_run(*run) for run in runs], columns=[*CSV_COLUMNS, "null_reasons", "sampler_errors"])
    frame["null_reasons"] = frame["null_reasons"].apply(lambda v: v if isinstance(v, dict) else {})
    output_dir.mkdir(parents=True, exist_ok=True)
    frame[CSV_COLUMNS].to_csv(output_dir / "attention_free_results.csv", index=False)
    (output_dir / "attention_free_table.tex").write_text(to_latex(frame))
    (output_dir / "attention_free_report.txt").write_text(report(frame))
    curves = {(row.model, row.size): learning_curve(folder, int(row.global_batch * row.context))
              for (folder, *_), row in zip(runs, frame.itertuples()) if row.status == "completed"}
    plot_curves(frame, curves, output_dir)
    plot_by_size(frame, output_dir)
    return frame


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=program_name("training_harness.report"), description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--results_dir", type=Path, nargs="+",
                        default=[Path("experiments/attention_free_benchmark/results")],
                        help="one folder per run; several folders make one table (the configs beside each, in "
                             "../configs, name the runs that never wrote results)")
    parser.add_argument("--output_dir", type=Path, default=Path("experiments/attention_free_benchmark/tables"),
                        help="where the table, CSV, report and figures go")
    parser.add_argument("--sizes", default=None, help="comma-separated nominal sizes to keep (default: all)")
    args = parser.parse_args(argv)
    try:
        frame = collect(args.results_dir, args.output_dir, args.sizes.split(",") if args.sizes else None)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if frame.empty:
        folders = ", ".join(str(d) for d in args.results_dir)
        print(f"error: no runs in {folders} (and no configs beside them)", file=sys.stderr)
        return 2
    print(f"{len(frame)} runs ({(frame['status'] == 'completed').sum()} completed) -> {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
