"""The Lightning glue behind `train.py`: the LightningModule, the DataModule, the CLI, resume identity, DDP."""
