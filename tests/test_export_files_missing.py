"""`train.py test` on an export missing a file that fit writes: one line naming it and the fix, or a report that
says what it cannot show."""

import shutil

import pytest

from corrsteer_pl.calibration.stats import STATS_FILE
from corrsteer_pl.evaluation.markdown import CHOSEN_SECTION, RESPONDS_SECTION
from corrsteer_pl.lightning.cli import main
from corrsteer_pl.selection.evidence import SELECTION_FILE

TINY = ["--config", "configs/tiny.yaml", "--trainer.enable_progress_bar", "false"]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """One tiny fit; each test tests a copy of its export."""
    root = tmp_path_factory.mktemp("fit")
    main(["fit", *TINY, "--trainer.default_root_dir", str(root)])
    return root / "steered"


def _without(export, tmp_path, name):
    """A copy of `export` in tmp_path without the file `name`."""
    copy = tmp_path / "steered"
    shutil.copytree(export, copy)
    (copy / name).unlink()
    return copy


def _test(tmp_path, export, *flags):
    return main(
        ["test", *TINY, "--trainer.default_root_dir", str(tmp_path), "--model.steering_path", str(export)] + [*flags]
    )


def test_testing_without_statistics_names_the_file_the_controls_need_and_both_fixes(fitted, tmp_path):
    export = _without(fitted, tmp_path, STATS_FILE)
    with pytest.raises(SystemExit) as exc:
        _test(tmp_path, export)
    line = str(exc.value.code)
    assert (
        line.startswith(f"error: {export / STATS_FILE} is missing, and the random-feature controls")
        and "\n" not in line
    )
    assert "re-run `train.py fit`" in line and "--model.controls 0" in line


def test_without_statistics_the_named_fix_controls_0_tests_without_controls(fitted, tmp_path):
    export = _without(fitted, tmp_path, STATS_FILE)
    _test(tmp_path, export, "--model.controls", "0")
    assert "| unsteered |" in (export / "report.md").read_text()


def test_comparison_rankings_without_statistics_name_the_file_and_the_flag(fitted, tmp_path):
    export = _without(fitted, tmp_path, STATS_FILE)
    with pytest.raises(SystemExit) as exc:
        _test(tmp_path, export, "--model.controls", "0", "--comparison.rankings", "[pearson]")
    line = str(exc.value.code)
    assert line.startswith(f"error: {export / STATS_FILE} is missing, and --comparison.rankings") and "\n" not in line
    assert "re-run `train.py fit`" in line and "leave out --comparison.rankings" in line


def test_a_report_without_selection_json_says_so_in_place_of_its_two_sections_and_warns(fitted, tmp_path):
    export = _without(fitted, tmp_path, SELECTION_FILE)
    with pytest.warns(UserWarning, match=f"{SELECTION_FILE} is missing"):
        _test(tmp_path, export)
    text = (export / "report.md").read_text()
    for heading in (CHOSEN_SECTION, RESPONDS_SECTION):
        assert f"{heading}\n\nNot shown: the export folder {export} has no {SELECTION_FILE}" in text
