"""Bad input gets one line naming the flag, file, row or field and the fix: options before any model loads,
exports that do not check out, unreadable models and data, over-long prompts, duplicate prompts."""

import json
import re

import pytest
from safetensors.torch import load_file, save_file

from corrsteer_pl.lightning.cli import main
from corrsteer_pl.lightning.data import TaskDataModule, check_prompt_lengths
from corrsteer_pl.models.tiny import tiny_tokenizer
from corrsteer_pl.steering.vectors import META_FILE, VECTORS_FILE, SteeringVectors, load_steered_model
from corrsteer_pl.tasks import SPLITS, Example, get_task

TINY = ["--config", "configs/tiny.yaml", "--trainer.enable_progress_bar", "false"]


def _exit_line(args: list[str], tmp_path) -> str:
    with pytest.raises(SystemExit) as exc:
        main([*args[:1], *TINY, "--trainer.default_root_dir", str(tmp_path), *args[1:]])
    return str(exc.value.code)


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--selection.scale", "-1"),
        ("--selection.max_answer_share", "2"),
        ("--selection.top_k", "0"),
        ("--selection.scale_grid", "[1.0, -2.0]"),
        ("--model.controls", "-1"),
        ("--checkpoint.every_n_batches", "-1"),
        ("--data.max_prompt_tokens", "0"),
        ("--export.formats", "[onnx]"),
        ("--calibration.bootstrap", "-1"),
        ("--selection.search_draws", "-2"),
        ("--selection.scale_grid", "[0, 1]"),
        ("--data.limit_calibration", "0"),
    ],
)
def test_an_out_of_range_option_is_refused_naming_the_flag_before_any_model_loads(
    tmp_path, no_model_loads, flag, value
):
    assert re.match(rf"error: {re.escape(flag)}:? must", _exit_line(["fit", flag, value], tmp_path))


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--data.task", "Synthetic", "--data.task.size", "3"], "--data.task.size"),
        (["--data.task", "Synthetic", "--data.task.max_new_tokens", "0"], "--data.task.max_new_tokens"),
        (["--data.task", "MMLU", "--data.task.fractions", "[0.5, 0.5, 0.5]"], "--data.task.fractions"),
    ],
)
def test_a_bad_task_option_is_refused_naming_its_flag_before_any_model_loads(tmp_path, no_model_loads, args, flag):
    line = _exit_line(["fit", *args], tmp_path)
    assert line.startswith("error: ") and flag in line and "\n" not in line


@pytest.mark.parametrize(
    ("flag", "value", "says"),
    [
        ("--calibration.pooling", "median", "Expected a typing.Literal['max', 'mean']"),
        ("--data.limit_calibration", "abc", "Given value: abc"),
        ("--calibration.topk", "3", "unrecognized arguments: --calibration.topk"),
    ],
)
def test_a_value_the_parser_refuses_is_one_line_naming_the_flag_not_the_usage(
    tmp_path, no_model_loads, flag, value, says
):
    line = _exit_line(["fit", flag, value], tmp_path)
    assert line.startswith(f"error: {flag}") or "unrecognized" in line
    assert says in line and "\n" not in line and "usage:" not in line


# -- exports that do not check out ------------------------------------------------------------


@pytest.fixture()
def export(tmp_path, llama, saes_for_llama):
    from corrsteer_pl.selection.variants import SelectedFeature

    features = [SelectedFeature(layer, 3, 0.5, 2.0, 0.1) for layer in saes_for_llama]
    SteeringVectors.from_selection(features, saes_for_llama, llama).save(tmp_path / "export")
    return tmp_path / "export"


@pytest.fixture(scope="module")
def saes_for_llama():
    from corrsteer_pl.models.tiny import random_sae

    return {layer: random_sae(64, 16, layer, seed=layer) for layer in (0, 1)}


def _edit_meta(folder, edit) -> None:
    meta = json.loads((folder / META_FILE).read_text())
    edit(meta)
    (folder / META_FILE).write_text(json.dumps(meta))


def test_a_nan_or_infinite_vector_is_refused_naming_the_layer(export):
    tensors = load_file(export / VECTORS_FILE)
    tensors["layer.1.vector"][5] = float("nan")
    save_file(tensors, export / VECTORS_FILE)
    with pytest.raises(ValueError, match=r"layers\[layer=1\]: the vector holds NaN or infinite values"):
        SteeringVectors.load(export)


def test_a_layer_index_outside_the_model_is_refused_at_load(export):
    tensors = load_file(export / VECTORS_FILE)
    tensors["layer.99.vector"] = tensors.pop("layer.1.vector")
    save_file(tensors, export / VECTORS_FILE)
    _edit_meta(export, lambda m: m["layers"][1].update(layer=99))
    with pytest.raises(ValueError, match=r"layer 99 is outside the model's layers 0\.\.2"):
        SteeringVectors.load(export)


