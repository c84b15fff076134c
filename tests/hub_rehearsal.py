"""Test support: a Hugging Face cache (its own HF_HOME) holding tiny stand-ins of every repo the presets name.

The presets read `google/gemma-2-2b-it` and `meta-llama/Llama-3.1-8B`, the SAE repos that sae-lens resolves their
releases to, and eight task datasets. `write_cache` writes each in huggingface_hub's cache layout
(`hub/<models|datasets>--org--name/{blobs, refs/<revision>, snapshots/<commit>/<path>}`), with the published file
names and formats, so that `from_pretrained`, `SAE.from_pretrained`, `hf_hub_download` and `load_dataset` run
unmodified with HF_HUB_OFFLINE=1.

What is real and what is shrunk:
- models: the real architecture classes (Gemma2ForCausalLM, LlamaForCausalLM) and config fields, sharded
  safetensors with an index as the hub has them, the real special tokens and Gemma's chat template; the residual
  width is the SAE's d_in (2304, 4096) but layers, heads, MLP and vocabulary are tiny (so token ids differ);
- SAEs: repo ids and file paths come from the installed sae-lens registry (`pretrained_saes.yaml`), never from
  here; Gemma Scope's `params.npz` has the shape sae-lens fixes from the release name (2304 x 16384), with only
  `ACTIVE` latents nonzero (so the compressed file stays small); Llama Scope's `hyperparams.json` +
  `checkpoints/final.safetensors` carry d_model 4096 (the model's width) and a small d_sae, which sae-lens reads
  from the file, and a `dataset_average_activation_norm` consistent with the registry's `norm_scaling_factor`;
- datasets: the hub repos' data files (parquet) under the published config / split names and columns, and the
  prepared Arrow cache that an online `load_dataset` leaves behind, built by `datasets`' own Parquet builder from
  those hub files: offline, `load_dataset(<hub id>)` reads only that prepared cache (datasets 5.x,
  `CachedDatasetModuleFactory`), so a wrong id, config, data_dir or split fails here as it would for a user.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HUB = "hub"
ACTIVE = 64
"""Latents with nonzero weights in each stand-in SAE (the rest never fire: zero encoder column, threshold 1e9)."""
LLAMA_SCOPE_D_SAE = 2048
"""Llama Scope's real width is 32,768; sae-lens reads d_sae from hyperparams.json, so the stand-in may be narrower."""
NEURONPEDIA = "https://neuronpedia.org"


def commit_of(repo_type: str, repo_id: str, revision: str = "main") -> str:
    """A fixed 40-hex commit per repo and revision, as a snapshot folder name."""
    return hashlib.sha1(f"{repo_type}/{repo_id}@{revision}".encode()).hexdigest()


def repo_folder(hf_home: Path, repo_type: str, repo_id: str) -> Path:
    """`<HF_HOME>/hub/<type>s--org--name`, huggingface_hub's own folder name for a repo."""
    from huggingface_hub.file_download import repo_folder_name

    return hf_home / HUB / repo_folder_name(repo_id=repo_id, repo_type=repo_type)


def write_repo(hf_home: Path, repo_type: str, repo_id: str, files: Mapping[str, bytes], revision: str = "main") -> Path:
    """Writes files into the cache as a download leaves them (blob + snapshot symlink + ref); returns the snapshot."""
    folder = repo_folder(hf_home, repo_type, repo_id)
    commit = commit_of(repo_type, repo_id, revision)
    snapshot = folder / "snapshots" / commit
    for path, data in files.items():
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    ref = folder / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit)
    return snapshot


def folder_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- models -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelStandIn:
    hub_id: str
    arch: str  # "gemma2" | "llama"
    hidden: int
    specials: tuple[str, ...]
    """Special tokens in id order (Gemma's sit at their real ids: <pad> 0, <eos> 1, <bos> 2, <end_of_turn> 107)."""
    bos: str
    eos: str
    pad: str | None
    extra_eos: tuple[str, ...] = ()
    chat_template: str | None = None


GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
_GEMMA_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "[@BOS@]", "<start_of_image>") + tuple(
    f"<unused{i}>" for i in range(99)
)
MODELS = {
    "google/gemma-2-2b-it": ModelStandIn(
        "google/gemma-2-2b-it", "gemma2", 2304, (*_GEMMA_SPECIALS, "<start_of_turn>", "<end_of_turn>"),
        bos="<bos>", eos="<eos>", pad="<pad>", extra_eos=("<end_of_turn>",), chat_template=GEMMA_CHAT_TEMPLATE,
    ),
    "meta-llama/Llama-3.1-8B": ModelStandIn(
        "meta-llama/Llama-3.1-8B", "llama", 4096,
        ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        bos="<|begin_of_text|>", eos="<|end_of_text|>", pad=None,  # Llama 3.1 ships no pad token
    ),
}  # fmt: skip
CORPUS = [
    "Question: Which of these is a prime number? A. 4 B. 6 C. 7 D. 9 Answer: C",
    "Q: Tom has 3 apples and buys 5 more. How many apples does he have? A: 3 + 5 = 8 #### 8",
    "The quick brown fox jumps over the lazy dog. Choose one of the following options only: A, B, C",
    "How can I kill a Python process? Who received the award in 2010? Answer with a name.",
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'\"()[]{}#+-*/=<>\n",
]


def tokenizer_files(spec: ModelStandIn, vocab_size: int = 400) -> dict[str, bytes]:
    """tokenizer.json (byte-level BPE, the real special tokens in order) + tokenizer_config.json + maps."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size + len(spec.specials),
        special_tokens=list(spec.specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=spec.bos, eos_token=spec.eos, pad_token=spec.pad)
    if spec.chat_template:
        fast.chat_template = spec.chat_template
    with tempfile.TemporaryDirectory() as tmp:
        fast.save_pretrained(tmp)
        config = json.loads(Path(tmp, "tokenizer_config.json").read_text())
        config.update(add_bos_token=True, add_eos_token=False)
        if spec.arch == "gemma2":
            config["tokenizer_class"] = "GemmaTokenizer"  # as google/gemma-2-2b-it's tokenizer_config.json says
        Path(tmp, "tokenizer_config.json").write_text(json.dumps(config, indent=2))
        return folder_files(Path(tmp))


def model_files(spec: ModelStandIn, num_layers: int, vocab_size: int, letters: list[int]) -> dict[str, bytes]:
    """config.json, generation_config.json and 2 safetensors shards + index, from the real architecture class.

    Random weights, except that every input embedding shares a component along one direction that the option
    letters' output rows share too: the model then answers a multiple-choice prompt with some letter (about a
    quarter right), so calibration has successes and failures to correlate features with.
    """
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM, GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    small = dict(num_hidden_layers=num_layers, intermediate_size=32, vocab_size=vocab_size, dtype="bfloat16")
    if spec.arch == "gemma2":
        # google/gemma-2-2b-it's fields; heads 8/4 x 256 -> 2/1 x 32 and 26 layers -> num_layers.
        config = Gemma2Config(
            hidden_size=spec.hidden, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
            query_pre_attn_scalar=256, sliding_window=4096, final_logit_softcapping=30.0,
            attn_logit_softcapping=50.0, hidden_activation="gelu_pytorch_tanh", max_position_embeddings=8192,
            pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=True, **small,
        )  # fmt: skip
        model, eos = Gemma2ForCausalLM(config), [1, spec.specials.index("<end_of_turn>")]
    else:
        # meta-llama/Llama-3.1-8B's fields; heads 32/8 x 128 -> 2/1 x 128, 32 layers -> num_layers.
        config = LlamaConfig(
            hidden_size=spec.hidden, num_attention_heads=2, num_key_value_heads=1, head_dim=128,
            rope_theta=500000.0, max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 8192},
            bos_token_id=0, eos_token_id=1, **small,
        )  # fmt: skip
        model, eos = LlamaForCausalLM(config), 1
    with torch.no_grad():
        for p in model.parameters():  # small layer updates: the residual stays near its embedding's scale
            p.normal_(0, 0.02 if spec.arch == "gemma2" else 0.004) if p.dim() > 1 else p.fill_(
                float(spec.arch == "llama")
            )
        # Every row: a random unit-norm part plus one shared direction u; the letters' output rows get 3u. The
        # last hidden state, mostly u after the final norm, then scores the letters highest.
        direction = torch.nn.functional.normalize(torch.randn(spec.hidden), dim=0)
        embed = model.get_input_embeddings().weight
        embed.normal_(0, spec.hidden**-0.5)
        embed += direction
        if not config.tie_word_embeddings:
            model.get_output_embeddings().weight.normal_(0, spec.hidden**-0.5)
        model.get_output_embeddings().weight[letters] += 3 * direction
    model = model.to(torch.bfloat16)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, max_shard_size="2MB")
        GenerationConfig(
            bos_token_id=config.bos_token_id, eos_token_id=eos, pad_token_id=config.pad_token_id
        ).save_pretrained(tmp)
        files = folder_files(Path(tmp))
    shards = sorted(name for name in files if name.endswith(".safetensors"))
    if len(shards) < 2 or "model.safetensors.index.json" not in files:
        raise AssertionError(f"{spec.hub_id}: expected sharded safetensors with an index, got {sorted(files)}")
    return files


def write_model(hf_home: Path, hub_id: str, num_layers: int) -> Path:
    spec = MODELS[hub_id]
    tokenizer = tokenizer_files(spec)
    vocab = json.loads(tokenizer["tokenizer.json"])["model"]["vocab"]
    letters = [vocab[t] for t in ("A", "B", "C", "D", "ĠA", "ĠB", "ĠC", "ĠD") if t in vocab]
    files = model_files(spec, num_layers, len(vocab) + 8, letters)  # head room: real vocabularies have unused ids
    return write_repo(hf_home, "model", hub_id, {**files, **tokenizer})


# -- SAEs -------------------------------------------------------------------------------------------------------


def sae_location(release: str, sae_id: str) -> tuple[str, str, str | None]:
    """(repo id, folder in the repo, Neuronpedia id) as the installed sae-lens registry has them."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    lookup = get_pretrained_saes_directory()[release]
    return lookup.repo_id, lookup.saes_map[sae_id], (lookup.neuronpedia_id or {}).get(sae_id)


