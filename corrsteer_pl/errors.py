"""Errors a user can fix: the library names the argument, the command line names the flag."""

from __future__ import annotations


class OptionError(ValueError):
    """A bad value of one argument of the library: an option group's field (`SelectionOptions.top_k`) or a
    loader's argument (`load_model.name`, `SAESpec.source`).

    The message names the argument as a Python caller writes it (`SelectionOptions.top_k: must be >= 1, got 0`);
    the command line, which knows which flag sets each argument, prints `--selection.top_k: must be >= 1, got 0`.
    """

    def __init__(self, owner: type | str, argument: str, problem: str) -> None:
        self.owner = owner if isinstance(owner, str) else owner.__name__
        self.argument, self.problem = argument, problem
        super().__init__(f"{self.owner}.{argument}: {problem}")
