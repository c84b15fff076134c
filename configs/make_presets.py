"""Writes the real-model presets configs/<model>_<task>.yaml: `python configs/make_presets.py`.

The YAML files are committed; tests/test_real_configs.py fails when they drift from this script.
Each preset's memory note is computed here from the model and SAE shapes, so the batch sizes can
be checked (and re-derived for another GPU) without loading anything. `MODELS` is the one table of
the two models' and SAEs' dimensions: benchmarks/scaling.py reads it too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent
GPU_GB = 80
BUDGET_GB = 60  # planned peak; the rest covers allocator fragmentation and prompts longer than assumed
CUDA_OVERHEAD_GB = 2.0  # CUDA context, cuBLAS workspaces, caching-allocator slack


@dataclass(frozen=True)
class Model:
    hub_id: str
    release: str
    sae_id: str  # with {L} for the layer
    layers: int  # decoder layers, each with an SAE
    d_model: int
    d_sae: int
    params: int  # LM parameters, as published (benchmarks/scaling.py recounts them from the shapes)
    kv_heads: int
    head_dim: int
    heads: int
    mlp_dim: int
    vocab: int
    tied: bool  # the output head shares the input embedding
    norms_per_layer: int  # RMSNorm weight vectors per decoder layer
    eager_attention: bool  # Gemma 2 (logit soft-capping) runs eager attention: B x heads x T^2 scores
    sae_dtype: str
    name: str
    title: str
    source: str  # where the numbers come from

    def sae_ids(self) -> list[str]:
        return [self.sae_id.format(L=layer) for layer in range(self.layers)]


@dataclass(frozen=True)
class Task:
    max_new_tokens: int
    prompt_tokens: int  # longest prompt we plan for (batches are left-padded to their longest prompt)
    batch_size: int
    every_n_batches: int
    limit_calibration: int
    limit_validation: int
    title: str
    why: str  # the prompt-length assumption


BYTES = {"float32": 4, "bfloat16": 2}

# The side-effects pass of every preset: the paper's short-answer tasks other than the target (GSM8K's 512-token
# answers under ten conditions would cost more than the target's whole test), 200 test items each.
SIDE_TASKS = ("mmlu", "bbq_disambig", "xstest", "harmbench")
SIDE_ITEMS = 200

MODELS: dict[str, Model] = {
    "gemma2-2b-it": Model(
        hub_id="google/gemma-2-2b-it",
        release="gemma-scope-2b-pt-res-canonical",
        sae_id="layer_{L}/width_16k/canonical",
        layers=26,
        d_model=2304,
        d_sae=16384,
        params=2_614_341_888,
        kv_heads=4,
        head_dim=256,
        heads=8,
        mlp_dim=9216,
        vocab=256000,
        tied=True,
        norms_per_layer=4,
        eager_attention=True,
        sae_dtype="float32",  # as Gemma Scope ships it; bf16 would save 3.9 GB that 80 GB does not need
        name="Gemma-2-2B",
        title="Gemma Scope 16k residual SAEs",
        source="huggingface.co/google/gemma-2-2b config.json (hidden_size 2304, num_hidden_layers 26, heads 8/4, "
        "head_dim 256, intermediate_size 9216, vocab_size 256000, tied); params 2,614,341,888 (safetensors "
        "total); SAEs: google/gemma-scope-2b-pt-res, layer_0..25/width_16k (JumpReLU, 16,384 latents)",
    ),
    "llama3.1-8b": Model(
        hub_id="meta-llama/Llama-3.1-8B",
        release="llama_scope_lxr_8x",
        sae_id="l{L}r_8x",
        layers=32,
        d_model=4096,
        d_sae=32768,
        params=8_030_261_248,
        kv_heads=8,
        head_dim=128,
        heads=32,
        mlp_dim=14336,
        vocab=128256,
        tied=False,
        norms_per_layer=2,
        eager_attention=False,
        sae_dtype="bfloat16",  # Llama Scope ships bf16 weights; float32 would double them to 34 GB
        name="Llama-3.1-8B",
        title="Llama Scope 32k residual SAEs",
        source="huggingface.co/meta-llama/Llama-3.1-8B config.json (hidden_size 4096, num_hidden_layers 32, "
        "heads 32/8, intermediate_size 14336, vocab_size 128256, untied); params 8,030,261,248; SAEs: "
        "fnlp/Llama-Scope LXR-8x (residual stream, every layer, 32,768 latents; He et al. 2024, arXiv:2410.20526)",
    ),
}

# Calibration / validation sizes: the paper's table (4000 / 200, or its smaller n).
# Batch sizes: 32 where prompts reach 1.5-2k tokens (prefill is compute-bound at 32 x ~1k tokens; a bigger batch
# only adds left padding and eager-attention scores); 64 for short prompts, and for GSM8K, whose 512 decode steps are
# bandwidth-bound (batch buys throughput) while 64 keeps the growing KV cache under ~9 GB even if it fragments.
# Checkpoints every few minutes of calibration or sooner (a checkpoint holds only the statistics: < 60 MB).
# Fields: max_new_tokens, prompt_tokens, batch_size, every_n_batches, limit_calibration, limit_validation, ...
TASKS: dict[str, Task] = {
    "mmlu": Task(1, 1536, 32, 25, 4000, 200, "MMLU", "auxiliary_train holds RACE passages of 1k+ tokens"),
    "mmlu_pro": Task(1, 2048, 32, 25, 4000, 200, "MMLU-Pro", "10 options, some long questions"),
    "bbq_ambig": Task(1, 256, 64, 10, 4000, 200, "BBQ-ambig", "context + question + 3 options"),
    "bbq_disambig": Task(1, 256, 64, 10, 4000, 200, "BBQ-disambig", "context + question + 3 options"),
    "simpleqa": Task(16, 128, 64, 5, 1167, 130, "SimpleQA", "one short question"),
    "harmbench": Task(32, 2048, 32, 1, 108, 12, "HarmBench", "contextual behaviours carry a long context"),
    "xstest": Task(32, 128, 64, 1, 121, 14, "XSTest", "one short prompt"),
    "gsm8k": Task(512, 512, 64, 5, 4000, 200, "GSM8K", "a word problem; the 512 new tokens dominate"),
}


def memory(model: Model, task: Task) -> dict[str, float]:
    """Rough peak GPU memory (GB) of one calibration batch; see the note written into each preset."""
    gb = 1e9
    weights = model.params * 2 / gb  # bf16
    saes = model.layers * 2 * model.d_model * model.d_sae * BYTES[model.sae_dtype] / gb  # W_enc + W_dec
    tokens = task.prompt_tokens + task.max_new_tokens
    kv = tokens * model.layers * 2 * model.kv_heads * model.head_dim * 2 / gb  # bf16 K and V
    mlp = task.prompt_tokens * model.mlp_dim * 2 * 3 / gb  # prefill: gate, up and their product, one layer at a time
    scores = model.heads * task.prompt_tokens**2 * 8 / gb if model.eager_attention else 0.0  # bf16 + fp32 softmax
    pooled = model.layers * model.d_sae * 4 * 2 / gb  # fp32 max accumulator + one step's encoded features
    per_prompt = kv + mlp + scores + pooled
    fixed = weights + saes + CUDA_OVERHEAD_GB
    return {
        "weights": weights,
        "saes": saes,
        "tokens": tokens,
        "kv": kv,
        "mlp": mlp,
        "scores": scores,
        "pooled": pooled,
        "per_prompt": per_prompt,
        "fixed": fixed,
        "total": fixed + task.batch_size * per_prompt,
    }


def memory_note(model: Model, task: Task) -> list[str]:
    m = memory(model, task)
    scores = f" + eager attention scores {m['scores']:.2f} GB" if model.eager_attention else ""
    return [
        f"# Memory on one {GPU_GB} GB GPU. Fixed: weights {m['weights']:.1f} GB (bf16) + SAEs {m['saes']:.1f} GB"
        f" ({model.layers} x {model.d_model}x{model.d_sae} x2 {model.sae_dtype})",
        f"#   + ~{CUDA_OVERHEAD_GB:.0f} GB CUDA = {m['fixed']:.1f} GB."
        f" Per prompt at {m['tokens']} tokens ({task.why}):",
        f"#   KV cache {m['kv']:.2f} GB + prefill MLP {m['mlp']:.2f} GB{scores}"
        f" + pooled features {m['pooled'] * 1e3:.0f} MB = {m['per_prompt']:.2f} GB.",
        f"# Batch {task.batch_size} -> ~{m['total']:.0f} GB peak.",
    ]


def render(name: str, task_name: str) -> str:
    model, task = MODELS[name], TASKS[task_name]
    preset = f"{name}_{task_name}"
    batches = math.ceil(task.limit_calibration / task.batch_size)
    lines = [
        f"# CorrSteer-A on {task.title}: {model.hub_id} with {model.title} on all {model.layers} layers.",
        "# Written by configs/make_presets.py (edit that and rerun it). Needs the hub for the model, SAEs and data.",
        *memory_note(model, task),
        "seed_everything: 0",
        "trainer:",
        "  accelerator: gpu",
        "  strategy: ddp",
        "  devices: 1  # --trainer.devices N: one process per GPU, calibration split sharded N ways, same batch_size",
        f"  default_root_dir: runs/{preset}",
        "  log_every_n_steps: 1",
        "model:",
        f"  model: {model.hub_id}",
        "  saes:",
        *(f"    - {{source: {model.release}, sae_id: {sae_id}}}" for sae_id in model.sae_ids()),
        "  dtype: bfloat16",
        f"  sae_dtype: {model.sae_dtype}",
        "data:",
        f"  task: {task_name}",
        "  source: hub",
        f"  batch_size: {task.batch_size}",
        "  seed: 0  # the paper averages 5 seeds: --data.seed 1..4 with another default_root_dir",
        f"  limit_calibration: {task.limit_calibration}",
        f"  limit_validation: {task.limit_validation}",
        "calibration:",
        "  pooling: max",
        "selection:",
        "  variant: A",
        "  top_k: 10",
        "  scale: 1.0",
        "checkpoint:",
        f"  every_n_batches: {task.every_n_batches}  # of {batches} calibration batches on one GPU",
        "side_effects:",
        "  # What else the steering changes (report.md's \"Side effects\"), beside 4 + 4 random controls of its norms:",
        "  # the paper's other short-answer tasks, the shipped open-generation prompts and the served policy.",
        f"  tasks: [{', '.join(t for t in SIDE_TASKS if t != task_name)}]",
        f"  items: {SIDE_ITEMS}",
        "  open_generation: true",
        "  open_tokens: 32",
        "  controls: 4",
        "  served: true",
        "  dose: true  # measures nothing where the selection has no scale grid (variant A at scale 1.0)",
    ]
    return "\n".join(lines) + "\n"


def presets() -> dict[Path, str]:
    """Every preset file and its text."""
    return {CONFIGS / f"{m}_{t}.yaml": render(m, t) for m in MODELS for t in TASKS}


def over_budget() -> list[str]:
    """Presets whose planned peak exceeds BUDGET_GB (should be none)."""
    return [
        f"{m}_{t}: {memory(MODELS[m], TASKS[t])['total']:.0f} GB"
        for m in MODELS
        for t in TASKS
        if memory(MODELS[m], TASKS[t])["total"] > BUDGET_GB
    ]


def main() -> None:
    if over_budget():
        raise SystemExit(f"planned peak above {BUDGET_GB} GB: {', '.join(over_budget())}")
    for path, text in presets().items():
        path.write_text(text)
        print(path.relative_to(CONFIGS.parent))


if __name__ == "__main__":
    main()
