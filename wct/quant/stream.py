"""Streaming quantization: memory O(one block), not O(model) (docs/scale.md).

The model is built on the meta device (real non-persistent buffers such as rotary tables, no weights). The tensors
outside the decoder blocks that the catch needs (embeddings, final norm) are read from the safetensors shards and
block 0's inputs are caught; then every tensor outside the blocks is written to the output straight from the
checkpoint, one at a time (a separate head is never cast to the compute dtype), and dropped. Then block by block:
its weights are read from the shards, it is quantized exactly as :func:`wct.quant.owq.quantize_model` does (the
same per-block function), its packed tensors go to the output writer (to disk, tensor by tensor) and the block
returns to the meta device. In memory at any time: one block (dense, then packed), the Hessians of its distinct
layer inputs, and the calibration activations entering and leaving it. The output is a sharded owq-pack folder
(``model-0000x-of-0000y.safetensors`` + index), written in a temporary folder and renamed into place; its tensors
are bit for bit those of ``quantize_model`` + ``save_quantized`` on the same inputs."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from wct.errors import WCTError
from wct.heap import libc_handle, release_freed_memory
from wct.io import atomic_dir
from wct.nn.owq_linear import OWQLinear
from wct.quant.blocks import find_linears, outside_blocks
from wct.checkpoint import (
    SAFETENSORS_META,
    packed_config,
    storage_form,
    write_side_files,
)
from wct.quant.config import QuantConfig
from wct.quant.owq import QuantReport, _catch, _finish, _quantize_block, _recipe, _setup, _Setup
from wct.format.shards import ShardReader, ShardWriter

SHARD_BYTES = 256 * 2**20  # output shard size (written to disk tensor by tensor: no shard waits in memory)
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
NAN_SCAN_ELEMS = 1 << 20  # elements per step of the NaN scan of a tensor written as read
PAGES = "_weight_pages"  # a linear's attribute: the MappedTensor its stored weight is a view of
MMAP_THRESHOLD = 3 * 2**19  # bytes: above the 1 MiB slab temporaries (gptq/linalg SLAB_ELEMS), below activations


def skeleton(folder: Path, dtype: torch.dtype | None) -> nn.Module:
    """The causal LM of ``folder/config.json`` with its parameters on the meta device (buffers real), in ``dtype``."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise WCTError(f"{folder} has no usable config.json ({str(e).splitlines()[0]}); streaming quantization "
                       "reads a Hugging Face model folder") from None
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()  # tied tensors are one parameter, read once
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model.to(dtype) if dtype is not None else model


def source_folder(name: str) -> Path:
    """The safetensors folder streaming reads for a ``model.name``: a local folder, or a built-in model's
    converted cache folder (SmolLM2, Gemma 3)."""
    from wct.models import CONVERTED

    if name in CONVERTED:
        return CONVERTED[name]()
    path = Path(name).expanduser()
    if not path.is_dir():
        raise WCTError(f"stream=true reads a local Hugging Face model folder with safetensors weights; "
                       f"model.name={name} is not one (save it with save_pretrained first, or use stream=false)")
    return path