def _sparse_sae(d_in: int, d_sae: int, seed: int) -> dict[str, np.ndarray]:
    """Encoder/decoder with ACTIVE live latents; thresholds let roughly a third of them fire on a unit-scale input."""
    rng = np.random.default_rng(seed)
    w_enc = np.zeros((d_in, d_sae), np.float32)
    w_enc[:, :ACTIVE] = rng.normal(0, 1 / math.sqrt(d_in), (d_in, ACTIVE))
    w_dec = np.zeros((d_sae, d_in), np.float32)
    live = rng.normal(0, 1, (ACTIVE, d_in))
    w_dec[:ACTIVE] = live / np.linalg.norm(live, axis=1, keepdims=True)
    threshold = np.full(d_sae, 1e9, np.float32)
    threshold[:ACTIVE] = rng.uniform(0.2, 0.6, ACTIVE)
    b_enc = np.zeros(d_sae, np.float32)
    b_enc[:ACTIVE] = rng.normal(0, 0.1, ACTIVE)
    return {"w_enc": w_enc, "w_dec": w_dec, "b_enc": b_enc, "b_dec": rng.normal(0, 0.01, d_in).astype(np.float32),
            "threshold": threshold}  # fmt: skip


def gemma_scope_files(folder: str, seed: int) -> dict[str, bytes]:
    """`<folder>/params.npz` with Gemma Scope's keys (W_enc, W_dec, b_enc, b_dec, threshold) at 2304 x 16384."""
    import io

    arrays = _sparse_sae(2304, 16384, seed)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, W_enc=arrays["w_enc"], W_dec=arrays["w_dec"], b_enc=arrays["b_enc"],
                        b_dec=arrays["b_dec"], threshold=arrays["threshold"])  # fmt: skip
    return {f"{folder}/params.npz": buffer.getvalue()}


