"""The library: calibrate -> select -> steer -> export from Python, the same code `train.py fit` runs."""

import re
from pathlib import Path

import pytest
import torch

from corrsteer_pl import (
    Calibration,
    CalibrationOptions,
    OptionError,
    SelectionOptions,
    Validator,
    calibrate,
    export_selection,
    get_task,
    load_model,
    load_saes,
    select,
)
from corrsteer_pl.calibration.calibration import calibration_batch
from corrsteer_pl.calibration.stats import STATS_FILE, load_layer_stats
from corrsteer_pl.lightning.cli import main
from corrsteer_pl.steering.vectors import SteeringVectors
from corrsteer_pl.tasks.batching import ShardedBatches

README = Path(__file__).resolve().parents[1] / "README.md"
TINY = ["--config", "configs/tiny.yaml", "--trainer.enable_progress_bar", "false", "--trainer.logger", "false"]


def _readme_block(heading: str) -> str:
    text = README.read_text()
    section = text.split(f"## {heading}", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = load_model("tiny-random")
    saes = load_saes(["tiny-random:layer_0", "tiny-random:layer_1"], model)
    task = get_task("synthetic")
    return model, tokenizer, saes, task


def test_the_readme_notebook_block_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(_readme_block("From Python"), "README.md", "exec"), scope)
    assert scope["selection"].features, "the block steers with what it selected"
    assert not torch.equal(scope["steered"], scope["unsteered"]) or scope["steering"].layers
    assert (tmp_path / "runs/notebook/steered/steering.json").is_file(), "the block exports as train.py does"


def test_calibrate_gives_the_statistics_train_py_fit_exports_bit_for_bit(tiny, tmp_path):
    model, tokenizer, saes, task = tiny
    main(["fit", *TINY, "--trainer.default_root_dir", str(tmp_path)])
    exported = load_layer_stats(tmp_path / "steered" / STATS_FILE)
    calibration = calibrate(model, tokenizer, saes, task.load_split("calibration"), task)  # tiny.yaml: batch 8
    assert sorted(exported) == sorted(calibration.stats)
    for layer, stats in calibration.stats.items():
        for key, value in stats.state_dict().items():
            assert torch.equal(value, exported[layer].state_dict()[key]), f"layer {layer}: {key}"


def test_two_calibrations_over_halves_merge_into_the_calibration_over_all(tiny):
    model, tokenizer, saes, task = tiny
    batches = [
        calibration_batch(model, tokenizer, saes, batch, task)
        for batch in ShardedBatches(task.load_split("calibration"), 4, tokenizer)
    ]
    whole, first, second = (Calibration.for_saes(saes) for _ in range(3))
    for i, result in enumerate(batches):
        whole.update(result)
        (first if i < len(batches) // 2 else second).update(result)
    merged = first.merge(second)
    assert merged.num_samples == whole.num_samples == sum(len(b.ids) for b in batches)
    for layer in whole.stats:
        torch.testing.assert_close(merged.stats[layer].pearson(), whole.stats[layer].pearson(), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(merged.bootstrap[layer].pearson(), whole.bootstrap[layer].pearson())
        assert torch.equal(merged.tops[layer].state.ids, whole.tops[layer].state.ids), "the same top examples"


def test_a_saved_calibration_loads_back_to_the_same_selection(tiny, tmp_path):
    model, tokenizer, saes, task = tiny
    options = CalibrationOptions(bootstrap=5, top_examples=3)
    calibration = calibrate(model, tokenizer, saes, task.load_split("calibration"), task, options=options)
    loaded = Calibration.load(calibration.save(tmp_path / "calibration.safetensors"))
    assert loaded.options == options and loaded.cut == calibration.cut and loaded.budget == task.max_new_tokens
    a = SelectionOptions(variant="A", require_significance=False)
    assert select(loaded, a).features == select(calibration, a).features
    for layer in calibration.stats:
        assert torch.equal(loaded.bootstrap[layer].pearson(), calibration.bootstrap[layer].pearson())


def test_p_and_its_grid_from_a_notebook_validate_on_the_examples_given(tiny, tmp_path):
    model, tokenizer, saes, task = tiny
    calibration = calibrate(model, tokenizer, saes, task.load_split("calibration"), task)
    validation = task.load_split("validation")
    validator = Validator.for_examples(model, tokenizer, saes, task, validation)
    options = SelectionOptions(variant="P", require_significance=False, search_draws=2, scale_grid=(0.5, 1.0))
    selection = select(calibration, options, validator)
    trials = [name for name in selection.validation if name != "unsteered"]
    assert trials and len(selection.search_controls) == 2, "P's trials and its two draws were answered"
    unsteered = selection.validation["unsteered"]
    assert unsteered["accuracy"] * len(validation) == pytest.approx(round(unsteered["accuracy"] * len(validation)))
    steering, _ = export_selection(tmp_path / "steered", selection, calibration, saes, model, tokenizer=tokenizer)
    assert SteeringVectors.load(tmp_path / "steered").layers.keys() == steering.layers.keys()


def test_p_without_a_validator_is_refused_naming_the_argument(tiny):
    model, tokenizer, saes, task = tiny
    calibration = calibrate(model, tokenizer, saes, task.load_split("calibration")[:16], task)
    with pytest.raises(ValueError, match="validator="):
        select(calibration, SelectionOptions(variant="P", require_significance=False))


@pytest.mark.parametrize(
    ("build", "argument"),
    [
        (lambda: SelectionOptions(top_k=0), "top_k"),
        (lambda: SelectionOptions(candidates=11), "candidates"),
        (lambda: SelectionOptions(scale=-1.0), "scale"),
        (lambda: CalibrationOptions(bootstrap=-1), "bootstrap"),
        (lambda: CalibrationOptions(pooling="median"), "pooling"),
    ],
)
def test_a_library_option_error_names_the_argument_not_a_flag(build, argument):
    with pytest.raises(OptionError) as error:
        build()
    assert error.value.argument == argument and "--" not in str(error.value)


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [
        ("--selection.top_k", "0", "error: --selection.top_k: must be >= 1"),
        ("--calibration.bootstrap", "-1", "error: --calibration.bootstrap: must be >= 0"),
        ("--export.formats", "[onnx]", "error: --export.formats: must name formats from gguf, merged"),
    ],
)
def test_the_command_line_names_the_flag_of_a_library_option_error(flag, value, expected, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *TINY, "--trainer.default_root_dir", str(tmp_path), flag, value])
    line = str(exit_info.value.code)
    assert line.startswith(expected) and "\n" not in line


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("--calibration.variant", "--selection.variant"),
        ("--calibration.export_formats", "--export.formats"),
        ("--model.pooling", "--calibration.pooling"),
        ("--model.max_new_tokens", "--data.task.max_new_tokens"),
        ("--comparison.all_positions", "--side_effects.served"),
    ],
)
def test_a_moved_flag_fails_in_one_line_naming_its_new_name(old, new, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *TINY, "--trainer.default_root_dir", str(tmp_path), old, "1"])
    line = str(exit_info.value.code)
    assert line.startswith(f"error: {old} moved to {new}") and "\n" not in line


def test_a_moved_key_in_a_config_file_fails_in_one_line_naming_its_new_place(tmp_path):
    config = tmp_path / "old.yaml"
    config.write_text(Path("configs/tiny.yaml").read_text().replace("selection:\n", "calibration:\n", 1))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path)])
    line = str(exit_info.value.code)
    assert "moved to selection." in line and "\n" not in line
