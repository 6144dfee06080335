"""Baselines trained through the same pipeline as WCT: LoRA and QLoRA (peft adapters)."""

from wct.baselines.lora import METHODS, prepare_lora_model, quantize_nf4

__all__ = ["METHODS", "prepare_lora_model", "quantize_nf4"]
