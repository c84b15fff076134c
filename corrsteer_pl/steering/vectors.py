"""Steering vectors: build from selected SAE features, apply to a model, save / load / export."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from corrsteer_pl.files.atomic import atomic_file, atomic_folder
from corrsteer_pl.models.hooks import LayerFn, LayerHooks, PositionPolicy
from corrsteer_pl.models.layers import decoder_layers, hidden_size, lm_eval_hookpoint
from corrsteer_pl.selection.variants import SelectedFeature, Selection
from corrsteer_pl.steering.identity import describe, identity, mismatch
from corrsteer_pl.steering.owned import owned_by_saved_model

if TYPE_CHECKING:  # sae-lens takes ~5 s to import: loading an export (every vLLM process) does not need it
    from sae_lens import SAE

FORMAT_VERSION = 1
VECTORS_FILE = "steering.safetensors"
META_FILE = "steering.json"
LM_EVAL_FILE = "lm_eval_steer.pt"
MODEL_DIR = "model"
IDENTITY_KEYS = ("architecture", "model_type", "dtype", "fingerprint", "fingerprint_method")
"""steering.json's `model` fields beside name_or_path, revision, d_model and num_layers (see steering/identity.py)."""


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
    model_identity: dict[str, Any] = field(default_factory=dict)  # IDENTITY_KEYS; empty for older exports

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
        from corrsteer_pl.models.sources import portable_name

        info = dict(info or {})
        if isinstance(selection, Selection):
            info.setdefault("variant", selection.variant)
        return cls(
            layers=layers,
            d_model=hidden_size(model),
            num_layers=len(decoder_layers(model)),
            positions=positions,
            model_name_or_path=portable_name(str(getattr(model, "name_or_path", "") or "")),
            model_revision=getattr(model.config, "_commit_hash", None),
            lm_eval_hookpoints={layer: lm_eval_hookpoint(model, layer) for layer in layers},
            info=info,
            model_identity=identity(model),
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
        """Hooks that add the vectors; use as `with steering.apply(model):` or `.attach()` / `.detach()`.

        A model carries a steering once: attaching one it already carries (the same vectors, e.g. after
        `load_steered_model`, whose hooks are `model.corrsteer_hooks`) is refused rather than added twice.
        """
        self.validate(model)
        key = self.key()
        SteeringHooks.refuse_if_attached(model, key)
        modules = decoder_layers(model)
        fns: dict[int, LayerFn] = {}
        for layer, steer in self.layers.items():
            param = next(modules[layer].parameters())
            fns[layer] = adder(steer.vector.to(param.device, param.dtype), self.positions)
        return SteeringHooks(model, fns, self.positions, key)

    def attach(self, model: nn.Module) -> LayerHooks:
        """Attaches the steering until `detach()` is called on the returned hooks."""
        return self.apply(model).attach()

    def key(self) -> str:
        """A hash of what the steering adds (positions, layers and vectors): equal steerings have equal keys."""
        digest = hashlib.sha256(self.positions.encode())
        for layer, steer in sorted(self.layers.items()):
            digest.update(f"|{layer}|".encode())
            digest.update(steer.vector.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return digest.hexdigest()

    # -- save / load ----------------------------------------------------------------------

    def save(self, folder: str | Path, model: nn.Module | None = None, tokenizer: Any = None) -> Path:
        """Writes steering.safetensors, steering.json and lm_eval_steer.pt; with `model`, also its weights."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {
            f"layer.{layer}.vector": s.vector.detach().float().cpu().contiguous() for layer, s in self.layers.items()
        }
        with atomic_file(folder / VECTORS_FILE) as tmp:  # each file whole, with the usual mode
            save_file(tensors, tmp)
        meta = self._metadata()
        if model is not None:
            with atomic_folder(folder / MODEL_DIR, owned=owned_by_saved_model) as tmp:
                model.save_pretrained(tmp)
                if tokenizer is not None:
                    tokenizer.save_pretrained(tmp)
            meta["model"]["standalone"] = MODEL_DIR
        with atomic_file(folder / META_FILE) as tmp:
            tmp.write_text(json.dumps(meta, indent=2))
        with atomic_file(folder / LM_EVAL_FILE) as tmp:
            torch.save(self.lm_eval_dict(), tmp)
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
                **self.model_identity,
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
                model_identity={key: model[key] for key in IDENTITY_KEYS if isinstance(model.get(key), str)},
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


def adder(vector: Tensor, positions: PositionPolicy) -> LayerFn:
    """The hook function that adds `vector` (d,), or one row per batch row (B, 1, d), at the policy's positions."""
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


def model_source(folder: str | Path, fix: str = "model=...") -> tuple[str, str | None]:
    """(path or hub id, revision) of the export's base model: its own `model/` copy when it has one, else the model
    steering.json names, resolved here (`resolve_model`: the built-in offline models are built on first use).

    A model that is not on this machine is one line naming the file and `fix` (how the caller passes a model).
    """
    from corrsteer_pl.models.sources import portable_name, resolve_model

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
    name = model.get("name_or_path")
    if not name or not isinstance(name, str):
        raise ValueError(f"{folder / META_FILE} names no model: pass the model it was made for ({fix})")
    try:
        return resolve_model(portable_name(name)), model.get("revision")
    except (FileNotFoundError, ValueError):
        raise ValueError(
            f"{folder / META_FILE} names the model '{name}', which is neither a model folder nor a hub id here: "
            f"pass the model it was made for ({fix})"
        ) from None


def load_base_model(
    folder: Path, fix: str, model: str | Path | None = None, dtype: torch.dtype | str | None = None
) -> tuple[nn.Module, Any, str]:
    """(model, tokenizer, how to name it) from `model` (a folder, hub id or built-in name), else the export's own."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from corrsteer_pl.models.sources import load_pretrained

    if model is not None:
        source, revision, flag = resolve_given(model, fix), None, f"the given model ({fix})"
    else:
        source, revision = model_source(folder, fix)
        flag = f"{folder / META_FILE}: its model"
    try:
        lm = load_pretrained(AutoModelForCausalLM.from_pretrained, source, flag, revision=revision, dtype=dtype)
        tokenizer = load_pretrained(AutoTokenizer.from_pretrained, source, flag, revision=revision, padding_side="left")
    except ValueError as err:
        raise ValueError(f"{err}; pass the model it was made for ({fix})") from None
    return lm.eval(), tokenizer, f"'{model if model is not None else source}'"


def resolve_given(model: str | Path, fix: str) -> str:
    """`resolve_model(model)` for a model the caller passed, its one-line error naming `fix` (the flag or argument)."""
    from corrsteer_pl.models.sources import resolve_model

    try:
        return resolve_model(str(model))
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(f"{fix}: {_reason(err).split(': ', 1)[-1]}") from None  # its own flag prefix dropped


def check_made_for(folder: Path, steering: SteeringVectors, model: nn.Module, given: str, fix: str) -> None:
    """One line naming the export, the model it was made for, the `given` model and `fix`, unless they match."""
    why = mismatch(steering.model_identity, steering.d_model, steering.num_layers, model)
    if why:
        made_for = describe(
            steering.model_name_or_path or "an unnamed model", steering.model_identity, steering.d_model,
            steering.num_layers,
        )  # fmt: skip
        raise ValueError(
            f"{folder}: this steering was made for {made_for}, but {given} has {why}: pass the model it was made "
            f"for ({fix}), or export a steering from this model"
        )


def load_steered_model(
    folder: str | Path,
    model: nn.Module | str | Path | None = None,
    *,
    tokenizer: Any = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[nn.Module, Any]:
    """An HF model + tokenizer with the export's steering attached (the hooks are `model.corrsteer_hooks`).

    `model`: the base model, as an `nn.Module` (used as it is: `device` and `dtype` do not apply; give `tokenizer`
    or the tokenizer is loaded from its `name_or_path`), a model folder, a hub id or a built-in name
    (smollm2-135m-instruct, tiny-random); by default the export's own `model/` copy or the model steering.json
    names. The model is checked against the one the steering was made for (width, layer count and the weights'
    fingerprint): a mismatch is one line.
    """
    folder = Path(folder)
    steering = SteeringVectors.load(folder)
    fix = "load_steered_model(folder, model=...)"
    if isinstance(model, nn.Module):
        lm, given = model, f"the given {type(model).__name__}"
        if tokenizer is None:
            tokenizer = _tokenizer_of(model, fix)
    else:
        lm, loaded_tokenizer, given = load_base_model(folder, fix, model, dtype)
        lm, tokenizer = lm.to(device), tokenizer if tokenizer is not None else loaded_tokenizer
    check_made_for(folder, steering, lm, given, fix)
    lm.corrsteer_hooks = steering.attach(lm)
    return lm, tokenizer


def _tokenizer_of(model: nn.Module, fix: str) -> Any:
    from transformers import AutoTokenizer

    from corrsteer_pl.models.sources import load_pretrained

    source = str(getattr(model, "name_or_path", "") or "")
    if not source:
        raise ValueError(f"{fix}: the given model names no folder to load its tokenizer from: pass tokenizer=...")
    flag = f"{fix}: the given model's tokenizer (pass tokenizer=...)"
    return load_pretrained(AutoTokenizer.from_pretrained, source, flag, padding_side="left")


class SteeringHooks(LayerHooks):
    """A steering's hooks: a model carries one steering once, so attaching one it carries already is refused."""

    def __init__(self, model: nn.Module, fns: Mapping[int, LayerFn], positions: PositionPolicy, key: str) -> None:
        super().__init__(model, fns, positions=positions)
        self.key = key

    @staticmethod
    def refuse_if_attached(model: nn.Module, key: str) -> None:
        """One line when `model` carries the steering whose `SteeringVectors.key()` is `key`."""
        if key in model.__dict__.get("_corrsteer_attached", set()):
            raise ValueError(
                "this steering is already attached to the model (by load_steered_model: model.corrsteer_hooks, or "
                "an earlier attach()/apply()); attaching it again would add it twice: detach() those hooks first"
            )

    def attach(self) -> SteeringHooks:
        self.refuse_if_attached(self.model, self.key)
        super().attach()
        self.model.__dict__.setdefault("_corrsteer_attached", set()).add(self.key)
        return self

    def detach(self) -> None:
        if self._handles:
            self.model.__dict__.get("_corrsteer_attached", set()).discard(self.key)
        super().detach()
