"""Export a training checkpoint as a deployable model, reloaded and checked before it is declared written.

    python -m wct.export ckpt_path=outputs/train/.../checkpoints/last.ckpt [out=DIR]

WCT: the trained weak columns written into the base's owq-pack folder (same tensors and size); LoRA / QLoRA: the
peft adapter, not merged. Either way the folder is reloaded and its logits must equal the in-training model's
bitwise before it appears under its final name (:mod:`wct.exporting`, docs/architecture.md §4).
"""

from __future__ import annotations

import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from wct.config import CONF_DIR, ExportApp, to_app
from wct.errors import cli_errors


@cli_errors
def run(cfg: DictConfig) -> dict:
    from wct.exporting import export_adapter, export_delta, export_wct
    from wct.runs import load_trained

    app = to_app(cfg, ExportApp)
    start = time.time()
    trained = load_trained(app.ckpt_path)
    ckpt = Path(app.ckpt_path)
    if app.format == "delta":
        meta = export_delta(trained, Path(app.out) if app.out else ckpt.parent.parent / f"delta-{ckpt.stem}.safetensors",
                            app.overwrite)
        print(f"exported the {meta['tensors']} trained tensors ({meta['trained_params']:,} parameters) of the WCT run as "
              f"a delta to {meta['path']}: {meta['bytes']:,} bytes (base {meta['base_bytes']:,}); applied to the base, "
              f"they read back bit-exactly; {time.time() - start:.1f} s")
        return meta
    out = Path(app.out) if app.out else ckpt.parent.parent / f"export-{ckpt.stem}"
    if trained.method == "wct":
        meta = export_wct(trained, out, app.overwrite)
    else:
        print(f"{trained.method}: saving the peft adapter, not a merged model (merging into a quantized base rounds "
              "the LoRA update into the base's 4-bit grid and changes the model)")
        meta = export_adapter(trained, out, app.overwrite)
    size = f"{meta['bytes']:,} bytes" + (f" (base {meta['base_bytes']:,})" if "base_bytes" in meta else "")
    print(f"exported {trained.method} model to {out}: {size}, {meta['trainable_params']:,} trained parameters; "
          f"reloaded logits equal the in-training model's (max abs diff {meta['max_abs_diff']}); "
          f"{time.time() - start:.1f} s")
    return meta


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="export")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
