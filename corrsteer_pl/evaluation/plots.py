"""The report's figures: controls as a distribution, the scale grid, each layer's distribution of r, and the
side effects' dose and response.

Matplotlib with the Agg backend (no display); fixed sizes, fonts and no timestamps in the PNG metadata, so the
same report gives the same bytes. Each figure says so when the steering is empty.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from corrsteer_pl.calibration.stats import CorrelationStats  # noqa: E402
from corrsteer_pl.files.atomic import atomic_file  # noqa: E402

PNG_METADATA = {"Software": None}  # no matplotlib version or date: deterministic files
KIND_LABELS = {
    "random_feature": "random SAE features",
    "random_direction": "random directions",
    "search_matched": "search-matched draws",
}


def _empty_note(ax: Any, steered: bool) -> None:
    if not steered:
        ax.text(0.5, 0.5, "nothing was steered", transform=ax.transAxes, ha="center", va="center", color="crimson")


def controls_figure(report: Any) -> Figure:
    """(a) Accuracy of every control draw, one strip per kind, with the steered and unsteered accuracy marked."""
    fig, ax = plt.subplots(figsize=(6.4, 1.2 + 0.6 * max(len(report.controls), 1)), dpi=100)
    for row, control in enumerate(report.controls):
        ax.scatter(control.accuracies, [row] * len(control.accuracies), s=18, alpha=0.6, color="gray")
    ax.axvline(report.paired.unsteered, color="black", linestyle="--", label="unsteered")
    ax.axvline(report.paired.accuracy, color="tab:blue", label="steered")
    ax.set_yticks(range(len(report.controls)), [KIND_LABELS.get(c.kind, c.kind) for c in report.controls])
    ax.set_ylim(-0.7, max(len(report.controls), 1) - 0.3)
    ax.set_xlabel(f"accuracy ({report.split} split, {report.samples} items)")
    ax.legend(loc="lower right", fontsize=8)
    _empty_note(ax, bool(report.features))
    fig.tight_layout()
    return fig


def scale_grid_figure(grid: dict[str, dict[str, float]], chosen: float | None) -> Figure:
    """(b) Validation accuracy and valid-answer rate against the scale, refused scales marked with an x."""
    fig, ax = plt.subplots(figsize=(5.2, 3.2), dpi=100)
    scales = sorted(grid, key=float)
    xs = [float(s) for s in scales]
    ax.plot(xs, [grid[s]["accuracy"] for s in scales], "o-", label="accuracy")
    if all("valid_rate" in grid[s] for s in scales):
        ax.plot(xs, [grid[s]["valid_rate"] for s in scales], "s--", label="valid-answer rate")
    refused = [s for s in scales if grid[s].get("refused")]
    if refused:
        ax.scatter([float(s) for s in refused], [grid[s]["accuracy"] for s in refused], marker="x", s=80,
                   color="crimson", zorder=3, label="refused (answers collapse onto one letter)")  # fmt: skip
    if chosen is not None and scales:
        ax.axvline(chosen, color="tab:green", linestyle=":", label=f"chosen: {chosen:g}")
    if xs:
        ax.set_xscale("log", base=2)
    ax.set_xlabel("coefficient scale")
    ax.set_ylabel("validation")
    ax.legend(fontsize=7)
    _empty_note(ax, bool(scales))
    fig.tight_layout()
    return fig


def r_by_layer_figure(stats: dict[int, CorrelationStats], selection: dict[str, Any]) -> Figure:
    """(c) Per layer, the distribution of r over features that fired, the candidates and the chosen feature marked."""
    layers = sorted(stats)
    fig, axes = plt.subplots(len(layers) or 1, 1, figsize=(6.4, 1.0 + 1.4 * max(len(layers), 1)), dpi=100,
                             squeeze=False)  # fmt: skip
    chosen = {(f["layer"], f["feature"]) for f in selection.get("chosen", [])}
    for ax, layer in zip(axes[:, 0], layers, strict=False):
        fired = stats[layer].frequency() > 0
        r = stats[layer].pearson()[fired].double().numpy()
        ax.hist(r, bins=60, color="lightgray", edgecolor="gray")
        for f in selection.get("layers", {}).get(str(layer), []):
            picked = (f["layer"], f["feature"]) in chosen
            ax.axvline(f["r"], color="tab:red" if picked else "tab:orange", linewidth=2 if picked else 1)
        ax.set_yscale("log")
        ax.set_ylabel(f"layer {layer}")
    axes[-1, 0].set_xlabel("Pearson r with success (features that fired; orange: candidates, red: chosen)")
    _empty_note(axes[0, 0], bool(chosen))
    fig.tight_layout()
    return fig


def dose_figure(dose: list[Any]) -> Figure:
    """(d) Target gain against side-effect cost at each scale of the grid: the share of open-generation
    continuations changed and the mean change in the side tasks' accuracy (`side_effects.measure.DoseRow`s)."""
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    gains = [row.target.difference if row.target is not None else float("nan") for row in dose]
    series = {}
    for rendering in dose[0].open_changed:
        series[f"continuations changed ({rendering})"] = [row.open_changed[rendering] for row in dose]
    if dose[0].tasks:
        series["side tasks' accuracy loss (mean)"] = [
            -sum(p.difference for p in row.tasks.values()) / len(row.tasks) for row in dose
        ]
    for (label, costs), marker in zip(series.items(), "osD^v", strict=False):
        ax.plot(gains, costs, marker=marker, label=label)
        for row, x, y in zip(dose, gains, costs, strict=True):
            ax.annotate(f"x{row.scale:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axhline(0, color="black", lw=0.5)
    ax.set(xlabel="target accuracy gain over unsteered (test)", ylabel="side-effect cost", title="dose and response")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path: Path) -> Path:
    """Writes the PNG atomically and closes the figure."""
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", metadata=PNG_METADATA)
    plt.close(fig)
    return path


def report_figures(report: Any, stats: dict[int, CorrelationStats]) -> dict[str, Figure]:
    """The report's figures by file stem: controls (when there are any), the scale grid (when there was one), r."""
    figures: dict[str, Figure] = {}
    if report.controls:
        figures["controls"] = controls_figure(report)
    grid = report.steering.get("scale_grid") or {}
    if grid:
        figures["scale_grid"] = scale_grid_figure(grid, report.steering.get("scale"))
    if stats:
        figures["r_by_layer"] = r_by_layer_figure(stats, report.selection)
    side = getattr(report, "side_effects", None)
    if side is not None and side.dose:
        figures["dose_response"] = dose_figure(side.dose)
    return figures
