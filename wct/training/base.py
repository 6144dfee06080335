"""The base a training run tunes: an owq-pack folder given by ``model.quantized``, or ``model.name`` quantized on the
fly with ``quant`` on ``calib`` (by default the task's own training rows, ``calib.source=task``) with ``tuning.k``
trainable columns per layer, cached under a hash of them (so a rerun reuses it); LoRA baselines load the
full-precision base."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import torch

from wct.config import TASK_SOURCES, TrainApp
from wct.data import chat, instruct
from wct.data.embedded import TEXTS
from wct.data.text import HUB_CORPORA, bos_label, calibration_windows, resolve_bos
from wct.device import resolve_device
from wct.errors import WCTError
from wct.io import atomic_file
from wct.models import cache_dir, load_model, model_tag
from wct.checkpoint import load_quantized, save_quantized
from wct.quant.owq import quantize_model
from wct.quant.stream import source_folder, tokenizer_of
from wct.training.module import fingerprint, prepare_wct

MIX_GENERIC = "emma"  # calib.source=mix: the generic text mixed with the task's rows (embedded)


def files_state(name: str) -> list:
    """(path, size, mtime) of the files under ``name`` when it is a local file or folder (else [])."""
    path = Path(name).expanduser()
    files = sorted(path.rglob("*")) if path.is_dir() else [path] if path.is_file() else []
    return [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]


def task_tokenizer(app: TrainApp):
    """The tokenizer of ``model.name`` without its weights where the folder has one (chat rows render with it)."""
    try:
        tok = tokenizer_of(source_folder(app.model.name))
    except WCTError:  # not a local or converted folder (tiny-llama, a hub id, a .gguf): load the model once
        tok = None
    return tok or load_model(app.model.name, dtype=app.model.dtype)[1]


def render_rows(app: TrainApp, train: list[dict]) -> str:
    """The training rows as training renders them: Alpaca prompt + response, or each conversation through the
    task's chat template (``task.template``), conversations separated by a blank line."""
    if app.task.format != "chat":
        return instruct.render_text(train)
    tok = task_tokenizer(app)
    template = chat.resolve_template(tok, app.task.template)
    return "\n\n".join(chat.render(tok, template, r["messages"], False, f"training row {i}")
                       for i, r in enumerate(train))


def task_text(app: TrainApp, rows: list[dict[str, str]]) -> tuple[Path, int]:
    """(file, rows in it): the task's training rows (``rows`` without the validation split) rendered with its
    template (:func:`render_rows`), written once to the cache; the text that calibrates when
    ``calib.source=task|mix`` (or ``calib.fallback=task`` finds no file) and that chooses the weak columns when
    ``tuning.select=task``. The validation split never enters it."""
    t = app.task
    train, _ = instruct.split_rows(rows, t.val_fraction, t.val_size, t.seed)
    text = render_rows(app, train)
    out = cache_dir() / "calib" / f"task-{hashlib.sha256(text.encode()).hexdigest()[:16]}.txt"
    if not out.is_file():
        with atomic_file(out, "w") as fh:
            fh.write(text)
    return out, len(train)


def calibration_source(app: TrainApp, data: tuple[list[dict[str, str]], str]) -> str:
    """The calibration text: ``calib.source``; for ``task`` / ``mix`` the file of the task's training rows
    (:func:`task_text`); when ``calib.source`` names a local file that is not here and ``calib.fallback=task``,
    that file too, announced by one WARNING. ``data`` = (rows, origin).

    The generic calibration text (``emma``) is embedded in the package (:mod:`wct.data.embedded`)."""
    source = str(app.calib.source)
    if source in TASK_SOURCES:
        return str(task_text(app, data[0])[0])
    if source in HUB_CORPORA or source in TEXTS or Path(source).expanduser().exists() or app.calib.fallback != "task":
        return source
    rows, origin = data
    path, n = task_text(app, rows)
    print(f"WARNING: calibration text {source} not found; calibrating on the task's own rows ({origin}, "
          f"{n} rows) instead. Pass calib.source=FILE for another text.")
    return str(path)


