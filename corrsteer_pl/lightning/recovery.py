"""What a calibration checkpoint must match before it is resumed.

Statistics are sums over samples: resuming them under another model, SAE set, task, split or
batching would add samples of two different runs (or skip the wrong batches) without a trace.
A checkpoint therefore records its calibration identity, by the flag that sets each part, and a
resume with any difference is refused. Selection, scale, controls and export settings may change.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

IDENTITY_KEY = "corrsteer_calibration_identity"


def calibration_identity(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings as plain JSON values (tuples become lists, paths strings), comparable after a reload."""
    return json.loads(json.dumps(settings, sort_keys=True, default=str))


def run_identity(module: Any) -> dict[str, Any]:
    """Every setting of a CorrSteerModule's run that changes the calibration statistics, by the flag that sets it."""
    hp, data = module.hparams, module.trainer.datamodule
    return calibration_identity(
        {
            "--model.model": hp.model,
            "--model.revision": hp.revision,
            "--model.dtype": hp.dtype,
            "--model.sae_dtype": hp.sae_dtype,
            "--model.saes": sorted(spec.label() for spec in module.sae_specs),
            "--model.train_saes": asdict(module.train_saes) if module.train_saes else None,
            "--calibration.pooling": module.calibration_options.pooling,
            "--calibration.target": module.calibration_options.target,
            "--trainer.devices x --trainer.num_nodes": module.trainer.world_size,
            **{f"--data.{key}": value for key, value in data.identity().items()},
            "--data.batch_size": data.hparams.batch_size,
        }
    )


def check_same_calibration(saved: dict[str, Any] | None, current: dict[str, Any]) -> None:
    """Raises one line naming the first flag whose value differs between the checkpoint and this run."""
    if saved is None:
        raise ValueError(
            "--ckpt_path: not a calibration checkpoint of `train.py fit` (it does not say which model, SAEs and "
            "data it was calibrated on: another project's, a fine-tune's or an older corrsteer-pl's): pass "
            "<default_root_dir>/checkpoints/last.ckpt, or start afresh with a new --trainer.default_root_dir"
        )
    for flag in sorted(set(saved) | set(current)):
        before, now = saved.get(flag, "<unset>"), current.get(flag, "<unset>")
        if before != now:
            raise ValueError(
                f"cannot resume: {flag} was {json.dumps(before)} in the checkpoint and is {json.dumps(now)} now, "
                "which would mix statistics of two calibrations; resume with the original config, or start "
                "afresh with a new --trainer.default_root_dir"
            )