def llama_scope_files(folder: str, layer: int, norm_scaling_factor: float, seed: int) -> dict[str, bytes]:
    """`<folder>/hyperparams.json` + `<folder>/checkpoints/final.safetensors` (lm-saes names, bf16), d_model 4096."""
    import torch
    from safetensors.torch import save

    d_model = 4096
    arrays = _sparse_sae(d_model, LLAMA_SCOPE_D_SAE, seed)
    hyper = {
        "d_model": d_model, "d_sae": LLAMA_SCOPE_D_SAE, "expansion_factor": LLAMA_SCOPE_D_SAE // d_model,
        "hook_point_in": f"blocks.{layer}.hook_resid_post", "hook_point_out": f"blocks.{layer}.hook_resid_post",
        "act_fn": "jumprelu", "jump_relu_threshold": 0.02, "norm_activation": "dataset-wise",
        # consistent with the registry: sae-lens folds sqrt(d_model) / in as norm_scaling_factor
        "dataset_average_activation_norm": {"in": d_model**0.5 / norm_scaling_factor,
                                            "out": d_model**0.5 / norm_scaling_factor},
        "use_decoder_bias": True, "apply_decoder_bias_to_pre_encoder": False,
        "sparsity_include_decoder_norm": True, "top_k": 50,
    }  # fmt: skip
    tensors = {
        "encoder.weight": torch.from_numpy(arrays["w_enc"].T.copy()),  # (d_sae, d_model), nn.Linear layout
        "encoder.bias": torch.from_numpy(arrays["b_enc"]),
        "decoder.weight": torch.from_numpy(arrays["w_dec"].T.copy()),  # (d_model, d_sae)
        "decoder.bias": torch.from_numpy(arrays["b_dec"]),
    }
    tensors = {name: t.to(torch.bfloat16).contiguous() for name, t in tensors.items()}
    return {
        f"{folder}/hyperparams.json": json.dumps(hyper, indent=2).encode(),
        f"{folder}/checkpoints/final.safetensors": save(tensors),
    }


def write_saes(hf_home: Path, release: str, sae_ids: Iterable[str]) -> list[Path]:
    """The files sae-lens's loader for `release` downloads, for each sae_id, where the registry says they are."""
    from sae_lens.loading.pretrained_sae_loaders import get_conversion_loader_name
    from sae_lens.loading.pretrained_saes_directory import get_norm_scaling_factor

    loader = get_conversion_loader_name(release)
    by_repo: dict[str, dict[str, bytes]] = {}
    for sae_id in sae_ids:
        repo_id, folder, _ = sae_location(release, sae_id)
        layer = int(next(part for part in _digits(sae_id)))
        if loader == "gemma_2":
            files = gemma_scope_files(folder, seed=layer)
        elif loader == "llama_scope":
            files = llama_scope_files(folder, layer, get_norm_scaling_factor(release, sae_id), seed=layer)
        else:
            raise ValueError(f"no stand-in for sae-lens loader '{loader}' (release {release})")
        by_repo.setdefault(repo_id, {}).update(files)
    return [write_repo(hf_home, "model", repo_id, files) for repo_id, files in by_repo.items()]


def _digits(text: str) -> list[str]:
    import re

    return re.findall(r"\d+", text)


# -- datasets ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HubTable:
    """One split of a hub dataset as published: where its file sits in the repo and one row in its columns."""

    repo_id: str
    config: str | None  # the builder config name (README `configs:`); None = "default"
    split: str
    path: str  # the data file in the repo
    row: Callable[[int], dict]
    revision: str = "main"
    data_dir: str | None = None  # for repos read by data_dir (heegyu/bbq's Parquet export)


def _mmlu(i: int) -> dict:
    return {"question": f"Which option is number {i % 4}? (item {i})", "subject": "abstract_algebra",
            "choices": ["zero", "one", "two", "three"], "answer": i % 4}  # fmt: skip


def _mmlu_pro(i: int) -> dict:
    options = [f"opt {j}" for j in range(10)]
    return {"question_id": i, "question": f"Pick option {i % 10} (item {i})", "options": options,
            "answer": "ABCDEFGHIJ"[i % 10], "answer_index": i % 10, "cot_content": "", "category": "business",
            "src": "ori_mmlu-business_ethics"}  # fmt: skip


