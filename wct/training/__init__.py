"""Training: the LightningModule, DataModule, callbacks and structured configs of ``python -m wct.train``."""

from wct.training.config import TrainApp
from wct.training.datamodule import InstructDataModule
from wct.training.module import TuneModule, fingerprint, prepare_wct

__all__ = ["InstructDataModule", "TrainApp", "TuneModule", "fingerprint", "prepare_wct"]
