"""Serving exports of a saved steering: `corrsteer-export <export dir> --to gguf merged`.

Writes `<export dir>/steering.gguf` (llama.cpp control vector) and `<export dir>/merged/` (an HF folder with
the steering folded into MLP biases), each atomically. Both steer every position, the prompt included.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from corrsteer_pl.steering.serving import (
    CONTROL_VECTOR_FILE,
    MERGED_DIR,
    check_control_vector,
    check_mergeable,
    model_hint,
    write_control_vector,
    write_merged,
)
from corrsteer_pl.steering.vectors import (
    META_FILE,
    SteeringVectors,
    _read_metadata,
    check_made_for,
    load_base_model,
    model_source,
    resolve_given,
)

FORMATS = ("gguf", "merged")
"""What `--to` (and the fit option) accepts: gguf = steering.gguf, merged = merged/."""
MODEL_FLAG = "--model"


def write_formats(
    folder: str | Path,
    steering: SteeringVectors,
    model: nn.Module,
    tokenizer: Any,
    formats: Sequence[str],
    hint: str | None = None,
    note: Callable[[str], None] | None = None,
) -> dict[str, Path]:
    """Writes each requested serving format into `folder`; checks all of them before writing any.

    Returns {format: path written}. Raises a one-line ValueError for an unknown format or a steering that a
    format cannot represent (layer 0 for gguf; an architecture without a foldable MLP bias for merged).
    `hint` overrides `controlvector.model_hint` (default: llama.cpp's name for the model's architecture). `note`
    hears which files an existing merged/ kept (what `save_pretrained` does not write).
    """
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"unknown export format {', '.join(map(repr, unknown))}: choose from {', '.join(FORMATS)}")
    if "gguf" in formats:
        check_control_vector(steering)
        steering.validate(model)
    if "merged" in formats:
        check_mergeable(steering, model)
    folder = Path(folder)
    written = {}
    if "gguf" in formats:
        hint = hint or model_hint(getattr(model.config, "model_type", ""))
        written["gguf"] = write_control_vector(steering, folder / CONTROL_VECTOR_FILE, hint)
    if "merged" in formats:
        written["merged"] = write_merged(steering, model, tokenizer, folder / MERGED_DIR, note=note)
    return written


def _load_base(folder: Path, steering: SteeringVectors, model: str | None) -> tuple[nn.Module, Any]:
    """The base model (--model, else the export's own), checked to be the one the steering was made for."""
    lm, tokenizer, given = load_base_model(folder, MODEL_FLAG, model, dtype="auto")
    check_made_for(folder, steering, lm, given, MODEL_FLAG)
    return lm, tokenizer


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        raise ValueError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="corrsteer-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="an export written by SteeringVectors.save (steering.json ...)")
    parser.add_argument(
        "--to", nargs="+", choices=FORMATS, required=True, help="gguf: steering.gguf; merged: merged/ HF folder"
    )
    parser.add_argument(
        "--model-hint", help="controlvector.model_hint of steering.gguf (default: llama.cpp's name of the model)"
    )
    parser.add_argument(
        MODEL_FLAG, help="the base model (a folder, hub id or built-in name) when the one steering.json names is absent"
    )
    return parser


def run(
    folder: Path,
    formats: Sequence[str],
    hint: str | None = None,
    model: str | None = None,
    note: Callable[[str], None] | None = None,
) -> dict[str, Path]:
    """Loads the export (and, for merged, its base model) and writes the formats into it; checks before writing."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder: give an export written by SteeringVectors.save")
    steering = SteeringVectors.load(folder)
    if "gguf" in formats:
        check_control_vector(steering)  # before loading a model for merged
    if "merged" in formats:
        lm, tokenizer = _load_base(folder, steering, model)
        return write_formats(folder, steering, lm, tokenizer, formats, hint=hint, note=note)
    model_type = _check_config(folder, steering, model, required=hint is None)
    return {"gguf": write_control_vector(steering, folder / CONTROL_VECTOR_FILE, hint or model_hint(model_type))}


def _check_config(folder: Path, steering: SteeringVectors, model: str | None, required: bool) -> str:
    """The base model's `model_type`, from its config alone (no weights loaded), after checking that the model has
    the steering's layers and width. A config that cannot be read fails only when `required` (no --model-hint)."""
    from transformers import AutoConfig

    try:
        source, revision = (resolve_given(model, MODEL_FLAG), None) if model else model_source(folder, MODEL_FLAG)
        config = AutoConfig.from_pretrained(source, revision=revision)
    except (OSError, ValueError) as err:
        if not required:
            return ""
        raise ValueError(
            f"{folder / META_FILE}: cannot read its model's config ({_one_line(err)}); give {MODEL_FLAG} or "
            "--model-hint"
        ) from None
    text = config.get_text_config()
    layers, width = getattr(text, "num_hidden_layers", None), getattr(text, "hidden_size", None)
    if (layers, width) != (steering.num_layers, steering.d_model):
        raise ValueError(
            f"{folder}: the steering is for {steering.num_layers} layers of width {steering.d_model}, but its model "
            f"'{model or steering.model_name_or_path}' has {layers} layers of width {width}: pass the model it was "
            f"made for ({MODEL_FLAG})"
        )
    return config.model_type


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; a bad folder, file or flag prints one line and returns 2."""
    try:
        args = _parser().parse_args(argv)
        say = lambda line: print(line, file=sys.stderr)  # noqa: E731
        written = run(args.folder, list(dict.fromkeys(args.to)), args.model_hint, args.model, note=say)
    except (FileNotFoundError, ValueError, OSError) as err:
        print(f"corrsteer-export: error: {_one_line(err)}", file=sys.stderr)
        return 2
    steering_positions = _read_metadata(args.folder)["positions"]
    for fmt, path in written.items():
        print(f"wrote {fmt}: {path}")
    if steering_positions != "all":
        print(
            f"note: both formats steer every position, the prompt included; this steering was calibrated with "
            f"positions='{steering_positions}'",
            file=sys.stderr,
        )
    return 0


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


if __name__ == "__main__":
    sys.exit(main())
