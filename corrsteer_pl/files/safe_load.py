"""Reading checkpoints without running code: weights-only loading, and one line for a file that is not ours.

`torch.load` without weights-only loading unpickles arbitrary objects, and a pickle can call any function while it
loads (`os.system` through `__reduce__`). Nothing in corrsteer-pl loads that way: Lightning checkpoints (resume only)
are read by `check_ckpt_path` (before LightningCLI reads the file's hyperparameters into the config) and by
`SafeCheckpointIO`, both passing `weights_only=True` explicitly (neither `--weights_only false` nor
`TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD` can turn it off); everything else is JSON or safetensors.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

CKPT_FLAG = "--ckpt_path"
CKPT_KEYWORDS = ("last", "best", "hpc", "registry")  # what Lightning resolves itself, through SafeCheckpointIO


def load_checkpoint(path: str | Path, flag: str, fix: str) -> dict[str, Any]:
    """The checkpoint at `path` as plain tensors and containers (`torch.load(weights_only=True)`), or one line naming
    `flag`, what the file is and `fix` (what to pass instead) for a missing, corrupt, unsafe or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{flag}: no checkpoint at {path}; {fix}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        culprit = _culprit(err)
        if culprit is None:
            raise ValueError(
                f"{flag}: {path} is not a PyTorch checkpoint (corrupt, or another format: {_detail(err)}); {fix}"
            ) from None
        raise ValueError(
            f"{flag}: {path} holds pickled Python objects ({culprit}) that weights-only loading refuses, so nothing "
            f"in it was run; it was not written by corrsteer-pl, or was tampered with: {fix}"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as err:
        raise ValueError(
            f"{flag}: {path} is not a readable PyTorch checkpoint (corrupt or truncated: {_first(err)}); {fix}"
        ) from None
    if not isinstance(state, dict):
        raise ValueError(f"{flag}: {path} holds a {type(state).__name__}, not a checkpoint's dict; {fix}")
    return state


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, reading `--ckpt_path` weights-only whatever `weights_only` it is asked for, with
    one line for a file that is missing, corrupt, unsafe or not a checkpoint (Lightning's own errors are tracebacks
    whose advice is to unpickle)."""

    def __init__(self, fix: str) -> None:
        """
        Args:
            fix: what to pass to --ckpt_path instead, said in every error.
        """
        self.fix = fix

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        state = load_checkpoint(path, CKPT_FLAG, self.fix)
        if "state_dict" not in state or "pytorch-lightning_version" not in state:
            raise ValueError(f"{CKPT_FLAG}: {path} is not a Lightning checkpoint (no state_dict/version); {self.fix}")
        return state


def check_ckpt_path(config: Any, key: str, what: str, fix: str) -> None:
    """Reads a LightningCLI's `--ckpt_path` file weights-only and refuses, in one line, one without `key` (the mark
    of `what`) before LightningCLI merges the file's hyperparameters into the config (a foreign file's would end in a
    parser dump; its own read of a bad file in a traceback). Keywords such as `last` are left to SafeCheckpointIO."""
    subcommand = config.get("subcommand")
    path = config[subcommand].get("ckpt_path") if subcommand else None
    if path is None or str(path) in CKPT_KEYWORDS or str(path).startswith("registry:"):
        return
    state = SafeCheckpointIO(fix).load_checkpoint(path)
    if key not in state:
        raise ValueError(f"{CKPT_FLAG}: {path} is not {what} (another project's, or an older corrsteer-pl's); {fix}")


def with_safe_checkpoint_io(plugins: Any, fix: str) -> list[Any]:
    """`--trainer.plugins` with SafeCheckpointIO added; another checkpoint IO is refused, naming the flag."""
    given = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    from lightning.fabric.plugins import CheckpointIO

    if any(isinstance(p, CheckpointIO) for p in given):
        raise ValueError(
            "--trainer.plugins: a checkpoint IO plugin would replace corrsteer-pl's weights-only loader; remove it"
        )
    return [*given, SafeCheckpointIO(fix)]


def _first(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0].split(". ")[0].rstrip(".") if lines else type(err).__name__


def _detail(err: BaseException) -> str:
    """The weights-only unpickler's own reason ("Unsupported operand 149"), without torch's advice to unpickle."""
    lines = [line.strip() for line in str(err).splitlines()]
    for i, line in enumerate(lines):
        if "WeightsUnpickler error:" in line:
            rest = line.split("WeightsUnpickler error:", 1)[1].strip() or next((x for x in lines[i + 1 :] if x), "")
            return rest.rstrip(".")
    return _first(err)


def _culprit(err: BaseException) -> str | None:
    """The refused global ("GLOBAL posix.system") when torch's message names one: a pickle that imports code."""
    words = str(err).split()
    return f"GLOBAL {words[words.index('GLOBAL') + 1]}" if "GLOBAL" in words[:-1] else None
