#!/usr/bin/env python
"""Figure 1: a calibration step against its lower bound.

Same model, prompts and batch, measured side by side in interleaved rounds:
  (a) plain greedy `generate` (`generate_answers` without SAEs);
  (b) the SAE encodes of exactly the positions calibration captures, run standalone on residuals
      saved beforehand (one `sae.encode` per layer over all of them);
  (c) the library's calibration step, as `corrsteer_pl.calibrate`, `CorrSteerModule.training_step` and
      `CorrelationCallback` run it: `calibration_batch` (greedy answers with the capture hooks, max pooling,
      the task's own scorer on the decoded answers) + `Calibration.update` (Pearson sums, 20 bootstrap
      replicates and the top 5 examples per feature: the default `CalibrationOptions`, as the configs use).
Batches are `tasks.batching.collate` batches of the task's examples. Result: median over rounds of
(c) / ((a) + (b)). Goal <= 1.05.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import _common as C

if TYPE_CHECKING:
    from corrsteer_pl.calibration.options import CalibrationOptions
    from corrsteer_pl.tasks.base import Example, Task

GOAL = 1.05
FIGURE = "1. calibration / (generate + encodes)"


def measure(
    name: str,
    model,
    tokenizer,
    saes,
    examples: Sequence[Example],
    task: Task,
    reps: int,
    chat_template: bool = False,
    inner: int = 1,
) -> str:
    """Times (a), (b), (c) on one model over one collated batch of `examples`, answered with `task`'s answer
    budget and scored by its scorer; prints and returns the table row."""
    from corrsteer_pl.calibration.options import CalibrationOptions
    from corrsteer_pl.tasks.batching import collate

    batch = collate(tokenizer, list(examples), chat_template)
    options = CalibrationOptions()
    cases, positions = timed_cases(name, model, tokenizer, saes, batch, task, options)
    times = C.interleaved(cases, reps, inner=inner)
    bound = [a + b for a, b in zip(times["a"], times["b"], strict=True)]
    ratio = C.median_ratio(times["c"], bound)
    d_sae, top = next(iter(saes.values())).cfg.d_sae, min(options.top_examples, len(examples))
    setting = (
        f"{name}: batch {len(examples)}, prompt {batch['input_ids'].shape[1]} tok, {task.max_new_tokens} new tok, "
        f"SAEs {d_sae} x {len(saes)} layers {sorted(saes)}, {positions} captured pos/layer; {options.pooling} "
        f"pooling, {task.judge_name}, bootstrap {options.bootstrap}, top {top} examples"
    )
    measured = (
        f"(a) {C.ms(times['a'])}, (b) {C.ms(times['b'])}, (c) {C.ms(times['c'])} {C.CLOCK_NAME}; "
        f"{reps} rounds x {inner} calls, "
        f"{C.spread(times['c'], bound)}"  # best-of: min(c) / min(a + b)
    )
    return C.row(FIGURE, setting, measured, f"{ratio:.3f}", f"<= {GOAL}", ratio <= GOAL)


def timed_cases(
    name: str, model, tokenizer, saes, batch: dict, task: Task, options: CalibrationOptions
) -> tuple[dict[str, Callable[[], object]], int]:
    """(a) plain generation, (b) the standalone encodes of the captured positions' residuals and (c) the library's
    calibration step over `batch`; and the captured positions per layer, once calibration's features are checked
    against the standalone encodes."""
    import torch

    from corrsteer_pl.calibration.calibration import Calibration, calibration_batch
    from corrsteer_pl.calibration.capture import generate_answers
    from corrsteer_pl.models.hooks import eos_ids, pad_id

    ids, mask, new_tokens = batch["input_ids"], batch["attention_mask"], task.max_new_tokens
    eos, pad = eos_ids(model, tokenizer), pad_id(model, tokenizer)
    calibration = Calibration.for_saes(saes, options, num_samples=len(batch["examples"]))

    def generate() -> None:
        generate_answers(model, ids, mask, new_tokens, None, eos_token_ids=eos, pad_token_id=pad)

    residuals, rows = captured_residuals(model, saes, generate, eos)

    @torch.inference_mode()
    def encode_only() -> None:
        for layer, sae in saes.items():
            sae.encode(residuals[layer])

    def calibration_step() -> None:
        calibration.update(calibration_batch(model, tokenizer, saes, batch, task, options))

    pooled = calibration_batch(model, tokenizer, saes, batch, task, options).pooled
    positions = check_capture(name, saes, residuals, rows, pooled)
    return {"a": generate, "b": encode_only, "c": calibration_step}, positions


def captured_residuals(model, saes, generate, eos: list[int]) -> tuple[dict, dict]:
    """Per SAE layer, the residuals at exactly the positions calibration captures (positions, d_model), saved once
    with the library's own position mask, and the batch row of each."""
    import torch

    from corrsteer_pl.models.hooks import LayerHooks

    saved: dict[int, list[torch.Tensor]] = {layer: [] for layer in saes}
    rows: dict[int, list[torch.Tensor]] = {layer: [] for layer in saes}

    def keep(layer: int):
        def fn(hidden: torch.Tensor, m: torch.Tensor) -> None:
            saved[layer].append(hidden[m].clone())  # (n, d_model)
            rows[layer].append(m.nonzero(as_tuple=True)[0])

        return fn

    with torch.inference_mode(), LayerHooks(model, {layer: keep(layer) for layer in saes}, eos_token_ids=eos):
        generate()
    return {layer: torch.cat(xs) for layer, xs in saved.items()}, {layer: torch.cat(r) for layer, r in rows.items()}


