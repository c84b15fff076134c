"""`python -m corrsteer_pl.finetune fit --config configs/finetune.yaml` (LoRA) or `configs/finetune_full.yaml`."""

from corrsteer_pl.finetune.cli import main

main()
