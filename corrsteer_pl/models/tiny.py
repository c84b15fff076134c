"""Tiny random models, tokenizers and SAEs: the offline test bed and the `tiny` config."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from filelock import FileLock
from sae_lens import SAE, JumpReLUSAE, JumpReLUSAEConfig
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

Arch = Literal["llama", "gemma2", "qwen2", "gpt2"]

VOCAB_SIZE = 512  # BPE target; the trained vocabulary is a little smaller
_CORPUS = (
    "the quick brown fox jumps over the lazy dog. Question: which option is correct? "
    "A. red B. blue C. green D. seven. Choose one of the following options only: A, B, C, or D. "
    "Answer: even odd apple river stone cloud one two three four five six eight nine ten "
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in milliseconds; EOS = '<eos>', PAD = '<pad>', left padding."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<pad>", "<eos>", "<bos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([_CORPUS] * 20, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", bos_token="<bos>", padding_side="left"
    )


def tiny_model(arch: Arch = "llama", num_layers: int = 2, hidden: int = 64, seed: int = 0) -> PreTrainedModel:
    """A randomly initialised causal LM of the given architecture, in eval mode."""
    torch.manual_seed(seed)
    common = dict(vocab_size=len(tiny_tokenizer()), pad_token_id=0, eos_token_id=1, bos_token_id=2)
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=hidden, n_layer=num_layers, n_head=4, n_positions=256, **common))
    else:
        kw = dict(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            **common,
        )
        if arch == "llama":
            model = LlamaForCausalLM(LlamaConfig(**kw))
        elif arch == "qwen2":
            model = Qwen2ForCausalLM(Qwen2Config(**kw))
        elif arch == "gemma2":
            model = Gemma2ForCausalLM(Gemma2Config(head_dim=hidden // 4, sliding_window=64, **kw))
        else:
            raise ValueError(f"unknown tiny architecture '{arch}'; use llama, gemma2, qwen2 or gpt2")
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 1
    return model.eval()


def random_sae(d_in: int, d_sae: int, layer: int, seed: int = 0, threshold: float = 0.0) -> SAE:
    """A random JumpReLU SAE reading `blocks.{layer}.hook_resid_post`; a positive threshold makes it sparse."""
    torch.manual_seed(seed)
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae, dtype="float32", device="cpu"))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae) / d_in**0.5)
        sae.W_dec.copy_(torch.randn(d_sae, d_in) / d_in**0.5)
        sae.threshold.fill_(threshold)
    sae.cfg.metadata.hook_name = f"blocks.{layer}.hook_resid_post"
    return sae.eval()


def firing_thresholds(pre: torch.Tensor, rate: float | torch.Tensor) -> torch.Tensor:
    """Per feature, the (1 - rate) quantile of its pre-activations `pre` (positions, d_sae), interpolated linearly
    as `torch.quantile` does: the JumpReLU threshold at which it fires on about `rate` of those positions.

    `rate` is one share for every feature, or one per feature (d_sae,). `torch.quantile` would give every q for
    every feature (d_sae x d_sae values for per-feature rates), and it refuses inputs over 16M values.
    """
    q = (1 - torch.as_tensor(rate, dtype=torch.float64)).to(pre.dtype).to(pre.device)
    rank = q.expand(pre.shape[1]) * (pre.shape[0] - 1)  # (d_sae,) fractional row of each feature's quantile
    below = rank.long()
    ordered = pre.sort(dim=0).values  # (positions, d_sae)
    low = ordered.gather(0, below[None])[0]
    high = ordered.gather(0, rank.ceil().long()[None])[0]
    return low.lerp(high, rank - below)


def build_tiny_checkpoint(
    folder: str | Path,
    arch: Arch = "llama",
    num_layers: int = 2,
    hidden: int = 64,
    sae_layers: tuple[int, ...] = (0, 1),
    d_sae: int = 256,
    firing_rate: float = 0.1,
    seed: int = 0,
) -> Path:
    """Writes `model/` (HF folder with tokenizer) and `saes/layer_{L}/` (sae-lens format) once; reuses them after.

    Each SAE feature's threshold is set so that it fires on about `firing_rate` of the tiny
    model's positions over a small corpus: random SAEs with realistic sparsity.
    """
    folder = Path(folder)
    done = folder / "COMPLETE"
    if done.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(folder / ".lock"):  # processes sharing a cache (DDP ranks, test workers) build it once
        if not done.exists():
            _build(folder, arch, num_layers, hidden, sae_layers, d_sae, firing_rate, seed)
            done.touch()
    return folder


def _build(
    folder: Path, arch: Arch, num_layers: int, hidden: int, sae_layers: tuple[int, ...], d_sae: int,
    firing_rate: float, seed: int,
) -> None:  # fmt: skip
    model, tokenizer = tiny_model(arch, num_layers, hidden, seed), tiny_tokenizer()
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    activations = _layer_outputs(model, tokenizer, sae_layers)
    for layer in sae_layers:
        sae = random_sae(hidden, d_sae, layer, seed + 1 + layer)
        with torch.no_grad():
            pre = activations[layer] @ sae.W_enc  # (positions, d_sae); b_enc and b_dec are zero
            sae.threshold.copy_(firing_thresholds(pre, firing_rate).clamp_min(0))
        sae.save_model(folder / "saes" / f"layer_{layer}")


def _layer_outputs(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, layers: tuple[int, ...]) -> dict:
    """Residual-stream vectors (positions, d) after each layer, over the tokenizer's corpus."""
    from corrsteer_pl.models.hooks import LayerHooks

    seen: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    record = {layer: (lambda h, m, layer=layer: seen[layer].append(h[m])) for layer in layers}
    words = _CORPUS.split()
    texts = [" ".join(words[i : i + 12]) for i in range(0, len(words), 3)]
    with torch.no_grad(), LayerHooks(model, record, positions="all"):
        model(**tokenizer(texts, return_tensors="pt", padding=True))
    return {layer: torch.cat(seen[layer]) for layer in layers}
