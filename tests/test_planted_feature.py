"""End to end on the core: a feature planted among 1,024 drives correctness; CorrSteer finds and uses it."""

from dataclasses import dataclass

import torch

from corrsteer_pl.calibration.capture import generate_answers
from corrsteer_pl.calibration.stats import CorrelationStats
from corrsteer_pl.models.tiny import random_sae, tiny_model
from corrsteer_pl.selection.variants import select_features
from corrsteer_pl.steering.vectors import SteeringVectors

D_SAE, PLANTED, TARGET = 1024, 517, 42


def _planted_world(beta: float = 3.0, gamma: float = 0.3):
    """Trigger tokens carry direction v in their embedding; the target token's unembedding is v.

    A prompt ending in a trigger token makes the model answer TARGET (correct); the SAE's
    feature PLANTED reads v. Other features are random directions with a threshold.
    """
    model = tiny_model("llama", num_layers=2, seed=1)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    v = torch.randn(64, generator=g)
    v = v / v.norm()
    triggers = torch.arange(100, 140)
    with torch.no_grad():
        model.model.embed_tokens.weight[triggers] += beta * v
        model.lm_head.weight[TARGET] = gamma * v
    sae = random_sae(64, D_SAE, layer=0, seed=3, threshold=0.3)
    with torch.no_grad():
        sae.W_enc -= torch.outer(v, v @ sae.W_enc)  # random features are blind to v ...
        sae.W_enc[:, PLANTED] = v  # ... only the planted one reads it
        sae.W_dec[PLANTED] = v
        sae.threshold[PLANTED] = beta / 2
    others = torch.tensor([t for t in range(3, vocab) if t not in set(triggers.tolist()) and t != TARGET])

    def prompts(n: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        ids = others[torch.randint(len(others), (n, 6), generator=gen)]
        triggered = torch.rand(n, generator=gen) < 0.5
        ids[triggered, -1] = triggers[torch.randint(len(triggers), (int(triggered.sum()),), generator=gen)]
        return ids

    return model, sae, prompts


def _answers(model, ids, saes=None):
    new, pooled, _, _ = generate_answers(model, ids, torch.ones_like(ids), 1, saes, pad_token_id=0)
    return (new[:, 0] == TARGET).double(), pooled


def test_core_selects_the_planted_feature_and_steering_raises_held_out_accuracy():
    model, sae, prompts = _planted_world()
    stats = CorrelationStats(D_SAE)
    for seed in range(4):  # calibration: 4 batches of 64
        y, pooled = _answers(model, prompts(64, seed), {0: sae})
        stats.update(pooled[0], y)
    assert 0.2 < stats.positive_rate() < 0.8, "both labels must occur for the test to mean anything"

    selection = select_features({0: stats}, variant="A")
    assert [f.feature for f in selection.features] == [PLANTED]
    runner_up = max((f.r for f in selection.candidates[0][1:]), default=0.0)
    assert selection.features[0].r > 0.8 and runner_up < 0.5, "the planted feature stands out"

    held_out = prompts(256, seed=99)
    base, _ = _answers(model, held_out)
    with SteeringVectors.from_selection(selection, {0: sae}, model).apply(model):
        steered, _ = _answers(model, held_out)
    assert steered.mean() > base.mean() + 0.2
    assert (steered >= base).all(), "steering towards the planted feature never breaks a correct answer here"


@dataclass(frozen=True)
class _Answers:
    scores: list[float]
    valid_rate: float = 1.0

    @property
    def accuracy(self) -> float:
        return sum(self.scores) / len(self.scores)


def test_p_under_holm_and_the_q_filter_still_keeps_the_planted_feature():
    model, sae, prompts = _planted_world()
    stats = CorrelationStats(D_SAE)
    for seed in range(4):
        y, pooled = _answers(model, prompts(64, seed), {0: sae})
        stats.update(pooled[0], y)
    validation = prompts(128, seed=50)

    def evaluate(conditions):
        out = {}
        for name, features in conditions.items():
            if not features:
                out[name] = _Answers(_answers(model, validation)[0].tolist())
                continue
            with SteeringVectors.from_selection(features, {0: sae}, model).apply(model):
                out[name] = _Answers(_answers(model, validation)[0].tolist())
        return out

    selection = select_features({0: stats}, "P", top_k=5, evaluate=evaluate, candidates=3)
    trials = {name: v for name, v in selection.validation.items() if name != "unsteered"}
    assert [f.feature for f in selection.features] == [PLANTED]
    assert trials[f"layer_0/{PLANTED}"]["p_holm"] < 1e-6 and trials[f"layer_0/{PLANTED}"]["kept"]
    assert len(trials) <= 3 and all(selection.candidates[0][i].q_value < 0.05 for i in range(len(trials)))


def test_planted_feature_top_examples_are_exactly_the_prompts_planted_to_fire_hardest():
    from corrsteer_pl.calibration.top_examples import TopExamples, example_keys

    model, sae, prompts = _planted_world()
    strong = torch.arange(140, 145)  # five tokens that carry the planted direction three times as strongly
    with torch.no_grad():
        v = sae.W_dec[PLANTED] / sae.W_dec[PLANTED].norm()
        model.model.embed_tokens.weight[strong] += 6.0 * v
    top, planted_at = TopExamples(D_SAE, k=5), set()
    for seed in range(4):
        ids = prompts(64, seed)
        if seed == 2:  # the hardest-firing prompts sit in one batch among others that fire too
            ids[[3, 17, 29, 40, 61], -1] = strong
            planted_at = {f"{seed}/{i}" for i in (3, 17, 29, 40, 61)}
        _, pooled = _answers(model, ids, {0: sae})
        top.update(pooled[0], [f"{seed}/{i}" for i in range(64)])
    names = {
        int(k): name for k, name in zip(example_keys(sorted(planted_at)).tolist(), sorted(planted_at), strict=True)
    }
    kept = top.examples(PLANTED)
    assert {names.get(key) for key, _, _ in kept} == planted_at
    assert [value for _, value, _ in kept] == sorted((value for _, value, _ in kept), reverse=True)