def test_a_field_of_the_wrong_type_is_named(export):
    _edit_meta(export, lambda m: m["model"].update(d_model="64"))
    with pytest.raises(ValueError, match=r"'model\.d_model' is '64', not a int"):
        SteeringVectors.load(export)


def test_a_standalone_model_path_outside_the_export_is_refused(export):
    _edit_meta(export, lambda m: m["model"].update(standalone="../../.."))
    with pytest.raises(ValueError, match="points outside the export folder"):
        load_steered_model(export)


# -- unreadable models and data ---------------------------------------------------------------


def test_a_model_path_that_does_not_exist_says_so(tmp_path):
    line = _exit_line(["fit", "--model.model", str(tmp_path / "no-such-model")], tmp_path)
    assert (
        line.startswith("error: --model.model: ") and "neither an existing folder nor a Hugging Face model id" in line
    )


def test_a_model_folder_with_a_corrupt_config_is_one_line(tmp_path, llama, tokenizer):
    folder = tmp_path / "model"
    llama.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "config.json").write_text("{corrupt")
    line = _exit_line(["fit", "--model.model", str(folder)], tmp_path)
    assert line.startswith(f"error: --model.model: cannot load '{folder}'")


def test_a_tiny_random_sae_with_an_unknown_id_lists_the_ids(tmp_path):
    saes = '[{"source": "tiny-random", "sae_id": "layer_7"}]'
    line = _exit_line(["fit", "--model.saes", saes], tmp_path)
    assert "the tiny-random SAEs are layer_0, layer_1" in line and "'layer_7'" in line


def test_a_malformed_json_line_mid_file_names_the_file_and_line(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(
        '{"question": "a", "answer": "b"}\n{"question": "c", "answer": \n{"question": "d", "answer": "e"}\n'
    )
    with pytest.raises(ValueError, match=rf"{path}: line 2 is not valid JSON"):
        get_task("custom", file=str(path))


def test_non_utf8_bytes_name_the_file_and_line(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_bytes(b"question,answer\nfine,yes\ncaf\xe9,no\n")
    with pytest.raises(ValueError, match=rf"{path}: line 3: byte 0xe9 is not UTF-8"):
        get_task("custom", file=str(path))


# -- prompt length, duplicates ----------------------------------------------------------------


class _CountingTokenizer:
    """A tokenizer that records every text it tokenizes."""

    def __init__(self):
        self.inner, self.seen = tiny_tokenizer(), []

    def get_vocab(self):
        return self.inner.get_vocab()

    def __call__(self, texts, **kwargs):
        self.seen += list(texts)
        return self.inner(texts, **kwargs)


def test_a_huge_prompt_is_refused_naming_its_item_without_being_tokenized():
    tokenizer = _CountingTokenizer()
    examples = [Example("t/0", "short prompt", "a"), Example("t/1", "word " * 2_000_000, "b")]
    with pytest.raises(
        ValueError, match=r"--data.max_prompt_tokens: calibration item 't/1' has a prompt of 10,000,000"
    ):
        check_prompt_lengths(examples, "calibration", tokenizer, 8192, lambda p: p)
    assert tokenizer.seen == [], "refused from its length in characters, before any tokenizing"


def test_a_prompt_just_over_the_token_limit_is_refused_with_its_count():
    examples = [Example("t/0", "one two three four five six", "a")]
    with pytest.raises(ValueError, match=r"item 't/0' has a prompt of \d+ tokens, more than 3 tokens"):
        check_prompt_lengths(examples, "test", tiny_tokenizer(), 3, lambda p: p)


def test_identical_prompts_never_straddle_two_splits_and_the_report_counts_them(tmp_path):
    rows = [{"question": f"question {i}", "answer": "x"} for i in range(40)]
    rows += [{"question": "question 7", "answer": "x"}] * 5
    path = tmp_path / "dup.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = TaskDataModule(task="custom", source=str(path), tokenizer="tiny-random")
    prompts = {split: [e.prompt for e in data.task.load_split(split)] for split in SPLITS}
    everything = [p for split in SPLITS for p in prompts[split]]
    assert len(everything) == len(set(everything)) == 40
    assert "5 items with a prompt seen before were dropped before splitting" in data.describe()


def test_a_limit_larger_than_the_split_says_so_once_with_the_splits_size():
    data = TaskDataModule(task="synthetic", tokenizer="tiny-random", batch_size=8, limit_calibration=400)
    size = len(data.task.load_split("calibration"))
    with pytest.warns(UserWarning) as caught:
        assert len(data.examples("calibration")) == size < 400
        data.examples("calibration")
        data.examples("test")  # no limit there: nothing to say
    lines = [str(w.message) for w in caught if "--data.limit_" in str(w.message)]
    assert lines == [f"--data.limit_calibration 400 is more than the {size} items of the calibration split of "
                     f"task 'synthetic': all {size} are used"]  # fmt: skip
