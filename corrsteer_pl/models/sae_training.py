"""SAEs trained here when none exist: TopK SAEs on residual-stream activations of the task's calibration prompts.

Collection goes through `LayerHooks`; training, saving and loading are sae-lens's (`SAETrainer`, `save_model`,
`SAE.load_from_disk`). Train on calibration prompts only (never test): the last prompt position, where CorrSteer
reads and steers, is out of distribution for an SAE trained on generic text.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from sae_lens import SAE, SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.sae import SAEMetadata
from torch import Tensor
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from corrsteer_pl.calibration.answer_cache import ANSWERS_FILE, ANSWERS_FORMAT, AnswerCache, letter_ids
from corrsteer_pl.files.atomic import atomic_folder
from corrsteer_pl.models.hooks import LayerFn, LayerHooks, position_ids, without_attention_sink
from corrsteer_pl.models.layers import decoder_layers, hidden_size
from corrsteer_pl.models.sources import cache_dir

METRICS_FILE = "training_metrics.json"


@dataclass
class SAETrainingConfig:
    """What to train: which layers, how wide, on how many tokens."""

    layers: list[int] = field(default_factory=list)
    """Decoder layers to train an SAE for (reads the residual stream after each, `blocks.L.hook_resid_post`)."""
    d_sae: int = 2304
    """Latents per SAE (4x SmolLM2's 576)."""
    k: int = 32
    """TopK: latents active per position."""
    tokens: int = 200_000
    """Positions collected per layer (held-out share included); prompts are read until this many are gathered."""
    epochs: int = 1
    """Passes over the training positions."""
    batch_size_tokens: int = 1024
    """Positions per SAE training step. A token budget this small needs many small steps: on SmolLM2 layer 12
    (200k tokens, lr 5e-3) held-out explained variance was 0.78 with 1024, 0.76 with 2048, 0.78 with 512 (but 2x
    slower); with 4096 and lr 4e-4 (44 steps) the decoder bias never reached the data mean (EV -0.5)."""
    lr: float = 5e-3
    """Adam learning rate, cosine-annealed to lr / 10 (same run: 2e-3 gave 0.75 and half the latents dead, 1e-2
    gave 0.74)."""
    seed: int = 0
    """Seeds the SAE's initialisation and the batch order."""
    max_norm_ratio: float | None = 10.0
    """Positions with a norm above this multiple of the median are dropped before training (None keeps all):
    attention sinks after the first token. On SmolLM2 layer 12, 119 of 200k positions (the second token of some
    prompts) had norms 1,000-20,000 against a median of 140 and held 47% of the variance."""
    holdout_fraction: float = 0.1
    """Share of positions (the last prompts read) kept out of training to measure explained variance."""
    prompts_per_batch: int = 8
    """Prompts per forward pass while collecting activations."""
    device: str = "cpu"
    """Where the SAE trains ("cuda" on a GPU machine); activations are collected wherever the model is."""

    def __post_init__(self) -> None:
        self.layers = list(self.layers)
        if not self.layers:
            raise ValueError("--model.train_saes.layers is empty: name the layers to train SAEs for, e.g. [6, 12]")
        if not 0 < self.holdout_fraction < 1:
            raise ValueError(
                f"--model.train_saes.holdout_fraction must lie strictly between 0 and 1, got {self.holdout_fraction}"
            )
        if not 0 < self.k <= self.d_sae:
            raise ValueError(
                f"--model.train_saes.k must lie in 1..--model.train_saes.d_sae ({self.d_sae}), got {self.k}"
            )


class _StopForward(Exception):
    """Raised by the deepest hook: the layers after it are not needed."""


def collect_activations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    layers: Sequence[int],
    max_tokens: int,
    batch_size: int = 8,
    answers: AnswerCache | None = None,
    add_special_tokens: bool = True,
) -> dict[int, Tensor]:
    """Residual stream after each layer, (positions, d_model) float32 on CPU, in text order, up to `max_tokens`.

    Drops padding and each text's first token: that attention sink has norms ~25,000 on SmolLM2 (others ~100-400)
    and would dominate training. Texts are batched by length: with MMLU prompts in given order, padding was half
    of every batch of 8. With `answers`, every text is read (past the budget too) through the whole model, and
    each one's greedy next token and last-position residuals are added to it.
    """
    if not texts:
        raise ValueError("no texts to collect activations from: pass the task's calibration prompts")
    ids = tokenizer(list(texts), add_special_tokens=add_special_tokens)["input_ids"]
    lengths = [len(row) - 1 for row in ids]  # kept positions per text
    recorder = _Recorder(sorted(set(layers)), _texts_within(lengths, max_tokens), last=answers is not None)
    read = len(texts) if answers is not None else recorder.used
    by_length = sorted(range(read), key=lambda i: lengths[i])
    progress = tqdm(total=sum(lengths[:read]), desc="collecting activations", unit="tok")
    with torch.no_grad(), LayerHooks(model, recorder.hooks(), positions="all"):
        for start in range(0, read, batch_size):
            rows = by_length[start : start + batch_size]
            batch_texts = [texts[i] for i in rows]
            batch = tokenizer(batch_texts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
            batch = batch.to(model.device)
            recorder.start_batch(rows, without_attention_sink(batch["attention_mask"]))
            logits = _forward(model, batch)
            if answers is not None:
                last = logits[:, -1]  # (B, vocab)
                answers.add(batch_texts, last.argmax(-1), recorder.last, last[:, answers.logit_ids.to(last.device)])
            progress.update(int(recorder.keep.sum()))
    progress.close()
    return {layer: torch.cat(recorder.per_text[layer])[:max_tokens] for layer in recorder.layers}


def _texts_within(lengths: Sequence[int], max_tokens: int) -> int:
    """How many texts, from the first, hold `max_tokens` kept positions (all of them when they hold fewer)."""
    used, gathered = 0, 0
    while used < len(lengths) and gathered < max_tokens:
        gathered += lengths[used]
        used += 1
    return used


class _Recorder:
    """The hooks of `collect_activations`: each of the first `used` texts' residuals at its kept positions, per
    layer, and with `last` every row's last-position residuals (else the pass stops after the deepest layer)."""

    def __init__(self, layers: list[int], used: int, last: bool) -> None:
        self.layers, self.used, self.keep_last = layers, used, last
        self.per_text: dict[int, list[Tensor]] = {layer: [torch.empty(0)] * used for layer in layers}
        self.last: dict[int, Tensor] = {}  # the current batch's last-position residuals
        self.rows: list[int] = []  # text index of each row of the current batch
        self.keep = torch.empty(0, dtype=torch.bool)  # (B, T) positions to record in the current batch

    def hooks(self) -> dict[int, LayerFn]:
        return {layer: self._record(layer) for layer in self.layers}

    def start_batch(self, rows: list[int], keep: Tensor) -> None:
        self.rows, self.keep = rows, keep

    def _record(self, layer: int) -> LayerFn:
        def fn(hidden: Tensor, mask: Tensor) -> None:
            kept = mask & self.keep
            for row, text in enumerate(self.rows):
                if text < self.used:
                    self.per_text[layer][text] = hidden[row][kept[row]].float().cpu()
            if self.keep_last:
                self.last[layer] = hidden[:, -1].clone()  # left padding: every row's last prompt position
            elif layer == self.layers[-1]:
                raise _StopForward  # the layers after the deepest SAE layer are not needed

        return fn


def _forward(model: PreTrainedModel, batch: Any) -> Tensor | None:
    """The logits at the last position (B, 1, vocab), or None when the deepest hook stopped the pass."""
    try:
        out = model(**batch, position_ids=position_ids(batch["attention_mask"]), use_cache=False, logits_to_keep=1)
    except _StopForward:
        return None
    return out.logits


def train_topk_sae(acts: Tensor, layer: int, cfg: SAETrainingConfig) -> tuple[SAE, dict[str, Any]]:
    """A TopK SAE for `blocks.{layer}.hook_resid_post`, trained with sae-lens's `SAETrainer` on `acts` (N, d).

    The last `holdout_fraction` of the rows is held out (rows come in prompt order, so whole prompts are held
    out: positions within a prompt are correlated and a random split would flatter the SAE).
    """
    acts, outliers = _drop_outliers(acts, cfg.max_norm_ratio)
    n_held = max(1, round(len(acts) * cfg.holdout_fraction))
    train, held = acts[:-n_held], acts[-n_held:]
    if len(train) < cfg.k:
        raise ValueError(f"only {len(train)} training positions for layer {layer}: give more texts or raise tokens")
    batch_size = min(cfg.batch_size_tokens, len(train))
    torch.manual_seed(cfg.seed)
    steps = cfg.epochs * (len(train) // batch_size)
    sae_cfg, trainer_cfg = _sae_configs(acts.shape[1], layer, cfg, steps, batch_size)
    start = time.perf_counter()
    data = _batches(train, batch_size, cfg.seed)
    trained = _ProgressTrainer(trainer_cfg, TopKTrainingSAE(sae_cfg), data, f"Training SAE layer {layer}").fit()
    seconds = time.perf_counter() - start
    sae = _inference_sae(trained)
    metrics = {
        "layer": layer,
        "hook_name": sae.cfg.metadata.hook_name,
        "explained_variance": explained_variance(sae, held),
        "train_explained_variance": explained_variance(sae, train[-len(held) :]),  # as many rows, seen in training
        "dead_fraction": dead_fraction(sae, held),
        "train_tokens": len(train),
        "holdout_tokens": len(held),
        "outliers_dropped": outliers,
        "train_seconds": round(seconds, 1),
        "config": asdict(cfg),
    }
    return sae, metrics


def _sae_configs(
    d_in: int, layer: int, cfg: SAETrainingConfig, steps: int, batch_size: int
) -> tuple[TopKTrainingSAEConfig, SAETrainerConfig]:
    """sae-lens's SAE and trainer configs for `steps` steps of `batch_size` rows."""
    sae_cfg = TopKTrainingSAEConfig(
        d_in=d_in,
        d_sae=cfg.d_sae,
        k=cfg.k,
        device=cfg.device,
        normalize_activations="expected_average_only_in",  # folded back into the weights after training
        metadata=SAEMetadata(hook_name=f"blocks.{layer}.hook_resid_post"),
    )
    trainer_cfg = SAETrainerConfig(
        total_training_samples=steps * batch_size,
        train_batch_size_samples=batch_size,
        lr=cfg.lr,
        lr_end=cfg.lr / 10,  # required: only the LM runner config fills it in
        lr_scheduler_name="cosineannealing",
        device=cfg.device,
        dead_feature_window=max(1, steps // 4),  # in steps; the default 1000 exceeds a whole run here
        feature_sampling_window=steps + 1,
        n_batches_for_norm_estimate=min(20, steps),
    )
    return sae_cfg, trainer_cfg


class _ProgressTrainer(SAETrainer):
    """sae-lens's `SAETrainer` with a bar that advances every step. `SAETrainer._update_pbar` moves it by 100 steps
    once every 100 steps, and a run here often has fewer (200k positions, 10% held out, 1024 a step: 175; the
    default config's 89,088 positions: 87), so the bar sat at 0% for the whole run and closed there."""

    def __init__(self, cfg: SAETrainerConfig, sae: TopKTrainingSAE, data: Iterator[Tensor], label: str) -> None:
        super().__init__(cfg, sae, data)
        self.label = label
        self.loss_every = max(1, cfg.total_training_samples // cfg.train_batch_size_samples // 20)

    def _update_pbar(self, step_output: Any, pbar: tqdm, update_interval: int = 100) -> None:
        if self.n_training_steps == 1:  # called after each step: the first call follows step 1
            pbar.set_description(self.label)
        pbar.update(self.cfg.train_batch_size_samples)
        if self.n_training_steps % self.loss_every == 0:
            pbar.set_postfix(loss=f"{step_output.loss.detach().item():.4g}", refresh=False)  # a device sync, 20 a run


def _drop_outliers(acts: Tensor, max_norm_ratio: float | None) -> tuple[Tensor, int]:
    """The rows whose norm is at most `max_norm_ratio` times the median norm, and how many were dropped."""
    if max_norm_ratio is None:
        return acts, 0
    norms = acts.norm(dim=1)
    keep = norms <= max_norm_ratio * norms.median()
    return acts[keep], int((~keep).sum())


def _batches(acts: Tensor, batch_size: int, seed: int) -> Iterator[Tensor]:
    """Endless full batches of rows, reshuffled every epoch: the data provider `SAETrainer` pulls from."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        for rows in torch.randperm(len(acts), generator=generator).split(batch_size):
            if len(rows) == batch_size:
                yield acts[rows]


def _inference_sae(trained: TopKTrainingSAE) -> SAE:
    """The inference `TopKSAE` that `save_inference_model` would write, kept in memory."""
    state = trained.state_dict()
    trained.process_state_dict_for_saving_inference(state)
    sae = SAE.from_dict(trained.cfg.get_inference_sae_cfg_dict())
    sae.load_state_dict(state)
    return sae.eval()


@torch.no_grad()
def explained_variance(sae: SAE, acts: Tensor, batch_size: int = 8192) -> float:
    """1 - FVU: 1 - sum |x - sae(x)|^2 / sum |x - mean(x)|^2 over the rows of `acts` (sae-lens's definition)."""
    error = sum(float((sae(x) - x).pow(2).sum()) for x in acts.split(batch_size))
    return 1.0 - error / float((acts - acts.mean(dim=0)).pow(2).sum())


@torch.no_grad()
def dead_fraction(sae: SAE, acts: Tensor, batch_size: int = 8192) -> float:
    """Share of latents that never fire on `acts`."""
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    for x in acts.split(batch_size):
        fired |= (sae.encode(x) > 0).any(dim=0).cpu()
    return 1.0 - fired.float().mean().item()


def prepare_saes(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    cfg: SAETrainingConfig,
    folder: str | Path,
    answers: bool = False,
    add_special_tokens: bool = True,
) -> dict[int, Path]:
    """`folder/layer_{L}` (sae-lens format + training metrics) for every layer of `cfg`; trains only missing ones.

    With `answers` (one-token tasks), the collection pass also writes `folder/answers.safetensors` (`AnswerCache`
    over all of `texts`, for the layers it reads), which calibration then reads instead of running the LM.
    """
    folder = Path(folder)
    num_layers, d_model = len(decoder_layers(model)), hidden_size(model)
    paths = {layer: folder / f"layer_{layer}" for layer in cfg.layers}
    for layer, path in paths.items():
        if not 0 <= layer < num_layers:
            raise ValueError(
                f"--model.train_saes.layers: cannot train an SAE for layer {layer}: the model has layers "
                f"0..{num_layers - 1}"
            )
        if path.is_dir():
            _check_existing(path, cfg, d_model)
    missing = [layer for layer, path in paths.items() if not path.is_dir()]
    if not missing:
        return paths
    cache = AnswerCache(logit_ids=letter_ids(tokenizer)) if answers else None
    start = time.perf_counter()
    acts = collect_activations(
        model, tokenizer, texts, missing, cfg.tokens, cfg.prompts_per_batch, cache, add_special_tokens
    )
    collect_seconds = round(time.perf_counter() - start, 1)  # one pass for all missing layers
    for layer in missing:
        sae, metrics = train_topk_sae(acts.pop(layer), layer, cfg)
        sae.cfg.metadata.model_name = getattr(model.config, "name_or_path", None) or None
        _save(sae, {**metrics, "collect_seconds": collect_seconds}, paths[layer])
        rank_zero_info(trained_line(metrics, paths[layer]))
    if cache is not None and set(missing) == set(cfg.layers):  # rows for every layer, or none at all
        cache.save(folder / ANSWERS_FILE)
    return paths


def trained_line(metrics: dict[str, Any], folder: Path) -> str:
    """One line per SAE trained: its time, training positions and held-out explained variance, and where it went."""
    return (
        f"SAE layer {metrics['layer']}: trained in {metrics['train_seconds']:.1f} s on {metrics['train_tokens']:,} "
        f"positions; held-out explained variance {metrics['explained_variance']:.3f} ({metrics['holdout_tokens']:,} "
        f"positions), {metrics['dead_fraction']:.0%} of latents dead; saved to {folder}"
    )


def _check_existing(path: Path, cfg: SAETrainingConfig, d_model: int) -> None:
    """An SAE folder being reused must fit the model and ask for the same width and k."""
    if not (path / "cfg.json").is_file():
        raise FileNotFoundError(f"{path} is in the way but is not an sae-lens folder (no cfg.json): delete or move it")
    saved = json.loads((path / "cfg.json").read_text())
    wanted = {"d_in": d_model, "d_sae": cfg.d_sae, "k": cfg.k}
    found = {key: saved.get(key) for key in wanted}
    if found != wanted:
        raise ValueError(f"{path} holds an SAE with {found} but {wanted} is asked for: delete it or use another folder")


def _save(sae: SAE, metrics: dict[str, Any], out: Path) -> None:
    """Writes the SAE and its metrics whole or not at all (`atomic_folder`: fsynced, the usual file modes, leftovers
    of a killed writer removed)."""
    with atomic_folder(out) as tmp:
        sae.save_model(tmp)
        (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2))


@dataclass
class TrainedSAEs:
    """SAEs trained here for one model and calibration split: their folders, metrics and recorded answers."""

    folders: dict[int, Path]
    metrics: dict[int, dict[str, Any]]
    answers: AnswerCache | None
    """One-token answers and answer-position residuals of every calibration prompt (None unless one-token)."""


def trained_saes(
    trainer: Any, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, model_id: str, dtype: str,
    cfg: SAETrainingConfig, one_token: bool,
) -> TrainedSAEs:  # fmt: skip
    """Trains (rank 0; the other ranks wait) or reuses the cached SAEs of `cfg` on the calibration prompts only.

    The cache folder is keyed by the model, its dtype, the data's identity and `cfg`: any change trains anew.
    """
    data = trainer.datamodule
    key = {"model": model_id, "dtype": dtype, "data": data.identity(), "sae": asdict(cfg), "answers": ANSWERS_FORMAT}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
    folder = cache_dir() / "saes" / Path(model_id).name / f"{data.task.name}-{digest}"
    if trainer.is_global_zero:
        texts = data.prompts("calibration")  # never the test split
        special = not data.hparams.chat_template  # as the batches tokenize
        prepare_saes(model, tokenizer, texts, cfg, folder, answers=one_token, add_special_tokens=special)
    trainer.strategy.barrier("train_saes")
    folders = {layer: folder / f"layer_{layer}" for layer in cfg.layers}
    metrics = {layer: _read_metrics(path) for layer, path in folders.items()}
    answers = AnswerCache.load(folder / ANSWERS_FILE) if one_token and (folder / ANSWERS_FILE).is_file() else None
    return TrainedSAEs(folders, metrics, answers)


def _read_metrics(folder: Path) -> dict[str, Any]:
    path = folder / METRICS_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def announce_trained_saes(metrics: dict[int, dict[str, Any]], answers: AnswerCache | None, loggers: list) -> None:
    """Says what the SAEs trained here reached (held-out explained variance) and whether answers were recorded."""
    if answers is not None:
        rank_zero_info(
            f"calibration encodes {len(answers)} answer positions recorded while training the SAEs "
            "(one-token answers): the LM does not run again"
        )
    for layer, m in metrics.items():
        ev = m.get("explained_variance", float("nan"))
        rank_zero_info(f"trained SAE layer {layer}: held-out explained variance {ev:.3f} (1 = perfect reconstruction)")
        for logger in loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_scalar(f"sae/layer_{layer}/explained_variance", ev, 0)
