"""A re-export replaces the export's own files and nothing else: a user's notes and an earlier `test` report stay,
byte for byte; a stale file of the old export goes; a failure or a kill at any point leaves every user file; what is
written gets the usual mode, not a temporary file's private one."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

import corrsteer_pl.files.atomic
from corrsteer_pl.calibration.stats import STATS_FILE, CorrelationStats, save_layer_stats
from corrsteer_pl.evaluation.controls import SEARCH_CONTROLS_DIR
from corrsteer_pl.files.atomic import atomic_file, atomic_folder
from corrsteer_pl.models.tiny import tiny_model, tiny_tokenizer
from corrsteer_pl.steering.export import export_folder
from corrsteer_pl.steering.serving import CONTROL_VECTOR_FILE, MERGED_DIR, write_control_vector, write_merged
from corrsteer_pl.steering.vectors import VECTORS_FILE, LayerSteering, SteeringVectors

ROOT = Path(__file__).resolve().parents[1]
USER_FILES = {
    "my_notes.md": b"# what I tried\n",
    "report.md": b"# Evaluation report\n",  # what `train.py test` writes beside the export
    "report.json": b'{"accuracy_steered": 0.5}',
    "report_accuracy.png": b"\x89PNG\r\n",
    "notes/runs/1.txt": b"a user folder, nested",
}


def _steering(scale: float = 1.0, layers=(1, 2)) -> SteeringVectors:
    gen = torch.Generator().manual_seed(3)
    steered = {layer: LayerSteering(layer, scale * torch.randn(64, generator=gen), []) for layer in layers}
    hookpoints = {layer: f"layers.{layer}" for layer in layers}
    return SteeringVectors(steered, d_model=64, num_layers=3, positions="all", lm_eval_hookpoints=hookpoints)


def _export(folder: Path, steering: SteeringVectors, extras: bool = False, note=None) -> None:
    """What fit's export writes; `extras` adds a control vector, a search control and merged/."""
    with export_folder(folder, note=note) as tmp:
        steering.save(tmp)
        if extras:
            write_control_vector(steering, tmp / CONTROL_VECTOR_FILE, "llama")
            steering.save(tmp / SEARCH_CONTROLS_DIR / "0")
            write_merged(steering, tiny_model("llama", num_layers=3), tiny_tokenizer(), tmp / MERGED_DIR)


def _add_user_files(folder: Path) -> None:
    for name, data in USER_FILES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_reexport_keeps_a_users_files_and_an_earlier_report_byte_for_byte_and_says_so(tmp_path):
    folder = tmp_path / "steered"
    _export(folder, _steering())
    _add_user_files(folder)
    notes = []
    _export(folder, _steering(scale=2.0), note=notes.append)
    files = _files(folder)
    assert {name: files.get(name) for name in USER_FILES} == USER_FILES
    assert SteeringVectors.load(folder).layers[1].vector.equal(_steering(scale=2.0).layers[1].vector)
    assert len(notes) == 1 and "\n" not in notes[0] and "my_notes.md" in notes[0] and "report.md" in notes[0]


def test_a_reexport_drops_the_old_exports_own_files_that_it_does_not_write_again(tmp_path):
    folder = tmp_path / "steered"
    _export(folder, _steering(), extras=True)
    (folder / MERGED_DIR / "serving-notes.txt").write_text("mine")
    (folder / MERGED_DIR / "model-00002-of-00002.safetensors").write_bytes(b"a shard of an older save")
    _export(folder, _steering(scale=2.0))
    assert not (folder / CONTROL_VECTOR_FILE).exists() and not (folder / SEARCH_CONTROLS_DIR).exists()
    assert sorted(p.name for p in (folder / MERGED_DIR).iterdir()) == ["serving-notes.txt"], "stale weights went"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["steered"], "no temporary folder left"


def test_writing_merged_over_a_folder_keeps_what_save_pretrained_does_not_write(tmp_path):
    model, folder = tiny_model("llama", num_layers=3), tmp_path / MERGED_DIR
    write_merged(_steering(), model, tiny_tokenizer(), folder)
    (folder / "README.md").write_text("served by vLLM on host b")
    (folder / "model-00001-of-00003.safetensors").write_bytes(b"stale shard")
    notes = []
    write_merged(_steering(scale=2.0), model, tiny_tokenizer(), folder, note=notes.append)
    assert (folder / "README.md").read_text() == "served by vLLM on host b"
    assert not (folder / "model-00001-of-00003.safetensors").exists()
    assert (folder / "model.safetensors").is_file() and "README.md" in notes[0]


