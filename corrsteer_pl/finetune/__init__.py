"""The fine-tuning baseline: full or LoRA fine-tuning on the calibration split's gold answers, picked on validation,
reported like steering (`python -m corrsteer_pl.finetune fit --config configs/finetune.yaml`; `finetune_full.yaml`
for full fine-tuning, the paper's baseline).

- `options`: --model.method (full | lora), LoRAOptions, OptimizerOptions, where each method's outputs go;
- `data`: targets, length-bucketed resumable training batches, micro-batches, FineTuneData;
- `module`: FineTuneModule (the LightningModule: training, validation, base vs fine-tuned test, checkpoints);
- `report`: per-item scores and the base-vs-fine-tuned report;
- `artefact`: the folder `--comparison.finetune` takes (written atomically, read as JSON + safetensors only);
- `cli`: the LightningCLI (`main`).
"""

from corrsteer_pl.finetune.artefact import (
    ADAPTER_FILES,
    FULL_FILES,
    SETTINGS_FILE,
    SETTINGS_FORMAT,
    export_adapters,
    export_finetuned,
    finetuned_scores,
    load_adapters,
    load_finetuned,
    load_full,
    read_settings,
)
from corrsteer_pl.finetune.cli import FineTuneCLI, checkpoint_callbacks, main
from corrsteer_pl.finetune.data import IGNORE, FineTuneData, TrainBatches, answer_target, collate_targets, micro_batches
from corrsteer_pl.finetune.module import FineTuneModule
from corrsteer_pl.finetune.options import (
    ARTEFACTS,
    FOLDERS,
    METHODS,
    LoRAOptions,
    Method,
    OptimizerOptions,
    artefact_folder,
    output_folder,
)
from corrsteer_pl.finetune.report import ItemScores, finetune_markdown, finetune_report

__all__ = [
    "ADAPTER_FILES",
    "ARTEFACTS",
    "FOLDERS",
    "FULL_FILES",
    "IGNORE",
    "METHODS",
    "SETTINGS_FILE",
    "SETTINGS_FORMAT",
    "FineTuneCLI",
    "FineTuneData",
    "FineTuneModule",
    "finetune_markdown",
    "ItemScores",
    "LoRAOptions",
    "Method",
    "OptimizerOptions",
    "TrainBatches",
    "answer_target",
    "artefact_folder",
    "checkpoint_callbacks",
    "collate_targets",
    "export_adapters",
    "export_finetuned",
    "finetune_report",
    "finetuned_scores",
    "load_adapters",
    "load_finetuned",
    "load_full",
    "main",
    "micro_batches",
    "output_folder",
    "read_settings",
]
