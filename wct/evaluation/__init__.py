"""Evaluation of loaded models: perplexity on text corpora (``perplexity``)."""
