"""Benchmarks behind one interface, and a registry from task name to class."""

from __future__ import annotations

from corrsteer_pl.tasks.base import SPLITS, Example, Split, Task
from corrsteer_pl.tasks.mmlu import MMLU
from corrsteer_pl.tasks.synthetic import Synthetic

TASKS: dict[str, type[Task]] = {task.name: task for task in (MMLU, Synthetic)}


def get_task(name: str, **kwargs: object) -> Task:
    """A task by registry name, built with its options (e.g. seed, source)."""
    if name not in TASKS:
        raise ValueError(f"unknown task '{name}'; choose one of: {', '.join(sorted(TASKS))} (set --data.task)")
    return TASKS[name](**kwargs)


__all__ = ["SPLITS", "TASKS", "Example", "Split", "Task", "get_task"]
