"""Seeds: selection and test repeated per seed, one row each plus mean ± sd; a finished seed is not run again."""

import json

import pytest

from corrsteer_pl.lightning import seeds

pytestmark = pytest.mark.slow  # two seeds of fit + test: scheduled first (conftest.py)

TINY = ["--", "--config", "configs/tiny.yaml", "--trainer.enable_progress_bar", "false", "--model.controls", "2"]


def test_two_seeds_give_a_row_each_and_a_mean_and_a_rerun_reuses_them(tmp_path, monkeypatch):
    rows = seeds.main(["--seeds", "0", "1", "--root", str(tmp_path), "--no-sae-seed", *TINY])
    assert [r["seed"] for r in rows] == [0, 1]
    assert rows[0]["accuracy_unsteered"] != rows[1]["accuracy_unsteered"], "another seed, another data split"
    table = (tmp_path / "seeds.md").read_text().splitlines()
    assert len(table) == 2 + 2 + 1 and table[-1].startswith("| mean ± sd |")
    assert {"random_feature", "random_direction"} <= set(json.loads((tmp_path / "seeds.json").read_text())[0]["p"])
    assert all(r["wall_s"] > 0 for r in rows) and table[0].endswith("| wall time |"), "each seed's wall time is kept"

    monkeypatch.setattr(seeds.subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran again")))
    assert seeds.main(["--seeds", "0", "1", "--root", str(tmp_path), "--no-sae-seed", *TINY]) == rows


def _report(side_effects):
    base = {"accuracy_unsteered": 0.1, "accuracy_steered": 0.2, "difference": 0.1, "ser": 0.0, "better": 3}
    base |= {"worse": 0, "features": [{"layer": 1, "feature": 7}], "conditions": [], "controls": []}
    return base | ({"side_effects": side_effects} if side_effects is not None else {})


def test_each_seeds_side_effects_get_a_row_naming_its_costs_and_a_seed_without_them_says_why():
    measured = {"changed": 0.4, "nll": 1.0}
    side = {
        "tasks": [{"task": "bbq_disambig", "steered": {"difference": -0.25}}],
        "open_generation": {
            "measures": {"raw": {"unsteered": measured | {"changed": 0.0}, "steered": measured}},
            "controls": {"raw": {"random_feature": [{"changed": 0.1}], "random_direction": [{"changed": 0.2}]}},
        },
        "costs": ["bbq_disambig: accuracy 0.300 -> 0.050"],
        "served_costs": ["open generation (raw): changed", "bbq_disambig: accuracy"],
        "seconds": 12.0,
    }
    empty = {"nothing": "the export steers nothing: there is no side effect to measure"}
    rows = [seeds.seed_row(0, _report(side)), seeds.seed_row(1, _report(None)), seeds.seed_row(2, _report(empty))]
    table = seeds.side_effects_table(rows).splitlines()
    assert table[2] == (
        "| 0 | bbq_disambig -0.250 | raw 0.400 (0.100-0.200) | bbq_disambig: accuracy 0.300 -> 0.050 | 2 |"
    )
    assert table[3].startswith("| 1 | not measured |")
    assert table[4].startswith("| 2 | the export steers nothing"), "an empty steering is said, not left blank"
    assert seeds.side_effects_table([rows[1]]) is None, "no seed measured side effects: no table"
