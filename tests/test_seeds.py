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
