"""The fine-tuned model as a folder: written after fit from the best checkpoint, read by `--comparison.finetune`.

- LoRA (<default_root_dir>/finetune/adapter): peft's adapter_config.json + adapter_model.safetensors.
- full (<default_root_dir>/finetune_full/model): a plain transformers model folder, config.json + model.safetensors
  (every weight: ~540 MB for SmolLM2-135M in fp32), which transformers, vLLM or lm-eval also load as is.

Both hold SETTINGS_FILE (JSON: the method, the base model, the run's settings) and are written whole or not at all
(`atomic_folder`). Reading one reads JSON and safetensors only, never a pickle: the full model's weights are loaded
into the base model's own architecture (--model.model, from the settings) with `safetensors.torch.load_model`,
strict (every key and shape must match; tied weights are saved once), so the folder's config.json is not trusted.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_info
from peft import PeftModel
from safetensors.torch import load_model
from torch import nn

from corrsteer_pl.files.atomic import atomic_folder, write_errors
from corrsteer_pl.files.safe_load import CKPT_FLAG, load_checkpoint
from corrsteer_pl.finetune.module import FineTuneModule
from corrsteer_pl.finetune.options import ARTEFACT_HINT, METHODS, LoRAOptions
from corrsteer_pl.finetune.report import ItemScores
from corrsteer_pl.lightning.data import TaskDataModule
from corrsteer_pl.tasks import Split

SETTINGS_FILE = "finetune.json"
SETTINGS_FORMAT = "corrsteer-pl fine-tuning adapters"  # the first artefacts were LoRA's: kept so that they still load
WEIGHTS_FILE = "model.safetensors"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", SETTINGS_FILE)
FULL_FILES = (WEIGHTS_FILE, SETTINGS_FILE)
FILES = {"lora": ADAPTER_FILES, "full": FULL_FILES}
"""What each method's folder must hold to be read (a full folder's config.json is written, not read)."""
FINETUNE_FLAG = "--comparison.finetune"
RESUME_FIX = (
    "pass `last` or <default_root_dir>/finetune/checkpoints/{best,last}.ckpt (finetune_full/ with --model.method "
    "full) written by `python -m corrsteer_pl.finetune fit`, or leave --ckpt_path out to start afresh"
)


def export_finetuned(module: FineTuneModule, checkpoint: str | Path, folder: str | Path) -> Path:
    """Writes the fine-tuned weights of `checkpoint` (a fit's best.ckpt, read weights-only) into `folder` whole: the
    method's files (module docstring) and SETTINGS_FILE (the run's settings, JSON)."""
    state = load_checkpoint(checkpoint, CKPT_FLAG, RESUME_FIX)
    module.on_load_checkpoint(state)
    module.load_state_dict(state["state_dict"], strict=False)
    settings = {
        "format": SETTINGS_FORMAT,
        "method": module.method,
        "model": module.hparams.model,
        "revision": module.hparams.revision,
        "dtype": module.hparams.dtype,
        "max_new_tokens": module.hparams.max_new_tokens,
        "lora": asdict(module.lora) if module.method == "lora" else None,
        "optimizer": asdict(module.optim),
        "trainable_parameters": module.trainable_count(),
        "step": state.get("global_step"),
        "val_accuracy": module.checkpoint_info.get("val_accuracy"),
        "checkpoint": str(checkpoint),
    }
    del state  # a full fine-tune's checkpoint holds the weights and AdamW's moments: ~3x the model
    with write_errors(folder), atomic_folder(folder) as tmp:
        module.lm.save_pretrained(tmp)  # peft: the adapters; transformers: config.json + model.safetensors
        missing = [name for name in FILES[module.method] if name != SETTINGS_FILE and not (tmp / name).is_file()]
        if missing:  # e.g. a model too large for one file (transformers shards above 50 GB): not readable here
            raise ValueError(f"saving the fine-tuned model did not write {', '.join(missing)} in {folder}")
        (tmp / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")
    rank_zero_info(
        f"fine-tuned model ({module.method}) of {checkpoint} written to {folder} (pass it to {FINETUNE_FLAG})"
    )
    return Path(folder)


export_adapters = export_finetuned  # the name from before full fine-tuning


def read_settings(folder: str | Path, flag: str = FINETUNE_FLAG) -> dict[str, Any]:
    """The settings of a folder written by `export_finetuned` (JSON; `method` defaults to lora, as the folders
    written before it), or one line naming `flag` and the fix."""
    folder, fix = Path(folder), f"pass the {ARTEFACT_HINT} folder written by fit"
    if folder.is_file():
        raise ValueError(
            f"{flag}: {folder} is a file; it takes the folder {ARTEFACT_HINT} written by `python -m "
            "corrsteer_pl.finetune fit` (its .ckpt files are for --ckpt_path resume only)"
        )
    if not (folder / SETTINGS_FILE).is_file():
        raise ValueError(f"{flag}: {folder} is not a fine-tuned model folder ({SETTINGS_FILE} missing); {fix}")
    try:
        settings = json.loads((folder / SETTINGS_FILE).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{flag}: {folder / SETTINGS_FILE} is not valid JSON ({err}); {fix}") from None
    if not isinstance(settings, dict) or settings.get("format") != SETTINGS_FORMAT:
        raise ValueError(f"{flag}: {folder / SETTINGS_FILE} was not written by corrsteer-pl's fine-tune; {fix}")
    method = settings.setdefault("method", "lora")
    if method not in METHODS:
        raise ValueError(f"{flag}: {folder / SETTINGS_FILE} names method {method!r}, not one of {', '.join(METHODS)}")
    missing = [name for name in FILES[method] if not (folder / name).is_file()]
    if missing:
        raise ValueError(f"{flag}: {folder} is not a fine-tuned {method} folder ({', '.join(missing)} missing); {fix}")
    return settings


def _unloadable(folder: Path, what: str, err: Exception) -> ValueError:
    lines = str(err).strip().splitlines()
    return ValueError(
        f"{FINETUNE_FLAG}: cannot load the {what} in {folder} ({type(err).__name__}: {lines[0] if lines else ''}); "
        "pass a folder fine-tuned on this --model.model"
    )


def load_adapters(base: nn.Module, folder: Path) -> PeftModel:
    """peft's PeftModel.from_pretrained on a checked folder (safetensors weights: no pickle is read)."""
    try:
        return PeftModel.from_pretrained(base, str(folder), is_trainable=False)
    except Exception as err:  # noqa: BLE001 - corrupt safetensors, shapes of another model: one line naming the flag
        raise _unloadable(folder, "adapters", err) from None