def tokenizer_of(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer_config.json").is_file() else None


def _fill(model: nn.Module, names: list[str], reader: ShardReader, narrow: frozenset[str] = frozenset()) -> None:
    """Replace the meta tensors ``names`` of ``model`` by the checkpoint's, floating ones cast to the skeleton's
    dtype (as ``load_model(..., dtype)`` casts a loaded model), except those in ``narrow`` whose values the
    skeleton's dtype holds exactly: they keep the checkpoint's dtype (see :func:`widen_on_call`)."""
    for name in names:
        parent, _, leaf = name.rpartition(".")
        mod = model.get_submodule(parent)
        current = mod._parameters.get(leaf, mod._buffers.get(leaf))
        pages = reader.mapped(name) if name in narrow else None
        t = reader.get(name) if pages is None else pages.tensor
        if t.shape != current.shape:
            raise WCTError(f"{reader.folder}: {name} has shape {tuple(t.shape)} but config.json makes it "
                           f"{tuple(current.shape)}; the checkpoint belongs to another model")
        if pages is not None and t.dtype != current.dtype and _widens(current.dtype, t.dtype):
            mod.__dict__[PAGES] = pages  # only ever read through copies; widen_on_call hands its pages back
        elif t.is_floating_point() and not (name in narrow and _widens(current.dtype, t.dtype)):
            t = t.to(current.dtype)
        elif pages is not None:
            t = t.clone()  # the map is read-only and this tensor is used (and may be written) as it is
        if leaf in mod._parameters:
            mod._parameters[leaf] = nn.Parameter(t, requires_grad=current.requires_grad)
        else:
            mod._buffers[leaf] = t


def _widens(compute: torch.dtype, src: torch.dtype) -> bool:
    """Whether every ``src`` value is exactly a ``compute`` value (fp16 and bf16 in fp32, all in fp64)."""
    return compute == src or (compute in (torch.float32, torch.float64)
                              and torch.finfo(compute).bits > torch.finfo(src).bits)


def widen_on_call(layer: nn.Module, compute: torch.dtype) -> None:
    """Let ``layer`` hold its weight in a narrower dtype whose values ``compute`` holds exactly (the checkpoint's
    fp16 or bf16 in an fp32 skeleton) and compute as if it held the ``compute`` copy: each forward call swaps that
    copy in and the stored tensor back, so every product is the fp32 model's, bit for bit (docs/scale.md). When
    the stored tensor is a view of the checkpoint's file (:func:`_fill`), its pages are handed back after each
    call, so a block waiting for its solve holds none of its linear weights in memory. Widening a slab of output
    features at a time would avoid the whole copy, but its products do not have the bits of one product at every
    shape (measured: 200 x 96 in slabs of 16), so the whole weight is widened."""

    def widen(mod: nn.Module, args: tuple) -> None:
        w = mod._parameters["weight"]
        if w.dtype != compute and w.device.type != "meta":
            mod.__dict__["_stored_weight"] = w
            mod._parameters["weight"] = w.detach().to(compute)

    def restore(mod: nn.Module, args: tuple, out: Any) -> None:
        w = mod.__dict__.pop("_stored_weight", None)
        if w is not None:
            mod._parameters["weight"] = w
            pages = mod.__dict__.get(PAGES)
            if pages is not None:
                pages.release()

    layer.register_forward_pre_hook(widen)
    layer.register_forward_hook(restore)


def widen_output(embedding: nn.Embedding, compute: torch.dtype) -> None:
    """Let a plain ``nn.Embedding`` hold its table in the checkpoint's narrower dtype and cast the rows it looks
    up to ``compute``: a lookup copies rows and the cast is exact, so the output has the bits of a lookup in the
    ``compute`` table, which is never made (a 32000 x 2048 table: 250 MiB in fp32; docs/scale.md)."""
    embedding.register_forward_hook(lambda mod, args, out: out.to(compute))


def _lookup_tables(model: nn.Module, blocks: nn.ModuleList) -> dict[str, nn.Embedding]:
    """{name: embedding} outside the blocks whose output is a plain row lookup (no max_norm renormalisation, no
    subclass that scales or offsets), so :func:`widen_output` gives their exact output."""
    outside = {id(m) for top in outside_blocks(model, blocks) for m in top.modules()}
    return {n: m for n, m in model.named_modules()
            if id(m) in outside and type(m) is nn.Embedding and m.max_norm is None}


def _drop_pages(module: nn.Module) -> None:
    """Forget the file maps of ``module``'s stored weights (they are unmapped once nothing else reads them)."""
    for m in module.modules():
        m.__dict__.pop(PAGES, None)


def stored_from_file(src: torch.Tensor, compute: torch.dtype, storage: torch.dtype) -> torch.Tensor:
    """What ``save_quantized`` stores for a tensor read as ``src`` from the source checkpoint and held by the model
    in ``compute``: ``storage_form(src.to(compute))``. When ``src`` is already in the storage dtype and ``compute``
    holds it exactly, that round trip gives ``src`` back bit for bit (NaNs aside, which compare unequal), so no
    ``compute`` copy is made: a 262k x 2048 head does not pass through fp32."""
    if not src.is_floating_point():
        return storage_form(src, False, storage)
    if src.dtype == storage and _widens(compute, src.dtype) and not _has_nan(src):
        return src.contiguous()
    return storage_form(src.to(compute), False, storage)


def _has_nan(t: torch.Tensor) -> bool:
    """Whether ``t`` holds a NaN, scanned :data:`NAN_SCAN_ELEMS` at a time (a whole-tensor ``isnan`` is a byte per
    element: 0.5 GiB for a 128256 x 4096 head)."""
    flat = t.reshape(-1)
    return any(bool(flat[a:a + NAN_SCAN_ELEMS].isnan().any()) for a in range(0, flat.numel(), NAN_SCAN_ELEMS))


def _output_head(model: nn.Module) -> list[str]:
    """The name of the output embedding's weight when it is not the input embedding's: the catch does not use it,
    so streaming reads it only to write it."""
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None or inp is None or out.weight is inp.weight:
        return []
    return [n for n, p in model.named_parameters() if p is out.weight]


def _outside_state(model: nn.Module, skip: str) -> dict[str, torch.Tensor]:
    """The model's state outside the decoder blocks (names not starting with ``skip``), tied tensors once (first
    name wins, as ``save_quantized``): the modules' own tensors, meta ones included."""
    seen, state = set(), {}
    for name, t in model.state_dict(keep_vars=True).items():
        if not name.startswith(skip) and id(t) not in seen:
            seen.add(id(t))
            state[name] = t
    return state


def _stored_names(module: nn.Module, prefix: str, reader: ShardReader) -> list[str]:
    """Qualified names of ``module``'s parameters and of its buffers the checkpoint holds (tied ones once)."""
    params = [f"{prefix}{n}" for n, _ in module.named_parameters()]
    return params + [f"{prefix}{n}" for n, _ in module.named_buffers() if f"{prefix}{n}" in reader]


def block_need(block: nn.Module, stream_bytes: int) -> int:
    """Bytes one block needs on its device while quantized: its weights, one fp32 Hessian K x K per linear (all
    of a block's at once in the worst case), and the calibration activations entering and leaving it."""
    weights = sum(t.numel() * t.element_size() for t in block.parameters())
    hessians = sum(m.in_features**2 * 4 for m in block.modules() if isinstance(m, nn.Linear))
    return weights + hessians + 2 * stream_bytes


def check_fits(index: int, need: int, free: int, device: torch.device) -> None:
    """WCTError naming the block and the bytes it needs when ``need`` exceeds ``free``."""
    if need > free:
        raise WCTError(f"decoder block {index} needs about {need / 2**30:.2f} GiB on {device} (weights, Hessians "
                       f"and calibration activations) but {free / 2**30:.2f} GiB is free; use fewer or shorter "
                       "calibration windows (calib.n_samples, calib.seqlen), a larger device, or device=cpu")


def _map_large_allocations() -> None:
    """Have glibc map every allocation above :data:`MMAP_THRESHOLD` on its own and unmap it when freed.

    By default glibc raises its mmap threshold to the size of each mapped block freed (up to 32 MiB), so a block's
    weights, Hessians and products end up in the heap, where freed ones stay resident and the heap grows with depth
    (1.5B synthetic model, docs/scale.md: peak 1.02 GiB after 9 blocks and 1.23 GiB after 27 without this, 0.89-0.91
    GiB after 9 with a 5 MiB threshold). At 1.5 MiB the activations of a calibration sequence are mapped too,
    instead of leaving resident holes in the heap, while the 1 MiB slab temporaries (gptq and linalg SLAB_ELEMS,
    pack PACK_CHUNK_ELEMS) stay below it and are reused from the heap. Process-wide and kept (mallopt cannot
    restore the sliding default); a no-op where the C library has no mallopt."""
    libc = libc_handle()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def _free_bytes(device: torch.device) -> int | None:
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None


def _block_loader(setup: _Setup, model: nn.Module, reader: ShardReader) -> Callable[[int, bool], None]:
    """``visit(i, True)`` reads decoder block ``i``'s weights from the shards (one error naming the block when the
    checkpoint lacks some), ``visit(i, False)`` returns it to the meta device and hands the memory back."""

    def visit(i: int, enter: bool) -> None:
        block = setup.blocks[i]
        if not enter:
            block.to("meta")
            _drop_pages(block)
            release_freed_memory()
            return
        prefix = f"{setup.prefix}.{i}."
        names = _stored_names(block, prefix, reader)
        absent = [n for n in names if n not in reader]
        if absent:
            raise WCTError(f"{reader.folder} lacks {len(absent)} tensor(s) of decoder block {i} (e.g. {absent[0]}); "
                           "the checkpoint is incomplete or belongs to another model")
        _fill(model, names, reader, frozenset(f"{prefix}{n}.weight" for n in find_linears(block)))

    return visit


@torch.no_grad()
def quantize_streaming(
    source: str | os.PathLike,
    out: str | os.PathLike,
    calib: torch.Tensor,
    cfg: QuantConfig | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = torch.float32,
    progress: bool = True,
    select: torch.Tensor | None = None,
    selection_label: str = "select",
    max_shard_bytes: int = SHARD_BYTES,
    storage_dtype: torch.dtype = torch.float16,
    overwrite: bool = False,
    calibration: dict[str, Any] | None = None,
    **recipe: Any,
) -> QuantReport:
    """Quantize the Hugging Face folder ``source`` (safetensors, one file or shards) into the owq-pack folder
    ``out`` one decoder block at a time (module docstring). Arguments as :func:`wct.quant.owq.quantize_model`;
    ``dtype``: compute dtype of the unquantized tensors (as ``load_model``'s); ``storage_dtype`` and
    ``overwrite`` as ``save_quantized``'s ``dtype`` and ``overwrite``. The folder's tokenizer is copied when it has
    one. ``quant.budget=global`` reads every block twice (its pre-pass scores the full-precision blocks)."""
    start = time.time()
    cfg = _recipe(cfg, recipe)
    source, device = Path(source), torch.device(device or "cpu")
    if not source.is_dir():
        raise WCTError(f"{source} is not a model folder; streaming quantization reads a Hugging Face folder with "
                       "config.json and safetensors weights")
    _map_large_allocations()
    reader = ShardReader(source)
    model = skeleton(source, dtype)
    tokenizer = tokenizer_of(source)
    setup = _setup(model, calib, select, cfg)
    blocks_prefix = f"{setup.prefix}."
    outside = [n for n in _stored_names(model, "", reader) if not n.startswith(blocks_prefix)]
    missing = [n for n in outside if n not in reader]
    if missing:
        raise WCTError(f"{source} lacks {len(missing)} tensor(s) of the model its config.json builds (e.g. "
                       f"{missing[0]}); the checkpoint is incomplete or belongs to another model")
    head = _output_head(model)
    compute_dtype = next(model.parameters()).dtype
    tables = _lookup_tables(model, setup.blocks)  # they stay in the checkpoint's dtype, looked up in place
    for table in tables.values():
        widen_output(table, compute_dtype)
    narrow = frozenset(f"{n}.weight" for n in tables)
    _fill(model, [n for n in outside if n not in head], reader, narrow)
    model.tie_weights()
    model.eval()
    use_cache, model.config.use_cache = getattr(model.config, "use_cache", None), False
    for block in setup.blocks:  # linear weights stay in the checkpoint's 16 bits until solved (docs/scale.md)
        for layer in find_linears(block).values():
            widen_on_call(layer, compute_dtype)
    visit = _block_loader(setup, model, reader)
    floats: set[torch.dtype] = set()
    with atomic_dir(out, "quantized", overwrite) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes, SAFETENSORS_META)

        def write(state: dict[str, torch.Tensor], owq: tuple[str, ...]) -> None:
            for name, t in state.items():
                is_owq = name.startswith(owq) if owq else False
                t = storage_form(t, is_owq, storage_dtype)
                if t.is_floating_point() and not is_owq:
                    floats.add(t.dtype)
                writer.add(name, t)

        stream = _catch(model, setup, calib, select, cfg, device, visit)
        state = _outside_state(model, blocks_prefix)
        compute = {n: compute_dtype if n in narrow else t.dtype for n, t in state.items()}
        kept = {n: t.detach() for n, t in state.items() if n not in reader}  # buffers the checkpoint does not hold
        del state
        for mod in outside_blocks(model, setup.blocks):  # embeddings, norm and head are no longer needed in memory:
            mod.to("meta")                                # each is written from the checkpoint, one at a time
            _drop_pages(mod)
        for name in compute:  # no local keeps the last one (a 16-bit head would stay alive through every block)
            write({name: kept[name] if name in kept else stored_from_file(reader.get(name), compute[name],
                                                                          storage_dtype)}, ())
        n_weak: dict[str, int] = {}
        losses: dict[str, float] = {}
        stream_bytes = sum(t.numel() * t.element_size() for t in (stream.inps, stream.sel_inps) if t is not None)
        block_seconds = []
        for i in tqdm(range(len(setup.blocks)), desc=f"quantize {cfg.name}", unit="block", disable=not progress):
            tick = time.time()
            block, prefix = setup.blocks[i], f"{setup.prefix}.{i}."
            visit(i, True)
            free = _free_bytes(device)
            if free is not None:
                check_fits(i, block_need(block, stream_bytes), free + stream_bytes, device)
            _quantize_block(i, setup, stream, cfg, device, n_weak, losses)
            owq = tuple(f"{prefix}{n}." for n, m in block.named_modules() if isinstance(m, OWQLinear))
            write(block.state_dict(prefix=prefix), owq)
            visit(i, False)
            block_seconds.append(time.time() - tick)
        writer.close()
        report = _finish(model, setup, cfg, n_weak, losses, start, "calib" if select is None else selection_label,
                         calibration)
        report.block_seconds = block_seconds
        model.config.use_cache = use_cache
        write_side_files(model, tokenizer, tmp, packed_config(model, floats))
    return report
