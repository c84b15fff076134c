"""Benchmarks behind one interface, and a registry from task name to class."""

from __future__ import annotations

import inspect

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


def get_task(name: str, **kwargs: object) -> Task:
    """A task by registry name, built with its options (e.g. seed, source)."""
    if name not in TASKS:
        raise ValueError(f"unknown task '{name}'; choose one of: {', '.join(sorted(TASKS))} (set --data.task)")
    options = list(inspect.signature(TASKS[name]).parameters)
    for option in kwargs:
        if option not in options:
            raise ValueError(
                f"task '{name}' has no option '{option}' (check --data.options); options: {', '.join(options)}"
            )
    return TASKS[name](**kwargs)


__all__ = ["SPLITS", "TASKS", "Example", "Split", "Task", "get_task"]
