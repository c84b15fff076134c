"""Benchmarks behind one interface, and a registry from task name to class."""

from __future__ import annotations

import inspect
from dataclasses import fields
from typing import Any, Protocol

from corrsteer_pl.tasks.base import SPLITS, Example, Split, Task
from corrsteer_pl.tasks.bbq import BBQAmbig, BBQDisambig
from corrsteer_pl.tasks.custom import Custom
from corrsteer_pl.tasks.gsm8k import GSM8K
from corrsteer_pl.tasks.harmbench import HarmBench
from corrsteer_pl.tasks.mmlu import MMLU
from corrsteer_pl.tasks.mmlu_pro import MMLUPro
from corrsteer_pl.tasks.simpleqa import SimpleQA
from corrsteer_pl.tasks.synthetic import Synthetic
from corrsteer_pl.tasks.xstest import XSTest

TASKS: dict[str, type[Task]] = {
    task.name: task
    for task in (MMLU, MMLUPro, BBQAmbig, BBQDisambig, SimpleQA, HarmBench, XSTest, GSM8K, Custom, Synthetic)
}
DATA_OPTIONS = ("seed", "source")
"""Task fields set by the data module's own flags (`--data.seed`, `--data.source`), not by `--data.task.<option>`."""


class TaskFactory(Protocol):
    """Builds a task from the data module's seed and source: a task class, or one with its options set.

    On the command line, `--data.task Custom --data.task.template "Q: {question}\\nA:"` gives such a factory;
    jsonargparse reads each class's fields and their docstrings (`--data.task.help Custom` prints them).
    """

    def __call__(self, *, seed: int, source: str | None) -> Task: ...


def get_task(name: str, **kwargs: object) -> Task:
    """A task by registry name (mmlu) or class name (MMLU), built with its options (e.g. seed, source)."""
    by_class = {task.__name__: task for task in TASKS.values()}
    if name not in TASKS and name not in by_class:
        raise ValueError(
            f"unknown task '{name}'; choose one of: {', '.join(sorted(TASKS))} (set --data.task), or a task class "
            f"to set its options: {', '.join(sorted(by_class))}"
        )
    task = TASKS.get(name) or by_class[name]
    options = list(inspect.signature(task).parameters)
    for option in kwargs:
        if option not in options:
            raise ValueError(
                f"task '{task.name}' has no option '{option}' (python train.py fit --data.task.help "
                f"{task.__name__} lists them); options: {', '.join(options)}"
            )
    return task(**kwargs)


def task_options(task: Task) -> dict[str, Any]:
    """A built task's own options (its fields but seed and source), as `--data.task.<option>` sets them."""
    return {f.name: getattr(task, f.name) for f in fields(task) if f.init and f.name not in DATA_OPTIONS}


__all__ = ["SPLITS", "TASKS", "Example", "Split", "Task", "TaskFactory", "get_task", "task_options"]
