"""Steering vectors: build from selected SAE features, apply to a model, save / load / export."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from corrsteer_pl.models.hooks import LayerFn, LayerHooks, PositionPolicy
from corrsteer_pl.models.layers import decoder_layers, hidden_size, lm_eval_hookpoint
from corrsteer_pl.selection.variants import SelectedFeature, Selection

FORMAT_VERSION = 1
VECTORS_FILE = "steering.safetensors"
META_FILE = "steering.json"
LM_EVAL_FILE = "lm_eval_steer.pt"
MODEL_DIR = "model"


@dataclass
class LayerSteering:
    """What is added at one layer's output: vector = sum_i c_i * W_dec[i] over its features."""

    layer: int
    vector: Tensor  # (d_model,)
    features: list[SelectedFeature]
    hook_name: str = ""
    sae_source: str = ""


@dataclass
class SteeringVectors:
    """A CorrSteer steering: one vector per layer, added at the chosen positions; no SAE needed."""

    layers: dict[int, LayerSteering]
    d_model: int
    num_layers: int
    positions: PositionPolicy = "generation"
    model_name_or_path: str = ""
    model_revision: str | None = None
    lm_eval_hookpoints: dict[int, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)  # variant, scale, samples seen, ...

    @classmethod
    def from_selection(
        cls,
        selection: Selection | list[SelectedFeature],
        saes: Mapping[int, SAE],
        model: nn.Module,
        sae_sources: Mapping[int, str] | None = None,
        positions: PositionPolicy = "generation",
        info: dict[str, Any] | None = None,
    ) -> SteeringVectors:
        """Steering for the selected features, with decoder directions taken from their SAEs."""
        features = selection.features if isinstance(selection, Selection) else selection
        by_layer: dict[int, list[SelectedFeature]] = {}
        for f in features:
            by_layer.setdefault(f.layer, []).append(f)
        layers = {
            layer: LayerSteering(
                layer,
                decoder_vector(saes[layer], fs),
                fs,
                hook_name=saes[layer].cfg.metadata.hook_name or "",
                sae_source=(sae_sources or {}).get(layer, ""),
            )
            for layer, fs in sorted(by_layer.items())
        }
        info = dict(info or {})
        if isinstance(selection, Selection):
            info.setdefault("variant", selection.variant)
        return cls(
            layers=layers,
            d_model=hidden_size(model),
            num_layers=len(decoder_layers(model)),
            positions=positions,
            model_name_or_path=str(getattr(model, "name_or_path", "") or ""),
            model_revision=getattr(model.config, "_commit_hash", None),
            lm_eval_hookpoints={layer: lm_eval_hookpoint(model, layer) for layer in layers},
            info=info,
        )

    # -- applying -------------------------------------------------------------------------

    def validate(self, model: nn.Module) -> None:
        """Fails with a clear message when this steering was made for a model of another shape."""
        d_model, num_layers = hidden_size(model), len(decoder_layers(model))
        if d_model != self.d_model:
            raise ValueError(f"steering was built for d_model={self.d_model}, but the model has d_model={d_model}")
        if num_layers != self.num_layers:
            raise ValueError(f"steering was built for {self.num_layers} layers, but the model has {num_layers}")

    def apply(self, model: nn.Module) -> LayerHooks:
        """Hooks that add the vectors; use as `with steering.apply(model):` or `.attach()` / `.detach()`."""
        self.validate(model)
        modules = decoder_layers(model)
        fns: dict[int, LayerFn] = {}
        for layer, steer in self.layers.items():
            param = next(modules[layer].parameters())
            fns[layer] = _adder(steer.vector.to(param.device, param.dtype), self.positions)
        return LayerHooks(model, fns, positions=self.positions)

    def attach(self, model: nn.Module) -> LayerHooks:
        """Attaches the steering until `detach()` is called on the returned hooks."""
        return self.apply(model).attach()

    # -- save / load ----------------------------------------------------------------------

    def save(self, folder: str | Path, model: nn.Module | None = None, tokenizer: Any = None) -> Path:
        """Writes steering.safetensors, steering.json and lm_eval_steer.pt; with `model`, also its weights."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {
            f"layer.{layer}.vector": s.vector.detach().float().cpu().contiguous() for layer, s in self.layers.items()
        }
        save_file(tensors, folder / VECTORS_FILE)
        meta = self._metadata()
        if model is not None:
            model.save_pretrained(folder / MODEL_DIR)
            if tokenizer is not None:
                tokenizer.save_pretrained(folder / MODEL_DIR)
            meta["model"]["standalone"] = MODEL_DIR
        (folder / META_FILE).write_text(json.dumps(meta, indent=2))
        torch.save(self.lm_eval_dict(), folder / LM_EVAL_FILE)
        return folder

    def lm_eval_dict(self) -> dict[str, dict[str, Any]]:
        """lm-evaluation-harness `steered` model format: {hookpoint: {action, steering_vector, ...}}."""
        return {
            self.lm_eval_hookpoints[layer]: {
                "action": "add",
                "steering_vector": s.vector.detach().float().cpu().clone(),
                "steering_coefficient": 1.0,
                "bias": None,
                "head_index": None,
            }
            for layer, s in self.layers.items()
        }

    def _metadata(self) -> dict[str, Any]:
        from corrsteer_pl import __version__

        return {
            "format_version": FORMAT_VERSION,
            "corrsteer_pl_version": __version__,
            "model": {
                "name_or_path": self.model_name_or_path,
                "revision": self.model_revision,
                "d_model": self.d_model,
                "num_layers": self.num_layers,
            },
            "positions": self.positions,
            "info": self.info,
            "layers": [
                {
                    "layer": layer,
                    "hook_name": s.hook_name,
                    "sae_source": s.sae_source,
                    "lm_eval_hookpoint": self.lm_eval_hookpoints.get(layer, ""),
                    "features": [asdict(f) for f in s.features],
                }
                for layer, s in self.layers.items()
            ],
            "lm_eval": {
                "file": LM_EVAL_FILE,
                "positions": "all",
                "note": "lm-eval's steered model adds the vectors at every position (prompt, padding and "
                "generated tokens), unlike corrsteer-pl's default 'generation' policy",
            },
        }

    @classmethod
    def load(cls, folder: str | Path) -> SteeringVectors:
        """Reads an export written by `save`; loads tensors and JSON only, never pickled code."""
        folder = Path(folder)
        meta = _read_metadata(folder)
        try:
            tensors = load_file(folder / VECTORS_FILE)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{folder / VECTORS_FILE} is missing: export again with SteeringVectors.save"
            ) from None
        except (SafetensorError, OSError) as err:
            raise ValueError(
                f"{folder / VECTORS_FILE} is corrupt ({err}): export again with SteeringVectors.save"
            ) from None
        try:
            model = meta["model"]
            d_model = _field(model, "d_model", int, "model.")
            num_layers = _field(model, "num_layers", int, "model.")
            positions = _field(meta, "positions", str)
            if positions not in ("generation", "all"):
                raise ValueError(f"'positions' is {positions!r}; expected 'generation' or 'all'")
            layers, hookpoints = {}, {}
            for entry in _field(meta, "layers", list):
                steer = _layer_entry(entry, tensors, d_model, num_layers)
                layers[steer.layer] = steer
                hookpoints[steer.layer] = str(entry.get("lm_eval_hookpoint", ""))
            return cls(
                layers=layers,
                d_model=d_model,
                num_layers=num_layers,
                positions=positions,
                model_name_or_path=_field(model, "name_or_path", str, "model."),
                model_revision=model.get("revision"),
                lm_eval_hookpoints=hookpoints,
                info=meta.get("info", {}),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(
                f"{folder / META_FILE} is an inconsistent export: {_reason(err)}; "
                "export again with SteeringVectors.save"
            ) from None


def _field(entry: Mapping[str, Any], key: str, kind: type, prefix: str = "") -> Any:
    """entry[key], checked to be of `kind` (a bool is not an int); the error names the field."""
    if not isinstance(entry, Mapping) or key not in entry:
        raise KeyError(f"'{prefix}{key}' is missing")
    value = entry[key]
    if not isinstance(value, kind) or (kind in (int, float) and isinstance(value, bool)):
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        raise TypeError(f"'{prefix}{key}' is {value!r}, not {'a number' if kind is float else 'a ' + kind.__name__}")
    return value


def _layer_entry(entry: Mapping[str, Any], tensors: dict[str, Tensor], d_model: int, num_layers: int) -> LayerSteering:
    """One checked `layers[]` entry: index inside the model, a finite vector of the model's width."""
    layer = _field(entry, "layer", int, "layers[].")
    where = f"layers[layer={layer}]"
    if not 0 <= layer < num_layers:
        raise ValueError(f"{where}: layer {layer} is outside the model's layers 0..{num_layers - 1}")
    vector = tensors.get(f"layer.{layer}.vector")
    if vector is None:
        raise KeyError(f"{where}: {VECTORS_FILE} has no tensor 'layer.{layer}.vector'")
    if vector.shape != (d_model,):
        raise ValueError(f"{where}: the vector has shape {tuple(vector.shape)}, expected ({d_model},)")
    if not torch.isfinite(vector).all():
        raise ValueError(f"{where}: the vector holds NaN or infinite values")
    features = [_feature(f, where) for f in _field(entry, "features", list, f"{where}.")]
    return LayerSteering(layer, vector, features, str(entry.get("hook_name", "")), str(entry.get("sae_source", "")))


