"""CorrelationCallback: per-layer Pearson statistics over calibration, then selection and export."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from corrsteer_pl.atomic import check_writable
from corrsteer_pl.calibration.bootstrap import BootstrapStats
from corrsteer_pl.calibration.rankings import Ranking, check_ranking
from corrsteer_pl.calibration.stats import STATS_FILE, CorrelationStats, save_layer_stats
from corrsteer_pl.calibration.top_examples import DEFAULT_TOP_EXAMPLES, TopExamples, example_keys
from corrsteer_pl.evaluation.comparison import SelectionOptions
from corrsteer_pl.evaluation.controls import SEARCH_CONTROLS_DIR, search_draws, search_trials, searched_layers
from corrsteer_pl.evaluation.judge import Target, check_target
from corrsteer_pl.evaluation.tensorboard import log_selection
from corrsteer_pl.evaluation.validation import Validator, group, grouped, scale_features
from corrsteer_pl.export import FORMATS, export_folder, write_formats
from corrsteer_pl.selection.diagnosis import selection_warnings
from corrsteer_pl.selection.evidence import (
    annotate,
    sae_neuronpedia_ids,
    selection_record,
    significance_warning,
    write_selection,
)
from corrsteer_pl.selection.examples import add_top_examples, example_index, reanswer
from corrsteer_pl.selection.variants import (
    SelectedFeature,
    Selection,
    Significance,
    Variant,
    feature_significance,
    ranked_layers,
    select_features,
    trial_family,
    validation_trials,
)
from corrsteer_pl.steering.vectors import SteeringVectors


class CorrelationCallback(L.Callback):
    """Keeps one `CorrelationStats` per SAE layer; at the end of calibration reduces them across
    ranks, runs the configured selection and exports the steering."""

    def __init__(
        self,
        variant: Variant = "A",
        ranking: Ranking = "pearson",
        top_k: int = 10,
        scale: float = 1.0,
        scale_grid: list[float] | None = None,
        max_answer_share: float = 0.6,
        active_only: bool = False,
        candidates: int = 3,
        alpha: float = 0.05,
        require_significance: bool = True,
        bootstrap: int = 20,
        top_examples: int = DEFAULT_TOP_EXAMPLES,
        search_draws: int = 10,
        include_model: bool = False,
        export_formats: list[str] | None = None,
        target: Target = "generated",
    ) -> None:
        """
        Args:
            variant: S (single best feature), A (top feature of every layer) or P (layers that help on validation).
            ranking: pearson (CorrSteer), mi (SPARE), fisher (DSG) or caa (mean difference); all keep r > 0 only.
            top_k: candidates kept per layer for the report.
            scale: multiplier (> 0; negative ones collapse accuracy, says the paper) of the coefficients; P uses it.
            scale_grid: pick the scale from these values (each > 0) by validation accuracy, e.g. [0.5, 1, 2, 4].
            max_answer_share: a multiple-choice grid scale is refused when one letter is over this share of answers.
            active_only: coefficient = mean over the correct answers where it fired (default: over all correct).
            candidates: P tries each layer's top this-many features on validation (3: SmolLM2's top-3 r tie).
            alpha: level of the q-values (Benjamini-Hochberg over all features) and of P's paired sign tests on
                validation against unsteered, Holm-corrected over all of P's trials (every layer's) as one family.
            require_significance: P tries only candidates with q < alpha, S and A export nothing unless a chosen
                feature has q < alpha (the reason is said); false: try and export them anyway.
            bootstrap: Poisson bootstrap replicates of r (0 = off): each candidate's stability and 90% interval of r.
            top_examples: keep each feature's this-many top activating calibration examples (0 = off).
            search_draws: P only: repeat P's search (trials per layer, norms, test and Holm as P's; no q filter) on
                random firing features this many times, the search-matched control of test (0 = off).
            include_model: also write the base model's weights into the export (it then stands alone).
            export_formats: also write gguf (steering.gguf, llama.cpp control vector) and/or merged (merged/, HF
                folder, steering in the MLP biases); both steer every position, the prompt included.
            target: what is correct in calibration and validation: generated (the paper's) or choice (top logit letter).
        """
        check_options(top_k, scale, scale_grid, max_answer_share, candidates, alpha, bootstrap, search_draws)
        self.variant, self.ranking, self.top_k, self.scale = variant, check_ranking(ranking), top_k, scale
        self.scale_grid, self.max_answer_share, self.active_only = scale_grid, max_answer_share, active_only
        self.candidates, self.alpha, self.replicates, self.search_draws = candidates, alpha, bootstrap, search_draws
        self.require_significance, self.include_model, self.exported = require_significance, include_model, False
        self.export_formats, self.target = check_formats(export_formats), target
        self.top_k_examples = check_top_examples(top_examples)
        self._fresh_state()

    def _fresh_state(self) -> None:
        """What calibration accumulates (statistics, bootstrap) and what the end of fit derives from it."""
        self.stats: dict[int, CorrelationStats] = {}
        self.bootstrap: dict[int, BootstrapStats] = {}
        self.tops: dict[int, TopExamples] = {}
        self.selection: Selection | None = None
        self.restored_complete = False  # resumed from a checkpoint written after the last calibration batch
        self._trainer: L.Trainer | None = None
        self._started, self._samples_at_start = 0.0, 0

    def selection_options(self) -> SelectionOptions:
        """These options as a comparison applies them to every method."""
        grid = tuple(self.scale_grid) if self.scale_grid else None
        return SelectionOptions(
            self.top_k, self.active_only, self.candidates, self.alpha, self.scale, grid, self.max_answer_share,
            self.require_significance,
        )  # fmt: skip

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.is_global_zero:  # fail now, not after an hour of calibration
            check_writable(pl_module.export_dir, "--model.steering_path")
        if stage == "fit":
            data = trainer.datamodule
            check_target(self.target, bool(data.examples("calibration")[0].choices), data.task.name)
        pl_module.calibration_target = self.target  # also for a comparison's selections on validation in test

    # -- calibration ----------------------------------------------------------------------

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._trainer = trainer
        for layer, sae in pl_module.saes.items():
            if layer not in self.stats:
                self.stats[layer] = CorrelationStats(sae.cfg.d_sae, device=pl_module.device)
                self.bootstrap[layer] = BootstrapStats(sae.cfg.d_sae, self.replicates, device=pl_module.device)
            self.stats[layer].to(pl_module.device)
            self.bootstrap[layer].to(pl_module.device)
            self.tops.setdefault(layer, TopExamples(sae.cfg.d_sae, self.top_k_examples)).to(pl_module.device)
        self._started, self._samples_at_start = time.perf_counter(), self._local_samples()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        labels = outputs["labels"]
        ids = [example.id for example in batch["examples"]]  # bootstrap weights follow the sample, not the batch
        keys = example_keys(ids) if self.top_k_examples and ids else None
        peaks = outputs.get("peaks") or {}
        for layer, pooled in outputs["pooled"].items():
            self.stats[layer].update(pooled, labels.to(pooled.device))
            self.bootstrap[layer].update(pooled, labels.to(pooled.device), ids)
            if keys is not None:
                self.tops[layer].update(pooled, keys, peaks.get(layer))
        stats = next(iter(self.stats.values()))
        elapsed = max(time.perf_counter() - self._started, 1e-9)
        pl_module.log_dict(
            {
                "calibration/samples_seen": float(stats.num_samples),
                "calibration/positive_rate": float(stats.positive_rate()),
                "samples_per_s": (self._local_samples() - self._samples_at_start) / elapsed,
            },
            prog_bar=True,
            on_step=True,
            on_epoch=False,
            batch_size=len(batch["examples"]) or 1,
        )

    def _local_samples(self) -> int:
        return next(iter(self.stats.values())).num_samples if self.stats else 0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A resume from a checkpoint written after the last batch skips the training loop (and its
        # on_train_end): select and export from the checkpoint's statistics without recalibrating.
        # (Lightning restores the loops only after on_fit_start, so the callback's own state says it.)
        if self.restored_complete:
            rank_zero_info("the checkpoint holds a finished calibration: selecting and exporting from its statistics")
            for layer in self.stats:
                self.stats[layer].to(pl_module.device)
                self.bootstrap[layer].to(pl_module.device)
                self.tops[layer].to(pl_module.device)
            self.on_train_end(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Reduce the statistics over ranks, select features, export the steering."""
        if self.exported:
            return
        for layer in self.stats:
            self.stats[layer].all_reduce()
            self.bootstrap[layer].all_reduce()
            self.tops[layer].all_reduce()
        validator = pl_module.validator()
        significance = feature_significance(self.stats)
        self.selection, scale, grid, searched = self._select(validator, pl_module.saes, significance)
        evidence = annotate(self.selection, self.stats, self.bootstrap, significance=significance)
        warnings = selection_warnings(self.stats, self.selection)
        warnings += significance_warning(evidence, self.alpha) if self.selection.features else []
        for warning in warnings:
            rank_zero_warn(warning)
        pl_module.steering = self._steering(trainer, pl_module, scale, grid, warnings)
        settings = {"variant": self.variant, "ranking": self.ranking, "candidates": self.candidates}
        settings |= {"alpha": self.alpha, "bootstrap": self.replicates, "scale": scale, "top_k": self.top_k}
        settings |= {"search_draws": len(searched), "require_significance": self.require_significance}
        settings["target"] = self.target
        record = selection_record(self.selection, evidence, warnings, settings, sae_neuronpedia_ids(pl_module.saes))
        record["search_controls"] = [
            {"kept": [asdict(f) for f in kept], "validation": figures} for kept, figures in searched
        ]
        controls = [SteeringVectors.from_selection(kept, pl_module.saes, pl_module.lm) for kept, _ in searched]
        if trainer.is_global_zero:
            self._add_examples(trainer, pl_module, record)
            self._export(pl_module, record, controls)
            log_selection(trainer, self.stats, self.selection, record)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        self.exported = True

    def _add_examples(self, trainer: L.Trainer, pl_module: L.LightningModule, record: dict[str, Any]) -> None:
        """Every candidate's top examples into the record: their prompts answered again, unsteered."""
        if not self.top_k_examples:
            return
        started = time.perf_counter()
        examples = example_index(trainer.datamodule.examples("calibration"))
        decode = lambda tokens: pl_module.tokenizer.decode(tokens, skip_special_tokens=True)  # noqa: E731
        add_top_examples(record, self.tops, examples, lambda wanted: reanswer(pl_module, wanted), decode)
        rank_zero_info(f"top examples: candidates' prompts answered again in {time.perf_counter() - started:.0f} s")

    def _select(
        self, validator: Validator, saes: dict, significance: Significance
    ) -> tuple[Selection, float, dict[str, dict[str, float]], list[tuple[list[SelectedFeature], dict]]]:
        """Ranks and validates (P's trials and its search-matched draws in one pass, at --calibration.scale; no pass
        when P has no trial), picks the scale on the grid, and scales the features once; the draws' kept features
        get the same scale."""
        results, drawn = {}, []
        if self.variant == "P":
            ranked = ranked_layers(self.stats, self.top_k, self.active_only, self.ranking, significance)
            family = trial_family(ranked, self.candidates, self.alpha, self.require_significance)
            if self.search_draws and any(family.values()):
                drawn = search_draws(family, self.stats, saes, self.candidates, self.search_draws)
            trials = grouped({"P": validation_trials(family, self.candidates)}) | search_trials(drawn, self.candidates)
            if trials:
                results = self._timed(
                    f"P's check and {len(drawn)} search-matched draws", validator, {"unsteered": []} | trials
                )
        mine = {"unsteered": results["unsteered"]} | group(results, "P") if results else {}
        selection = select_features(
            self.stats, self.variant, self.top_k, self.active_only, (lambda _: mine) if self.variant == "P" else None,
            self.ranking, self.candidates, self.alpha, self.require_significance, significance,
        )  # fmt: skip
        scale, grid = self.scale, {}
        if self.scale_grid and selection.features:
            started = time.perf_counter()
            scale, grid = validator.pick_scale(selection.features, self.scale_grid, self.max_answer_share, self.scale)
            rank_zero_info(f"validation: the scale grid {self.scale_grid}: {time.perf_counter() - started:.0f} s")
        selection.features = scale_features(selection.features, scale)
        searched = searched_layers(drawn, results, self.candidates, self.alpha) if drawn else []
        return selection, scale, grid, [(scale_features(kept, scale), figures) for kept, figures in searched]

    def _timed(self, what: str, validator: Validator, candidates: dict[str, list[SelectedFeature]]) -> dict:
        started = time.perf_counter()
        results = validator.results_at(candidates, self.scale)
        items = next(iter(results.values())).n if results else 0
        rank_zero_info(
            f"validation: {what}, {len(candidates)} conditions on {items} items: {time.perf_counter() - started:.0f} s"
        )
        return results

    def _steering(
        self, trainer: L.Trainer, pl_module: L.LightningModule, scale: float, grid: dict, warnings: list[str]
    ) -> SteeringVectors:
        stats = next(iter(self.stats.values()))
        info = {
            "variant": self.variant,
            "ranking": self.ranking,
            "scale": scale,
            "scale_grid": grid,
            "active_only": self.active_only,
            "samples_seen": stats.num_samples,
            "positive_rate": float(stats.positive_rate()),
            "pooling": pl_module.hparams.pooling,
            "task": trainer.datamodule.task.name,
            "validation": self.selection.validation,
            "warnings": warnings,
        }
        return SteeringVectors.from_selection(
            self.selection, pl_module.saes, pl_module.lm, pl_module.sae_sources, info=info
        )

    def _export(self, pl_module: L.LightningModule, record: dict[str, Any], controls: list[SteeringVectors]) -> None:
        """Writes the export folder whole or not at all: a failure leaves the previous export as it was."""
        folder = pl_module.export_dir
        model = pl_module.lm if self.include_model else None
        try:
            with export_folder(folder, note=rank_zero_info) as tmp:  # keeps what the export does not own
                pl_module.steering.save(tmp, model=model, tokenizer=pl_module.tokenizer if model is not None else None)
                save_layer_stats(self.stats, tmp / STATS_FILE)
                write_selection(tmp, record)
                for i, control in enumerate(controls):
                    control.save(tmp / SEARCH_CONTROLS_DIR / str(i))
                self._serving_formats(pl_module, tmp)
        except OSError as err:
            raise OSError(
                f"could not write the export to {folder} ({err.strerror or err}); any previous export there is "
                "unchanged and the statistics are in checkpoints/last.ckpt: make room, then run "
                "`fit --ckpt_path last` to export without recalibrating"
            ) from None
        rank_zero_info(f"exported the steering to {folder}")

    def _serving_formats(self, pl_module: L.LightningModule, folder: Path) -> None:
        """--calibration.export_formats, each format on its own: one the steering cannot take is a warning, and the
        main export still lands (an empty steering, or layer 0 in a control vector, is no reason to lose the run)."""
        for fmt in self.export_formats:
            try:
                write_formats(folder, pl_module.steering, pl_module.lm, pl_module.tokenizer, [fmt])
            except ValueError as err:
                rank_zero_warn(f"--calibration.export_formats: {fmt} not written: {err}")

    # -- checkpointing --------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        # Checkpoints hold the statistics summed over all ranks so far (rank 0 writes the file);
        # on resume rank 0 restarts from that sum and the other ranks from zero, so the final
        # all-reduce counts every sample exactly once.
        state, replicates = {}, {}
        for layer, stats in self.stats.items():
            reduced = CorrelationStats(stats.num_features, device=stats.sum_z.device)
            reduced.load_state_dict(stats.state_dict())
            state[layer] = {k: v.cpu() for k, v in reduced.all_reduce().state_dict().items()}
            boot = BootstrapStats.from_state_dict(self.bootstrap[layer].state_dict(), device=stats.sum_z.device)
            replicates[layer] = {k: v.cpu() for k, v in boot.all_reduce().state_dict().items()}
        loader = self._trainer.train_dataloader if self._trainer is not None else None
        complete = loader is not None and loader.completed >= len(loader)
        tops = {}
        for layer, top in self.tops.items():
            tops[layer] = {
                k: v.cpu()
                for k, v in TopExamples.from_state_dict(top.state_dict(), top.state.values.device)
                .all_reduce()
                .state_dict()
                .items()
            }
        return {"stats": state, "bootstrap": replicates, "top_examples": tops, "complete": complete}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self.stats = {}
        self.restored_complete = bool(state_dict.get("complete", False))
        for layer, state in state_dict["stats"].items():
            stats = CorrelationStats(int(state["sum_z"].numel()))
            if rank == 0:
                stats.load_state_dict(state)
            self.stats[int(layer)] = stats
        self.bootstrap = {}
        for layer, state in state_dict["bootstrap"].items():
            boot = BootstrapStats.from_state_dict(state)
            self.bootstrap[int(layer)] = boot if rank == 0 else BootstrapStats(boot.num_features, boot.replicates)
        self.tops = {}
        for layer, state in state_dict.get("top_examples", {}).items():
            top = TopExamples.from_state_dict(state)
            if top.k != self.top_k_examples:
                raise ValueError(
                    f"cannot resume: --calibration.top_examples {self.top_k_examples} differs from the checkpoint's "
                    f"{top.k}; resume with the original value, or start afresh with a new --trainer.default_root_dir"
                )
            self.tops[int(layer)] = top if rank == 0 else TopExamples(top.num_features, top.k)
        if set(self.bootstrap) != set(self.stats) or any(
            b.replicates != self.replicates for b in self.bootstrap.values()
        ):
            raise ValueError(
                "cannot resume: --calibration.bootstrap differs from the checkpoint's replicates; resume with the "
                "original value, or start afresh with a new --trainer.default_root_dir"
            )


def check_options(
    top_k: int, scale: float, scale_grid: list[float] | None, max_answer_share: float, candidates: int, alpha: float,
    bootstrap: int, search_draws: int,
) -> None:  # fmt: skip
    """Refuses selection options that would silently do something else than asked, naming the flag."""
    if top_k < 1:
        raise ValueError(f"--calibration.top_k must be >= 1 (candidates kept per layer), got {top_k}")
    if search_draws < 0:
        raise ValueError(f"--calibration.search_draws must be >= 0 (0 turns it off), got {search_draws}")
    if not 1 <= candidates <= top_k:
        raise ValueError(f"--calibration.candidates must lie in 1..--calibration.top_k ({top_k}), got {candidates}")
    if not 0 < alpha < 1:
        raise ValueError(f"--calibration.alpha must lie in (0, 1), got {alpha}")
    if bootstrap < 0:
        raise ValueError(f"--calibration.bootstrap must be >= 0 replicates (0 turns it off), got {bootstrap}")
    if not scale > 0:
        raise ValueError(
            f"--calibration.scale must be > 0, got {scale}: a negative scale subtracts the features, "
            "which the paper reports collapses accuracy"
        )
    if scale_grid is not None and (not scale_grid or not all(s > 0 for s in scale_grid)):
        raise ValueError(f"--calibration.scale_grid must list scales > 0 (or be null), got {scale_grid}")
    if not 0 < max_answer_share <= 1:
        raise ValueError(
            f"--calibration.max_answer_share must lie in (0, 1], got {max_answer_share} "
            "(1 turns the collapse guard off)"
        )


def check_top_examples(top_examples: int) -> int:
    if top_examples < 0:
        raise ValueError(f"--calibration.top_examples must be >= 0 (0 turns it off), got {top_examples}")
    return top_examples


def check_formats(formats: list[str] | None) -> list[str]:
    """--calibration.export_formats, deduplicated; an unknown format is refused before any model loads."""
    unknown = [f for f in formats or [] if f not in FORMATS]
    if unknown:
        raise ValueError(
            f"--calibration.export_formats must name formats from {', '.join(FORMATS)}; got {', '.join(unknown)}"
        )
    return list(dict.fromkeys(formats or []))
