import itertools
from dataclasses import fields

import docstring_parser
import pytest
from jsonargparse import ArgumentError, ArgumentParser, set_parsing_settings

from corrsteer_pl.lightning.cli import main
from corrsteer_pl.lightning.data import ShardedBatches, TaskDataModule
from corrsteer_pl.models.tiny import tiny_tokenizer
from corrsteer_pl.tasks import DATA_OPTIONS, TASKS, Example
from corrsteer_pl.tasks.custom import Custom

EXAMPLES = [Example(f"x/{i}", f"Question {i}\nAnswer:", "A") for i in range(9)]


def test_shards_cover_every_example_once_with_equal_batch_counts():
    tok = tiny_tokenizer()
    shards = [ShardedBatches(EXAMPLES, 2, tok, rank, 2) for rank in range(2)]
    assert len(shards[0]) == len(shards[1]) == 3
    seen = [e.id for shard in shards for batch in shard for e in batch["examples"]]
    assert sorted(seen) == sorted(e.id for e in EXAMPLES)


def test_batches_group_prompts_of_similar_length_longest_first():
    tok = tiny_tokenizer()
    mixed = [Example(f"m/{i}", "word " * (i * 7 % 10) + "Answer:", "A") for i in range(10)]
    batches = list(ShardedBatches(mixed, 3, tok))
    real = [batch["attention_mask"].sum(dim=1).tolist() for batch in batches]
    assert all(min(a) >= max(b) for a, b in itertools.pairwise(real))  # no long row beside a short one
    assert sum(batch["input_ids"].numel() for batch in batches) < len(mixed) * max(max(r) for r in real)
    assert sorted(e.id for batch in batches for e in batch["examples"]) == sorted(e.id for e in mixed)


def test_resume_starts_after_the_completed_batches():
    batches = ShardedBatches(EXAMPLES, 2, tiny_tokenizer())
    batches.load_state_dict({"completed": 3})
    assert [b["index"] for b in batches] == [3, 4]


def test_chat_template_wraps_the_prompt_as_one_user_turn():
    tok = tiny_tokenizer()
    tok.chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}<|assistant|>"
    batch = ShardedBatches(EXAMPLES[:1], 1, tok, chat_template=True).collate(EXAMPLES[:1], 0)
    text = tok.decode(batch["input_ids"][0])
    assert text == "<|user|>Question 0\nAnswer:<|assistant|>"
    raw = ShardedBatches(EXAMPLES[:1], 1, tok).collate(EXAMPLES[:1], 0)
    assert tok.decode(raw["input_ids"][0]) == "Question 0\nAnswer:"


def test_chat_template_without_one_in_the_tokenizer_is_refused():
    with pytest.raises(ValueError, match="no chat template"):
        ShardedBatches(EXAMPLES[:1], 1, tiny_tokenizer(), chat_template=True).collate(EXAMPLES[:1], 0)


# -- task options on the command line ---------------------------------------------------------------------------


def _data_parser() -> ArgumentParser:
    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # as the CLI does
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(TaskDataModule, "data")
    return parser


def _option_names(task: type) -> list[str]:
    return [f.name for f in fields(task) if f.init and f.name not in DATA_OPTIONS]


def test_a_task_class_takes_its_options_as_flags_and_the_seed_and_source_of_the_data_module():
    parser = _data_parser()
    config = parser.parse_args(["--data.task", "Synthetic", "--data.task.size", "50", "--data.seed", "3"])
    data = parser.instantiate(config).data
    assert (data.task.name, data.task.size, data.task.seed) == ("synthetic", 50, 3)
    assert data.identity()["task"] == "synthetic" and data.identity()["task.size"] == 50
    with pytest.raises(ArgumentError, match="seed"):
        parser.parse_args(["--data.task", "Synthetic", "--data.task.seed", "3"])  # one flag per setting


def test_a_task_by_name_has_the_identity_of_its_class_with_default_options():
    parser = _data_parser()
    by_name = parser.instantiate(parser.parse_args(["--data.task", "synthetic"])).data
    by_class = parser.instantiate(parser.parse_args(["--data.task", "Synthetic"])).data
    assert by_name.identity() == by_class.identity() == TaskDataModule(task="synthetic").identity()
    assert "task: synthetic\n" in parser.dump(parser.parse_args(["--data.task", "synthetic"]))  # config.yaml
    assert {key for key in by_name.identity() if key.startswith("task.")} == {"task.size", "task.max_new_tokens"}


def test_the_task_flag_help_lists_every_option_of_every_task():
    (doc,) = [
        p.description for p in docstring_parser.parse(TaskDataModule.__init__.__doc__).params if p.arg_name == "task"
    ]
    with_options = [
        f"{task.__name__}: {', '.join(_option_names(task))}" for task in TASKS.values() if _option_names(task)
    ]
    without = [task.__name__ for task in TASKS.values() if not _option_names(task)]
    listed = "; ".join(with_options) + (f"; {', '.join(without)}: none" if without else ".")
    assert listed in " ".join(doc.split())


def test_per_task_help_shows_each_option_with_its_docstring(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--data.task.help", "Custom"])
    text = " ".join(capsys.readouterr().out.split())
    for option in _option_names(Custom):
        assert f"--data.task.{option}" in text
    assert "The column with the gold answer" in text and "exact: first line equals the answer" in text


def test_a_second_cli_reads_no_source_for_its_option_help(monkeypatch, capsys):
    import inspect

    with pytest.raises(SystemExit):
        main(["fit", "--data.task.help", "Custom"])  # the first CLI of this process may parse sources
    reads = []
    getsource = inspect.getsource
    monkeypatch.setattr(inspect, "getsource", lambda obj: reads.append(obj) or getsource(obj))
    with pytest.raises(SystemExit):
        main(["fit", "--data.task.help", "Custom"])
    assert "The column with the gold answer" in capsys.readouterr().out, "help still comes from attribute docstrings"
    classes = [obj for obj in reads if inspect.isclass(obj)]
    assert classes == [], "each class's attribute docstrings were parsed by the first CLI: no source is read again"
