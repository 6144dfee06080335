"""The base a training run tunes: an owq-pack folder given by ``model.quantized``, or ``model.name`` quantized on the
fly with ``quant`` on ``calib`` and cached under a hash of the three (so a rerun reuses it); LoRA baselines load
the full-precision base."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from wct.config import TrainApp
from wct.data import chat, instruct
from wct.data.embedded import TEXTS
from wct.data.text import HUB_CORPORA, bos_label, calibration_windows, resolve_bos
from wct.device import resolve_device
from wct.io import atomic_file
from wct.models import cache_dir, load_model, model_tag
from wct.quant.checkpoint import load_quantized, save_quantized
from wct.quant.owq import quantize_model
from wct.training.module import fingerprint, prepare_wct


def files_state(name: str) -> list:
    """(path, size, mtime) of the files under ``name`` when it is a local file or folder (else [])."""
    path = Path(name).expanduser()
    files = sorted(path.rglob("*")) if path.is_dir() else [path] if path.is_file() else []
    return [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]


def task_text(app: TrainApp, rows: list[dict[str, str]]) -> tuple[Path, int]:
    """(file, rows in it): the task's training rows (``rows`` without the validation split) rendered with its
    template, written once to the cache; the text that calibrates when ``calib.fallback=task`` and that chooses
    the weak columns when ``tuning.select=task``."""
    t = app.task
    train, _ = instruct.split_rows(rows, t.val_fraction, t.val_size, t.seed)
    text = (chat if t.format == "chat" else instruct).render_text(train)
    out = cache_dir() / "calib" / f"task-{hashlib.sha256(text.encode()).hexdigest()[:16]}.txt"
    if not out.is_file():
        with atomic_file(out, "w") as fh:
            fh.write(text)
    return out, len(train)


def calibration_source(app: TrainApp, data: tuple[list[dict[str, str]], str]) -> str:
    """``calib.source``, or, when it names a local file that is not here and ``calib.fallback=task``, the text of
    the task's rows ``data`` = (rows, origin) (:func:`task_text`), announced by one WARNING.

    The default calibration text (``emma``) is embedded in the package (:mod:`wct.data.embedded`)."""
    source = str(app.calib.source)
    if source in HUB_CORPORA or source in TEXTS or Path(source).expanduser().exists() or app.calib.fallback != "task":
        return source
    rows, origin = data
    path, n = task_text(app, rows)
    print(f"WARNING: calibration text {source} not found; calibrating on the task's own rows ({origin}, "
          f"{n} rows) instead. Pass calib.source=FILE for another text.")
    return str(path)


def quantized_base(app: TrainApp, data: tuple[list[dict[str, str]], str]) -> Path:
    """The owq-pack folder of ``model.name`` quantized with ``quant`` on ``calib``, made once and cached under a
    hash of the three configs (and, for local models, their files' sizes and times). ``data``: the task's
    ``(rows, origin)`` (:func:`wct.training.datamodule.task_rows`), for task calibration or selection."""
    qcfg = app.quant
    source = calibration_source(app, data)
    select = task_text(app, data[0])[0] if app.tuning.select == "task" else None
    key = {
        "model": app.model.name,
        "files": files_state(app.model.name) + files_state(source),
        "quant": asdict(app.quant),
        "calib": asdict(app.calib),
    }
    if select:  # the file's name holds the hash of the rendered rows
        key["select"] = select.name
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(app.cache_dir) if app.cache_dir else cache_dir() / "quantized"
    out = root / f"{model_tag(app.model.name)}-{qcfg.name}{'-task' if select else ''}-{digest}"
    if (out / "config.json").is_file():
        print(f"base: reusing the cached quantized model {out}")
        return out
    print(f"base: quantizing {app.model.name} with {qcfg.name} (cached afterwards in {out})")
    model, tok = load_model(app.model.name, dtype=app.model.dtype)
    c = app.calib
    bos = resolve_bos(tok, c.bos, "calib.bos")
    calib = calibration_windows(tok, source, c.n_samples, c.seqlen, c.seed, bos)
    windows = None
    if select:
        windows = calibration_windows(tok, select, c.n_samples, c.seqlen, c.seed, bos)
        print(f"base: weak columns chosen on the Hessians of {c.n_samples} x {c.seqlen} tokens of the task's rows")
    report = quantize_model(model, calib, qcfg, device=resolve_device("auto"), progress=app.progress, select=windows,
                            selection_label=f"task:{select.name}" if select else "select",
                            calibration=asdict(c) | {"source": source, "bos": bos_label(bos)})
    print(report.summary())
    try:
        save_quantized(model, tok, out)
    except OSError:  # another process (a DDP rank, a parallel trial) wrote it first
        if not (out / "config.json").is_file():
            raise
    return out


def load_base(app: TrainApp, data: tuple[list[dict[str, str]], str]):
    """``(model, tokenizer, meta)``: the model to train with only its trainable tensors requiring grad, and the
    checkpoint metadata (base name, folder, fingerprint). ``data``: the task's ``(rows, origin)``."""
    method = app.method.name
    if method == "wct":
        base_dir = Path(app.model.quantized) if app.model.quantized else quantized_base(app, data)
        model, tok = load_quantized(base_dir, dtype=app.model.dtype)
        meta = {"base": str(app.model.quantized or app.model.name), "base_dir": str(base_dir.resolve()),
                "fingerprint": fingerprint(model)}
        prepare_wct(model, app.tuning)
    else:
        from wct.baselines.lora import prepare_lora_model

        model, tok = load_model(app.model.name, dtype=app.model.dtype)
        meta = {"base": app.model.name, "base_dir": None, "fingerprint": fingerprint(model)}
        m = app.method
        targets = m.target_modules if isinstance(m.target_modules, str) else list(m.target_modules)
        model = prepare_lora_model(model, method, r=m.r, alpha=m.alpha, dropout=m.dropout, target_modules=targets)
    return model, tok, meta | {"method": method}
