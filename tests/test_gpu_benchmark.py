"""benchmarks/gpu.py --cpu-smoke: the GPU figures' script runs on CPU with tiny shapes and prints table rows."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
ROW = re.compile(r"^\|( [^|]*(?:\\\|[^|]*)* \|){6}$")  # six cells; a cell may hold an escaped \|
FIGURES = [
    "G1. calibration time",  # 4,000 one-token prompts (here 16)
    "G2. calibration / (generate + encodes)",
    "G3. steered / unsteered",  # greedy generation
    "G3. steered / unsteered",  # one-token answers
    "G1. calibration time",  # with --new-tokens
    "G2. calibration / (generate + encodes)",
    "G4. peak GPU memory",
]


@pytest.fixture()
def gpu_script(monkeypatch):
    """benchmarks/gpu.py as a module; the torch threads, RNG and `_common` state it sets are restored after."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    spec = importlib.util.spec_from_file_location("benchmark_gpu", BENCHMARKS / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    monkeypatch.setattr(module.C, "SMOKE", module.C.SMOKE)
    yield module
    torch.set_num_threads(threads)
    torch.set_rng_state(rng)


@pytest.mark.slow
def test_cpu_smoke_prints_a_well_formed_row_for_every_figure(gpu_script, capsys):
    returned = gpu_script.main(["--cpu-smoke", "--header"])
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert lines[0] == "| figure | setting | measured | result | goal | met |"
    printed = [line for line in lines[2:] if line.startswith("|")]
    assert printed == returned
    for line in printed:
        assert ROW.match(line), f"not a 6-cell Markdown row: {line}"
        assert "smoke run" in line
    assert [line.split(" | ")[0].removeprefix("| ") for line in printed] == FIGURES
    assert "tiny Gemma-2, random weights" in printed[0] and "MMLU-length prompts" in printed[0]
    assert "[profile] top 10" in out.err, "the profile summary goes to stderr"
    assert "|pooled - standalone encodes| max 0.00e+00" in out.err, "capture must equal the standalone encodes"


def test_gpu_sh_is_valid_bash_and_runs_the_script_and_the_cuda_tests():
    script = BENCHMARKS / "gpu.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "benchmarks/gpu.py" in text and "tests/test_cuda_paths.py" in text and "timeout" in text
