"""What `save_pretrained` writes: a re-write of a model folder (`merged/`, an export's standalone `model/`)
replaces or removes these names and keeps everything else (`atomic_folder(..., owned=...)`). The export folder's
own names are `steering.export.export_names`."""

from __future__ import annotations

from corrsteer_pl.files.atomic import Owned, owned_names

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
