"""Data: plain text for calibration and perplexity (:mod:`wct.data.text`); instruction data lives beside it."""

from wct.data.text import calibration_windows, eval_tokens, load_text

__all__ = ["calibration_windows", "eval_tokens", "load_text"]
