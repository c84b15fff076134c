"""What an export writes, in one place: a re-export replaces or removes these names and keeps everything else.

An export folder also holds what others put there: `train.py test` writes report.md / report.json and its figures
beside the export, and a user may keep notes in it. `atomic_folder(..., owned=...)` replaces only the names below.
"""

from __future__ import annotations

from functools import cache
from pathlib import PurePosixPath

from corrsteer_pl.atomic import Owned, owned_names

SAVED_MODEL: tuple[str, ...] = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model.bin.index.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "additional_chat_templates",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)
"""What `save_pretrained` of a causal LM and its tokenizer writes (shards of an earlier, larger save included)."""


owned_by_saved_model: Owned = owned_names(dict.fromkeys(SAVED_MODEL))
"""Whether a path inside a folder written by `save_pretrained` is `save_pretrained`'s own."""


@cache
def export_names() -> dict[str, tuple[str, ...] | None]:
    """{name: None (owned whole) or the names owned inside}: every name `SteeringVectors.save`, the fit callback's
    export and `python -m corrsteer_pl.export` write into an export folder."""
    from corrsteer_pl.calibration.stats import STATS_FILE
    from corrsteer_pl.selection.evidence import SELECTION_FILE
    from corrsteer_pl.steering.export import SEARCH_CONTROLS_DIR
    from corrsteer_pl.steering.serving import CONTROL_VECTOR_FILE, MERGED_DIR
    from corrsteer_pl.steering.vectors import LM_EVAL_FILE, META_FILE, MODEL_DIR, VECTORS_FILE

    whole = dict.fromkeys((META_FILE, VECTORS_FILE, LM_EVAL_FILE, STATS_FILE, SELECTION_FILE, CONTROL_VECTOR_FILE))
    return whole | {SEARCH_CONTROLS_DIR: None, MERGED_DIR: SAVED_MODEL, MODEL_DIR: SAVED_MODEL}


def owned_by_export(path: PurePosixPath) -> bool:
    """Whether `path` (inside an export folder) is the export's own: see `export_names`."""
    return _export_owned()(path)


@cache
def _export_owned() -> Owned:
    return owned_names(export_names())
