"""Selection and test repeated over seeds, reported as the paper reports them: mean ± sd and every seed's row.

    corrsteer-seeds --seeds 0 1 2 [--root runs/seeds] [-- <train.py fit options>]

Each seed s runs `train.py fit --test_after_fit true` with `--seed_everything s --data.seed s` (the data split)
and, where SAEs are trained here, `--model.train_saes.seed s`, into `<root>/seed_<s>`. What does not depend on
the seed is reused: the converted model, and every seed's SAEs and recorded answers from the cache on a rerun.
A finished seed (its report exists) is not run again. The table, and one of each seed's side effects where the
test measured them, go to `<root>/seeds.md` and `seeds.json`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from corrsteer_pl.files.atomic import atomic_file
from corrsteer_pl.lightning.entry import shipped_config

WALL_FILE = "wall_time.json"
"""Seconds that a seed's fit + test took in this command (absent for a seed found finished)."""


def run_seed(seed: int, folder: Path, fit_args: list[str], trains_saes: bool) -> dict[str, Any]:
    """Runs fit + test for one seed (unless its report exists) and returns the report."""
    report = folder / "steered" / "report.json"
    if not report.is_file():
        args = ["--seed_everything", str(seed), "--data.seed", str(seed), "--test_after_fit", "true"]
        args += ["--trainer.default_root_dir", str(folder)]
        if trains_saes:
            args += ["--model.train_saes.seed", str(seed)]
        started = time.perf_counter()
        command = [sys.executable, "-m", "corrsteer_pl.lightning.cli", "fit", *fit_args, *args]  # train.py's CLI
        done = subprocess.run(command)
        if done.returncode != 0:
            raise SystemExit(f"error: seed {seed} failed (exit {done.returncode}); its log is above")
        with atomic_file(folder / WALL_FILE) as tmp:  # a resumed or partly cached run says less about a first run
            tmp.write_text(json.dumps({"seconds": time.perf_counter() - started}))
    return json.loads(report.read_text())


def seed_row(seed: int, report: dict[str, Any], wall_s: float | None = None) -> dict[str, Any]:
    """One seed's figures: chosen features, test accuracy, valid rate, SER, p against each control, wall time."""
    valid = {c["name"]: c["valid_rate"] for c in report["conditions"]}
    return {
        "wall_s": wall_s,
        "seed": seed,
        "features": [f"L{f['layer']}#{f['feature']}" for f in report["features"]],
        "accuracy_unsteered": report["accuracy_unsteered"],
        "accuracy_steered": report["accuracy_steered"],
        "difference": report["difference"],
        "valid_rate": valid.get("steered"),
        "ser": report["ser"],
        "better": report["better"],
        "worse": report["worse"],
        "p": {c["kind"]: c["p_value"] for c in report["controls"]},
        "warnings": report.get("warnings", []),
        "side_effects": side_effects_row(report.get("side_effects")),
    }


def side_effects_row(side: dict[str, Any] | None) -> dict[str, Any] | None:
    """One seed's side effects (report.json's "Side effects"): each side task's accuracy change, the share of open
    continuations changed against the controls' range, and the costs named; None where the pass did not run, and
    {"nothing": why} where the export steers nothing."""
    if not side:
        return None
    if side.get("nothing"):
        return {"nothing": side["nothing"]}
    og = side.get("open_generation") or {}
    opened, controls = og.get("measures", {}), og.get("controls", {})
    changed = {
        rendering: {
            "steered": m["steered"]["changed"],
            "controls": [c["changed"] for kind in controls.get(rendering, {}).values() for c in kind],
        }
        for rendering, m in opened.items()
    }
    return {
        "tasks": {t["task"]: t["steered"]["difference"] for t in side.get("tasks", [])},
        "open_changed": changed,
        "costs": side.get("costs", []),
        "served_costs": side.get("served_costs", []),
        "seconds": side.get("seconds"),
    }


def side_effects_table(rows: list[dict[str, Any]]) -> str | None:
    """Markdown: per seed, the side tasks' accuracy change, open continuations changed (controls' range), the costs
    of the steering as exported and of the served policy; None when no seed measured side effects."""
    if not any(r.get("side_effects") for r in rows):
        return None
    head = ["seed", "side tasks: accuracy change", "open text changed (controls)", "costs", "served-policy costs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        side = r.get("side_effects")
        if not side or side.get("nothing"):
            lines.append(f"| {r['seed']} | {side['nothing'] if side else 'not measured'} | | | |")
            continue
        tasks = ", ".join(f"{name} {d:+.3f}" for name, d in side["tasks"].items()) or "none"
        opened = ", ".join(f"{k} {v['steered']:.3f} ({_range(v['controls'])})" for k, v in side["open_changed"].items())
        costs = "; ".join(side["costs"]) or "none"
        cells = [str(r["seed"]), tasks, opened or "not measured", costs, str(len(side["served_costs"]))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _range(values: list[float]) -> str:
    return f"{min(values):.3f}-{max(values):.3f}" if values else "no controls"


def seeds_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one row per seed, then mean ± sd of the numeric columns."""
    kinds = sorted({kind for row in rows for kind in row["p"]})
    head = ["seed", "chosen features", "acc. unsteered", "acc. steered", "valid rate", "better / worse", "SER"]
    head += [f"p vs {k}" for k in kinds] + ["wall time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        chosen = ", ".join(r["features"]) or "nothing steered"
        cells = [str(r["seed"]), chosen, f"{r['accuracy_unsteered']:.3f}", f"{r['accuracy_steered']:.3f}"]
        cells += [_f(r["valid_rate"]), f"{r['better']} / {r['worse']}", f"{r['ser']:.3f}"]
        wall = r.get("wall_s")
        cells += [_f(r["p"].get(k)) for k in kinds] + [f"{wall / 60:.1f} min" if wall is not None else ""]
        lines.append("| " + " | ".join(cells) + " |")
    mean = ["mean ± sd", ""] + [
        _mean_sd([r[key] for r in rows]) for key in ("accuracy_unsteered", "accuracy_steered", "valid_rate")
    ]
    lines.append("| " + " | ".join(mean + ["", _mean_sd([r["ser"] for r in rows])] + [""] * (len(kinds) + 1)) + " |")
    return "\n".join(lines)


def _f(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def _mean_sd(values: list[float | None]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return ""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds to run (default 0 1 2)")
    parser.add_argument("--root", default="runs/seeds", help="one folder per seed under this root")
    parser.add_argument("--no-sae-seed", action="store_true", help="the config trains no SAEs: do not seed them")
    args, fit_args = parser.parse_known_args(argv)
    fit_args = [a for a in fit_args if a != "--"] or ["--config", str(shipped_config("default.yaml"))]
    root = Path(args.root)
    rows = []
    for seed in args.seeds:
        report = run_seed(seed, root / f"seed_{seed}", fit_args, not args.no_sae_seed)
        wall = root / f"seed_{seed}" / WALL_FILE
        rows.append(seed_row(seed, report, json.loads(wall.read_text())["seconds"] if wall.is_file() else None))
    table = seeds_table(rows)
    side = side_effects_table(rows)
    if side is not None:
        table += "\n\nSide effects (the steering as exported; a cost is beyond tolerance and every control):\n\n" + side
    with atomic_file(root / "seeds.json") as tmp:
        tmp.write_text(json.dumps(rows, indent=2))
    with atomic_file(root / "seeds.md") as tmp:
        tmp.write_text(table + "\n")
    print(table)
    return rows


def command() -> None:
    """The `corrsteer-seeds` console script."""
    main()


if __name__ == "__main__":
    command()
