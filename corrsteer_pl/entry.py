"""Running a LightningCLI as a command: the offline default config, and configuration mistakes in one line."""

from __future__ import annotations

import functools
import os
import re
import sys
from pathlib import Path
from typing import Any

import docstring_parser
from jsonargparse import ArgumentError, set_parsing_settings
from lightning.pytorch.cli import LightningCLI

SUBCOMMANDS = ("fit", "validate", "test")


def run_cli(
    cli: type[LightningCLI], default_config: Path, args: list[str] | None, flags_change_default: bool = False,
    **kwargs: Any,
) -> LightningCLI | None:  # fmt: skip
    """`cli(**kwargs, args=args)`; a bare subcommand runs on `default_config`, and with `flags_change_default` so
    does a subcommand given flags but no --config, the flags changing it (`train.py fit --calibration.target
    choice` is the default job with that one change). A ValueError, OSError (unreadable input, full disk) or
    missing module ends with one line naming it (CORRSTEER_TRACEBACK=1 for the trace)."""
    given = sys.argv if args is None else args  # LightningCLI reads sys.argv itself when args is None
    start = 1 if args is None else 0
    has_config = any(a in ("--config", "-c") or a.startswith("--config=") for a in given[start:])
    bare = len(given) == start + 1
    if len(given) > start and given[start] in SUBCOMMANDS and not has_config and (bare or flags_change_default):
        given[start + 1 : start + 1] = ["--config", str(default_config)]
    _option_help_from_attribute_docstrings()
    strict = {"exit_on_error": False}  # a bad value raises instead of printing the whole usage: one line below
    kwargs.setdefault("parser_kwargs", {strict_key: dict(strict) for strict_key in SUBCOMMANDS} | strict)
    try:
        return cli(args=args, **kwargs)
    except ArgumentError as err:
        if os.environ.get("CORRSTEER_TRACEBACK"):
            raise
        detail = re.sub(r'^Parser key "([^"]+)":', r"--\1:", " ".join(str(err).split()))  # name it as a flag
        sys.exit(f"error: {detail} (run with --help for the accepted options)")
    except (ValueError, OSError, ModuleNotFoundError) as err:
        if os.environ.get("CORRSTEER_TRACEBACK"):
            raise
        sys.exit(f"error: {err} (CORRSTEER_TRACEBACK=1 shows where)")


def _option_help_from_attribute_docstrings() -> None:
    """The docstring under each option becomes its --help, each documented object's source parsed once a process.

    jsonargparse re-reads and ast-parses the source of every class it documents (Trainer's included) for each of
    LightningCLI's four subcommand parsers and for each CLI built: 2.8 s of every `train.py` start here (cProfile
    of fit + test on configs/tiny.yaml: 288 parses, 5.6 s of 8.7 s). A docstring cannot change while a process
    runs, so `docstring_parser.parse_from_object` is memoised (objects that cannot be hashed are parsed as before).
    """
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    if not hasattr(docstring_parser.parse_from_object, "cache_info"):
        docstring_parser.parse_from_object = _parsed_once(docstring_parser.parse_from_object)


def _parsed_once(parse: Any) -> Any:
    cached = functools.lru_cache(maxsize=None)(parse)

    @functools.wraps(parse)
    def parse_once(obj: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return cached(obj, *args, **kwargs)
        except TypeError as err:  # an unhashable object: lru_cache raises before parsing
            if "unhashable" not in str(err):
                raise
            return parse(obj, *args, **kwargs)

    parse_once.cache_info = cached.cache_info
    return parse_once
