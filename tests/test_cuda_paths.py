"""Device- and dtype-sensitive paths on every device there is: CPU always (so CI runs them), CUDA where present.

Each test takes a tiny Llama in float32 or bfloat16 on a device; the `cuda-*` variants skip without CUDA.
`bash benchmarks/gpu.sh` runs them on a GPU (`pytest tests/test_cuda_paths.py -k cuda-`).
"""

import copy
from contextlib import nullcontext

import numpy as np
import pytest
import scipy.stats
import torch

from corrsteer_pl.calibration.capture import generate_answers
from corrsteer_pl.calibration.stats import CorrelationStats
from corrsteer_pl.evaluation.conditions import answered
from corrsteer_pl.models.layers import decoder_layers
from corrsteer_pl.models.tiny import random_sae
from corrsteer_pl.selection.variants import SelectedFeature
from corrsteer_pl.steering.vectors import SteeringVectors

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
PLACEMENTS = [
    pytest.param("cpu", torch.float32, id="cpu-float32"),
    pytest.param("cpu", torch.bfloat16, id="cpu-bfloat16"),
    pytest.param("cuda", torch.float32, id="cuda-float32", marks=CUDA),
    pytest.param("cuda", torch.bfloat16, id="cuda-bfloat16", marks=CUDA),
]
DEVICES = [
    pytest.param("cpu", id="cpu-bfloat16"),
    pytest.param("cuda", id="cuda-bfloat16", marks=CUDA),
]  # bf16 features

# ||features - float32 CPU oracle|| / ||oracle||: bf16 keeps 8 mantissa bits (0.4% per rounding) and the tiny
# model's features came out 0.4-0.5% off on CPU; float32 on a GPU differs by summation order only.
FEATURE_RTOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
# |r - scipy's float64 r on the same captured values|: both are float64, only the summation differs.
R_ATOL = 1e-10
# Rows whose top-2 logit gap is below this may differ between two computations of the same token (the tiny
# model's logits are ~0.16 apart in scale, so a few bf16 roundings of ~0.002 each can swap a near tie).
TIE_GAP = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
LAYERS = (0, 1)  # not the last layer: its hidden_states entry has the final norm applied
PROMPTS = [
    "the quick brown fox",
    "A. red",
    "Answer: even odd apple river",
    "seven",
    "which option is correct?",
    "B. blue C. green D. seven",
    "one two three four five six",
    "Choose one of the following options only: A, B, C, or D. Answer:",
]


@pytest.fixture(scope="module")
def prompts(tokenizer):
    """Left-padded prompts and generate()'s position ids for them (as test_capture's oracle numbers them)."""
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"], (enc["attention_mask"].cumsum(-1) - 1).clamp_min(0)


def placed(model, device, dtype):
    """A copy of the session's tiny model on `device` in `dtype` (the fixture itself stays float32 on CPU)."""
    return copy.deepcopy(model).to(device, dtype)


def device_saes(device, d_sae=128):
    """float32 SAEs on the device, as the presets load them (sae_dtype float32 beside a bf16 model)."""
    return {layer: random_sae(64, d_sae, layer, seed=layer).to(device) for layer in LAYERS}


@pytest.mark.parametrize(("device", "dtype"), PLACEMENTS)
def test_captured_features_on_the_device_equal_a_float32_cpu_oracle(llama, prompts, device, dtype):
    ids, mask, positions = prompts
    model, saes = placed(llama, device, dtype), device_saes(device)
    _, pooled, _, _ = generate_answers(model, ids.to(device), mask.to(device), 1, saes, "max", [1], 0)
    with torch.no_grad():
        hidden = llama(input_ids=ids, attention_mask=mask, position_ids=positions, output_hidden_states=True)
    for layer, sae in saes.items():
        assert pooled[layer].device.type == device and pooled[layer].dtype == torch.float32
        cpu_sae = copy.deepcopy(sae).to("cpu")
        with torch.no_grad():
            oracle = cpu_sae.encode(hidden.hidden_states[layer + 1][:, -1])  # one new token: the last prompt position
        error = float((pooled[layer].cpu() - oracle).norm() / oracle.norm())
        assert error <= FEATURE_RTOL[dtype], f"layer {layer}: relative error {error:.2e}"


