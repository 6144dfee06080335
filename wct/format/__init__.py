"""The owq-pack checkpoint format in one place, below ``quant/``, ``nn/`` and ``kernels/`` (docs/owq-pack.md):
``layout`` (bit planes, codes, dequantization, stored bits, the format version), ``config`` (the
``quantization_config`` schema as transformers reads it), ``shards`` (sharded safetensors read and write),
``reference`` (the reference OWQ code's packed layout). Assembling modules from it is above: :mod:`wct.checkpoint`
(save/load of a model), :mod:`wct.hf` (transformers' loader)."""
