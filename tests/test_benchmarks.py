"""Every benchmark script runs with --smoke and prints Markdown table rows; run_all prints the table."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = (
    "scaling",
    "stats_vs_torchmetrics",
    "bootstrap_cost",
    "top_examples_cost",
    "stats_memory",
    "calibration_overhead",
    "steering_overhead",
    "validation_cost",
    "decode_together",
    "null_selection",
)
ROW = re.compile(r"^\|( [^|]*(?:\\\|[^|]*)* \|){6}$")  # six cells; a cell may hold an escaped \|


def load(name: str, monkeypatch: pytest.MonkeyPatch):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def benchmarks_on_path(monkeypatch):
    """The scripts import their sibling `_common`; they also set torch's thread count, restored after."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_smoke_prints_table_rows(name, benchmarks_on_path, capsys, monkeypatch):
    returned = load(name, monkeypatch).main(["--smoke"])
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    assert printed, f"{name} printed no table row"
    assert printed == returned
    for line in printed:
        assert ROW.match(line), f"not a 6-cell Markdown row: {line}"
        assert "smoke run" in line


def test_run_all_prints_header_then_rows():
    out = subprocess.run(
        [sys.executable, str(BENCHMARKS / "run_all"), "--smoke", "--only", "scaling"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert out[0] == "| figure | setting | measured | result | goal | met |"
    assert re.fullmatch(r"\|(---\|){6}", out[1])
    rows = [line for line in out[2:] if line.startswith("|")]
    assert len(rows) == 8 and all(ROW.match(line) for line in rows)
    assert any(line.startswith("Total wall time") for line in out)