def scipy_r(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-column float64 Pearson r by scipy, 0 for constant columns (as CorrelationStats defines it)."""
    return np.array([0.0 if np.ptp(col) == 0 else scipy.stats.pearsonr(col, y).statistic for col in z.T])


@pytest.mark.parametrize(("device", "dtype"), PLACEMENTS)
def test_statistics_of_captured_features_on_the_device_equal_a_float64_cpu_reference(llama, prompts, device, dtype):
    ids, mask, _ = prompts
    model, saes = placed(llama, device, dtype), device_saes(device)
    labels = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    stats = {layer: CorrelationStats(128, device=device) for layer in LAYERS}
    seen: dict[int, list[torch.Tensor]] = {layer: [] for layer in LAYERS}
    for rows in (slice(0, 3), slice(3, 8)):  # two batches: the second is shifted by the first one's means
        _, pooled, _, _ = generate_answers(model, ids[rows].to(device), mask[rows].to(device), 4, saes, "max", [1], 0)
        for layer, z in pooled.items():
            stats[layer].update(z, labels[rows].to(device))
            seen[layer].append(z.cpu())
    for layer, layer_stats in stats.items():
        r = layer_stats.pearson()
        assert r.device.type == device and r.dtype == torch.float64
        assert layer_stats.sum_z.device.type == device and layer_stats.sum_z.dtype == torch.float64
        z = torch.cat(seen[layer]).double().numpy()  # (8, 128)
        expected = scipy_r(z, labels.numpy())
        assert np.abs(r.cpu().numpy() - expected).max() <= R_ATOL
        np.testing.assert_allclose(layer_stats.frequency().cpu().numpy(), (z > 0).mean(0), rtol=0, atol=1e-15)
        assert 0 < (expected != 0).sum(), "some features must correlate, or the comparison is vacuous"


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_features_on_the_device_are_accumulated_in_float64(device):
    g = torch.Generator().manual_seed(0)
    z = (torch.rand(64, 300, generator=g) < 0.05) * torch.rand(64, 300, generator=g) * 40.0  # sparse, large values
    y = (torch.rand(64, generator=g) < 0.3).to(torch.float64)
    z16 = z.to(torch.bfloat16)
    stats = CorrelationStats(300, device=device)
    stats.update(z16[:20].to(device), y[:20].to(device))
    stats.update(z16[20:].to(device), y[20:].to(device))
    expected = scipy_r(z16.double().numpy(), y.numpy())  # the bf16 values, compared exactly in float64
    assert np.abs(stats.pearson().cpu().numpy() - expected).max() <= R_ATOL


@pytest.mark.parametrize("positions", ["all", "generation"])
@pytest.mark.parametrize(("device", "dtype"), PLACEMENTS)
def test_steering_adds_the_vector_in_the_models_dtype_on_its_device(llama, prompts, device, dtype, positions):
    ids, mask, position_ids = (t.to(device) for t in prompts)
    model, saes = placed(llama, device, dtype), device_saes(device)
    features = [SelectedFeature(0, 3, 0.5, 4.0, 0.1), SelectedFeature(1, 7, 0.4, -2.5, 0.1)]
    steering = SteeringVectors.from_selection(features, saes, model, positions=positions)
    layers = decoder_layers(model)
    raw: dict[int, torch.Tensor] = {}
    after: dict[int, torch.Tensor] = {}
    # forward hooks run in registration order: `raw` sees a layer's own output, `after` the steered one
    handles = [
        layers[layer].register_forward_hook(lambda m, a, out, layer=layer: raw.__setitem__(layer, out))
        for layer in LAYERS
    ]
    hooks = steering.attach(model)
    handles += [
        layers[layer].register_forward_hook(lambda m, a, out, layer=layer: after.__setitem__(layer, out))
        for layer in LAYERS
    ]
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, position_ids=position_ids)
    finally:
        hooks.detach()
        for handle in handles:
            handle.remove()
    for layer in LAYERS:
        vector = steering.layers[layer].vector.to(device, dtype)
        assert after[layer].dtype == dtype and after[layer].device.type == device
        if positions == "all":
            assert torch.equal(after[layer], raw[layer] + vector)
        else:  # a plain forward pass is a prefill: only the last prompt position is a generation position
            assert torch.equal(after[layer][:, -1], raw[layer][:, -1] + vector)
            assert torch.equal(after[layer][:, :-1], raw[layer][:, :-1])


def _conditions(model, saes):
    conditions = {"unsteered": None}
    for scale in (20.0, 60.0):
        features = [SelectedFeature(0, 3, 0.5, scale, 0.1), SelectedFeature(1, 7, 0.4, scale, 0.1)]
        conditions[f"x{scale:g}"] = SteeringVectors.from_selection(features, saes, model)
    conditions["layer1"] = SteeringVectors.from_selection([SelectedFeature(1, 9, 0.3, 80.0, 0.1)], saes, model)
    return conditions


@pytest.mark.parametrize(("device", "dtype"), PLACEMENTS)
def test_one_token_answers_on_the_device_equal_generate(llama, prompts, device, dtype):
    ids, mask, position_ids = (t.to(device) for t in prompts)
    model = placed(llama, device, dtype)
    conditions = _conditions(model, device_saes(device, d_sae=32))
    fast = {name: a.tokens for name, a in answered(model, ids, mask, conditions, 1, [1], 0).items()}
    compared = 0
    for name, steering in conditions.items():
        assert fast[name].device.type == device and fast[name].shape == (len(PROMPTS), 1)
        with steering.apply(model) if steering is not None else nullcontext():
            expected, _, _, _ = generate_answers(model, ids, mask, 1, pad_token_id=0)
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits[:, -1].float()
        top = logits.topk(2).values
        clear = (top[:, 0] - top[:, 1]) > TIE_GAP[dtype]  # (B,) rows whose answer rounding cannot flip
        assert torch.equal(fast[name][clear], expected[clear]), name
        compared += int(clear.sum())
    assert compared >= len(conditions) * len(PROMPTS) // 2, f"only {compared} rows were clear of near ties"
    assert not torch.equal(fast["unsteered"], fast["x60"]), "the conditions must actually differ"
