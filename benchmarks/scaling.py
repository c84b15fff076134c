#!/usr/bin/env python
"""Figure 5: what calibration costs at paper scale, on paper (no download, no measurement).

For Gemma-2-2B with Gemma Scope 16k residual SAEs on all 26 layers and Llama-3.1-8B with Llama
Scope 32k (8x) residual SAEs on all 32 layers: FLOPs and bytes per calibration sample, memory of
the statistics state, and the all-reduce volume of one DDP sync, from the shapes in configs/make_presets.py.

Conventions: a matmul with a weight of P parameters costs 2P FLOPs per token; the input embedding
is a lookup (no FLOPs), a tied output head is a matmul; attention scores (2 * 2 * T * H * head_dim
per layer and token) are counted too. The SAE encode is 2 * d_model * d_sae per captured token and
layer. Weights and activations are bf16 (2 bytes), pooled features float32, statistics float64.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import _common as C

from configs.make_presets import MODELS, Model  # the presets' table of model and SAE shapes

BF16, F32, F64 = 2, 4, 8
# CorrelationStats per layer (calibration/stats.py): shift_z and 8 vector sums of d_sae float64 each (sum_z, sum_zz,
# sum_zy, active, sum_z_pos, active_pos, sum_zz_pos, sum_zz_neg), shift_y and 4 scalar sums (n, sum_y, sum_yy,
# n_pos). The sums are what a DDP sync adds up.
STATS_SUMS, STATS_SCALAR_SUMS = 8, 4
STATS_VECTORS, STATS_SCALARS = 1 + STATS_SUMS, 1 + STATS_SCALAR_SUMS
# update() per feature and sample: the 8 sums' multiply-adds (2 FLOPs each), z - shift, z squared twice; the copy
# and the comparison z > 0 are not arithmetic.
STATS_FLOPS = 2 * STATS_SUMS + 3


def params(s: Model) -> dict[str, int]:
    """Parameter counts from the config: embedding, per-layer blocks, head."""
    attn = s.d_model * s.heads * s.head_dim * 2 + s.d_model * s.kv_heads * s.head_dim * 2  # q, o, k, v
    layer = attn + 3 * s.d_model * s.mlp_dim + s.norms_per_layer * s.d_model  # gated MLP: gate, up, down
    embed = s.vocab * s.d_model
    head = 0 if s.tied else embed
    total = embed + s.layers * layer + s.d_model + head  # + final norm
    matmul = s.layers * layer + embed  # the head (tied or not) is one vocab x d matmul; the lookup is free
    return {"total": total, "matmul": matmul, "layer": layer}


def sae_encoder_params(s: Model) -> int:
    """Encode reads W_enc (d x F), b_enc and threshold (F), b_dec (d) per SAE layer."""
    return s.layers * (s.d_model * s.d_sae + 2 * s.d_sae + s.d_model)


def per_sample(s: Model, prompt: int, new: int, batch: int) -> dict[str, float]:
    """FLOPs and bytes of one calibration sample: prompt tokens, `new` generated tokens, `batch` samples per step."""
    p = params(s)
    fed = prompt + new - 1  # the last generated token is never fed back
    positions = sum(prompt + t for t in range(new))  # attended positions, summed over fed tokens' steps
    attn_scores = 2 * 2 * s.heads * s.head_dim * s.layers * (prompt * (prompt + 1) / 2 + positions - prompt)
    lm_flops = 2 * p["matmul"] * fed + attn_scores
    sae_flops = 2 * s.d_model * s.d_sae * s.layers * new  # one captured position per generated token
    features = s.layers * s.d_sae
    steps = new  # prefill + new - 1 decoding steps, each reading all weights once for the whole batch
    kv_bytes = 2 * s.layers * s.kv_heads * s.head_dim * BF16 * positions  # K and V read at every step
    lm_bytes = steps * p["matmul"] * BF16 / batch + kv_bytes  # the embedding lookup reads B rows only
    rows = new * s.layers * s.d_model * BF16  # captured residual rows
    # FeatureCapture keeps the captured rows and encodes them once after generation: the SAE encoders are read
    # once per batch (rows written, then read). Encoding at every step would read them at every step.
    sae_bytes = sae_encoder_params(s) * BF16 / batch + 2 * rows
    sae_bytes_per_step = steps * sae_encoder_params(s) * BF16 / batch + rows
    # pooled features written once (f32), read by the update; the update reads + writes the 8 float64 sums per batch
    stats_bytes = 2 * features * F32 + STATS_SUMS * 2 * features * F64 / batch
    return {
        "lm_flops": lm_flops,
        "sae_flops": sae_flops,
        "stats_flops": STATS_FLOPS * features,
        "lm_bytes": lm_bytes,
        "sae_bytes": sae_bytes,
        "sae_bytes_per_step": sae_bytes_per_step,
        "stats_bytes": stats_bytes,
    }


def state_bytes(s: Model) -> int:
    """CorrelationStats per layer: shift_z + 8 vector sums (9 float64 vectors of d_sae) + 5 float64 scalars."""
    return s.layers * (STATS_VECTORS * s.d_sae + STATS_SCALARS) * F64


def sync_bytes(s: Model, world: int) -> dict[str, float]:
    """One `all_reduce()` per layer: all_gather of counts, broadcast of the shift, all_reduce of 4 scalars + 8F."""
    reduce_payload = s.layers * (STATS_SUMS * s.d_sae + STATS_SCALAR_SUMS) * F64
    broadcast = s.layers * (s.d_sae + 1) * F64
    gather = s.layers * world * F64
    ring = 2 * (world - 1) / world * reduce_payload  # bytes each rank sends in a ring all-reduce
    return {
        "reduce": reduce_payload,
        "broadcast": broadcast,
        "gather": gather,
        "ring_per_rank": ring,
        "collectives": 3 * s.layers,
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
    for s in MODELS.values():
        counts = params(s)
        assert counts["total"] == s.params, (s.name, counts["total"], s.params)
        C.log(f"[scaling] {s.name} + {s.title}: {s.source}")
        cfg = (
            f"{s.name}: d_model {s.d_model}, {s.layers} layers, {counts['total'] / 1e9:.2f}B params; "
            f"d_sae {s.d_sae:,} x {s.layers} layers"
        )
        out += [*work_rows(s, cfg, args), *state_rows(s, cfg, args.world)]
    return out


def work_rows(s: Model, cfg: str, args) -> list[str]:
    """Rows 5a and 5b: FLOPs and bytes of one calibration sample."""
    work = per_sample(s, args.prompt, args.new_tokens, args.batch)
    share = 2 * s.d_model * s.d_sae * s.layers / (2 * params(s)["matmul"])
    total_flops = work["lm_flops"] + work["sae_flops"] + work["stats_flops"]
    flops = C.row(
        "5a. FLOPs / calibration sample",
        f"{cfg}; prompt {args.prompt} + {args.new_tokens} new tok",
        f"LM {human(work['lm_flops'], 'FLOP')}, SAE encodes {human(work['sae_flops'], 'FLOP')}, "
        f"stats update {human(work['stats_flops'], 'FLOP')}; "
        f"SAE = {share:.1%} of a forward per generated token",
        human(total_flops, "FLOP"),
        "-",
        None,
    )
    memory = C.row(
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
    return [flops, memory]


def state_rows(s: Model, cfg: str, world: int) -> list[str]:
    """Rows 5c and 5d: the statistics state and what one DDP sync moves."""
    state = C.row(
        "5c. statistics state",
        cfg,
        f"{s.layers} x ({STATS_VECTORS} x {s.d_sae:,} + {STATS_SCALARS}) float64 "
        f"(shift_z + {STATS_SUMS} sums + {STATS_SCALARS} scalars per layer)",
        human(state_bytes(s), "B"),
        "O(F), not O(samples)",
        None,
    )
    sync = sync_bytes(s, world)
    ddp = C.row(
        "5d. DDP all-reduce / sync",
        f"{cfg}; {world} ranks",
        f"all_reduce {human(sync['reduce'], 'B')} + broadcast of shifts {human(sync['broadcast'], 'B')} + "
        f"all_gather {human(sync['gather'], 'B')} in {sync['collectives']} collectives; ring all-reduce sends "
        f"{human(sync['ring_per_rank'], 'B')} per rank",
        human(sync["reduce"] + sync["broadcast"] + sync["gather"], "B"),
        "-",
        None,
    )
    return [state, ddp]


if __name__ == "__main__":
    main(sys.argv[1:])