def source_label(app: TrainApp, source: str, origin: str, n_rows: int) -> str:
    """How the calibration text is named in ``quantization_config["calibration"]`` and the model card."""
    what = f"{app.task.name} training rows ({origin}, {n_rows} rows, {app.task.template} template; validation " \
           f"split excluded; {Path(source).name})"
    if app.calib.source == "task":
        return f"task: {what}"
    if app.calib.source == "mix":
        return f"mix: {app.calib.n_samples - app.calib.n_samples // 2} windows of {what} + " \
               f"{app.calib.n_samples // 2} of {MIX_GENERIC}"
    return source


def task_windows(app: TrainApp, tok, source: str, bos) -> torch.Tensor:
    """The calibration windows [n_samples, seqlen] of ``source`` (:func:`calibration_source`); ``calib.source=mix``
    takes half of them (rounded down) from the generic text. A task text shorter than one window is one
    WCTError naming the fix."""
    c = app.calib
    n_generic = c.n_samples // 2 if c.source == "mix" else 0
    try:
        windows = calibration_windows(tok, source, c.n_samples - n_generic, c.seqlen, c.seed, bos)
    except WCTError as e:
        if c.source not in TASK_SOURCES:
            raise
        raise WCTError(f"calib.source={c.source}: the task's training rows are too short to calibrate ({e}); lower "
                       "calib.seqlen, add rows, or use calib.source=emma") from None
    if n_generic:
        generic = calibration_windows(tok, MIX_GENERIC, n_generic, c.seqlen, c.seed, bos)
        windows = torch.cat([windows, generic])
    return windows


def quantized_base(app: TrainApp, data: tuple[list[dict[str, str]], str]) -> Path:
    """The owq-pack folder of ``model.name`` quantized with ``quant`` on ``calib`` (and ``tuning.k`` trainable
    columns per layer), made once and cached under a hash of the configs, the calibration text's file (its name
    holds the hash of the rendered rows) and, for local models, their files' sizes and times. ``data``: the task's
    ``(rows, origin)`` (:func:`wct.training.datamodule.task_rows`), for task calibration or selection."""
    qcfg = app.quant
    instruct.split_rows(data[0], app.task.val_fraction, app.task.val_size, app.task.seed)  # a training split at all
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
    if app.tuning.k:
        key["tuning_k"] = app.tuning.k
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(app.cache_dir) if app.cache_dir else cache_dir() / "quantized"
    tag = f"{'-task' if select else ''}{f'-k{app.tuning.k}' if app.tuning.k else ''}"
    out = root / f"{model_tag(app.model.name)}-{qcfg.name}{tag}-{digest}"
    if (out / "config.json").is_file():
        print(f"base: reusing the cached quantized model {out}")
        return out
    print(f"base: quantizing {app.model.name} with {qcfg.name} (cached afterwards in {out})")
    model, tok = load_model(app.model.name, dtype=app.model.dtype)
    c = app.calib
    bos = resolve_bos(tok, c.bos, "calib.bos")
    calib = task_windows(app, tok, source, bos)
    n_rows = len(instruct.split_rows(data[0], app.task.val_fraction, app.task.val_size, app.task.seed)[0])
    label = source_label(app, source, data[1], n_rows)
    print(f"base: calibrating on {c.n_samples} x {c.seqlen} tokens of {label}")
    windows = None
    if select:
        windows = calibration_windows(tok, select, c.n_samples, c.seqlen, c.seed, bos)
        print(f"base: weak columns chosen on the Hessians of {c.n_samples} x {c.seqlen} tokens of the task's rows")
    if app.tuning.k:
        print(f"base: {app.tuning.k} more trainable FP16 columns in every linear (tuning.k), chosen on the "
              f"{'task' if select or c.source in TASK_SOURCES else 'calibration'} Hessians")
    report = quantize_model(model, calib, qcfg, device=resolve_device("auto"), progress=app.progress, select=windows,
                            selection_label=f"task:{select.name}" if select else "select",
                            calibration=asdict(c) | {"source": label, "bos": bos_label(bos)}, tune_k=app.tuning.k)
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
