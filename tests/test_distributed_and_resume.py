"""Exactness across processes: 2-rank DDP equals one process; a SIGKILLed calibration resumes exactly.

Only what needs its own process runs in one (the DDP ranks, the run that SIGKILLs itself); the references and the
resume run in the test's process, with one torch thread like the subprocesses (OMP_NUM_THREADS=1)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from corrsteer_pl.calibration.stats import STATS_FILE, load_layer_stats
from corrsteer_pl.lightning.cli import main

pytestmark = pytest.mark.slow  # subprocess runs of train.py: scheduled first (conftest.py)

ROOT = Path(__file__).resolve().parents[1]
# batch_size 1: every sample is computed with the same shapes in every run (no padding differences).
TINY = ["--config", "configs/tiny.yaml", "--trainer.enable_progress_bar", "false", "--data.batch_size", "1"]


def _train(*args: str, root: Path, wait: bool = True, env: dict[str, str] | None = None):
    cmd = [sys.executable, "train.py", "fit", *TINY, "--trainer.default_root_dir", str(root), *args]
    # One thread per process in every run: DDP ranks get one core each, and a different thread
    # count changes float32 summation order inside the model.
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **(env or {})}
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _train_here(*args: str, root: Path) -> None:
    """The same `train.py fit` in this process (its one torch thread: `one_thread`), where no subprocess is needed."""
    main(["fit", *TINY, "--trainer.default_root_dir", str(root), *args])


def _statistics(root: Path) -> dict[str, torch.Tensor]:
    return load_file(root / "steered" / STATS_FILE)


def _selected(root: Path) -> list:
    return json.loads((root / "steered" / "steering.json").read_text())["layers"]


def test_two_process_ddp_counts_every_sample_once_and_equals_one_process(tmp_path, one_thread):
    odd = ["--data.limit_calibration", "21"]
    _train_here(*odd, root=tmp_path / "single")
    _train(*odd, "--trainer.strategy", "ddp", "--trainer.devices", "2", root=tmp_path / "ddp")
    single = load_layer_stats(tmp_path / "single" / "steered" / STATS_FILE)
    ddp = load_layer_stats(tmp_path / "ddp" / "steered" / STATS_FILE)
    assert sorted(ddp) == sorted(single) == [0, 1]
    for layer in (0, 1):
        assert ddp[layer].num_samples == 21, "every sample counted exactly once"
        torch.testing.assert_close(ddp[layer].pearson(), single[layer].pearson(), rtol=0, atol=1e-9)
        torch.testing.assert_close(ddp[layer].positive_mean(), single[layer].positive_mean(), rtol=0, atol=1e-9)
        torch.testing.assert_close(ddp[layer].frequency(), single[layer].frequency(), rtol=0, atol=0)
    ddp_features = [f for layer in _selected(tmp_path / "ddp") for f in layer["features"]]
    single_features = [f for layer in _selected(tmp_path / "single") for f in layer["features"]]
    # the ranks sum their shards in another order than one process: r agrees to float64 rounding, not bit for bit
    assert [(f["layer"], f["feature"]) for f in ddp_features] == [(f["layer"], f["feature"]) for f in single_features]
    for a, b in zip(ddp_features, single_features, strict=True):
        assert a["r"] == pytest.approx(b["r"], rel=1e-12) and a["coefficient"] == pytest.approx(b["coefficient"])
    assert _top_examples(tmp_path / "ddp") == _top_examples(tmp_path / "single"), "top examples merge exactly"


def _top_examples(root: Path) -> dict:
    """Every candidate's top examples in selection.json, by (layer, feature)."""
    record = json.loads((root / "steered" / "selection.json").read_text())
    tops = {(f["layer"], f["feature"]): f["top_examples"] for fs in record["layers"].values() for f in fs}
    assert any(tops.values()), "some candidate has top examples for the comparison to mean anything"
    return tops


def _recorder(root: Path, log: Path, kill: bool) -> list[str]:
    """A second config that adds the test-only BatchRecorder (tests/fault_injection.py)."""
    config = root.parent / f"{root.name}-recorder-{int(kill)}.yaml"
    config.write_text(
        "trainer:\n  callbacks:\n    - class_path: fault_injection.BatchRecorder\n"
        f"      init_args: {{log: {log}, kill_after_checkpoint: {str(kill).lower()}}}\n"
    )
    return ["--config", str(config)]


def _computed(log: Path) -> dict[int, list[int]]:
    """Batch indices computed, by process id, in order."""
    by_pid: dict[int, list[int]] = {}
    for line in log.read_text().splitlines():
        pid, index = map(int, line.split())
        by_pid.setdefault(pid, []).append(index)
    return by_pid


def test_sigkill_then_resume_from_last_computes_only_the_remaining_batches_and_gives_identical_results(
    tmp_path, one_thread, lightning_log, monkeypatch
):
    _train_here(root=tmp_path / "reference")

    killed, log = tmp_path / "killed", tmp_path / "batches.log"
    env_path = {"PYTHONPATH": str(ROOT / "tests")}
    run = _train(
        "--checkpoint.every_n_batches", "5", *_recorder(killed, log, True), root=killed, wait=False, env=env_path
    )
    run.wait(timeout=300)
    assert run.returncode == -signal.SIGKILL, run.stderr.read().decode()[-3000:]
    assert not (killed / "steered").exists(), "killed before the end of calibration"
    (before,) = _computed(log).values()
    assert before == [0, 1, 2, 3, 4], "killed at the first batch after the checkpoint of batch 5"

    monkeypatch.syspath_prepend(str(ROOT / "tests"))  # fault_injection.BatchRecorder, in this process too
    _train_here("--ckpt_path", "last", *_recorder(killed, log, False), root=killed)
    assert "resuming calibration after batch 5 of 58" in lightning_log.text
    after = [indices for indices in _computed(log).values() if indices != before]
    assert after == [list(range(5, 58))], "the resumed process computes only the batches after the checkpoint"
    reference, resumed = _statistics(tmp_path / "reference"), _statistics(killed)
    assert resumed["layer.0.n"].item() == 58
    for key in reference:
        assert torch.equal(reference[key], resumed[key]), key
    assert _selected(killed) == _selected(tmp_path / "reference")
    assert _top_examples(killed) == _top_examples(tmp_path / "reference"), "top examples resume exactly"


@pytest.mark.parametrize("devices", [2])
def test_ddp_test_stage_counts_every_test_item_once(tmp_path, devices, one_thread):
    _train_here("--data.limit_calibration", "9", root=tmp_path)
    cmd = [sys.executable, "train.py", "test", *TINY, "--trainer.default_root_dir", str(tmp_path)]
    cmd += ["--trainer.strategy", "ddp", "--trainer.devices", str(devices), "--data.limit_test", "7"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "steered" / "report.json").read_text())
    assert results["samples"] == 7
