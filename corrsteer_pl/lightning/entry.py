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

from corrsteer_pl.errors import OptionError

SUBCOMMANDS = ("fit", "validate", "test")
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
"""The presets of the source checkout (`configs/`): the offline default job, tiny, the paper's presets."""


def shipped_config(name: str) -> Path:
    """`configs/<name>` of the checkout this package runs from; one line saying where it is when installed without
    one (a wheel carries the code, not the presets)."""
    path = CONFIGS / name
    if not path.is_file():
        sys.exit(
            f"error: configs/{name} ships with the corrsteer-pl source checkout, and this installation "
            f"({CONFIGS.parent}) has none: run from a clone of the repository, or pass --config <your file>"
        )
    return path


def run_cli(
    cli: type[LightningCLI],
    default_config: Path,
    args: list[str] | None,
    flags: dict[str, str] | None = None,
    moved: dict[str, str] | None = None,
    **kwargs: Any,
) -> LightningCLI | None:
    """`cli(**kwargs, args=args)`; a bare subcommand (`train.py fit`) runs on `default_config`; flags without
    --config run on the classes' own defaults, said in one line (the default job with one flag changed is
    `--config <default_config> <flag>`: its settings are for its own model). A ValueError, OSError (unreadable
    input, full disk) or missing module ends with one line naming it (CORRSTEER_TRACEBACK=1 for the trace); a
    library's `OptionError` names the flag of its argument (`flags`: "Owner.argument" or "Owner.{}" -> the flag,
    "{}" standing for the argument); a flag of `moved` (old key -> new) names its new place."""
    given = sys.argv if args is None else args  # LightningCLI reads sys.argv itself when args is None
    start = 1 if args is None else 0
    _refuse_moved(given[start:], moved or {})
    has_config = any(a in ("--config", "-c") or a.startswith("--config=") for a in given[start:])
    if len(given) == start + 1 and given[start] in SUBCOMMANDS:
        given[start + 1 : start + 1] = ["--config", str(shipped_config(default_config.name))]
    elif len(given) > start + 1 and given[start] in SUBCOMMANDS and not has_config and "--help" not in given:
        print(
            f"note: no --config: the classes' defaults and your flags (the offline default job is --config "
            f"{_shown(default_config)})",
            file=sys.stderr,
        )
    _option_help_from_attribute_docstrings()
    strict = {"exit_on_error": False}  # a bad value raises instead of printing the whole usage: one line below
    kwargs.setdefault("parser_kwargs", {strict_key: dict(strict) for strict_key in SUBCOMMANDS} | strict)
    try:
        return cli(args=args, **kwargs)
    except ArgumentError as err:
        if os.environ.get("CORRSTEER_TRACEBACK"):
            raise
        detail = re.sub(r'^Parser key "([^"]+)":', r"--\1:", " ".join(str(err).split()))  # name it as a flag
        sys.exit(f"error: {detail}{_moved_hint(detail, moved or {})} (run with --help for the accepted options)")
    except OptionError as err:
        if os.environ.get("CORRSTEER_TRACEBACK"):
            raise
        sys.exit(f"error: {_as_flag(err, flags or {})} (CORRSTEER_TRACEBACK=1 shows where)")
    except (ValueError, OSError, ModuleNotFoundError) as err:
        if os.environ.get("CORRSTEER_TRACEBACK"):
            raise
        sys.exit(f"error: {err} (CORRSTEER_TRACEBACK=1 shows where)")


def _as_flag(err: OptionError, flags: dict[str, str]) -> str:
    """The error as the command line says it: the flag that sets its argument, then the problem."""
    flag = flags.get(f"{err.owner}.{err.argument}") or flags.get(f"{err.owner}.{{}}", "").format(err.argument)
    return f"{flag}: {err.problem}" if flag else str(err)


def _refuse_moved(args: list[str], moved: dict[str, str]) -> None:
    """A flag that moved ends the run in one line naming its new name."""
    for arg in args:
        key = arg[2:].split("=", 1)[0] if arg.startswith("--") else None
        if key in moved:
            sys.exit(f"error: --{key} moved to --{moved[key]}: rename it (in a config file, the same key)")


def _moved_hint(detail: str, moved: dict[str, str]) -> str:
    """For a config file's moved key, its new place."""
    for old, new in moved.items():
        group, name = old.split(".", 1)
        if re.search(rf"\b{re.escape(old)}\b", detail) or (f'"{group}"' in detail and f'"{name}"' in detail):
            return f" ({group}.{name} moved to {new.split(' ', 1)[0]}: rename it)"
    return ""


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


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
