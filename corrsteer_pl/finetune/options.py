"""The fine-tuning baseline's options (--model.method, --model.lora.*, --model.optimizer.*) and where each method's
outputs go under --trainer.default_root_dir."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from peft import LoraConfig

Method = Literal["full", "lora"]
"""`full`: AdamW on every weight of the model (the paper's and the reference code's baseline); `lora`: AdamW on LoRA
adapters only (--model.lora), the base weights frozen."""
METHODS: tuple[str, ...] = get_args(Method)
FOLDERS: dict[str, str] = {"lora": "finetune", "full": "finetune_full"}
"""Each method's folder under --trainer.default_root_dir: its artefact, `checkpoints/` (best.ckpt, last.ckpt: resume
and the fine-tune's own test only) and `report.{json,md}`; the two methods can share a root."""
ARTEFACTS: dict[str, str] = {"lora": "adapter", "full": "model"}
"""The artefact's name inside the method's folder: what `--comparison.finetune` and `load_finetuned` take."""
BEST, LAST = "best", "last"
LLAMA_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def check_method(method: str) -> Method:
    """`method` if it is one of METHODS, else one line naming --model.method."""
    if method not in METHODS:
        raise ValueError(f"--model.method must be one of {', '.join(METHODS)}, got {method!r}")
    return method  # type: ignore[return-value]


def output_folder(root: str | Path, method: Method) -> Path:
    """<root>/finetune (LoRA) or <root>/finetune_full (full): the method's checkpoints, artefact and report."""
    return Path(root) / FOLDERS[method]


def artefact_folder(root: str | Path, method: Method) -> Path:
    """<root>/finetune/adapter (LoRA) or <root>/finetune_full/model (full): what `--comparison.finetune` takes."""
    return output_folder(root, method) / ARTEFACTS[method]


ARTEFACT_HINT = " or ".join(f"<default_root_dir>/{FOLDERS[m]}/{ARTEFACTS[m]} ({m})" for m in ("lora", "full"))
"""How error messages name the artefact folders fit writes."""


@dataclass
class LoRAOptions:
    """Where the LoRA adapters go and how large they are (--model.method lora only)."""

    r: int = 8
    """Rank of each adapter."""
    alpha: float = 16.0
    """Scaling numerator: the adapter's update is multiplied by alpha / r."""
    dropout: float = 0.05
    """Dropout on the adapter's input during training."""
    target_modules: list[str] = field(default_factory=lambda: list(LLAMA_ATTENTION))
    """Module names to adapt (Llama-family attention q/k/v/o by default); ["all-linear"] adapts every linear layer
    but the output head (other architectures name theirs differently, e.g. GPT-2's c_attn)."""
    seed: int = 0
    """Seed of the adapters' initialisation (A random, B zero), whatever else drew random numbers before."""

    def __post_init__(self) -> None:
        """Refuses out-of-range options, naming the flag."""
        if self.r < 1:
            raise ValueError(f"--model.lora.r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--model.lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError('--model.lora.target_modules is empty: name modules such as q_proj, or ["all-linear"]')

    def peft_config(self) -> LoraConfig:
        """The peft configuration of these options."""
        targets: list[str] | str = self.target_modules
        if list(targets) == ["all-linear"]:
            targets = "all-linear"
        return LoraConfig(
            r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=targets, task_type="CAUSAL_LM"
        )

    def shape(self) -> dict[str, object]:
        """What the adapters' weights mean (dropout and seed act in training only): a checkpoint must match it."""
        return {"r": self.r, "alpha": self.alpha, "target_modules": list(self.target_modules)}


@dataclass
class OptimizerOptions:
    """AdamW on the trainable weights, linear warm-up, then a constant rate; the budget is --trainer.max_steps.

    The trainable weights are the LoRA adapters (--model.method lora) or every weight of the model (full)."""

    lr: float = 5e-4
    """Learning rate after warm-up (LoRA's adapters take ~5e-4; full fine-tuning of every weight ~1e-5, the
    reference code's)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 10
    """Optimizer steps over which the learning rate rises linearly to lr (step s uses lr * (s + 1) / (warmup + 1))."""
    clip_norm: float | None = 1.0
    """Clip the trainable weights' gradient to this global L2 norm (None = no clipping)."""
    micro_batch_tokens: int = 1024
    """A batch runs forward and backward in pieces of at most this many padded tokens (one row at least), their
    gradients summed into the whole batch's: the memory of a step is bounded, its result is the same. Training keeps
    every layer's activations for the backward pass: SmolLM2 took ~2.3 MB per token at 512-token prompts (a batch of
    8 such prompts peaked at 10 GB)."""

    def __post_init__(self) -> None:
        """Refuses out-of-range options, naming the flag."""
        if self.lr <= 0:
            raise ValueError(f"--model.optimizer.lr must be positive, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"--model.optimizer.weight_decay must be >= 0, got {self.weight_decay}")
        if self.warmup_steps < 0:
            raise ValueError(f"--model.optimizer.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.clip_norm is not None and self.clip_norm <= 0:
            raise ValueError(f"--model.optimizer.clip_norm must be positive (or null), got {self.clip_norm}")
        if self.micro_batch_tokens < 1:
            raise ValueError(f"--model.optimizer.micro_batch_tokens must be >= 1, got {self.micro_batch_tokens}")
