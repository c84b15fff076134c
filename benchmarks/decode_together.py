#!/usr/bin/env python
"""Figure 10: longer answers under many conditions, decoded together against one condition after another.

What the side-effects pass and the test pass do for answers of several tokens: SmolLM2-135M-Instruct continues a
batch of the shipped open-generation prompts (raw) for 16 greedy tokens under the unsteered model and 9 seeded
random steerings of the four default layers (the default job's ten generation-position conditions: unsteered,
steered, 2 + 2 controls, 3 other scales). "together" is `evaluation.conditions.answered` as it runs (the ten
conditions' rows in one decoding batch over copies of one prompt-body cache); "one after another" is the same call
with one condition per decode (each continues its own copy of the body, the path before). Both include the body
pass. Result: median over rounds of time(one after another) / time(together), goal >= 2x; the answers must be equal.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import _common as C

GOAL = 2.0
FIGURE = "10. conditions decoded together"


def main(argv: Sequence[str] | None = None) -> list[str]:
    p = C.parser(__doc__.splitlines()[1])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--conditions", type=int, default=10, help="the unsteered model and this many - 1 steerings")
    p.add_argument("--new-tokens", type=int, default=16)
    args = p.parse_args(argv)
    reps = C.setup(args, default_reps=3)
    if args.smoke:
        model, tokenizer, _ = C.tiny_setup()
        layers, name = (0, 1), "tiny-random"
    else:
        skipped = C.smollm2_skipped(False, FIGURE, f">= {GOAL:g}x")
        if skipped is not None:
            return [skipped]
        (model, tokenizer), layers, name = C.smollm2_plain(), C.SMOLLM2_SAE_LAYERS, "SmolLM2-135M-Instruct"
    from corrsteer_pl.side_effects.prompts import PROMPTS

    batch = tokenizer(list(PROMPTS[: args.batch]), return_tensors="pt", padding=True)
    conditions = {"unsteered": None} | C.random_steerings(model, layers, args.conditions - 1, one_layer=False)
    cases, answers = _cases(model, tokenizer, batch, conditions, args.new_tokens)
    times = C.interleaved(cases, reps)
    equal = all(answers["together"][n] == answers["one after another"][n] for n in conditions)
    ratio = C.median_ratio(times["one after another"], times["together"])
    setting = (
        f"{name}: batch {args.batch}, prompts padded to {batch['input_ids'].shape[1]} tok, {args.new_tokens} new tok, "
        f"{len(conditions)} conditions (unsteered + {len(conditions) - 1} random steerings of layers {list(layers)})"
    )
    measured = (
        f"one after another {C.ms(times['one after another'])}, together {C.ms(times['together'])} "
        f"{C.CLOCK_NAME}; {reps} rounds, {C.spread(times['one after another'], times['together'])}; "
        f"answers {'equal' if equal else '**differ**'}"
    )
    return [C.row(FIGURE, setting, measured, f"{ratio:.2f}x", f">= {GOAL:g}x, equal", ratio >= GOAL and equal)]


def _cases(model, tokenizer, batch, conditions: dict, new_tokens: int) -> tuple[dict, dict]:
    """The two timed calls, and each one's latest answers (condition -> token lists) to compare."""
    from unittest import mock

    from corrsteer_pl.evaluation import conditions as evaluation
    from corrsteer_pl.models.hooks import eos_ids, pad_id

    ids, mask = batch["input_ids"], batch["attention_mask"]
    eos, pad = eos_ids(model, tokenizer), pad_id(model, tokenizer)
    answers: dict[str, dict] = {}

    def run(case: str) -> None:
        out = evaluation.answered(model, ids, mask, conditions, new_tokens, eos, pad)
        answers[case] = {name: a.tokens.tolist() for name, a in out.items()}

    def one_after_another() -> None:
        with mock.patch.object(evaluation, "_conditions_per_decode", lambda *args: 1):
            run("one after another")

    return {"together": lambda: run("together"), "one after another": one_after_another}, answers


if __name__ == "__main__":
    main(sys.argv[1:])