def _feature(entry: Mapping[str, Any], where: str) -> SelectedFeature:
    known = {f.name: f for f in fields(SelectedFeature)}
    unknown = sorted(set(entry) - set(known)) if isinstance(entry, Mapping) else []
    if unknown:
        raise KeyError(f"{where}.features: unknown fields {unknown}")
    values = {}
    for name, spec in known.items():
        if spec.default is not MISSING and entry.get(name, spec.default) == spec.default:
            continue  # an optional field left at its default (e.g. None)
        kind = int if name in ("layer", "feature") else float
        values[name] = _field(entry, name, kind, f"{where}.features[].")
        if kind is float and not math.isfinite(values[name]):
            raise ValueError(f"{where}.features[].{name} is {values[name]}, not a finite number")
    return SelectedFeature(**values)


def _reason(err: Exception) -> str:
    return str(err.args[0]) if err.args else repr(err)


def decoder_vector(sae: SAE, features: list[SelectedFeature]) -> Tensor:
    """sum_i c_i * W_dec[i], as decode(c) - decode(0): right whether or not decoder norms were folded."""
    codes = torch.zeros(1, sae.cfg.d_sae, dtype=sae.W_dec.dtype, device=sae.W_dec.device)
    for f in features:
        codes[0, f.feature] += f.coefficient
    with torch.no_grad():
        return (sae.decode(codes) - sae.decode(torch.zeros_like(codes)))[0].float().cpu()


