"""TensorBoard panels for a calibration: r histograms, the selection table and r-distribution figures."""

from __future__ import annotations

from collections.abc import Mapping

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger

from corrsteer_pl.calibration.stats import CorrelationStats
from corrsteer_pl.selection.evidence import candidates_table
from corrsteer_pl.selection.examples import examples_markdown
from corrsteer_pl.selection.variants import Selection


def selection_table(selection: Selection) -> str:
    """Markdown table of the selected features (TensorBoard renders it in the Text tab)."""
    rows = ["| layer | feature | r | coefficient | activation frequency |", "|---|---|---|---|---|"]
    rows += [
        f"| {f.layer} | {f.feature} | {f.r:.4f} | {f.coefficient:.4f} | {f.frequency:.4f} |" for f in selection.features
    ]
    if not selection.features:
        rows.append("| - | none selected | | | |")
    return "\n".join(rows)


def r_distribution_figure(layer: int, stats: CorrelationStats, selection: Selection):
    """Sorted r of every feature of one layer, selected features marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = stats.pearson().cpu()
    order = r.argsort(descending=True)
    rank = {int(f): i for i, f in enumerate(order)}
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(r[order].numpy(), lw=1)
    for f in selection.features:
        if f.layer == layer:
            ax.scatter([rank[f.feature]], [f.r], color="red", zorder=3, label=f"feature {f.feature}")
    ax.set(title=f"layer {layer}: Pearson r per feature", xlabel="feature rank", ylabel="r")
    if any(f.layer == layer for f in selection.features):
        ax.legend(loc="upper right")
    fig.tight_layout()
    return fig


def log_selection(
    trainer: L.Trainer, stats: Mapping[int, CorrelationStats], selection: Selection, record: dict | None = None
) -> None:
    """Histograms of r per layer, the selection table, every candidate's evidence and one r figure per layer."""
    logger = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
    if logger is None:
        return
    writer, step = logger.experiment, trainer.global_step
    for layer, layer_stats in stats.items():
        writer.add_histogram(f"r/layer_{layer}", layer_stats.pearson().float().cpu(), step)
        writer.add_figure(f"r_distribution/layer_{layer}", r_distribution_figure(layer, layer_stats, selection), step)
    writer.add_text("selection", selection_table(selection), step)
    if record is not None:
        writer.add_text("selection_candidates", candidates_table(record), step)
        if examples_markdown(record):
            writer.add_text("top_examples", examples_markdown(record), step)
    writer.flush()