def check_capture(name: str, saes, residuals: dict, rows: dict, pooled: dict) -> int:
    """Logs how far the capture's max-pooled features are from the standalone encodes of the saved residuals (they
    must agree) and each layer's firing rate; returns the number of captured positions per layer."""
    import torch

    worst, firing = 0.0, []
    with torch.inference_mode():
        for layer, sae in saes.items():
            acts = sae.encode(residuals[layer])  # (positions, d_sae)
            ref = torch.zeros_like(pooled[layer]).scatter_reduce_(
                0, rows[layer][:, None].expand_as(acts), acts, "amax", include_self=True
            )
            worst = max(worst, float((ref - pooled[layer]).abs().max()))
            firing.append(float((acts > 0).float().mean()))
    positions = residuals[next(iter(residuals))].shape[0]
    C.log(
        f"[{name}] captured positions per layer: {positions}; firing rate per layer: "
        f"{', '.join(f'{f:.3f}' for f in firing)}; |pooled - standalone| max {worst:.2e}"
    )
    return positions


def main(argv: Sequence[str] | None = None) -> list[str]:
    p = C.parser(__doc__.splitlines()[1])
    p.add_argument("--model", choices=("tiny", "smollm2", "both"), default="both")
    p.add_argument("--batch", type=int, default=None, help="default: 8 (tiny, as configs/tiny.yaml), 4 (SmolLM2)")
    p.add_argument("--new-tokens", type=int, default=None, help="default: 4 (tiny, as configs/tiny.yaml), 16 (SmolLM2)")
    args = p.parse_args(argv)
    C.setup(args)
    out = []
    if args.model in ("tiny", "both"):
        from corrsteer_pl.tasks import get_task

        model, tokenizer, saes = C.tiny_setup()
        examples = C.synthetic_examples(2 if args.smoke else args.batch or 8)
        # A tiny call takes ~25 ms, and the shared machine's speed drifts by tens of percent: many short
        # rounds pair the three cases closely in time.
        task = get_task("synthetic", max_new_tokens=args.new_tokens or 4)  # its scorer reads only the gold label
        out.append(measure("tiny-random (synthetic task)", model, tokenizer, saes, examples, task, C.rounds(args, 41)))
    if args.model in ("smollm2", "both"):
        skipped = C.smollm2_skipped(args.smoke, FIGURE, f"<= {GOAL}")
        if skipped:
            out.append(skipped)
        else:
            from corrsteer_pl.tasks import get_task

            model, tokenizer, saes, _ = C.smollm2_setup(C.mmlu_explain_prompts, args.batch or 4)
            examples = C.mmlu_explain_examples(tokenizer, args.batch or 4)
            task = get_task("mmlu", max_new_tokens=args.new_tokens or 16)  # letter-match on the explanation
            name = "SmolLM2-135M-Instruct (MMLU in chat template, asked to explain)"
            out.append(measure(name, model, tokenizer, saes, examples, task, C.rounds(args, 7), chat_template=True))
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
