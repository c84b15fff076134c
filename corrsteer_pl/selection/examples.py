"""Each candidate's top activating calibration examples in `selection.json`, the report and TensorBoard.

Streaming keeps only (sample key, activation, peak position) per slot (`calibration/top_examples.py`). At the
end of fit the prompts of all candidates' top examples (a few dozen) are answered again, one prompt at a time
(no padding), with the unsteered model, greedily, by the same code as calibration
(`calibration.capture.generate_answers`, then `CorrSteerModule.score` = `evaluation.judge`): that gives
the answer, whether it was correct, and the token at which the feature peaked (the answer token produced from
the peak's generation position; position 0 produces the first answer token). A calibration batch is left-padded
with others, so on a model whose greedy answer depends on padding the re-answer could differ from the one
calibration scored; the activation and position are the streamed ones, exact.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from corrsteer_pl.calibration.answer_cache import AnswerCache
from corrsteer_pl.calibration.capture import generate_answers
from corrsteer_pl.calibration.top_examples import TopExamples, example_keys
from corrsteer_pl.evaluation.judge import judge
from corrsteer_pl.models.hooks import eos_ids, pad_id
from corrsteer_pl.tasks.batching import collate

SHOWN_CHARS = 160  # the report shows the last this-many characters of a prompt


def example_index(examples: list[Any]) -> dict[int, Any]:
    """Sample key (as `TopExamples` keeps it) -> example."""
    return dict(zip(example_keys([e.id for e in examples]).tolist(), examples, strict=True))


@torch.inference_mode()
def reanswer(
    model: nn.Module,
    tokenizer: Any,
    task: Any,
    examples: list[Any],
    chat_template: bool = False,
    answers: AnswerCache | None = None,
) -> dict[str, tuple[list[int], float, str]]:
    """Example id -> (new token ids, score, answer text): the unsteered model's greedy answer, one prompt at a time.

    One-token answers recorded while training the SAEs (`answers`) are read back instead (the same greedy token
    calibration scored), so a run whose calibration never ran the LM does not run it here either."""
    steps = task.max_new_tokens
    recorded = answers if steps == 1 else None
    device = next(model.parameters()).device
    out = {}
    for example in examples:
        batch = collate(tokenizer, [example], chat_template)  # the calibration batch's tokenization, one prompt
        rows = recorded.rows(batch["texts"], []) if recorded is not None else None
        if rows is not None:
            new = recorded.tokens[rows].unsqueeze(1)
        else:
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            eos, pad = eos_ids(model, tokenizer), pad_id(model, tokenizer)
            new = generate_answers(model, ids, mask, steps, eos_token_ids=eos, pad_token_id=pad).tokens
        score = float(judge(task, tokenizer, batch["examples"], new).scores[0])
        out[example.id] = (new[0].tolist(), score, tokenizer.decode(new[0], skip_special_tokens=True))
    return out


def add_top_examples(
    record: dict[str, Any],
    tops: Mapping[int, TopExamples],
    examples: Mapping[int, Any],
    answer: Callable[[list[Any]], dict[str, tuple[list[int], float, str]]],
    decode: Callable[[list[int]], str],
) -> None:
    """Adds `top_examples` to every candidate (and chosen feature) of a `selection.json` record, in place."""
    wanted = {(int(f["layer"]), int(f["feature"])) for fs in record.get("layers", {}).values() for f in fs}
    slots = {key: tops[key[0]].examples(key[1]) for key in wanted if key[0] in tops and tops[key[0]].k}
    needed = {key for rows in slots.values() for key, _, _ in rows}
    answers = answer([examples[key] for key in sorted(needed) if key in examples])

    def rows(layer: int, feature: int) -> list[dict[str, Any]]:
        out = []
        for key, activation, position in slots.get((layer, feature), []):
            example = examples.get(key)
            if example is None or example.id not in answers:
                continue
            tokens, score, text = answers[example.id]
            peak = decode(tokens[position : position + 1]) if position < len(tokens) else ""
            marked = decode(tokens[:position]) + f"⟦{peak}⟧" + decode(tokens[position + 1 :])
            out.append(
                {"id": example.id, "prompt": example.prompt, "answer": text, "correct": score > 0,
                 "score": score, "activation": activation, "position": position, "peak_token": peak,
                 "marked_answer": marked}
            )  # fmt: skip
        return out

    for candidates in record.get("layers", {}).values():
        for f in candidates:
            f["top_examples"] = rows(int(f["layer"]), int(f["feature"]))
    for f in record.get("chosen", []):
        f["top_examples"] = rows(int(f["layer"]), int(f["feature"]))


def shorten(prompt: str, chars: int = SHOWN_CHARS) -> str:
    """The last `chars` characters of a prompt on one line, "…" in front when cut."""
    flat = " ".join(prompt.split())
    return flat if len(flat) <= chars else "…" + flat[-chars:]


def examples_markdown(record: dict[str, Any]) -> str:
    """The chosen features' top examples as Markdown: prompt (shortened), answer with the peak token marked ⟦ ⟧."""
    lines = []
    for f in record.get("chosen", []):
        examples = f.get("top_examples")
        if examples is None:
            continue
        lines += ["", f"**Layer {f['layer']}, feature {f['feature']}**: top activating calibration examples", ""]
        if not examples:
            lines.append("(the feature fired on no calibration example)")
            continue
        lines += ["| activation | correct | prompt (end) → answer, peak token ⟦ ⟧ |", "|---|---|---|"]
        for e in examples:
            text = f"{shorten(e['prompt'])} → {' '.join(e['marked_answer'].split())}".replace("|", "\\|")
            lines.append(f"| {e['activation']:.3g} | {'yes' if e['correct'] else 'no'} | {text} |")
    return "\n".join(lines).strip()


__all__ = ["add_top_examples", "example_index", "examples_markdown", "reanswer", "shorten"]
