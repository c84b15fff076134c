"""CorrSteerModule: a frozen HF causal LM and its SAEs; calibration, validation and test steps."""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from corrsteer_pl.capture import Pooling, generate_with_features
from corrsteer_pl.comparison import SteeringComparison
from corrsteer_pl.report import EvaluationReport
from corrsteer_pl.sae import check_sae_fits, load_sae
from corrsteer_pl.selection import SelectedFeature
from corrsteer_pl.sources import TINY_RANDOM, resolve_model, resolve_sae
from corrsteer_pl.steering import SteeringVectors

REPORT_SCALARS = ("accuracy_unsteered", "accuracy_steered", "difference", "ci_low", "ci_high", "better", "worse", "ser")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Calibration runs in Lightning's training loop (for mid-epoch checkpoints and resume), but the
# LM stays frozen in eval mode on purpose: silence Lightning's warning about that.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")


@dataclass
class SAESpec:
    """One SAE: a local sae-lens folder, or a sae-lens release with an id inside it."""

    source: str
    """Local sae-lens folder, a release such as gemma-scope-2b-pt-res-canonical, or tiny-random."""
    sae_id: str | None = None
    """Id inside the release, e.g. layer_12/width_16k/canonical (None for a local folder)."""

    def label(self) -> str:
        return f"{self.source}/{self.sae_id}" if self.sae_id else self.source