def load_full(base: nn.Module, folder: Path) -> nn.Module:
    """`base` with every weight from the folder's model.safetensors (strict: keys and shapes must match), frozen."""
    try:
        load_model(base, folder / WEIGHTS_FILE, strict=True)
    except Exception as err:  # noqa: BLE001 - a pickle named .safetensors, another model's weights: one line
        raise _unloadable(folder, "weights", err) from None
    return base.requires_grad_(False)


def load_finetuned(folder: str | Path) -> FineTuneModule:
    """The fine-tuned model of a folder written by fit (base model from its settings), in eval mode."""
    settings, folder = read_settings(folder), Path(folder)
    try:
        lora = settings["lora"]
        module = FineTuneModule(
            model=settings["model"],
            method=settings["method"],
            revision=settings["revision"],
            dtype=settings["dtype"],
            lora=LoRAOptions(**lora) if lora is not None else None,
            max_new_tokens=settings["max_new_tokens"],
        )
    except (KeyError, TypeError) as err:
        raise ValueError(f"{FINETUNE_FLAG}: {folder / SETTINGS_FILE} lacks or mistypes {err}") from None
    base = module.load_base()
    module.lm = load_adapters(base, folder) if module.method == "lora" else load_full(base, folder)
    module.configure_model()  # the tokenizer
    module.checkpoint_info = {**settings, "path": str(folder)}
    return module.eval()


def finetuned_scores(folder: str | Path, data: TaskDataModule, split: Split = "test", base: bool = False) -> ItemScores:
    """Per-item scores of the fine-tuned model of a folder (or of its base model, `base=True`) on a split.

    `data` is the data module of the comparison (its tokenizer must be the checkpoint's model); the items come in
    its batch order with their ids: `ItemScores.aligned(ids)` pairs them with another method's results.
    """
    return load_finetuned(folder).item_scores(data, split, tuned=not base)
