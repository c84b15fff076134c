"""What a calibration checkpoint must match before it is resumed.

Statistics are sums over samples: resuming them under another model, SAE set, task, split or
batching would add samples of two different runs (or skip the wrong batches) without a trace.
A checkpoint therefore records its calibration identity, by the flag that sets each part, and a
resume with any difference is refused. Selection, scale, controls and export settings may change.
"""

from __future__ import annotations

import json
from typing import Any

IDENTITY_KEY = "corrsteer_calibration_identity"


def calibration_identity(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings as plain JSON values (tuples become lists, paths strings), comparable after a reload."""
    return json.loads(json.dumps(settings, sort_keys=True, default=str))


def check_same_calibration(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Raises one line naming the first flag whose value differs between the checkpoint and this run."""
    for flag in sorted(set(saved) | set(current)):
        before, now = saved.get(flag, "<unset>"), current.get(flag, "<unset>")
        if before != now:
            raise ValueError(
                f"cannot resume: {flag} was {json.dumps(before)} in the checkpoint and is {json.dumps(now)} now, "
                "which would mix statistics of two calibrations; resume with the original config, or start "
                "afresh with a new --trainer.default_root_dir"
            )
