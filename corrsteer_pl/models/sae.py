"""Loading SAEs (sae-lens release ids or local folders) and checking them against a model."""

from __future__ import annotations

from pathlib import Path

from sae_lens import SAE
from torch import nn

from corrsteer_pl.errors import OptionError
from corrsteer_pl.models.layers import decoder_layers, hidden_size, layer_from_hook_name
from corrsteer_pl.models.sources import SAE_SPEC, uncached_hub_file


def load_sae(source: str, sae_id: str | None = None, device: str = "cpu", dtype: str = "float32") -> SAE:
    """A frozen SAE from a local sae-lens folder (cfg.json + sae_weights.safetensors) or a hub release."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "cfg.json").exists():
            raise FileNotFoundError(f"{path} is not an sae-lens folder: cfg.json is missing (save with sae.save_model)")
        if not (path / "sae_weights.safetensors").is_file():
            raise OptionError(
                SAE_SPEC,
                "source",
                f"{path} has no sae_weights.safetensors (only safetensors weights are read, never a pickled .pt/.bin): "
                "save the SAE with sae.save_model",
            )
        try:
            sae = SAE.load_from_disk(path, device=device, dtype=dtype)
        except Exception as err:  # noqa: BLE001 - corrupt weights or cfg.json: one line naming the folder
            lines = str(err).strip().splitlines()
            problem = f"cannot load the SAE folder {path} ({type(err).__name__}: {lines[0] if lines else ''})"
            raise OptionError(SAE_SPEC, "source", f"{problem}; save it again with sae.save_model") from None
    elif sae_id is None:
        raise OptionError(
            SAE_SPEC, "sae_id", f"source '{source}' is not an existing folder, and a sae-lens release needs an sae_id"
        )
    else:
        try:
            sae = SAE.from_pretrained(source, sae_id, device=device, dtype=dtype)
        except Exception as err:  # noqa: BLE001 - unknown release or id, no hub: one line naming the entry
            lines = str(err).strip().splitlines()
            missing = uncached_sae_file(source, sae_id)
            fix = f"it needs {missing}" if missing else "check the release and id, or give a local sae-lens folder"
            problem = (
                f"cannot load SAE '{sae_id}' of release '{source}' ({type(err).__name__}: {lines[0] if lines else ''})"
            )
            raise OptionError(SAE_SPEC, "source", f"{problem}; {fix}") from None
    sae.eval()
    for p in sae.parameters():
        p.requires_grad_(False)
    return sae


LOADER_FILES = {"gemma_2": ("params.npz",), "llama_scope": ("hyperparams.json", "checkpoints/final.safetensors")}
"""The files sae-lens's converters download from an SAE's folder, for the releases the presets use."""


def uncached_sae_file(release: str, sae_id: str) -> str | None:
    """The repo and file of a registered SAE that the offline HF cache lacks (see `uncached_hub_file`)."""
    from sae_lens.loading.pretrained_sae_loaders import get_conversion_loader_name
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    lookup = get_pretrained_saes_directory().get(release)
    if lookup is None or sae_id not in lookup.saes_map:
        return None
    folder = lookup.saes_map[sae_id]
    files = LOADER_FILES.get(get_conversion_loader_name(release), ("cfg.json",))
    return uncached_hub_file(lookup.repo_id, [f"{folder}/{file}" for file in files])


def sae_hook_name(sae: SAE) -> str:
    """The HF hook name when the metadata has one (Gemma Scope 2), else the TransformerLens one."""
    meta = sae.cfg.metadata
    name = getattr(meta, "hf_hook_name", None) or getattr(meta, "hook_name", None)
    if not name:
        raise ValueError(
            "SAE metadata has no hook_name: set sae.cfg.metadata.hook_name (e.g. 'blocks.12.hook_resid_post')"
        )
    return name


def sae_layer(sae: SAE) -> int:
    """The decoder layer whose output this SAE reads."""
    return layer_from_hook_name(sae_hook_name(sae))


def check_sae_fits(sae: SAE, model: nn.Module, source: str) -> int:
    """Validates an SAE against the model before anything runs; returns its layer."""
    layer = sae_layer(sae)
    num_layers = len(decoder_layers(model))
    if layer >= num_layers:
        raise ValueError(
            f"SAE '{source}' reads layer {layer} ({sae_hook_name(sae)}) but the model has layers "
            f"0..{num_layers - 1}: remove it from model.saes or pick an SAE for this model"
        )
    d_model = hidden_size(model)
    if sae.cfg.d_in != d_model:
        raise ValueError(
            f"SAE '{source}' has d_in={sae.cfg.d_in} but the model's hidden size is {d_model}: "
            "this SAE was trained for another model"
        )
    return layer
