"""Serving exports of a saved steering: `python -m corrsteer_pl.export <export dir> --to gguf merged`.

Writes `<export dir>/steering.gguf` (llama.cpp control vector) and `<export dir>/merged/` (an HF folder with
the steering folded into MLP biases), each atomically. Both steer every position, the prompt included.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
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
from corrsteer_pl.steering.vectors import META_FILE, SteeringVectors, _read_metadata

FORMATS = ("gguf", "merged")
"""What `--to` (and the fit option) accepts: gguf = steering.gguf, merged = merged/."""


def write_formats(
    folder: str | Path,
    steering: SteeringVectors,
    model: nn.Module,
    tokenizer: Any,
    formats: Sequence[str],
    hint: str | None = None,
) -> dict[str, Path]:
    """Writes each requested serving format into `folder`; checks all of them before writing any.

    Returns {format: path written}. Raises a one-line ValueError for an unknown format or a steering that a
    format cannot represent (layer 0 for gguf; an architecture without a foldable MLP bias for merged).
    `hint` overrides `controlvector.model_hint` (default: llama.cpp's name for the model's architecture).
    """
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"unknown export format {', '.join(map(repr, unknown))}: choose from {', '.join(FORMATS)}")
    if "gguf" in formats:
        check_control_vector(steering)
    if "merged" in formats:
        check_mergeable(steering, model)
    folder = Path(folder)
    written = {}
    if "gguf" in formats:
        hint = hint or model_hint(getattr(model.config, "model_type", ""))
        written["gguf"] = write_control_vector(steering, folder / CONTROL_VECTOR_FILE, hint)
    if "merged" in formats:
        written["merged"] = write_merged(steering, model, tokenizer, folder / MERGED_DIR)
    return written


def model_source(folder: Path, steering: SteeringVectors) -> tuple[str, str | None]:
    """(path or hub id, revision) of the export's base model: its standalone copy, else the model it names."""
    from corrsteer_pl.models.sources import resolve_model

    standalone = _read_metadata(folder)["model"].get("standalone")
    if standalone:
        return str(folder / standalone), None
    if not steering.model_name_or_path:
        raise ValueError(f"{folder / META_FILE} names no model: export with SteeringVectors.save(folder, model=...)")
    try:
        return resolve_model(steering.model_name_or_path), steering.model_revision
    except (FileNotFoundError, ValueError):
        raise ValueError(
            f"{folder / META_FILE} names the model '{steering.model_name_or_path}', which is neither a model folder "
            "nor a hub id here: restore it, or export with SteeringVectors.save(folder, model=...)"
        ) from None


def _load_base(folder: Path, steering: SteeringVectors) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, revision = model_source(folder, steering)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, revision=revision, dtype="auto").eval()
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
    except (OSError, ValueError) as err:
        raise ValueError(f"{folder / META_FILE}: cannot load its model '{source}' ({_one_line(err)})") from None
    return model, tokenizer


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        raise ValueError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m corrsteer_pl.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="an export written by SteeringVectors.save (steering.json ...)")
    parser.add_argument(
        "--to", nargs="+", choices=FORMATS, required=True, help="gguf: steering.gguf; merged: merged/ HF folder"
    )
    parser.add_argument(
        "--model-hint", help="controlvector.model_hint of steering.gguf (default: llama.cpp's name of the model)"
    )
    return parser


def run(folder: Path, formats: Sequence[str], hint: str | None = None) -> dict[str, Path]:
    """Loads the export (and, for merged, its base model) and writes the formats into it; checks before writing."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder: give an export written by SteeringVectors.save")
    steering = SteeringVectors.load(folder)
    if "gguf" in formats:
        check_control_vector(steering)  # before loading a model for merged
    if "merged" in formats:
        model, tokenizer = _load_base(folder, steering)
        return write_formats(folder, steering, model, tokenizer, formats, hint=hint)
    hint = hint or model_hint(_model_type(folder, steering))
    return {"gguf": write_control_vector(steering, folder / CONTROL_VECTOR_FILE, hint)}


def _model_type(folder: Path, steering: SteeringVectors) -> str:
    """The base model's `model_type`, from its config alone (no weights loaded)."""
    from transformers import AutoConfig

    source, revision = model_source(folder, steering)
    try:
        return AutoConfig.from_pretrained(source, revision=revision).model_type
    except (OSError, ValueError) as err:
        raise ValueError(
            f"{folder / META_FILE}: cannot read its model's config ({_one_line(err)}); give --model-hint"
        ) from None


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; a bad folder, file or flag prints one line and returns 2."""
    try:
        args = _parser().parse_args(argv)
        written = run(args.folder, list(dict.fromkeys(args.to)), args.model_hint)
    except (FileNotFoundError, ValueError, OSError) as err:
        print(f"corrsteer_pl.export: error: {_one_line(err)}", file=sys.stderr)
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
