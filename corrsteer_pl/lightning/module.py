"""CorrSteerModule: a frozen HF causal LM and its SAEs; calibration, validation and test steps."""

from __future__ import annotations

import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor, nn

from corrsteer_pl.calibration.answer_cache import AnswerCache
from corrsteer_pl.calibration.calibration import calibration_batch
from corrsteer_pl.calibration.options import CalibrationOptions
from corrsteer_pl.evaluation.columns import ConditionScores, score_columns
from corrsteer_pl.evaluation.conditions import Conditions, PromptCaches, SplitResult, evaluate_batches, judge_conditions
from corrsteer_pl.evaluation.controls import ConditionSet
from corrsteer_pl.evaluation.export_pass import (
    build_report,
    export_conditions,
    export_stats,
    load_export,
    report_scalars,
    save_report,
)
from corrsteer_pl.evaluation.judge import Judged, judge
from corrsteer_pl.evaluation.report import EvaluationReport
from corrsteer_pl.lightning.recovery import IDENTITY_KEY, check_same_calibration, run_identity
from corrsteer_pl.models.loading import SAESpec, check_module_options, load_frozen_lm, load_sae_set
from corrsteer_pl.models.sae_training import SAETrainingConfig, announce_trained_saes, trained_saes
from corrsteer_pl.models.sources import TINY_RANDOM
from corrsteer_pl.selection.validation import Validator
from corrsteer_pl.side_effects.measure import (
    SideEffects,
    add_target,
    build_side_tasks,
    measure_side_effects,
    target_conditions,
)
from corrsteer_pl.side_effects.options import SideEffectsOptions
from corrsteer_pl.steering.vectors import SteeringVectors

# Calibration runs in Lightning's training loop (for mid-epoch checkpoints and resume), but the
# LM stays frozen in eval mode on purpose: silence Lightning's warning about that.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")


