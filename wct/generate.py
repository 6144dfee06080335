"""Answer a prompt with any model wct can load: a base, an owq-pack folder, an export, or a training checkpoint.

    python -m wct.generate model=smollm2-135m prompt="Name three primary colors."
    python -m wct.generate model.quantized=outputs/quantized/smollm2-135m-owq-w3-t3.01 prompt="..."
    python -m wct.generate model.name=outputs/train/.../export-last prompt="..."      # WCT or LoRA export
    python -m wct.generate ckpt_path=outputs/train/.../checkpoints/last.ckpt prompt="..." input="..."

``template``: ``alpaca`` (the training template, with ``input`` when given), ``chat`` (the tokenizer's chat
template), ``none`` (the prompt as is), or ``auto``: for a training checkpoint or an export of one, the template it
was tuned with (alpaca, or for a ``task=chat`` run its chat template), else the tokenizer's chat template when it
has one, else alpaca. Greedy unless
``do_sample=true``; stops at EOS or after ``max_new_tokens``.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from wct.config import CONF_DIR, GenerateApp, to_app
from wct.errors import cli_errors


@cli_errors
def run(cfg: DictConfig) -> str:
    from wct.generation import generate, render, resolve_template
    from wct.loading import load_for_use

    app = to_app(cfg, GenerateApp)
    loaded = load_for_use(app.model, app.ckpt_path, app.device)
    template = resolve_template(app.template, loaded.tokenizer, loaded.tuned, bool(app.input))
    text = render(loaded.tokenizer, app.prompt, app.input, template)
    answer = generate(loaded.model, loaded.tokenizer, text, app.max_new_tokens, app.do_sample, app.temperature,
                      app.top_p, app.seed, add_special_tokens=template != "chat")
    print(answer)
    return answer


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="generate")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