def test_an_exception_while_the_export_is_written_leaves_the_old_folder_file_for_file(tmp_path):
    folder = tmp_path / "steered"
    _export(folder, _steering())
    _add_user_files(folder)
    before = _files(folder)
    with pytest.raises(RuntimeError, match="killed"), export_folder(folder) as tmp:
        _steering(scale=2.0).save(tmp)
        raise RuntimeError("killed mid-export")
    assert _files(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["steered"]


def test_a_full_disk_under_safetensors_during_an_export_is_one_oserror_line_and_leaves_the_old_folder(tmp_path):
    folder = tmp_path / "steered"
    _export(folder, _steering())
    before = _files(folder)
    with pytest.raises(OSError) as err, export_folder(folder) as tmp:
        _steering(scale=2.0).save(tmp)
        raise SafetensorError(  # what safetensors' writer raises when the disk fills up
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        )
    assert err.value.strerror == "No space left on device", "fit's export error quotes the reason"
    assert "\n" not in str(err.value) and str(folder) in str(err.value) and "free space" in str(err.value)
    assert _files(folder) == before


def test_a_failure_while_carrying_user_files_over_leaves_the_old_folder_file_for_file(tmp_path, monkeypatch):
    folder = tmp_path / "steered"
    _export(folder, _steering())
    _add_user_files(folder)
    before = _files(folder)
    links = []

    def second_link_fails(src, dest):
        if links:
            raise OSError(28, "No space left on device")
        os.link(src, dest)
        links.append(dest)

    monkeypatch.setattr(corrsteer_pl.files.atomic, "_link", second_link_fails)
    with pytest.raises(OSError, match="No space left"):
        _export(folder, _steering(scale=2.0))
    assert _files(folder) == before and links
    assert sorted(p.name for p in tmp_path.iterdir()) == ["steered"]


def test_a_failure_between_the_two_renames_puts_the_old_folder_back(tmp_path, monkeypatch):
    folder = tmp_path / "steered"
    _export(folder, _steering())
    _add_user_files(folder)
    before = _files(folder)
    rename = os.rename

    def new_one_fails(src, dest):
        if Path(src).name.startswith(".steered.tmp-"):
            raise OSError(5, "Input/output error")
        rename(src, dest)

    monkeypatch.setattr(os, "rename", new_one_fails)
    with pytest.raises(OSError, match="Input/output error"):
        _export(folder, _steering(scale=2.0))
    assert _files(folder) == before


KILLED_BETWEEN_RENAMES = """
import os, signal, sys
from pathlib import Path
from corrsteer_pl.files.atomic import atomic_folder
rename = os.rename
def killed(src, dest):
    if Path(src).name.startswith(".steered.tmp-"):
        os.kill(os.getpid(), signal.SIGKILL)  # the old folder is moved aside, the new one not yet in place
    rename(src, dest)
os.rename = killed
with atomic_folder(sys.argv[1], owned=lambda path: path.parts[0] == "steering.json") as tmp:
    (tmp / "steering.json").write_text("new")
"""


def test_a_kill_between_the_two_renames_loses_no_user_file_and_the_next_export_keeps_them(tmp_path):
    folder = tmp_path / "steered"
    _export(folder, _steering())
    _add_user_files(folder)
    before = _files(folder)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", KILLED_BETWEEN_RENAMES, str(folder)], env=env, timeout=120)
    assert done.returncode == -9 and not folder.exists(), "the kill came between the two renames"
    _export(folder, _steering(scale=2.0))
    files = _files(folder)
    assert {name: files.get(name) for name in USER_FILES} == USER_FILES
    assert files[VECTORS_FILE] != before[VECTORS_FILE]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["steered"], "the killed run's leftovers went"


@pytest.fixture()
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_every_written_file_gets_the_usual_mode_and_a_kept_file_keeps_its_own(tmp_path, umask_027):
    folder = tmp_path / "steered"
    _export(folder, _steering())
    (folder / "private.txt").write_text("mine")
    os.chmod(folder / "private.txt", 0o600)
    with export_folder(folder) as tmp:
        _steering().save(tmp)
        save_layer_stats({1: CorrelationStats(4)}, tmp / STATS_FILE)
        write_merged(_steering(), tiny_model("llama", num_layers=3), tiny_tokenizer(), tmp / MERGED_DIR)
    written = [p for p in folder.rglob("*") if p.is_file() and p.name != "private.txt"]
    assert {folder / VECTORS_FILE, folder / STATS_FILE, folder / MERGED_DIR / "model.safetensors"} <= set(written)
    assert {str(p.relative_to(folder)): oct(_mode(p)) for p in written} == {
        str(p.relative_to(folder)): oct(0o640) for p in written
    }
    assert _mode(folder) == _mode(folder / MERGED_DIR) == 0o750
    assert _mode(folder / "private.txt") == 0o600


def test_steering_save_and_atomic_files_outside_an_export_folder_get_the_usual_mode(tmp_path, umask_027):
    _steering().save(tmp_path / "direct")
    with atomic_file(tmp_path / "file.safetensors") as tmp:
        save_layer_stats({1: CorrelationStats(4)}, tmp)
    with atomic_folder(tmp_path / "folder") as tmp:
        save_layer_stats({1: CorrelationStats(4)}, tmp / STATS_FILE)
    paths = [*(tmp_path / "direct").iterdir(), tmp_path / "file.safetensors", tmp_path / "folder" / STATS_FILE]
    assert {p.name: oct(_mode(p)) for p in paths} == {p.name: oct(0o640) for p in paths}


def test_fit_into_a_steering_path_holding_an_earlier_report_and_notes_keeps_both(tmp_path, lightning_log):
    from corrsteer_pl.lightning.cli import main

    folder = tmp_path / "mine"
    _export(folder, _steering())  # an earlier run's export, then its `test` report and the user's notes
    _add_user_files(folder)
    args = ["fit", "--config", "configs/tiny.yaml", "--trainer.enable_progress_bar", "false"]
    main([*args, "--trainer.default_root_dir", str(tmp_path / "run"), "--model.steering_path", str(folder)])
    files = _files(folder)
    assert {name: files.get(name) for name in USER_FILES} == USER_FILES
    assert sorted(SteeringVectors.load(folder).layers) == [0, 1], "the fit's own export replaced the earlier one"
    assert "kept 5 file(s)" in lightning_log.text and "my_notes.md" in lightning_log.text


def test_an_export_folder_the_user_made_private_stays_private_after_a_reexport(tmp_path):
    folder = tmp_path / "steered"
    _export(folder, _steering())
    os.chmod(folder, 0o700)
    _export(folder, _steering(scale=2.0))
    assert _mode(folder) == 0o700
