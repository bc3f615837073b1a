"""The collector's figures: one colour, marker and order per family in every figure, legends outside the
data, log axes where values span a decade or more, axis labels in words with units; each saved as PNG and PDF.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure  # figures drawn straight to files: no pyplot, no display backend
from matplotlib.ticker import LogFormatter

from training_harness.registry import SIZES, family_names

#: Okabe-Ito colours (distinguishable with colour-vision deficiencies), given to families in registry order.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#D55E00", "#56B4E9", "#F0E442", "#000000"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
FORMATS = ("png", "pdf")


@dataclass(frozen=True)
class Style:
    color: str
    marker: str
    order: int


def family_styles(models: list[str]) -> dict[str, Style]:
    """The same style for a family in every figure: registered families in registry order first, then others."""
    ordered = [*family_names(), *sorted(set(models) - set(family_names()))]
    return {model: Style(PALETTE[i % len(PALETTE)], MARKERS[i % len(MARKERS)], i) for i, model in enumerate(ordered)}


@dataclass(frozen=True)
class Quantity:
    """A plotted result column: its axis label in words with units, a scale from the stored unit, and whether
    less is better (for comparisons between families)."""

    key: str
    label: str
    scale: float = 1.0
    lower: bool = True


QUANTITIES = [
    Quantity("bpb", "validation bits per byte"),
    Quantity("ppl", "validation perplexity (per token of its own tokenizer)"),
    Quantity("amu_gb", "average GPU memory used (GB)"),
    Quantity("al_s_per_iter", "latency per optimizer iteration (s)"),
    Quantity("tt_tokens_per_param_s", "throughput per parameter (tokens / parameter / s)"),
    Quantity("tokens_per_s", "throughput (tokens / s)"),
    Quantity("aec_w", "average power (W)"),
    Quantity("energy_j_per_token", "energy per token (mJ)", 1e3),
]


def save(figure: Figure, output_dir: Path, stem: str) -> list[Path]:
    paths = [output_dir / f"{stem}.{suffix}" for suffix in FORMATS]
    for path in paths:
        figure.savefig(path, dpi=150, bbox_inches="tight")
    return paths


def legend_outside(axis) -> None:
    axis.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False)


def _log_if_wide(axis, values: pd.Series) -> None:
    """A log axis where the values span a decade or more: every decade labelled, and the ticks between them
    where only a few decades show."""
    positive = values[values > 0]
    if len(positive) and positive.max() / positive.min() >= 10:
        axis.set_yscale("log")
        axis.yaxis.set_major_formatter(LogFormatter())  # minor ticks labelled only where few decades show
        axis.yaxis.set_minor_formatter(LogFormatter(minor_thresholds=(1.5, 0.5)))


def plot_by_size(frame: pd.DataFrame, output_dir: Path) -> list[Path]:
    """One figure per quantity: its value at each size, one line of markers per family (a dot plot: the axis
    need not start at zero, so small differences stay visible)."""
    done = frame[frame["status"] == "completed"]
    styles = family_styles(list(frame["model"]))
    written = []
    for quantity in QUANTITIES:
        values = pd.to_numeric(done.get(quantity.key), errors="coerce") * quantity.scale
        if values.isna().all():
            continue
        sizes = [size for size in SIZES if size in set(done["size"])]
        figure = Figure(figsize=(6, 3.6))
        axis = figure.subplots()
        for model, group in sorted(done.assign(value=values).groupby("model"), key=lambda g: styles[g[0]].order):
            group = group.dropna(subset=["value"]).set_index("size").reindex(sizes).dropna(subset=["value"])
            if group.empty:
                continue
            style = styles[model]
            axis.plot([sizes.index(size) for size in group.index], group["value"], color=style.color,
                      marker=style.marker, label=group["display_name"].iloc[0])
        axis.set_xticks(range(len(sizes)), sizes)
        axis.set_xlim(-0.3, len(sizes) - 0.7)
        axis.set(xlabel="nominal model size", ylabel=quantity.label)
        _log_if_wide(axis, values.dropna())
        axis.grid(axis="y", alpha=0.3)
        legend_outside(axis)
        written += save(figure, output_dir, quantity.key)
    return written


def plot_curves(frame: pd.DataFrame, curves: dict[tuple[str, str], pd.DataFrame], output_dir: Path) -> list[Path]:
    """Per size: training loss against optimizer step, and validation BPB against training tokens, one line
    per family. ``curves[(model, size)]`` has columns step, tokens, loss and val_bpb (NaN where not logged)."""
    styles = family_styles(list(frame["model"]))
    written = []
    panels = [("loss", "step", "optimizer step", "training loss (nats / token)", "loss_curves"),
              ("val_bpb", "tokens", "training tokens (millions)", "validation bits per byte", "val_bpb_curves")]
    for size in [s for s in SIZES if s in set(frame["size"])] + sorted(set(frame["size"]) - set(SIZES)):
        runs = sorted(((model, curve) for (model, run_size), curve in curves.items() if run_size == size),
                      key=lambda item: styles[item[0]].order)
        for column, x, x_label, y_label, stem in panels:
            lines = [(model, curve.dropna(subset=[column])) for model, curve in runs]
            lines = [(model, curve) for model, curve in lines if len(curve)]
            if not lines:
                continue
            figure = Figure(figsize=(6, 3.6))
            axis = figure.subplots()
            for model, curve in lines:
                style = styles[model]
                name = frame.loc[frame["model"] == model, "display_name"].iloc[0]
                axis.plot(curve[x] / (1e6 if x == "tokens" else 1), curve[column], color=style.color, label=name,
                          marker=style.marker if column == "val_bpb" else None, markersize=4)
            axis.set(xlabel=x_label, ylabel=y_label, title=f"{size}")
            axis.grid(alpha=0.3)
            legend_outside(axis)
            written += save(figure, output_dir, f"{stem}_{size}")
    return written
