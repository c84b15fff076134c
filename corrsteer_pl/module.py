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
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from corrsteer_pl.calibration.answer_cache import AnswerCache
from corrsteer_pl.calibration.capture import Pooling, generate_with_features, recorded_features
from corrsteer_pl.calibration.sae_training import SAETrainingConfig, trained_saes
from corrsteer_pl.calibration.stats import STATS_FILE, load_layer_stats
from corrsteer_pl.evaluation.comparison import method_rows
from corrsteer_pl.evaluation.conditions import Conditions, PromptCaches, SplitResult, answer_conditions
from corrsteer_pl.evaluation.controls import ConditionSet, load_search_controls
from corrsteer_pl.evaluation.judge import Judged, judge, pad_id
from corrsteer_pl.evaluation.report import EvaluationReport
from corrsteer_pl.evaluation.scores import ConditionScores
from corrsteer_pl.evaluation.validation import Validator
from corrsteer_pl.models.hooks import eos_ids
from corrsteer_pl.models.sae import check_sae_fits, load_sae
from corrsteer_pl.models.sources import TINY_RANDOM, load_pretrained, resolve_model, resolve_sae
from corrsteer_pl.recovery import IDENTITY_KEY, calibration_identity, check_same_calibration
from corrsteer_pl.selection.diagnosis import nothing_steered
from corrsteer_pl.selection.evidence import read_selection
from corrsteer_pl.steering.vectors import SteeringVectors

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
        controls: int = 20,
        control_seed: int = 0,
        train_saes: SAETrainingConfig | None = None,
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
            steering_path: the export folder: fit writes the steering there, validate/test read it
                (None = <default_root_dir>/steered).
            controls: validate/test also steer with this many random-feature and random-direction controls (>= 0).
            control_seed: seed of the random controls.
            train_saes: train TopK SAEs for these layers on the calibration prompts when none are cached
                (for models without published SAEs); they are added to `saes`.
        """
        super().__init__()
        self.save_hyperparameters()
        _check_options(controls, max_new_tokens, bool(saes or (train_saes and train_saes.layers)))
        # hparams turn dataclasses into dicts: keep the typed objects for our own use
        self.sae_specs = [s if isinstance(s, SAESpec) else SAESpec(**s) for s in saes or []]
        self.train_saes = train_saes if not isinstance(train_saes, dict) else SAETrainingConfig(**train_saes)
        self.sae_metrics: dict[int, dict[str, Any]] = {}
        self.automatic_optimization = False  # no optimizer, no gradient: calibration only reads
        self.strict_loading = False  # checkpoints leave out the frozen LM and SAE weights
        self.lm: nn.Module | None = None
        self.sae_modules = nn.ModuleDict()
        self.sae_sources: dict[int, str] = {}
        self.tokenizer: Any = None
        self.steering: SteeringVectors | None = None
        self.answer_cache: AnswerCache | None = None  # one-token calibration rows recorded while training SAEs
        self.conditions: ConditionSet | None = None
        self.comparison = ConditionScores()

    # -- set-up ---------------------------------------------------------------------------

    def configure_model(self) -> None:
        """Loads the LM and SAEs and checks they fit together, before any forward pass."""
        if self.lm is not None:
            return
        path, revision = resolve_model(self.hparams.model), self.hparams.revision
        dtype = DTYPES[self.hparams.dtype]
        self.lm = load_pretrained(AutoModelForCausalLM.from_pretrained, path, revision=revision, dtype=dtype).eval()
        self.lm.requires_grad_(False)
        self.tokenizer = load_pretrained(AutoTokenizer.from_pretrained, path, revision=revision, padding_side="left")
        for spec in [*self.sae_specs, *self._trained_saes()]:
            source, sae_id = resolve_sae(spec.source, spec.sae_id)
            sae = load_sae(source, sae_id, dtype=self.hparams.sae_dtype)
            layer = check_sae_fits(sae, self.lm, spec.label())
            if layer in self.sae_sources:
                raise ValueError(f"two SAEs read layer {layer} ({self.sae_sources[layer]}, {spec.label()}): keep one")
            self.sae_modules[str(layer)] = sae
            self.sae_sources[layer] = spec.label()

    def _trained_saes(self) -> list[SAESpec]:
        """SAEs trained here on the calibration prompts, cached; with one-token answers, their recorded answers."""
        cfg = self.train_saes
        if not cfg or not cfg.layers:
            return []
        trained = trained_saes(
            self.trainer,
            self.lm,
            self.tokenizer,
            self.hparams.model,
            self.hparams.dtype,
            cfg,
            self._max_new_tokens() == 1,
        )
        self.sae_metrics, self.answer_cache = trained.metrics, trained.answers
        return [SAESpec(str(path)) for path in trained.folders.values()]

    def on_fit_start(self) -> None:
        if self.answer_cache is not None:
            rank_zero_info(
                f"calibration encodes {len(self.answer_cache)} answer positions recorded while training the SAEs "
                "(one-token answers): the LM does not run again"
            )
        for layer, metrics in self.sae_metrics.items():
            ev = metrics.get("explained_variance", float("nan"))
            rank_zero_info(f"trained SAE layer {layer}: explained variance {ev:.3f} on held-out positions >= 1")
            for logger in self.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_scalar(f"sae/layer_{layer}/explained_variance", ev, 0)

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
        checkpoint[IDENTITY_KEY] = self.calibration_identity()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuses to resume statistics gathered under another model, SAE set, data or batching."""
        saved = checkpoint.get(IDENTITY_KEY)
        if saved is None:
            raise ValueError(
                "--ckpt_path: not a calibration checkpoint of `train.py fit` (it does not say which model, SAEs and "
                "data it was calibrated on: another project's, a fine-tune's or an older corrsteer-pl's): pass "
                "<default_root_dir>/checkpoints/last.ckpt, or start afresh with a new --trainer.default_root_dir"
            )
        check_same_calibration(saved, self.calibration_identity())

    def calibration_identity(self) -> dict[str, Any]:
        """Every setting that changes the calibration statistics, by the flag that sets it."""
        data = self.trainer.datamodule
        return calibration_identity(
            {
                "--model.model": self.hparams.model,
                "--model.revision": self.hparams.revision,
                "--model.dtype": self.hparams.dtype,
                "--model.sae_dtype": self.hparams.sae_dtype,
                "--model.saes": sorted(spec.label() for spec in self.sae_specs),
                "--model.train_saes": asdict(self.train_saes) if self.train_saes else None,
                "--model.pooling": self.hparams.pooling,
                "--model.max_new_tokens": self._max_new_tokens(),
                "--trainer.devices x --trainer.num_nodes": self.trainer.world_size,
                **{f"--data.{key}": value for key, value in data.identity().items()},
                "--data.batch_size": data.hparams.batch_size,
            }
        )

    # -- generation -----------------------------------------------------------------------

    @property
    def task(self) -> Any:
        return self.trainer.datamodule.task

    def _max_new_tokens(self) -> int:
        return self.hparams.max_new_tokens or self.task.max_new_tokens

    def score(self, batch: dict[str, Any], new_tokens: Tensor) -> Judged:
        """Per item: score (float64), whether the answer was valid, and the extracted answer."""
        return judge(self.task, self.tokenizer, batch["examples"], new_tokens)

    def answer(
        self, batch: dict[str, Any], conditions: Conditions, prompt_caches: PromptCaches | None = None
    ) -> dict[str, Tensor]:
        """New tokens per condition for one batch (prompt cache shared for one-token answers)."""
        return answer_conditions(
            self.lm,
            batch["input_ids"].to(self.device),
            batch["attention_mask"].to(self.device),
            conditions,
            self._max_new_tokens(),
            eos_ids(self.lm, self.tokenizer),
            pad_id(self.lm, self.tokenizer),
            prompt_caches,
        )

    # -- calibration (fit) ----------------------------------------------------------------

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        if not batch["examples"]:
            return {"labels": torch.zeros(0, dtype=torch.float64), "pooled": {}}
        one_token = self.answer_cache is not None and self._max_new_tokens() == 1
        cached = recorded_features(self.answer_cache, batch["texts"], self.saes) if one_token else None
        if cached is not None:
            new, pooled = cached
            labels, _, _ = self.score(batch, new)
            return {"labels": labels, "pooled": pooled}
        with torch.inference_mode():
            new, pooled = generate_with_features(
                self.lm,
                batch["input_ids"],
                batch["attention_mask"],
                self._max_new_tokens(),
                self.saes,
                self.hparams.pooling,
                eos_token_ids=eos_ids(self.lm, self.tokenizer),
                pad_token_id=pad_id(self.lm, self.tokenizer),
            )
        labels, _, _ = self.score(batch, new)
        return {"labels": labels, "pooled": pooled}

    def score_conditions(
        self, batch: dict[str, Any], conditions: Conditions, prompt_caches: PromptCaches | None = None
    ) -> dict[str, tuple[Tensor, Tensor, list[str | None]]]:
        """Per condition: each item's score, whether its answer was valid, and the answer. The one way a batch is
        answered and judged, for validation choices during fit and for validate / test alike."""
        if not batch["examples"]:
            return {}
        return {name: self.score(batch, new) for name, new in self.answer(batch, conditions, prompt_caches).items()}

    @torch.inference_mode()
    def evaluate_split(
        self, conditions: Conditions, split: str = "validation", prompt_caches: PromptCaches | None = None
    ) -> dict[str, SplitResult]:
        """Accuracy, valid rate and answer counts per condition on a split, over all ranks.

        Pass the same `prompt_caches` to several calls over one split to run its prompts only once.
        """
        results = {name: SplitResult() for name in conditions}
        for batch in self.trainer.datamodule.batches(split):
            for name, (scores, valid, answers) in self.score_conditions(batch, conditions, prompt_caches).items():
                results[name].add(scores, valid, answers)
        if dist.is_available() and dist.is_initialized():
            gathered: list[dict[str, SplitResult]] = [{} for _ in range(dist.get_world_size())]
            dist.all_gather_object(gathered, results)
            results = {name: SplitResult.merged([r[name] for r in gathered]) for name in conditions}
        return results

    def validator(self) -> Validator:
        """Scores candidate steerings on the validation split: P's check, the scale grid, a comparison's methods."""
        return Validator(
            evaluate=lambda conditions, caches: self.evaluate_split(conditions, prompt_caches=caches),
            build=lambda features: SteeringVectors.from_selection(features, self.saes, self.lm),
            multiple_choice=bool(self.trainer.datamodule.examples("validation")[0].choices),
        )

    # -- validate / test: unsteered vs steered --------------------------------------------

    @property
    def export_dir(self) -> Path:
        """The export folder (--model.steering_path): fit writes the steering there, validate/test read it."""
        return Path(self.hparams.steering_path or Path(self.trainer.default_root_dir) / "steered")

    def _prepare_conditions(self) -> None:
        """Unsteered, steered, and the random controls, all answered on the same items."""
        if self.steering is None:
            path = self.export_dir
            if not (path / "steering.json").exists():
                raise FileNotFoundError(
                    f"no steering export at {path}: run `train.py fit` with this config first, "
                    "or set --model.steering_path"
                )
            self.steering = SteeringVectors.load(path)
            self.steering.validate(self.lm)
        if not self.steering.layers:
            rank_zero_warn(nothing_steered(list(self.steering.info.get("warnings", []))))
        stats = load_layer_stats(self.export_dir / STATS_FILE) if self.hparams.controls and self.steering.layers else {}
        self.conditions = ConditionSet.with_random_controls(
            self.steering, self.saes, stats, self.hparams.controls, self.hparams.control_seed
        )
        searched = load_search_controls(self.export_dir) if self.hparams.controls else []
        if searched and self.steering.layers:
            self.conditions.controls["search_matched"] = searched

    def on_validation_start(self) -> None:
        self._prepare_conditions()

    def on_test_start(self) -> None:
        self._prepare_conditions()

    def _compare_step(self, batch: dict[str, Any]) -> None:
        results = self.score_conditions(batch, self.conditions.named())
        if results:
            columns = [(scores, valid) for scores, valid, _ in results.values()]
            columns += [scorer(batch) for scorer in self.conditions.baselines.values()]
            scores = torch.stack([scores.cpu() for scores, _ in columns], 1)
            valid = torch.stack([valid.cpu() for _, valid in columns], 1)
            self.comparison.update(scores.to(self.device), valid.to(self.device))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._compare_step(batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._compare_step(batch)

    def _report(self, split: str, stage: str) -> None:
        """Logs the comparison and, on rank 0, writes the report next to the steering export."""
        scores, valid = self.comparison.compute()  # (N, C): every item of every rank
        self.comparison.reset()
        column, control_scores = self.conditions.columns(scores)
        is_valid, control_valid = self.conditions.columns(valid)
        controls = {kind: (control_scores[kind], control_valid[kind]) for kind in control_scores}
        report = EvaluationReport.from_scores(
            column["unsteered"],
            column["steered"],
            task=self.task.name,
            split=split,
            judge=self.task.judge_name,
            valid=is_valid,
            controls=controls,
            features=[asdict(f) for layer in self.steering.layers.values() for f in layer.features],
            steering={"path": str(self.export_dir), **self.steering.info},
            data=self.trainer.datamodule.describe(),
            warnings=list(self.steering.info.get("warnings", [])),
            selection=read_selection(self.export_dir),
            methods=method_rows(self.conditions, column, is_valid, control_scores),
        )
        self.log_dict({f"{stage}/{name}": float(getattr(report, name)) for name in REPORT_SCALARS})
        self.log(f"{stage}/samples", float(report.samples))
        for c in report.conditions:
            self.log_dict(
                {f"{stage}/{c.name}/valid_rate": c.valid_rate, f"{stage}/{c.name}/accuracy_valid": c.accuracy_valid}
            )
        for c in report.controls:
            self.log_dict({f"{stage}/{c.kind}/accuracy_mean": c.accuracy_mean, f"{stage}/{c.kind}/p_value": c.p_value})
        for m in report.methods:
            self.log_dict(
                {f"{stage}/method/{m.name}/{k}": float(getattr(m, k)) for k in ("accuracy", "difference", "ser")}
            )
        if self.trainer.is_global_zero:
            report.save(self.export_dir, "report" if split == "test" else f"{split}_report")
            for logger in self.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_text(f"{stage}/report", report.to_markdown(), self.global_step)

    def on_validation_epoch_end(self) -> None:
        self._report("validation", "val")

    def on_test_epoch_end(self) -> None:
        self._report("test", "test")


def _check_options(controls: int, max_new_tokens: int | None, has_saes: bool) -> None:
    """Refuses module options that would silently do something else than asked, naming the flag."""
    if controls < 0:
        raise ValueError(f"--model.controls must be >= 0 (0 leaves the random controls out), got {controls}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(f"--model.max_new_tokens must be >= 1 (or null for the task's own), got {max_new_tokens}")
    if not has_saes:
        raise ValueError(
            "no SAEs configured: add entries to --model.saes (source, sae_id) or layers to --model.train_saes"
        )