def _adder(vector: Tensor, positions: PositionPolicy) -> LayerFn:
    if positions == "all":
        return lambda hidden, mask: hidden + vector
    return lambda hidden, mask: hidden + mask.unsqueeze(-1).to(hidden.dtype) * vector


def _read_metadata(folder: Path) -> dict[str, Any]:
    path = folder / META_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: {folder} is not a corrsteer-pl export")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}): export again with SteeringVectors.save") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a corrsteer-pl export of format version {FORMAT_VERSION}")
    return meta


def model_source(folder: str | Path) -> tuple[str, str | None]:
    """(path or hub id, revision) of the export's base model: its own `model/` copy when it has one."""
    folder = Path(folder)
    meta = _read_metadata(folder)
    model = meta.get("model") if isinstance(meta.get("model"), dict) else {}
    standalone = model.get("standalone")
    if standalone:
        path = (folder / str(standalone)).resolve()
        if not path.is_relative_to(folder.resolve()):
            raise ValueError(
                f"{folder / META_FILE}: 'model.standalone' ({standalone}) points outside the export folder; "
                "it must name a folder inside it (export again with SteeringVectors.save(folder, model=...))"
            )
        return str(path), None
    source = model.get("name_or_path")
    if not source or not isinstance(source, str):
        raise ValueError(f"{folder / META_FILE} names no model: export with SteeringVectors.save(folder, model=...)")
    return source, model.get("revision")


def load_steered_model(
    folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[nn.Module, Any]:
    """An HF model + tokenizer with the export's steering attached (the hooks are `model.corrsteer_hooks`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    steering = SteeringVectors.load(folder)
    source, revision = model_source(folder)
    model = AutoModelForCausalLM.from_pretrained(source, revision=revision, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, padding_side="left")
    model.corrsteer_hooks = steering.attach(model)
    return model, tokenizer
