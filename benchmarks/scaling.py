#!/usr/bin/env python
"""Figure 5: what calibration costs at paper scale, on paper (no download, no measurement).

For Gemma-2-2B with Gemma Scope 16k residual SAEs on all 26 layers and Llama-3.1-8B with Llama
Scope 32k (8x) residual SAEs on all 32 layers: FLOPs and bytes per calibration sample, memory of
the statistics state, and the all-reduce volume of one DDP sync, from the configs' numbers below.

Conventions: a matmul with a weight of P parameters costs 2P FLOPs per token; the input embedding
is a lookup (no FLOPs), a tied output head is a matmul; attention scores (2 * 2 * T * H * head_dim
per layer and token) are counted too. The SAE encode is 2 * d_model * d_sae per captured token and
layer. Weights and activations are bf16 (2 bytes), pooled features float32, statistics float64.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

import _common as C

BF16, F32, F64 = 2, 4, 8


@dataclass(frozen=True)
class Setup:
    name: str
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    vocab: int
    tied: bool
    norms_per_layer: int
    published_params: int
    d_sae: int
    sae_layers: int
    source: str


SETUPS = (
    Setup(
        "Gemma-2-2B + Gemma Scope 16k",
        d_model=2304,
        n_layers=26,
        n_heads=8,
        n_kv_heads=4,
        head_dim=256,
        d_ff=9216,
        vocab=256000,
        tied=True,
        norms_per_layer=4,
        published_params=2_614_341_888,
        d_sae=16384,
        sae_layers=26,
        source="huggingface.co/google/gemma-2-2b config.json (hidden_size 2304, num_hidden_layers 26, heads 8/4, "
        "head_dim 256, intermediate_size 9216, vocab_size 256000, tied); params 2,614,341,888 (safetensors "
        "total); SAEs: google/gemma-scope-2b-pt-res, layer_0..25/width_16k (JumpReLU, 16,384 latents)",
    ),
    Setup(
        "Llama-3.1-8B + Llama Scope 32k",
        d_model=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        head_dim=128,
        d_ff=14336,
        vocab=128256,
        tied=False,
        norms_per_layer=2,
        published_params=8_030_261_248,
        d_sae=32768,
        sae_layers=32,
        source="huggingface.co/meta-llama/Llama-3.1-8B config.json (hidden_size 4096, num_hidden_layers 32, "
        "heads 32/8, intermediate_size 14336, vocab_size 128256, untied); params 8,030,261,248; SAEs: "
        "fnlp/Llama-Scope LXR-8x (residual stream, every layer, 32,768 latents; He et al. 2024, arXiv:2410.20526)",
    ),
)


def params(s: Setup) -> dict[str, int]:
    """Parameter counts from the config: embedding, per-layer blocks, head."""
    attn = s.d_model * s.n_heads * s.head_dim * 2 + s.d_model * s.n_kv_heads * s.head_dim * 2  # q, o, k, v
    layer = attn + 3 * s.d_model * s.d_ff + s.norms_per_layer * s.d_model  # gated MLP: gate, up, down
    embed = s.vocab * s.d_model
    head = 0 if s.tied else embed
    total = embed + s.n_layers * layer + s.d_model + head  # + final norm
    matmul = s.n_layers * layer + embed  # the head (tied or not) is one vocab x d matmul; the lookup is free
    return {"total": total, "matmul": matmul, "layer": layer}


def sae_encoder_params(s: Setup) -> int:
    """Encode reads W_enc (d x F), b_enc and threshold (F), b_dec (d) per SAE layer."""
    return s.sae_layers * (s.d_model * s.d_sae + 2 * s.d_sae + s.d_model)


def per_sample(s: Setup, prompt: int, new: int, batch: int) -> dict[str, float]:
    """FLOPs and bytes of one calibration sample: prompt tokens, `new` generated tokens, `batch` samples per step."""
    p = params(s)
    fed = prompt + new - 1  # the last generated token is never fed back
    positions = sum(prompt + t for t in range(new))  # attended positions, summed over fed tokens' steps
    attn_scores = 2 * 2 * s.n_heads * s.head_dim * s.n_layers * (prompt * (prompt + 1) / 2 + positions - prompt)
    lm_flops = 2 * p["matmul"] * fed + attn_scores
    sae_flops = 2 * s.d_model * s.d_sae * s.sae_layers * new  # one captured position per generated token
    features = s.sae_layers * s.d_sae
    stats_flops = 14 * features  # gt, 6 multiply-adds, copy, shift, square per feature (stats.py update)
    steps = new  # prefill + new - 1 decoding steps, each reading all weights once for the whole batch
    kv_bytes = 2 * s.n_layers * s.n_kv_heads * s.head_dim * BF16 * positions  # K and V read at every step
    lm_bytes = steps * p["matmul"] * BF16 / batch + kv_bytes  # the embedding lookup reads B rows only
    rows = new * s.sae_layers * s.d_model * BF16  # captured residual rows
    # FeatureCapture keeps the captured rows and encodes them once after generation: the SAE encoders are read
    # once per batch (rows written, then read). Encoding at every step would read them at every step.
    sae_bytes = sae_encoder_params(s) * BF16 / batch + 2 * rows
    sae_bytes_per_step = steps * sae_encoder_params(s) * BF16 / batch + rows
    # pooled features written once (f32), read by the update; the update reads+writes 6 float64 sums per batch
    stats_bytes = 2 * features * F32 + 6 * 2 * features * F64 / batch
    return {
        "lm_flops": lm_flops,
        "sae_flops": sae_flops,
        "stats_flops": stats_flops,
        "lm_bytes": lm_bytes,
        "sae_bytes": sae_bytes,
        "sae_bytes_per_step": sae_bytes_per_step,
        "stats_bytes": stats_bytes,
    }


def state_bytes(s: Setup) -> int:
    """CorrelationStats per layer: shift_z + 6 vector sums (7 float64 vectors of d_sae) + 5 float64 scalars."""
    return s.sae_layers * (7 * s.d_sae + 5) * F64


def sync_bytes(s: Setup, world: int) -> dict[str, float]:
    """One `all_reduce()` per layer: all_gather of counts, broadcast of the shift, all_reduce of 4 scalars + 6F."""
    reduce_payload = s.sae_layers * (6 * s.d_sae + 4) * F64
    broadcast = s.sae_layers * (s.d_sae + 1) * F64
    gather = s.sae_layers * world * F64
    ring = 2 * (world - 1) / world * reduce_payload  # bytes each rank sends in a ring all-reduce
    return {
        "reduce": reduce_payload,
        "broadcast": broadcast,
        "gather": gather,
        "ring_per_rank": ring,
        "collectives": 3 * s.sae_layers,
    }


def human(x: float, unit: str) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {prefix}{unit}"
    return f"{x:.0f} {unit}"


def main(argv: Sequence[str] | None = None) -> list[str]:
    p = C.parser(__doc__.splitlines()[1])
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens per sample")
    p.add_argument("--new-tokens", type=int, default=32, help="generated tokens per sample")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--world", type=int, default=8, help="DDP ranks")
    args = p.parse_args(argv)
    C.setup(args, uses_torch=False)
    out = []
    for s in SETUPS:
        counts = params(s)
        assert counts["total"] == s.published_params, (s.name, counts["total"], s.published_params)
        C.log(f"[scaling] {s.name}: {s.source}")
        short = s.name.split(" + ")[0]
        cfg = (
            f"{short}: d_model {s.d_model}, {s.n_layers} layers, {counts['total'] / 1e9:.2f}B params; "
            f"d_sae {s.d_sae:,} x {s.sae_layers} layers"
        )
        work = per_sample(s, args.prompt, args.new_tokens, args.batch)
        share = 2 * s.d_model * s.d_sae * s.sae_layers / (2 * counts["matmul"])
        total_flops = work["lm_flops"] + work["sae_flops"] + work["stats_flops"]
        out.append(
            C.row(
                "5a. FLOPs / calibration sample",
                f"{cfg}; prompt {args.prompt} + {args.new_tokens} new tok",
                f"LM {human(work['lm_flops'], 'FLOP')}, SAE encodes {human(work['sae_flops'], 'FLOP')}, "
                f"stats update {human(work['stats_flops'], 'FLOP')}; "
                f"SAE = {share:.1%} of a forward per generated token",
                human(total_flops, "FLOP"),
                "-",
                None,
            )
        )
        out.append(
            C.row(
                "5b. bytes / calibration sample",
                f"{cfg}; bf16, batch {args.batch}, prompt {args.prompt} + {args.new_tokens} new tok",
                f"LM weights + KV cache {human(work['lm_bytes'], 'B')}, SAE encoders + captured rows "
                f"{human(work['sae_bytes'], 'B')} (encoded once per batch; "
                f"{human(work['sae_bytes_per_step'], 'B')} if encoded at every step), "
                f"pooled features + stats {human(work['stats_bytes'], 'B')}",
                human(work["lm_bytes"] + work["sae_bytes"] + work["stats_bytes"], "B"),
                "-",
                None,
            )
        )
        out.append(
            C.row(
                "5c. statistics state",
                cfg,
                f"{s.sae_layers} x (7 x {s.d_sae:,} + 5) float64 (shift_z + 6 sums + 5 scalars per layer)",
                human(state_bytes(s), "B"),
                "O(F), not O(samples)",
                None,
            )
        )
        sync = sync_bytes(s, args.world)
        out.append(
            C.row(
                "5d. DDP all-reduce / sync",
                f"{cfg}; {args.world} ranks",
                f"all_reduce {human(sync['reduce'], 'B')} + broadcast of shifts {human(sync['broadcast'], 'B')} + "
                f"all_gather {human(sync['gather'], 'B')} in {sync['collectives']} collectives; ring all-reduce sends "
                f"{human(sync['ring_per_rank'], 'B')} per rank",
                human(sync["reduce"] + sync["broadcast"] + sync["gather"], "B"),
                "-",
                None,
            )
        )
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
