"""How sure a selection is: each candidate's p, q, bootstrap stability and r interval, and `selection.json`.

p is the one-sided p-value of r > 0, q its Benjamini-Hochberg q-value over all features of all layers;
stability is the share of bootstrap replicates in which the candidate is its layer's top-1 by r (for S,
the top-1 of the whole model). Stability and the interval describe r, so they are left out (None) for
rankings other than Pearson.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from corrsteer_pl.calibration.bootstrap import BootstrapStats, overall_top1_share, r_interval, top1_share
from corrsteer_pl.calibration.stats import CorrelationStats
from corrsteer_pl.selection.variants import SelectedFeature, Selection, Significance, feature_significance

SELECTION_FILE = "selection.json"
NEURONPEDIA = "https://neuronpedia.org"


@dataclass
class Evidence:
    """Per (layer, feature) candidate: r's bootstrap interval; the features themselves carry p, q and stability."""

    intervals: dict[tuple[int, int], tuple[float, float]] = field(default_factory=dict)
    smallest_q: float = 1.0
    features_tested: int = 0


def annotate(
    selection: Selection,
    stats: Mapping[int, CorrelationStats],
    bootstrap: Mapping[int, BootstrapStats],
    level: float = 0.9,
    significance: Significance | None = None,
) -> Evidence:
    """Fills p, q and stability into every candidate, chosen and withheld feature of `selection` (in place); p and q
    are computed unless given (`feature_significance`)."""
    p, q = significance if significance is not None else feature_significance(stats)
    replicate_r = {layer: b.pearson() for layer, b in bootstrap.items() if b.replicates and b.num_samples}
    with_r = selection.ranking == "pearson" and set(replicate_r) == set(stats)
    shares: dict[tuple[int, int], float] = {}
    intervals: dict[tuple[int, int], tuple[float, float]] = {}
    for layer, candidates in selection.candidates.items():
        ids = [f.feature for f in candidates]
        if with_r and ids:
            shares |= dict(zip(((layer, i) for i in ids), top1_share(replicate_r[layer], ids).tolist(), strict=True))
            low, high = r_interval(replicate_r[layer][:, ids], level)
            intervals |= {(layer, i): (lo, hi) for i, lo, hi in zip(ids, low.tolist(), high.tolist(), strict=True)}
    if with_r and selection.variant == "S" and selection.features:
        best = [(f.layer, f.feature) for f in selection.features]
        shares |= dict(zip(best, overall_top1_share(replicate_r, best).tolist(), strict=True))

    def filled(f: SelectedFeature) -> SelectedFeature:
        key = (f.layer, f.feature)
        return replace(
            f, p_value=float(p[f.layer][f.feature]), q_value=float(q[f.layer][f.feature]), stability=shares.get(key)
        )

    selection.candidates = {layer: [filled(f) for f in fs] for layer, fs in selection.candidates.items()}
    selection.features = [filled(f) for f in selection.features]
    selection.withheld = [filled(f) for f in selection.withheld]
    tested = sum(int(v.numel()) for v in q.values())
    smallest = min((float(v.min()) for v in q.values() if v.numel()), default=1.0)
    return Evidence(intervals, smallest, tested)


def significance_warning(evidence: Evidence, alpha: float) -> list[str]:
    """A warning when no feature of any layer is significant at `alpha` after the BH correction (say it only of a
    steering that was exported all the same, with --selection.require_significance false)."""
    if evidence.features_tested == 0 or evidence.smallest_q < alpha:
        return []
    return [
        f"no feature's correlation with success is significant: the smallest q-value over "
        f"{evidence.features_tested:,} features is {evidence.smallest_q:.3f} (alpha {alpha}); what was selected "
        "may be noise (exported because --selection.require_significance is false): use more calibration items "
        "(--data.limit_calibration)"
    ]


def neuronpedia_url(neuronpedia_id: str | None, feature: int) -> str | None:
    """The feature's Neuronpedia page, from the SAE's sae-lens metadata (e.g. "gemma-2-2b/12-gemmascope-res-16k")."""
    return f"{NEURONPEDIA}/{neuronpedia_id.strip('/')}/{feature}" if neuronpedia_id else None


def sae_neuronpedia_ids(saes: Mapping[int, Any]) -> dict[int, str | None]:
    """Each layer's Neuronpedia id, where the SAE's sae-lens metadata has one (sae-lens releases; None otherwise)."""
    ids = {}
    for layer, sae in saes.items():
        metadata = getattr(getattr(sae, "cfg", None), "metadata", None)
        ids[layer] = getattr(metadata, "neuronpedia_id", None)
    return ids


def selection_record(
    selection: Selection,
    evidence: Evidence,
    warnings: list[str],
    settings: dict[str, Any],
    neuronpedia: Mapping[int, str | None] | None = None,
) -> dict[str, Any]:
    """What `selection.json` holds: per layer its candidates with all figures, the chosen features, the warnings
    and the settings; `neuronpedia` (layer -> Neuronpedia id) adds each feature's page as `neuronpedia_url`."""

    def page(f: SelectedFeature) -> dict[str, str]:
        url = neuronpedia_url((neuronpedia or {}).get(f.layer), f.feature)
        return {"neuronpedia_url": url} if url else {}

    layers = {}
    for layer, candidates in selection.candidates.items():
        rows = []
        for f in candidates:
            low, high = evidence.intervals.get((f.layer, f.feature), (None, None))
            figures = selection.validation.get(f"layer_{f.layer}/{f.feature}")
            rows.append(asdict(f) | {"r_interval": [low, high], "validation": figures} | page(f))
        layers[str(layer)] = rows
    return {
        "settings": settings,
        "chosen": [asdict(f) | page(f) for f in selection.features],
        "withheld": [asdict(f) | page(f) for f in selection.withheld],
        "warnings": warnings,
        "unsteered_validation": selection.validation.get("unsteered"),
        "layers": layers,
    }


def write_selection(folder: Path, record: dict[str, Any]) -> None:
    (folder / SELECTION_FILE).write_text(json.dumps(record, indent=2))


def read_selection(folder: Path) -> dict[str, Any]:
    """The export's selection record, or {} for an export written before selection.json existed."""
    path = folder / SELECTION_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def candidates_table(record: dict[str, Any]) -> str:
    """Markdown table of every candidate in a `selection.json` record, chosen ones marked."""
    chosen = {(f["layer"], f["feature"]) for f in record.get("chosen", [])}
    rows = [
        "| layer | feature | chosen | r (90% interval) | q | stability | frequency | coefficient | val. accuracy "
        "| val. valid | better / worse | p vs unsteered (Holm over all trials) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for candidates in record.get("layers", {}).values():
        for f in candidates:
            low, high = f.get("r_interval") or (None, None)
            interval = f" ({low:.3f}..{high:.3f})" if low is not None else ""
            v = f.get("validation") or {}
            holm = f" (Holm {v['p_holm']:.3g})" if "p_holm" in v else ""
            figures = (
                f"{v['accuracy']:.3f} | {v['valid_rate']:.3f} | {v['better']} / {v['worse']} | {v['p_value']:.3g}{holm}"
                if v
                else " | | | "
            )
            rows.append(
                f"| {f['layer']} | {f['feature']} | {'yes' if (f['layer'], f['feature']) in chosen else ''} "
                f"| {f['r']:.3f}{interval} | {_num(f.get('q_value'))} | {_num(f.get('stability'))} "
                f"| {f['frequency']:.3f} | {f['coefficient']:.3g} | {figures} |"
            )
    return "\n".join(rows)


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.3g}"
