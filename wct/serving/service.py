"""One served model: loaded, its deltas banked, the engine started, the app bound to a socket and run by uvicorn.

SIGTERM drains: uvicorn stops accepting connections, the engine refuses new jobs (503), every request in flight
(streams included) finishes, then the process exits 0. SIGINT (Ctrl-C) does the same, and a second one forces.
"""

from __future__ import annotations

import os
import signal
import socket
from dataclasses import dataclass, field
from pathlib import Path

from wct.delta import owq_layers
from wct.errors import WCTError
from wct.serving.api import Limits, create_app, require_serve_extra
from wct.serving.bank import DeltaBank, deltas_folder
from wct.serving.engine import Engine
from wct.serving.watch import DeltaWatch


def resident_bytes() -> int:
    """This process's resident set size (Linux /proc; 0 elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def draining_server(config, engine: Engine):
    """uvicorn's server whose SIGTERM is a graceful drain ending in exit status 0 (uvicorn by itself re-raises the
    signal after its graceful shutdown, which would end the process with -15); the engine refuses new work (503)
    from the first signal on."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame) -> None:
            engine.drain()
            if sig == signal.SIGTERM and not self.should_exit:
                self.should_exit = True
                return
            super().handle_exit(sig, frame)

    return DrainingServer(config)


@dataclass
class Service:
    """A loaded model behind the API (:func:`load_service`)."""

    engine: Engine
    limits: Limits
    deltas: str | None
    label: str
    backend: str
    refused: dict[str, str] = field(default_factory=dict)
    watch_s: float = 0.0
    sock: socket.socket | None = None

    @property
    def url(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return f"http://{host}:{port}"

    def bind(self, host: str, port: int) -> str:
        """Listen on ``host:port`` (0: a free port); returns the URL."""
        try:
            self.sock = socket.create_server((host, port), reuse_port=False)
        except OSError as e:
            raise WCTError(f"cannot listen on {host}:{port} ({e.strerror}); choose another port= (0: any free one)") \
                from None
        return self.url

    def summary(self) -> list[str]:
        bank = self.engine.bank
        lines = [f"model: {bank.names[0]} ({self.label}), device {self.engine.device}, backend {self.backend}",
                 f"deltas: {len(bank.names) - 1} from {self.deltas} ({bank.delta_bytes / 2**20:.2f} MiB)"
                 if self.deltas else "deltas: none (deltas=DIR serves weak-column fine-tunes of this base)"]
        lines += [f"  {name}" for name in bank.names[1:]]
        lines += [f"  refused {name}: {why}" for name, why in self.refused.items()]
        if self.deltas:
            lines += [f"  watching {self.deltas} every {self.watch_s:g} s for new deltas" if self.watch_s else
                      "  not watching the folder (watch_s=0); POST /v1/deltas/reload loads new files"]
        lines += [f"limits: max_batch={self.engine.max_batch} max_wait_ms={1e3 * self.engine.max_wait_s:g} "
                  f"max_queue={self.engine.max_queue} max_prompt_tokens={self.limits.max_prompt_tokens} "
                  f"max_tokens={self.limits.max_tokens}",
                  f"memory: {resident_bytes() / 2**20:.0f} MiB resident"]
        return lines

    def run(self, drain_timeout_s: float = 60.0, log_level: str = "warning") -> None:
        """Serve on the bound socket until SIGTERM/SIGINT; drains, then returns."""
        import uvicorn

        app = create_app(self.engine, self.limits, self.deltas)
        config = uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=drain_timeout_s,
                                lifespan="off")
        watch = None
        if self.deltas and self.watch_s:
            watch = DeltaWatch(self.engine.bank, self.deltas, self.watch_s, self.refused)
            watch.start()
        self.engine.start()
        try:
            draining_server(config, self.engine).run(sockets=[self.sock])
        finally:
            if watch is not None:
                watch.stop()
            self.engine.stop()


def load_service(model_cfg, deltas: str | None, name: str | None, device: str, kernel: str, limits: Limits,
                 max_batch: int, max_wait_ms: float, max_queue: int, watch_s: float = 0.0) -> Service:
    """Load the model ``model_cfg`` names (:func:`wct.loading.load_for_use`), bank its weak columns and the deltas
    in ``deltas``, and build the engine."""
    from wct.kernels import configure, resolve_backend
    from wct.loading import load_for_use

    require_serve_extra()
    if deltas:
        deltas_folder(deltas)  # before the model loads
    configure(kernel=kernel)
    loaded = load_for_use(model_cfg, None, device)
    model, tokenizer = loaded.model, loaded.tokenizer
    where = next(model.parameters()).device
    base_name = name or loaded.label
    bank = DeltaBank(model, base_name)
    refused: dict[str, str] = {}
    if deltas:
        if not bank.layers:
            raise WCTError(f"deltas={deltas}: {loaded.label} has no weak columns (not an owq-pack base); serve the "
                           "packed base the deltas were exported from (model.quantized=DIR)")
        _, refused = bank.scan(deltas)
    positions = getattr(model.config, "max_position_embeddings", None)
    limits.max_positions = positions
    engine = Engine(model, tokenizer, bank, max_batch=max_batch, max_wait_s=max_wait_ms / 1e3, max_queue=max_queue)
    backend = resolve_backend(kernel, where, 1) if owq_layers(model) else "none (no packed layers)"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return Service(engine, limits, deltas, loaded.label, backend, refused, watch_s)
