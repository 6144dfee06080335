"""Training: the LightningModule, DataModule, callbacks, base caching and one training run of ``python -m wct.train``."""