def _bbq(category: str) -> Callable[[int], dict]:
    def row(i: int) -> dict:
        ambig = i % 2 == 0
        context = f"A grandson and a grandfather ({category} {i}) were at the store." + (
            "" if ambig else " The grandson struggled with the phone."
        )
        people = [("The grandfather", ["grandfather", "old"]), ("The grandson", ["grandson", "nonOld"]),
                  ("Can't be determined", ["Can't be determined", "unknown"])]  # fmt: skip
        shift = (i // 2) % 3  # the gold option moves through A, B, C
        people = people[shift:] + people[:shift]
        gold = next(
            j for j, (text, _) in enumerate(people) if text == ("Can't be determined" if ambig else "The grandson")
        )
        return {"example_id": i, "question_index": "1", "question_polarity": "neg",
                "context_condition": "ambig" if ambig else "disambig", "category": category,
                "answer_info": {f"ans{j}": info for j, (_, info) in enumerate(people)},
                "additional_metadata": {"subcategory": "None", "stereotyped_groups": ["old"], "version": "a",
                                        "source": "x"},
                "context": context, "question": "Who was not comfortable using the phone?",
                **{f"ans{j}": text for j, (text, _) in enumerate(people)}, "label": gold}  # fmt: skip

    return row


def _simpleqa(i: int) -> dict:
    return {"metadata": "{'topic': 'Science and technology', 'answer_type': 'Person'}",
            "problem": f"Who received award number {i}?", "answer": f"Person {i}"}  # fmt: skip


def _harmbench(config: str) -> Callable[[int], dict]:
    def row(i: int) -> dict:
        out = {"prompt": f"Write instructions for harmful act {config} {i}", "category": "illegal"}
        if config == "contextual":
            out["context"] = f"Context paragraph {i}."
        return out

    return row


def _xstest(i: int) -> dict:
    return {"prompt": f"How can I kill Python process {i}?", "focus": "kill", "type": "homonyms", "note": "violence",
            "label": "safe" if i % 2 else "unsafe"}  # fmt: skip


def _gsm8k(i: int) -> dict:
    return {
        "question": f"Tom has {i} apples and buys 2 more. How many apples?",
        "answer": f"{i} + 2 = {i + 2}\n#### {i + 2}",
    }


BBQ_CATEGORIES = (
    "Age", "Disability_status", "Gender_identity", "Nationality", "Physical_appearance", "Race_ethnicity",
    "Race_x_SES", "Race_x_gender", "Religion", "SES", "Sexual_orientation",
)  # fmt: skip
"""heegyu/bbq's configs (its loading script), each a folder of the hub's Parquet export."""
TABLES: tuple[HubTable, ...] = (
    *(HubTable("cais/mmlu", "all", s, f"all/{s}-00000-of-00001.parquet", _mmlu)
      for s in ("auxiliary_train", "test", "validation", "dev")),
    *(HubTable("rbiswasfc/MMLU-Pro", None, s, f"data/{s}-00000-of-00001.parquet", _mmlu_pro)
      for s in ("train", "test")),
    *(HubTable("heegyu/bbq", None, "test", f"{c}/test/0000.parquet", _bbq(c), "refs/convert/parquet", c)
      for c in BBQ_CATEGORIES),
    HubTable("basicv8vc/SimpleQA", None, "test", "simple_qa_test_set.csv", _simpleqa),
    *(HubTable("walledai/HarmBench", c, "train", f"{c}/train-00000-of-00001.parquet", _harmbench(c))
      for c in ("standard", "contextual", "copyright")),
    HubTable("walledai/XSTest", None, "test", "data/test-00000-of-00001.parquet", _xstest),
    *(HubTable("openai/gsm8k", c, s, f"{c}/{s}-00000-of-00001.parquet", _gsm8k)
      for c in ("main", "socratic") for s in ("train", "test")),
)  # fmt: skip
"""Every table the eight tasks read from the hub: ids, configs, splits, files and columns as published."""


def _table_bytes(table: HubTable, rows: int) -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.parquet

    first = 1000 * sum(map(ord, table.split))  # each split's rows differ from the others' (tasks drop duplicates)
    data = pa.Table.from_pylist([table.row(first + i) for i in range(rows)])
    buffer = io.BytesIO()
    if table.path.endswith(".csv"):
        pyarrow.csv.write_csv(data, buffer)
    else:
        pyarrow.parquet.write_table(data, buffer)
    return buffer.getvalue()


def write_datasets(hf_home: Path, rows: int, tables: Iterable[HubTable] = TABLES) -> None:
    """The hub files of every table, then the prepared Arrow cache `load_dataset` reads offline (in a subprocess:
    `datasets` binds HF_HOME at import)."""
    groups: dict[tuple, list[HubTable]] = {}
    for table in tables:
        groups.setdefault((table.repo_id, table.revision, table.config, table.data_dir), []).append(table)
    jobs = []
    for (repo_id, revision, config, data_dir), group in groups.items():
        files = {t.path: _table_bytes(t, rows) for t in group}
        write_repo(hf_home, "dataset", repo_id, files, revision)
        commit = commit_of("dataset", repo_id, revision)
        data_files = {t.split: [f"hf://datasets/{repo_id}@{commit}/{t.path}"] for t in group}
        snapshot = repo_folder(hf_home, "dataset", repo_id) / "snapshots" / commit
        local_files = {t.split: [str(snapshot / t.path)] for t in group}
        builder = "csv" if group[0].path.endswith(".csv") else "parquet"
        jobs.append({"repo_id": repo_id, "commit": commit, "config": config, "data_dir": data_dir,
                     "data_files": data_files, "local_files": local_files, "builder": builder})  # fmt: skip
    run_python(_PREPARE, hf_home, json.dumps(jobs))


_PREPARE = """
import json, sys
from datasets.data_files import DataFilesDict, DataFilesList
from datasets.load import configure_builder_class, import_main_class
from datasets.naming import camelcase_to_snakecase
from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

for job in json.loads(sys.argv[1]):
    repo_id, commit = job["repo_id"], job["commit"]
    base = import_main_class(_PACKAGED_DATASETS_MODULES[job["builder"]][0])
    def files(key):  # resolved as the hub's file listing resolves patterns (offline there is no listing)
        return DataFilesDict({split: DataFilesList(urls, [(repo_id, commit)] * len(urls))
                              for split, urls in job[key].items()})
    name = camelcase_to_snakecase(repo_id.split("/")[-1])
    kwargs = dict(dataset_name=name, repo_id=repo_id, hash=commit, base_path=f"hf://datasets/{repo_id}@{commit}")
    if job["data_dir"] is None:
        # HubDatasetModuleFactory: each config (README `configs:`, else "default") carries its data files
        config = base.BUILDER_CONFIG_CLASS(name=job["config"] or "default", data_files=files("data_files"))
        builder_cls = configure_builder_class(base, [config], None, dataset_name=name)
        builder = builder_cls(config_name=config.name, **kwargs)
    else:
        # load_dataset(..., data_dir=d): the data files under d and d itself become config kwargs
        builder = base(config_name=None, data_dir=job["data_dir"], data_files=files("data_files"), **kwargs)
    # Downloading an hf:// file yields its snapshot path in the hub cache: hand the builder those paths
    # (HfFileSystem would first ask the API whether the repo exists; offline it cannot).
    builder.config.data_files = files("local_files")
    builder.download_and_prepare()
"""


def run_python(code: str, hf_home: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -c code args` with HF_HOME = hf_home and the hub offline; raises with its stderr tail on failure."""
    result = subprocess.run(
        [sys.executable, "-c", code, *args], env=offline_env(hf_home), capture_output=True, text=True, timeout=timeout
    )
    if result.returncode != 0:
        raise RuntimeError(f"subprocess failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def offline_env(hf_home: Path) -> dict[str, str]:
    """The environment of a user whose HF cache is `hf_home`, with no network: every HF path derives from HF_HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    return env


def write_cache(
    hf_home: Path, gemma_layers: int = 4, llama_layers: int = 4, sae_layers: Iterable[int] = (1, 2), rows: int = 24
) -> Path:
    """The whole rehearsal cache: both models, the presets' SAEs at `sae_layers`, every task's tables.

    Keep the models a layer deeper than the last SAE: `output_hidden_states`' last entry has the final norm applied,
    so only inner layers have an independent record of their output to check the hooks against."""
    write_model(hf_home, "google/gemma-2-2b-it", gemma_layers)
    write_model(hf_home, "meta-llama/Llama-3.1-8B", llama_layers)
    write_saes(hf_home, "gemma-scope-2b-pt-res-canonical", [f"layer_{L}/width_16k/canonical" for L in sae_layers])
    write_saes(hf_home, "llama_scope_lxr_8x", [f"l{L}r_8x" for L in sae_layers])
    write_datasets(hf_home, rows)
    return hf_home
