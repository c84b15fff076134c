"""Errors a user can fix: the library names the argument, the command line names the flag."""

from __future__ import annotations


class OptionError(ValueError):
    """A bad value of one option of a dataclass option group (`SelectionOptions.top_k`, ...).

    The message names the argument as a Python caller writes it (`top_k: must be >= 1, got 0`); the CLI, which
    knows under which flag group each option class sits, prints it as `--selection.top_k: must be >= 1, got 0`.
    """

    def __init__(self, owner: type | str, argument: str, problem: str) -> None:
        self.owner = owner if isinstance(owner, str) else owner.__name__
        self.argument, self.problem = argument, problem
        super().__init__(f"{self.owner}.{argument}: {problem}")

    def as_flag(self, group: str) -> str:
        """The message as the command line says it, `group` being the flag group (`selection`)."""
        return f"--{group}.{self.argument}: {self.problem}"
