"""Recovery: a resume never mixes calibrations, a finished checkpoint re-exports without recalibrating, the export
folder has one owner and is written whole or not at all, and an empty steering is said out loud."""

import json
import warnings

import pytest

import corrsteer_pl.steering.export
from corrsteer_pl.lightning.cli import main
from corrsteer_pl.lightning.module import CorrSteerModule

TINY = ["--config", "configs/tiny.yaml", "--trainer.enable_progress_bar", "false"]


def _fit(root, *args):
    return main(["fit", *TINY, "--trainer.default_root_dir", str(root), *args])


def _error(exc: pytest.ExceptionInfo) -> str:
    """The one line `main` exits with."""
    return str(exc.value.code)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("fitted")
    _fit(root)
    return root


@pytest.fixture()
def no_calibration(monkeypatch):
    """Fails the test if any calibration batch is computed."""

    def refuse(*args, **kwargs):
        raise AssertionError("a calibration batch was computed")

    monkeypatch.setattr(CorrSteerModule, "training_step", refuse)


@pytest.mark.parametrize(
    ("change", "flag"),
    [
        (["--data.task", "Synthetic", "--data.task.size", "50"], "--data.task.size"),
        (["--data.batch_size", "4"], "--data.batch_size"),
        (["--model.saes", '[{"source": "tiny-random", "sae_id": "layer_1"}]'], "--model.saes"),
        (["--calibration.pooling", "mean"], "--calibration.pooling"),
        (["--data.task", "Synthetic", "--data.task.max_new_tokens", "2"], "--data.task.max_new_tokens"),
    ],
)
def test_resume_with_a_config_that_changes_the_statistics_is_refused_naming_the_flag(fitted, change, flag):
    with pytest.raises(SystemExit) as exc:
        _fit(fitted, "--ckpt_path", "last", *change)
    assert _error(exc).startswith(f"error: cannot resume: {flag} was ")
    assert "new --trainer.default_root_dir" in _error(exc)


def test_resume_of_a_finished_calibration_reselects_and_exports_without_computing_a_batch(tmp_path, monkeypatch):
    _fit(tmp_path)
    before = json.loads((tmp_path / "steered" / "steering.json").read_text())
    monkeypatch.setattr(CorrSteerModule, "training_step", lambda *a, **k: pytest.fail("a batch was computed"))
    _fit(tmp_path, "--ckpt_path", "last", "--selection.variant", "S")  # selection options may change
    after = json.loads((tmp_path / "steered" / "steering.json").read_text())
    assert before["info"]["variant"] == "A" and len(before["layers"]) == 2
    assert after["info"]["variant"] == "S" and len(after["layers"]) == 1
    assert after["info"]["samples_seen"] == before["info"]["samples_seen"] == 58


def test_export_folder_flag_is_where_fit_writes_and_where_test_after_fit_reads_and_reports(tmp_path):
    stale = tmp_path / "root" / "steered"
    stale.mkdir(parents=True)
    (stale / "steering.json").write_text("stale")
    export = tmp_path / "elsewhere"
    args = ["--model.steering_path", str(export), "--test_after_fit", "true", "--model.controls", "2"]
    _fit(tmp_path / "root", *args)
    report = json.loads((export / "report.json").read_text())
    assert [c["kind"] for c in report["controls"]] == ["random_feature", "random_direction"]
    assert report["steering"]["path"] == str(export)
    assert (stale / "steering.json").read_text() == "stale", "the default folder is left alone"
    assert sorted(p.name for p in stale.iterdir()) == ["steering.json"]


def test_a_failed_export_leaves_the_previous_export_whole_and_says_how_to_recover(fitted, tmp_path, monkeypatch):
    root = tmp_path / "run"
    _fit(root)
    old = {p.name: p.read_bytes() for p in (root / "steered").iterdir()}

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(corrsteer_pl.steering.export, "save_layer_stats", full_disk)
    with pytest.raises(SystemExit) as exc:
        _fit(root, "--selection.variant", "S", "--ckpt_path", "last")
    assert "could not write the export" in _error(exc) and "No space left on device" in _error(exc)
    assert "--ckpt_path last" in _error(exc)
    assert {p.name: p.read_bytes() for p in (root / "steered").iterdir()} == old
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == [], "no temporary folder left"


def test_an_unwritable_export_folder_is_refused_before_calibration(tmp_path, no_calibration):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as exc:
        _fit(tmp_path / "root", "--model.steering_path", str(blocker / "steered"))
    assert _error(exc).startswith("error: --model.steering_path: cannot write under")


def _never_right(tmp_path):
    rows = [{"question": f"item {i} alpha beta", "answer": "zzzq never said"} for i in range(40)]
    path = tmp_path / "never.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ["--data.task", "Custom", "--data.source", str(path), "--data.task.max_new_tokens", "2"]


def test_constant_labels_export_an_empty_steering_that_warns_everywhere(tmp_path):
    root = tmp_path / "root"
    with pytest.warns(UserWarning, match="every calibration answer was wrong"):
        _fit(root, *_never_right(tmp_path))
    meta = json.loads((root / "steered" / "steering.json").read_text())
    assert meta["layers"] == []
    assert meta["info"]["warnings"] and "every calibration answer was wrong" in meta["info"]["warnings"][0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main(["test", *TINY, "--trainer.default_root_dir", str(root), *_never_right(tmp_path)])
    report = (root / "steered" / "report.md").read_text().splitlines()
    assert report[2].startswith("**nothing was steered: every calibration answer was wrong")
    assert json.loads((root / "steered" / "report.json").read_text())["warnings"] == meta["info"]["warnings"]
