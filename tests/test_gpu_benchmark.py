"""benchmarks/gpu.py --cpu-smoke: the GPU figures' script runs on CPU with tiny shapes and prints table rows."""

import importlib.util
import os
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


FAKE_PYTHON = r"""#!/usr/bin/env bash
# Stands in for the interpreter gpu.sh runs: records where it ran, its parent and its arguments, and answers as
# the real commands would when their files exist.
printf '%s\t' "$PWD" "$(cat /proc/$PPID/comm)" "$@" >> "$CALLS"; echo >> "$CALLS"
case " $* " in
  *" benchmarks/gpu.py "*) [ -f benchmarks/gpu.py ] || exit 2
     echo "| G1. calibration time | fake | 1 s | 1 s | < 6 min | yes |"; echo "gpu.py details" >&2; exit 0 ;;
  *" -m pytest "*) for arg in "$@"; do case $arg in tests/*) [ -f "$arg" ] || exit 4 ;; esac; done
     echo "2 passed in 0.50s"; exit "$TESTS_EXIT" ;;
esac
"""


def _run_gpu_sh(tmp_path, tests_exit: int) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    """benchmarks/gpu.sh with a fake interpreter (PYTHON) and nvidia-smi: (the run, the interpreter's calls:
    working directory, parent process, arguments)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    for name, text in (("python", FAKE_PYTHON), ("nvidia-smi", "#!/bin/sh\nexit 1\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    calls = tmp_path / "calls.tsv"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": str(bin_dir / "python")}
    env |= {"OUT": str(tmp_path / "out"), "CALLS": str(calls), "TESTS_EXIT": str(tests_exit)}
    run = subprocess.run(["bash", str(BENCHMARKS / "gpu.sh"), "--cpu-smoke"], env=env, capture_output=True, text=True)
    recorded = [line.rstrip("\t").split("\t") for line in calls.read_text().splitlines()]
    return run, [call for call in recorded if "pip" not in call]  # a .whl/ folder adds a pip install


def test_gpu_sh_runs_the_figures_script_and_the_cuda_tests_under_timeouts_and_fails_with_them(tmp_path):
    run, calls = _run_gpu_sh(tmp_path / "pass", tests_exit=0)
    assert run.returncode == 0, run.stderr
    root = str(BENCHMARKS.parent)
    assert [call[:2] for call in calls] == [[root, "timeout"]] * 2, "both commands run from the root, under timeout"
    script, tests = (call[2:] for call in calls)
    assert script == ["benchmarks/gpu.py", "--header", "--deadline-s", "330", "--cpu-smoke"], "extra args to gpu.py"
    assert tests[:2] == ["-m", "pytest"] and "tests/test_cuda_paths.py" in tests
    rows = (tmp_path / "pass" / "out" / "gpu_rows.md").read_text().splitlines()
    assert rows[0].startswith("| G1. calibration time | fake |")
    assert rows[1].startswith("| G5. device tests |") and rows[1].endswith(
        "| 2 passed in 0.50s | exit 0 | all pass | yes |"
    )
    assert "gpu.py details" in (tmp_path / "pass" / "out" / "gpu_details.log").read_text()

    failed, _ = _run_gpu_sh(tmp_path / "fail", tests_exit=1)
    assert failed.returncode == 1 and "| exit 1 | all pass | **no** |" in failed.stdout

    # the test command gpu.sh runs selects the CUDA variants, and only them
    collect = [sys.executable, *tests[:2], "-o", "addopts=", "--collect-only", *tests[2:]]
    listed = subprocess.run(collect, cwd=root, capture_output=True, text=True).stdout.splitlines()
    ids = [line for line in listed if "::" in line]
    assert ids and all("[cuda-" in test_id for test_id in ids), listed
