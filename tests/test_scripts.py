"""The commands work from an installed package: console scripts, and presets found or said where they are."""

import importlib
import tomllib
from pathlib import Path

import pytest

from corrsteer_pl.lightning import entry
from corrsteer_pl.lightning.cli import main

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_every_console_script_names_a_callable_that_exists():
    scripts = tomllib.loads(PYPROJECT.read_text())["project"]["scripts"]
    assert {"corrsteer", "corrsteer-export", "corrsteer-seeds", "corrsteer-finetune"} <= set(scripts)
    for name, target in scripts.items():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), name


def test_a_bare_subcommand_without_the_checkouts_presets_says_where_they_are_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(entry, "CONFIGS", tmp_path / "configs")  # an installed wheel: no configs/ beside the code
    with pytest.raises(SystemExit) as exit_info:
        main(["fit"])
    line = str(exit_info.value.code)
    assert line.startswith("error: configs/default.yaml ships with the corrsteer-pl source checkout")
    assert "--config" in line and "\n" not in line
