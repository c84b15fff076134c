#!/usr/bin/env python
"""Figure 4: steering costs nothing visible at inference.

Greedy generation of exactly 32 new tokens (min_new_tokens = max_new_tokens, so an early EOS
cannot shorten either side) for the same prompts, unsteered and steered with
`SteeringVectors.from_selection(...).apply(model)` (default "generation" positions; building and
attaching the hooks is inside the timed call, as in `CorrSteerModule.generate`), in interleaved
rounds. Result: median over rounds of steered / unsteered time. Goal <= 1.02.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import _common as C

GOAL = 1.02
FIGURE = "4. steered / unsteered generation"


def measure(name: str, model, tokenizer, saes, prompts: Sequence[str], new_tokens: int, reps: int, inner: int) -> str:
    import torch

    from corrsteer_pl.selection.variants import SelectedFeature
    from corrsteer_pl.steering.vectors import SteeringVectors

    enc = tokenizer(list(prompts), return_tensors="pt", padding=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    kwargs = dict(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
    # One feature per SAE layer (CorrSteer-A), coefficient 1: the cost does not depend on which.
    features = [SelectedFeature(layer, 7, 0.5, 1.0, 0.02) for layer in sorted(saes)]
    steering = SteeringVectors.from_selection(features, saes, model)

    @torch.inference_mode()
    def unsteered() -> None:
        model.generate(**kwargs)

    @torch.inference_mode()
    def steered() -> None:
        with steering.apply(model):
            model.generate(**kwargs)

    times = C.interleaved({"unsteered": unsteered, "steered": steered}, reps, inner=inner)
    ratio = C.median_ratio(times["steered"], times["unsteered"])
    setting = (
        f"{name}: batch {len(prompts)}, prompt {enc['input_ids'].shape[1]} tok, {new_tokens} new tok, "
        f"{len(steering.layers)} steered layers {sorted(steering.layers)}"
    )
    measured = (
        f"unsteered {C.ms(times['unsteered'])}, steered {C.ms(times['steered'])} {C.CLOCK_NAME}; "
        f"{reps} rounds x {inner} calls, {C.spread(times['steered'], times['unsteered'])}"
    )
    return C.row(FIGURE, setting, measured, f"{ratio:.3f}", f"<= {GOAL}", ratio <= GOAL)


def main(argv: Sequence[str] | None = None) -> list[str]:
    p = C.parser(__doc__.splitlines()[1])
    p.add_argument("--model", choices=("tiny", "smollm2", "both"), default="both")
    p.add_argument("--batch", type=int, default=None, help="default: 8 (tiny), 4 (SmolLM2)")
    p.add_argument("--new-tokens", type=int, default=32)
    args = p.parse_args(argv)
    C.setup(args)
    out = []
    if args.model in ("tiny", "both"):
        model, tokenizer, saes = C.tiny_setup()
        batch, tokens = (2, 4) if args.smoke else (args.batch or 8, args.new_tokens)
        prompts = C.synthetic_prompts(batch)
        out.append(measure("tiny-random", model, tokenizer, saes, prompts, tokens, C.rounds(args, 41), 1))
    if args.model in ("smollm2", "both"):
        skipped = C.smollm2_skipped(args.smoke, FIGURE, f"<= {GOAL}")
        if skipped:
            out.append(skipped)
        else:
            model, tokenizer, saes, prompts = C.smollm2_setup(C.mmlu_prompts, args.batch or 4)
            out.append(
                measure("SmolLM2-135M-Instruct", model, tokenizer, saes, prompts, args.new_tokens, C.rounds(args, 7), 1)
            )
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
