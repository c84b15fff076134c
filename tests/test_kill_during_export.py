"""A kill -9 after calibration (during fit's validation choices or its export), then `fit --ckpt_path last`: the
calibration is not redone, and the export folder is absent or whole, never partial (tests/fault_injection.py)."""

import json
import os
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from corrsteer_pl.calibration.stats import STATS_FILE, load_layer_stats
from corrsteer_pl.lightning.cli import main
from corrsteer_pl.selection.evidence import read_selection
from corrsteer_pl.steering.vectors import META_FILE, VECTORS_FILE, SteeringVectors

pytestmark = pytest.mark.slow  # subprocess runs of train.py: scheduled first (conftest.py)

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--config", "configs/tiny.yaml", "--trainer.enable_progress_bar", "false"]
FINISHED = "the checkpoint holds a finished calibration: selecting and exporting from its statistics"


def _fit(root: Path, *args: str, kill: str | None = None) -> None:
    """`train.py fit` with the test-only callbacks: every computed batch is logged, and `kill` names the point where
    the process SIGKILLs itself (a subprocess then; otherwise this process, with one torch thread like it)."""
    log = root.parent / f"{root.name}-batches.log"
    callbacks = f"    - class_path: fault_injection.BatchRecorder\n      init_args: {{log: {log}}}\n"
    if kill:
        callbacks += f"    - class_path: fault_injection.KillDuringSelection\n      init_args: {{at: {kill}}}\n"
    config = root.parent / f"{root.name}-{kill or 'run'}.yaml"
    config.write_text(f"trainer:\n  callbacks:\n{callbacks}")
    args = ["fit", *TINY, "--trainer.default_root_dir", str(root), "--config", str(config), *args]
    if not kill:
        with _one_thread():
            main(args)
        return
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests")}
    cmd = [sys.executable, "train.py", *args]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]


@contextmanager
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _batches(root: Path) -> list[str]:
    log = root.parent / f"{root.name}-batches.log"
    return log.read_text().splitlines() if log.exists() else []


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _assert_complete(export: Path) -> SteeringVectors:
    """Every file steering.json names is there and loads: vectors, lm-eval file, statistics, selection."""
    meta = json.loads((export / META_FILE).read_text())
    for name in (VECTORS_FILE, meta["lm_eval"]["file"], STATS_FILE, "selection.json"):
        assert (export / name).is_file(), name
    steering = SteeringVectors.load(export)
    assert sorted(load_layer_stats(export / STATS_FILE)) == [0, 1]
    assert read_selection(export)["settings"]["variant"] == steering.info["variant"]
    return steering


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A whole uninterrupted tiny fit (variant A): its export is what a resumed fit must write."""
    root = tmp_path_factory.mktemp("finished") / "run"
    _fit(root)
    return root


@pytest.mark.parametrize(
    ("kill", "variant"),
    [("validation", "P"), ("export_before_rename", "A")],  # P's check is the validation pass of fit
)
def test_kill_after_calibration_leaves_no_export_and_resume_exports_whole_without_computing_a_batch(
    tmp_path, finished, kill, variant, lightning_log
):
    root = tmp_path / "run"
    _fit(root, "--selection.variant", variant, kill=kill)
    calibrated = _batches(root)
    assert len(calibrated) == 8, "the kill came after all 8 calibration batches"
    assert not (root / "steered").exists(), "no export, not a partial one"
    assert (root / "checkpoints" / "last.ckpt").is_file()

    _fit(root, "--ckpt_path", "last", "--selection.variant", variant)
    assert FINISHED in lightning_log.text
    assert _batches(root) == calibrated, "the resume computed no calibration batch"
    steering = _assert_complete(root / "steered")
    assert [p.name for p in root.iterdir() if p.name.startswith(".steered")] == [], "the killed run's leftovers went"
    assert steering.info["samples_seen"] == 58 and steering.info["variant"] == variant
    if variant == "A":
        reference = json.loads((finished / "steered" / META_FILE).read_text())
        assert json.loads((root / "steered" / META_FILE).read_text())["layers"] == reference["layers"]
        assert _files(root / "steered")[VECTORS_FILE] == _files(finished / "steered")[VECTORS_FILE]


def test_kill_while_the_export_is_written_leaves_the_previous_export_intact_and_resume_replaces_it_whole(
    tmp_path, finished, lightning_log
):
    root = tmp_path / "run"
    shutil.copytree(finished, root)
    before = _files(root / "steered")
    _fit(root, "--ckpt_path", "last", "--selection.variant", "S", kill="export_first_file")
    assert _files(root / "steered") == before, "the previous export is unchanged, file for file"
    assert not _batches(root)

    _fit(root, "--ckpt_path", "last", "--selection.variant", "S")
    assert FINISHED in lightning_log.text and not _batches(root)
    steering = _assert_complete(root / "steered")
    assert steering.info["variant"] == "S" and len(steering.layers) == 1
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".steered")) == [], "no temporary folder left"
