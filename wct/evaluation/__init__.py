"""Evaluation of loaded models: perplexity on text corpora (``perplexity``), lm-evaluation-harness tasks
(``harness``)."""