class CorrSteerModule(L.LightningModule):
    """Calibration (fit) generates answers, reads SAE features on the generated positions and hands
    pooled features with correctness labels to `CorrelationCallback`; validate/test compare the
    model with and without the exported steering."""

    def __init__(
        self,
        model: str = TINY_RANDOM,
        saes: list[SAESpec] | None = None,
        revision: str | None = None,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        sae_dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        max_new_tokens: int | None = None,
        pooling: Pooling = "max",
        steering_path: str | None = None,
    ) -> None:
        """
        Args:
            model: Hugging Face model id, local folder, or tiny-random.
            saes: SAEs to read, one per layer (a layer's SAE is found from its hook name).
            revision: model revision on the hub (branch, tag or commit).
            dtype: model weights dtype (bfloat16 on GPU).
            sae_dtype: SAE weights dtype.
            max_new_tokens: tokens to generate per answer (None = the task's own).
            pooling: how SAE features are pooled over generation positions: max or mean.
            steering_path: export folder used by validate/test (None = <default_root_dir>/steered).
        """
        super().__init__()
        self.save_hyperparameters()
        if not saes:
            raise ValueError("no SAEs configured: add at least one entry to model.saes (source, sae_id)")
        self.automatic_optimization = False  # no optimizer, no gradient: calibration only reads
        self.strict_loading = False  # checkpoints leave out the frozen LM and SAE weights
        self.lm: nn.Module | None = None
        self.sae_modules = nn.ModuleDict()
        self.sae_sources: dict[int, str] = {}
        self.tokenizer: Any = None
        self.steering: SteeringVectors | None = None
        self.comparison = SteeringComparison()

    # -- set-up ---------------------------------------------------------------------------

    def configure_model(self) -> None:
        """Loads the LM and SAEs and checks they fit together, before any forward pass."""
        if self.lm is not None:
            return
        path = resolve_model(self.hparams.model)
        self.lm = AutoModelForCausalLM.from_pretrained(
            path, revision=self.hparams.revision, dtype=DTYPES[self.hparams.dtype]
        ).eval()
        self.lm.requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(path, revision=self.hparams.revision, padding_side="left")
        for spec in self.hparams.saes:
            spec = spec if isinstance(spec, SAESpec) else SAESpec(**spec)
            source, sae_id = resolve_sae(spec.source, spec.sae_id)
            sae = load_sae(source, sae_id, dtype=self.hparams.sae_dtype)
            layer = check_sae_fits(sae, self.lm, spec.label())
            if layer in self.sae_sources:
                raise ValueError(f"two SAEs read layer {layer} ({self.sae_sources[layer]}, {spec.label()}): keep one")
            self.sae_modules[str(layer)] = sae
            self.sae_sources[layer] = spec.label()

    @property
    def saes(self) -> dict[int, nn.Module]:
        return {int(layer): sae for layer, sae in self.sae_modules.items()}

    def train(self, mode: bool = True) -> CorrSteerModule:
        # Lightning switches the module to train mode for fit; the frozen LM and SAEs stay in eval.
        super().train(mode)
        if self.lm is not None:
            self.lm.eval()
        self.sae_modules.eval()
        return self

    def configure_optimizers(self) -> list:
        return []  # calibration has nothing to optimise

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {}  # frozen LM and SAE weights are reloaded from their sources

    # -- generation -----------------------------------------------------------------------

    @property
    def task(self) -> Any:
        return self.trainer.datamodule.task

    def _max_new_tokens(self) -> int:
        return self.hparams.max_new_tokens or self.task.max_new_tokens

    def _eos_ids(self) -> list[int]:
        eos = self.lm.generation_config.eos_token_id
        ids = [eos] if isinstance(eos, int) else list(eos or [])
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in ids:
            ids.append(self.tokenizer.eos_token_id)
        return ids

    def generate(
        self, batch: dict[str, Any], with_features: bool = False, steering: SteeringVectors | None = None
    ) -> tuple[Tensor, dict[int, Tensor]]:
        """Greedy answers (scores (B,)) and, with `with_features`, pooled SAE features per layer."""
        if not batch["examples"]:
            return torch.zeros(0, dtype=torch.float64), {}
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self._eos_ids()[0]
        hooks = steering.apply(self.lm) if steering is not None else None
        if hooks is not None:
            hooks.attach()
        try:
            new, pooled = generate_with_features(
                self.lm,
                batch["input_ids"].to(self.device),
                batch["attention_mask"].to(self.device),
                self._max_new_tokens(),
                self.saes if with_features else None,
                self.hparams.pooling,
                eos_token_ids=self._eos_ids(),
                pad_token_id=pad,
            )
        finally:
            if hooks is not None:
                hooks.detach()
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        scores = torch.tensor(
            [self.task.score(example, text) for example, text in zip(batch["examples"], texts, strict=True)],
            dtype=torch.float64,
        )
        return scores, pooled

    # -- calibration (fit) ----------------------------------------------------------------

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        with torch.inference_mode():
            labels, pooled = self.generate(batch, with_features=True)
        return {"labels": labels, "pooled": pooled, "index": batch["index"]}

    @torch.inference_mode()
    def split_accuracy(self, features: list[SelectedFeature], split: str = "validation") -> float:
        """Accuracy on a split with the given features steered ([] = unsteered), over all ranks."""
        steering = SteeringVectors.from_selection(features, self.saes, self.lm) if features else None
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        for batch in self.trainer.datamodule.batches(split):
            scores, _ = self.generate(batch, steering=steering)
            totals += torch.stack([scores.sum(), torch.tensor(float(scores.numel()))]).to(totals)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(totals)
        return float(totals[0] / totals[1].clamp_min(1))

    # -- validate / test: unsteered vs steered --------------------------------------------

    def _steering_dir(self) -> Path:
        return Path(self.hparams.steering_path or Path(self.trainer.default_root_dir) / "steered")

    def _load_steering(self) -> None:
        if self.steering is not None:
            return
        path = self._steering_dir()
        if not (path / "steering.json").exists():
            raise FileNotFoundError(
                f"no steering export at {path}: run `train.py fit` with this config first, or set --model.steering_path"
            )
        self.steering = SteeringVectors.load(path)
        self.steering.validate(self.lm)

    def on_validation_start(self) -> None:
        self._load_steering()

    def on_test_start(self) -> None:
        self._load_steering()

    def _compare_step(self, batch: dict[str, Any]) -> None:
        unsteered, _ = self.generate(batch)
        steered, _ = self.generate(batch, steering=self.steering)
        self.comparison.update(unsteered.to(self.device), steered.to(self.device))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._compare_step(batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._compare_step(batch)

    def _report(self, split: str, stage: str) -> None:
        """Logs the comparison and, on rank 0, writes the report next to the steering export."""
        unsteered, steered = self.comparison.compute()  # every item of every rank
        self.comparison.reset()
        report = EvaluationReport.from_scores(
            unsteered,
            steered,
            task=self.task.name,
            split=split,
            judge=getattr(self.task, "judge_name", type(self.task).__name__ + ".score"),
            features=[asdict(f) for layer in self.steering.layers.values() for f in layer.features],
            steering={"path": str(self._steering_dir()), **self.steering.info},
        )
        self.log_dict({f"{stage}/{name}": float(getattr(report, name)) for name in REPORT_SCALARS})
        self.log(f"{stage}/samples", float(report.samples))
        if self.trainer.is_global_zero:
            report.save(self._steering_dir(), "report" if split == "test" else f"{split}_report")
            for logger in self.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_text(f"{stage}/report", report.to_markdown(), self.global_step)

    def on_validation_epoch_end(self) -> None:
        self._report("validation", "val")

    def on_test_epoch_end(self) -> None:
        self._report("test", "test")
