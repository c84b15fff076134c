#!/usr/bin/env python
"""Figure 7: cost of the default job's validation against one unsteered pass over the same prompts.

SmolLM2-135M-Instruct on a batch of MMLU validation prompts: the default job's 320 sorted by length, as fit
batches them, and the batch of 16 around the median length (left-padded). "validation" is what fit runs for
CorrSteer-P with the default job's settings: one pass answering unsteered + each of 4 layers' 3 candidates +
4 search-matched draws of 12 trials (61 conditions as query tokens over one prompt cache), then the scale
grid (4 conditions) from the kept prompt cache. The baseline is one unsteered pass. Result: median over
rounds of time(validation) / time(unsteered), goal <= 1.3. The measured column also gives the same without
the search draws (P's trials and the grid alone).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import _common as C

GOAL = 1.3
LAYERS = (6, 12, 18, 24)


def main(argv: Sequence[str] | None = None) -> list[str]:
    p = C.parser(__doc__.splitlines()[1])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--candidates", type=int, default=3)
    p.add_argument("--draws", type=int, default=4)
    p.add_argument("--grid", type=int, default=4)
    args = p.parse_args(argv)
    reps = C.setup(args, default_reps=5)
    figure = "7. validation / one unsteered pass"
    if args.smoke:
        model, tokenizer, _ = C.tiny_setup()
        prompts, layers, name = C.synthetic_prompts(args.batch), (0, 1), "tiny-random"
    else:
        skipped = C.smollm2_skipped(False, figure, f"<= {GOAL:g}x")
        if skipped is not None:
            return [skipped]
        model, tokenizer = C.smollm2_plain()
        prompts, layers, name = _validation_prompts(args.batch), LAYERS, "SmolLM2-135M-Instruct"
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    trials = len(layers) * args.candidates
    cases = _cases(model, tokenizer, batch, layers, trials, args.draws * trials, args.grid)
    times = C.interleaved(cases, reps)
    full, plain, base = times["validation"], times["validation, no search draws"], times["unsteered"]
    ratio = C.median_ratio(full, base)
    setting = (
        f"{name}: batch {args.batch}, prompts padded to {batch['input_ids'].shape[1]} tok; {trials} candidates "
        f"({len(layers)} layers x {args.candidates}) + {args.draws} search draws x {trials} + unsteered in one pass, "
        f"then a grid of {args.grid} from the kept cache"
    )
    measured = (
        f"unsteered {C.ms(base)}, validation {C.ms(full)}, without search draws {C.ms(plain)} "
        f"({C.median_ratio(plain, base):.2f}x) {C.CLOCK_NAME}; {len(base)} rounds, {C.spread(full, base)}"
    )
    return [C.row(figure, setting, measured, f"{ratio:.2f}x", f"<= {GOAL:g}x", ratio <= GOAL)]


def _cases(model, tokenizer, batch, layers, trials: int, searched: int, grid: int) -> dict:
    """The three timed calls: one unsteered pass, and validation with and without the search draws."""
    from corrsteer_pl.evaluation.conditions import PromptCaches, answered

    ids, mask = batch["input_ids"], batch["attention_mask"]
    eos, pad = [tokenizer.eos_token_id], tokenizer.pad_token_id or tokenizer.eos_token_id
    check = {"unsteered": None} | C.random_steerings(model, layers, trials + searched, one_layer=True)
    plain_check = dict(list(check.items())[: 1 + trials])
    scales = C.random_steerings(model, layers, grid, one_layer=False)

    def validation(conditions: dict) -> None:
        caches = PromptCaches()
        answered(model, ids, mask, conditions, 1, eos, pad, caches)
        answered(model, ids, mask, scales, 1, eos, pad, caches)  # the grid: its prompts come from the cache

    return {
        "unsteered": lambda: answered(model, ids, mask, {"unsteered": None}, 1, eos, pad),
        "validation": lambda: validation(check),
        "validation, no search draws": lambda: validation(plain_check),
    }


def _validation_prompts(n: int, limit: int = 320) -> list[str]:
    """The n prompts around the median length of the default job's validation split (its first `limit` items),
    which fit batches sorted by length: a typical batch."""
    from corrsteer_pl.tasks import get_task

    prompts = sorted((e.prompt for e in get_task("mmlu").load_split("validation")[:limit]), key=len)
    start = max(0, len(prompts) // 2 - n // 2)
    return prompts[start : start + n]


if __name__ == "__main__":
    main(sys.argv[1:])
