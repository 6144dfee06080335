"""Serve a packed base (and its weak-column deltas) over an OpenAI-compatible HTTP API (docs/serving.md).

    python -m wct.serve model.quantized=outputs/quantized/smollm2-135m-owq-w4-t4.01 deltas=outputs/deltas
    python -m wct.serve model.name=outputs/train/.../export-last port=0      # a merged export, any free port

Routes: ``/v1/chat/completions``, ``/v1/completions`` (streaming with ``stream: true``), ``/v1/models`` (the base and
every delta, by name), ``/health``, ``POST /v1/deltas/reload`` (load deltas added to the folder). A request's
``model`` picks its delta; one batch mixes deltas. SIGTERM drains the requests in flight and exits 0.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from wct.config import CONF_DIR, ServeApp, to_app
from wct.errors import cli_errors


@cli_errors
def run(cfg: DictConfig) -> None:
    from wct.serving.api import Limits
    from wct.serving.service import load_service

    app = to_app(cfg, ServeApp)
    limits = Limits(app.max_prompt_tokens, app.max_tokens, app.default_max_tokens)
    service = load_service(app.model, app.deltas, app.name, app.device, app.kernel, limits, app.max_batch,
                           app.max_wait_ms, app.max_queue, app.watch_s)
    url = service.bind(app.host, app.port)
    for line in service.summary():
        print(line, flush=True)
    print(f"serving on {url} (OpenAI API at {url}/v1; SIGTERM or Ctrl-C drains and stops)", flush=True)
    service.run(app.drain_timeout_s, app.log_level)
    print("drained; stopped", flush=True)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="serve")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