class CorrSteerModule(L.LightningModule):
    """Calibration (fit) generates answers, reads SAE features on the generated positions and hands
    pooled features with correctness labels to `CorrelationCallback`; validate/test compare the
    model with and without the exported steering."""

    side_tasks: list[Any]
    """The side-effects pass's other tasks (built at test start)."""

    def __init__(
        self,
        model: str = TINY_RANDOM,
        saes: list[SAESpec] | None = None,
        revision: str | None = None,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        sae_dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        steering_path: str | None = None,
        controls: int = 20,
        control_seed: int = 0,
        train_saes: SAETrainingConfig | None = None,
        calibration: CalibrationOptions | None = None,
        side_effects: SideEffectsOptions | None = None,
    ) -> None:
        """
        Args:
            model: Hugging Face model id, local folder, or tiny-random.
            saes: SAEs to read, one per layer (a layer's SAE is found from its hook name).
            revision: model revision on the hub (branch, tag or commit).
            dtype: model weights dtype (bfloat16 on GPU).
            sae_dtype: SAE weights dtype.
            steering_path: the export folder: fit writes the steering there, validate/test read it
                (None = <default_root_dir>/steered).
            controls: validate/test also steer with this many random-feature and random-direction controls (>= 0).
            control_seed: seed of the random controls.
            train_saes: train TopK SAEs for these layers on the calibration prompts when none are cached
                (for models without published SAEs); they are added to `saes`.
            calibration: how calibration pools features and what counts as correct (the CLI links --calibration).
            side_effects: what test measures beside the target task (the CLI links --side_effects).
        """
        super().__init__()
        self.save_hyperparameters(ignore=["calibration", "side_effects"])  # dicts below: checkpoints hold no class
        check_module_options(controls, bool(saes or (train_saes and train_saes.layers)))
        self._keep_typed(saes, train_saes, calibration, side_effects)
        self.sae_metrics: dict[int, dict[str, Any]] = {}
        self.automatic_optimization = False  # no optimizer, no gradient: calibration only reads
        self.strict_loading = False  # checkpoints leave out the frozen LM and SAE weights
        self.lm: nn.Module | None = None
        self.sae_modules = nn.ModuleDict()
        self.sae_sources, self.tokenizer = {}, None
        self.steering: SteeringVectors | None = None  # the export, in validate / test
        self.answer_cache: AnswerCache | None = None  # one-token calibration rows recorded while training SAEs
        self.conditions: ConditionSet | None = None
        self.comparison, self.choice_comparison = ConditionScores(), ConditionScores()  # choice: multiple choice
        self.report: EvaluationReport | None = None  # the last validate / test report (the CLI prints its summary)

    def _keep_typed(self, saes: Any, train_saes: Any, calibration: Any, side_effects: Any) -> None:
        """hparams turn dataclasses into dicts (and a checkpoint gives dicts back): keep the typed objects for our
        own use, and the option groups in hparams as plain dicts."""
        self.sae_specs = [_typed(s, SAESpec) for s in saes or []]
        self.train_saes = _typed(train_saes, SAETrainingConfig) if train_saes is not None else None
        self.calibration_options = _typed(calibration, CalibrationOptions)
        self.side_effects_options = _typed(side_effects, SideEffectsOptions)
        calibration, side_effects = self.calibration_options, self.side_effects_options
        self.hparams.update(calibration=asdict(calibration), side_effects=asdict(side_effects))

    def configure_model(self) -> None:
        """Loads the LM and SAEs and checks they fit together, before any forward pass."""
        if self.lm is not None:
            return
        self.lm, self.tokenizer = load_frozen_lm(self.hparams.model, self.hparams.revision, self.hparams.dtype)
        saes, self.sae_sources = load_sae_set([*self.sae_specs, *self._trained_saes()], self.lm, self.hparams.sae_dtype)
        self.sae_modules.update({str(layer): sae for layer, sae in saes.items()})

    def _trained_saes(self) -> list[SAESpec]:
        """SAEs trained here on the calibration prompts, cached; with one-token answers, their recorded answers."""
        cfg = self.train_saes
        if not cfg or not cfg.layers:
            return []
        one_token = self.task.max_new_tokens == 1
        hp = self.hparams
        trained = trained_saes(self.trainer, self.lm, self.tokenizer, hp.model, hp.dtype, cfg, one_token)
        self.sae_metrics, self.answer_cache = trained.metrics, trained.answers
        return [SAESpec(str(path)) for path in trained.folders.values()]

    def on_fit_start(self) -> None:
        announce_trained_saes(self.sae_metrics, self.answer_cache, self.loggers)

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
        checkpoint[IDENTITY_KEY] = run_identity(self)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuses to resume statistics gathered under another model, SAE set, data or batching."""
        check_same_calibration(checkpoint.get(IDENTITY_KEY), run_identity(self))

    @property
    def task(self) -> Any:
        return self.trainer.datamodule.task

    def score(self, batch: dict[str, Any], new_tokens: Tensor, choice_logits: Tensor | None = None) -> Judged:
        """Per item: score, validity, answer (and the choice-restricted ones, given the letters' logits)."""
        return judge(self.task, self.tokenizer, batch["examples"], new_tokens, choice_logits)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """One calibration batch (`calibration_batch`, as `corrsteer_pl.calibrate` runs it): CorrelationCallback
        adds it to the run's `Calibration`."""
        options, answers = self.calibration_options, self.answer_cache
        return {"batch": calibration_batch(self.lm, self.tokenizer, self.saes, batch, self.task, options, answers)}

    def score_conditions(
        self, batch: dict[str, Any], conditions: Conditions, prompt_caches: PromptCaches | None = None
    ) -> dict[str, Judged]:
        """Per condition: each item's score, validity and answer (`judge_conditions`, the one way a batch is
        answered and judged, for validation choices during fit and for validate / test alike)."""
        return judge_conditions(self.lm, self.tokenizer, self.task, batch, conditions, prompt_caches)

    @torch.inference_mode()
    def evaluate_split(
        self, conditions: Conditions, split: str = "validation", prompt_caches: PromptCaches | None = None
    ) -> dict[str, SplitResult]:
        """Accuracy, valid rate and answer counts per condition on a split, over all ranks (pass the same
        `prompt_caches` to several calls over one split to run its prompts only once)."""
        score = lambda batch: self.score_conditions(batch, conditions, prompt_caches)  # noqa: E731
        target = self.calibration_options.target
        return evaluate_batches(self.trainer.datamodule.batches(split), score, conditions, target)

    def validator(self) -> Validator:
        """Scores candidate steerings on the validation split: P's check, the scale grid, a comparison's methods."""
        return Validator(
            evaluate=lambda conditions, caches: self.evaluate_split(conditions, prompt_caches=caches),
            build=lambda features: SteeringVectors.from_selection(features, self.saes, self.lm),
            multiple_choice=bool(self.trainer.datamodule.examples("validation")[0].choices),
            saes=self.saes,
        )

    @property
    def export_dir(self) -> Path:
        """The export folder (--model.steering_path): fit writes the steering there, validate/test read it."""
        return Path(self.hparams.steering_path or Path(self.trainer.default_root_dir) / "steered")

    def _prepare_conditions(self) -> None:
        """Unsteered, steered, and the random controls, all answered on the same items."""
        self.steering = load_export(self.export_dir, self.lm)
        hp = self.hparams
        self.conditions = export_conditions(self.steering, self.saes, self.export_dir, hp.controls, hp.control_seed)

    on_validation_start = _prepare_conditions

    def on_test_start(self) -> None:
        """The conditions, with what the side-effects pass adds to the target's own items (the served policy, the
        other scales); the side tasks are built and their items read here, before any answer."""
        self._prepare_conditions()
        options = self.side_effects_options
        self.conditions.methods |= target_conditions(self.steering, options)
        data = self.trainer.datamodule
        self.side_tasks = build_side_tasks(options.side_tasks(self.task.name), data.hparams.seed, data.hparams.source)
        for task in self.side_tasks:
            task.load_split("test")

    def _compare_step(self, batch: dict[str, Any]) -> None:
        judged = self.score_conditions(batch, self.conditions.named())
        if judged:
            scores, valid, choice = score_columns(judged, self.conditions, batch)
            self.comparison.update(scores.to(self.device), valid.to(self.device))
            if choice is not None:
                self.choice_comparison.update(choice.to(self.device), torch.ones_like(choice, dtype=torch.bool))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._compare_step(batch)

    test_step = validation_step  # validate and test answer the same conditions on their own split

    def _report(self, split: str, stage: str) -> None:
        """Logs the comparison and, on rank 0, writes the report next to the steering export."""
        scores, valid = self.comparison.compute()  # (N, C): every item of every rank
        choice = self.choice_comparison.compute()[0] if self.choice_comparison.update_count else None
        self.comparison.reset(), self.choice_comparison.reset()
        report = build_report(
            self.conditions,
            scores,
            valid,
            choice,
            self.steering,
            self.export_dir,
            task=self.task.name,
            split=split,
            judge=self.task.judge_name,
            data=self.trainer.datamodule.describe(),
        )
        if split == "test" and self.side_effects_options.active:
            report.side_effects = self._side_effects(report)
        self.log_dict(report_scalars(report, stage))
        self.report = report
        if self.trainer.is_global_zero:
            save_report(report, self.export_dir, split, stage, self.loggers, self.global_step)

    def _side_effects(self, report: EvaluationReport) -> SideEffects:
        """The side-effects pass of the export (`measure_side_effects`), with the target's rows of this test pass."""
        options, data = self.side_effects_options, self.trainer.datamodule
        needed_by = "the side effects' random-feature controls (--side_effects.controls) draw from it"
        stats = export_stats(self.export_dir, needed_by, "pass --side_effects.controls 0") if options.controls else {}
        side = measure_side_effects(
            self.lm, self.tokenizer, self.steering, self.saes, stats, options, self.side_tasks,
            control_seed=self.hparams.control_seed, batch_size=data.hparams.batch_size,
            chat_template=data.hparams.chat_template,
        )  # fmt: skip
        add_target(side, {row.name: row.paired for row in report.methods})
        return side

    def on_validation_epoch_end(self) -> None:
        self._report("validation", "val")

    def on_test_epoch_end(self) -> None:
        self._report("test", "test")


def _typed(options: Any, cls: type) -> Any:
    """An option group as its dataclass: given, rebuilt from a checkpoint's dict, or the defaults."""
    if options is None:
        return cls()
    return cls(**options) if isinstance(options, dict) else options
