"""Streaming quantization (wct.quant.stream) and sharded owq-pack folders (wct.format.shards): bit for bit equal to
the in-memory path, reloadable, and one clear error for broken shards."""

from __future__ import annotations

import json
import shutil
import weakref
from pathlib import Path

import pytest
import torch

from wct.errors import WCTError
from wct.models import load_model, tiny_llama
from wct.checkpoint import load_quantized, save_quantized
from wct.quant.owq import quantize_model
from wct.format.shards import INDEX, SINGLE, ShardReader, ShardWriter, payload_bytes
from wct.quant.stream import block_need, check_fits, quantize_streaming


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """tiny-llama saved as a Hugging Face folder cut into several safetensors shards (fp16, like real models)."""
    folder = tmp_path_factory.mktemp("tiny") / "tiny-sharded"
    model, tok = tiny_llama()
    model.to(torch.float16).save_pretrained(folder, max_shard_size="60KB")
    tok.save_pretrained(folder)
    assert len(json.loads((folder / INDEX).read_text())["weight_map"]) > 3
    return folder


def calib_ids(n: int = 4, seq: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(1))


def assert_same_checkpoint(mem: Path, streamed: Path) -> dict[str, torch.Tensor]:
    a, b = ShardReader(mem).load_all(), ShardReader(streamed).load_all()
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    conf_a, conf_b = (json.loads((d / "config.json").read_text()) for d in (mem, streamed))
    assert conf_a == conf_b
    return b


RECIPES = [
    dict(bits=3, target_rank=4, act_order=True),
    dict(bits=4, target_rank=2, group_size=32, act_order=True, true_sequential=True),
    dict(bits=4, group_size=32, method="gptq"),
    dict(bits=3, target_bit=3.1, budget="global"),
]


@pytest.mark.parametrize("recipe", RECIPES, ids=["w3-k4-act", "w4-k2-g32-act-seq", "gptq-w4-g32", "w3-t3.1-global"])
def test_streaming_equals_in_memory_bitwise(sharded, tmp_path, recipe):
    calib = calib_ids()
    model, tok = load_model(sharded, dtype=torch.float32)
    report_mem = quantize_model(model, calib, progress=False, **recipe)
    save_quantized(model, tok, tmp_path / "mem")
    report_str = quantize_streaming(sharded, tmp_path / "str", calib, progress=False, max_shard_bytes=20_000,
                                    **recipe)
    assert (tmp_path / "str" / INDEX).is_file() and not (tmp_path / "str" / SINGLE).exists()
    shards = sorted(p.name for p in (tmp_path / "str").glob("model-*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert_same_checkpoint(tmp_path / "mem", tmp_path / "str")
    assert report_mem.n_weak == report_str.n_weak and report_mem.loss == report_str.loss
    assert (tmp_path / "str" / "tokenizer_config.json").is_file()


def test_waiting_block_holds_its_linear_weights_in_the_checkpoints_dtype(sharded, tmp_path, monkeypatch):
    """A streamed block keeps its linears' weights in fp16 (half an fp32 block) until they are solved, while its
    norms and every product run in fp32 (widen_on_call, docs/scale.md); the output stays the in-memory path's
    (test above)."""
    import wct.quant.stream as stream
    from wct.quant.blocks import find_linears

    seen = []
    quantize_block = stream._quantize_block

    def spy(i, setup, *args):
        block = setup.blocks[i]
        seen.append(({p.weight.dtype for p in find_linears(block).values()},
                     {p.dtype for n, p in block.named_parameters() if "norm" in n}))
        layer = block.mlp.down_proj
        x = torch.randn(2, 5, layer.in_features)
        widened = layer(x)  # the hooks swap in the fp32 copy for the call and the fp16 tensor back after it
        assert layer.weight.dtype == torch.float16
        assert torch.equal(widened, torch.nn.functional.linear(x, layer.weight.float()))
        return quantize_block(i, setup, *args)

    monkeypatch.setattr(stream, "_quantize_block", spy)
    quantize_streaming(sharded, tmp_path / "str", calib_ids(), progress=False, bits=4, target_rank=2)
    assert seen and all(linear == {torch.float16} and norms == {torch.float32} for linear, norms in seen)


def resident_bytes(t: torch.Tensor) -> int:
    """Resident bytes of the memory map holding ``t``'s data (/proc/self/smaps)."""
    addr, found = t.data_ptr(), False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                a, b = (int(x, 16) for x in head.split("-"))
                found = a <= addr < b
            elif found and head == "Rss:":
                return int(line.split()[1]) * 1024
    raise AssertionError("no map holds the tensor")


needs_smaps = pytest.mark.skipif(not Path("/proc/self/smaps").is_file(), reason="needs Linux /proc/self/smaps")


@needs_smaps
def test_mapped_tensor_reads_the_file_and_hands_its_pages_back(tmp_path):
    """ShardReader.mapped gives the tensor safetensors reads, as a view of the file: its pages are resident once
    read and none after release(), and a new read gives the same values (docs/scale.md)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=g).half(), "w": torch.randn(1024, 1000, generator=g).half(),
               "b": torch.randn(7, generator=g).to(torch.bfloat16)}  # "w" starts at an odd offset
    save_file(tensors, tmp_path / SINGLE)
    reader = ShardReader(tmp_path)
    for name, t in tensors.items():
        pages = reader.mapped(name)
        assert pages.tensor.dtype == t.dtype and torch.equal(pages.tensor, t)
    pages = reader.mapped("w")
    assert resident_bytes(pages.tensor) == 0  # nothing read yet
    total = float(pages.tensor.float().sum())
    assert resident_bytes(pages.tensor) >= tensors["w"].numel() * 2
    pages.release()
    assert resident_bytes(pages.tensor) == 0
    assert float(pages.tensor.float().sum()) == total and torch.equal(pages.tensor, tensors["w"])


def test_mapped_tensor_of_a_shard_cut_short_is_one_clear_error(tmp_path):
    """A shard truncated after the folder was opened (a copy still running, a full disk): one error, no bus
    error from reading past the file's end."""
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(64, 64, dtype=torch.float16)}, tmp_path / SINGLE)
    reader = ShardReader(tmp_path)
    with open(tmp_path / SINGLE, "r+b") as f:
        f.truncate((tmp_path / SINGLE).stat().st_size - 100)
    with pytest.raises(WCTError, match="corrupt: tensor w does not fit its header"):
        reader.mapped("w")


@needs_smaps
def test_waiting_linear_weights_and_the_embedding_are_views_of_the_checkpoint(sharded, tmp_path, monkeypatch):
    """A streamed block's fp16 linear weights are views of the checkpoint's file whose pages are handed back after
    each forward call (a waiting block holds none of them), and the input embedding stays the checkpoint's fp16
    table while block 0's inputs are caught, its rows widened to fp32 as they are looked up (docs/scale.md); the
    output stays the in-memory path's (test_streaming_equals_in_memory_bitwise)."""
    import wct.quant.stream as stream

    seen = {}
    quantize_block, catch = stream._quantize_block, stream._catch

    def spy_block(i, setup, *args):
        layer = setup.blocks[i].mlp.down_proj
        layer(torch.randn(2, 5, layer.in_features))
        seen.setdefault("resident", []).append(resident_bytes(layer.weight))
        seen.setdefault("mapped", []).append(stream.PAGES in layer.__dict__)
        return quantize_block(i, setup, *args)

    def spy_catch(model, *args):
        table = model.get_input_embeddings()
        ids = torch.tensor([[0, 5, 7]])
        seen["table"] = table.weight.dtype
        seen["rows"] = torch.equal(table(ids), torch.nn.functional.embedding(ids, table.weight.float()))
        return catch(model, *args)

    monkeypatch.setattr(stream, "_quantize_block", spy_block)
    monkeypatch.setattr(stream, "_catch", spy_catch)
    quantize_streaming(sharded, tmp_path / "str", calib_ids(), progress=False, bits=4, target_rank=2)
    assert seen["mapped"] == [True, True] and seen["resident"] == [0, 0]
    assert seen["table"] == torch.float16 and seen["rows"]


MALLINFO_PROBE = """
import ctypes, sys, torch
import wct.quant.stream as stream

class Info(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
first = torch.empty(6 * 2**20)
del first  # a freed 24 MiB mapping lifts glibc's sliding threshold to 24 MiB (mappings above 32 MiB do not)
if sys.argv[1] == "set":
    stream._map_large_allocations()
mapped = lambda: libc.mallinfo2().hblkhd  # bytes held in separate mappings
before = mapped()
big = torch.empty(2**19)  # 2 MiB: one sequence's MLP activations
after_big = mapped()
small = torch.empty(2**18)  # 1 MiB: a slab temporary
print(after_big - before >= 2 * 2**20, mapped() - after_big >= 2**20)
"""


def test_streaming_maps_large_allocations_on_their_own():
    """glibc's sliding mmap threshold puts freed weights and Hessians in the heap, where they stay resident
    (docs/scale.md); streaming fixes it so every allocation above 1.5 MiB is its own mapping and the 1 MiB slab
    temporaries are still served from the heap."""
    import subprocess
    import sys

    try:
        import ctypes
        ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        pytest.skip("needs glibc >= 2.33 (mallinfo2)")
    runs = {mode: subprocess.run([sys.executable, "-c", MALLINFO_PROBE, mode], capture_output=True, text=True,
                                 timeout=120) for mode in ("default", "set")}
    assert runs["default"].stdout.split() == ["False", "False"], runs["default"].stderr
    assert runs["set"].stdout.split() == ["True", "False"], runs["set"].stderr


def test_tensor_written_as_read_unless_a_nan_would_change_in_the_round_trip(monkeypatch):
    """stored_from_file gives what save_quantized stores (storage_form of the compute-dtype copy): the file's own
    tensor, no copy, when that round trip is the identity, and the round trip itself when a NaN is anywhere in
    the tensor (found by a scan in steps, the last one ragged)."""
    import wct.quant.stream as stream
    from wct.checkpoint import storage_form

    monkeypatch.setattr(stream, "NAN_SCAN_ELEMS", 7)
    src = torch.randn(5, 6, generator=torch.Generator().manual_seed(0)).half()
    same = stream.stored_from_file(src, torch.float32, torch.float16)
    assert same.data_ptr() == src.data_ptr() and torch.equal(same, storage_form(src.float(), False, torch.float16))
    src[4, 5] = float("nan")  # in the last, 2-element step
    cast = stream.stored_from_file(src, torch.float32, torch.float16)
    want = storage_form(src.float(), False, torch.float16)  # a NaN is not "lossless": save_quantized keeps fp32
    assert cast.data_ptr() != src.data_ptr() and cast.dtype == want.dtype == torch.float32
    assert torch.equal(cast.isnan(), src.isnan()) and torch.equal(cast.nan_to_num(), want.nan_to_num())


def test_untied_head_is_streamed_from_the_checkpoint_bitwise(tmp_path):
    """A separate output head is not read for the catch; it is written straight from the checkpoint (fp16 there,
    fp16 stored, no fp32 copy) and must equal what the in-memory path stores."""
    model, tok = tiny_llama()
    model.config.tie_word_embeddings = False
    untied = type(model)(model.config)
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    folder = tmp_path / "untied"
    untied.to(torch.float16).save_pretrained(folder, max_shard_size="60KB")
    tok.save_pretrained(folder)
    mem, _ = load_model(folder, dtype=torch.float32)
    quantize_model(mem, calib_ids(), progress=False, bits=4, target_rank=2)
    save_quantized(mem, tok, tmp_path / "mem")
    quantize_streaming(folder, tmp_path / "str", calib_ids(), progress=False, max_shard_bytes=20_000, bits=4,
                       target_rank=2)
    b = assert_same_checkpoint(tmp_path / "mem", tmp_path / "str")
    assert not torch.equal(b["lm_head.weight"], b["model.embed_tokens.weight"])
    assert b["lm_head.weight"].dtype == torch.float16


def test_sharded_packed_checkpoint_reloads_bitwise(sharded, tmp_path):
    quantize_streaming(sharded, tmp_path / "str", calib_ids(), progress=False, max_shard_bytes=20_000, bits=3,
                       target_rank=4)
    model, tok = load_quantized(tmp_path / "str")
    stored = ShardReader(tmp_path / "str").load_all()
    state = model.state_dict()
    for name, t in stored.items():
        assert torch.equal(state[name].to(t.dtype), t), name
    save_quantized(model, tok, tmp_path / "again", max_shard_bytes=20_000)
    again = ShardReader(tmp_path / "again").load_all()
    assert again.keys() == stored.keys() and all(torch.equal(again[n], stored[n]) for n in stored)
    save_quantized(model, tok, tmp_path / "single")  # what an export of a run on the streamed base compares
    assert (tmp_path / "single" / SINGLE).is_file()
    tensor_bytes = sum(t.numel() * t.element_size() for t in stored.values())
    assert payload_bytes(tmp_path / "single") == payload_bytes(tmp_path / "str") == tensor_bytes
    ids = calib_ids(1, 16)
    reloaded, _ = load_quantized(tmp_path / "again")
    assert torch.equal(model(ids).logits, reloaded(ids).logits)


def broken_copy(sharded: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "broken"
    shutil.copytree(sharded, folder)
    return folder


def test_missing_shard_is_one_clear_error(sharded, tmp_path):
    folder = broken_copy(sharded, tmp_path)
    victim = sorted(folder.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(WCTError, match=f"{victim.name} is missing: .* lists \\d+ tensors in it") as e:
        quantize_streaming(folder, tmp_path / "out", calib_ids(), progress=False, bits=4)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_index_naming_absent_tensors_is_one_clear_error(sharded, tmp_path):
    folder = broken_copy(sharded, tmp_path)
    index = json.loads((folder / INDEX).read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = first
    (folder / INDEX).write_text(json.dumps(index))
    with pytest.raises(WCTError, match=f"places 1 tensor\\(s\\) in {first} that it does not hold "
                                       "\\(e.g. model.layers.9.mlp.up_proj.weight\\)"):
        quantize_streaming(folder, tmp_path / "out", calib_ids(), progress=False, bits=4)
    assert not (tmp_path / "out").exists()


def test_checkpoint_lacking_a_block_tensor_leaves_no_output(sharded, tmp_path):
    folder = broken_copy(sharded, tmp_path)
    index = json.loads((folder / INDEX).read_text())
    del index["weight_map"]["model.layers.1.mlp.down_proj.weight"]
    (folder / INDEX).write_text(json.dumps(index))
    with pytest.raises(WCTError, match="lacks 1 tensor\\(s\\) of decoder block 1 \\(e.g. "
                                       "model.layers.1.mlp.down_proj.weight\\)"):
        quantize_streaming(folder, tmp_path / "out", calib_ids(), progress=False, bits=4)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_block_that_does_not_fit_names_itself():
    model, _ = tiny_llama()
    block = model.model.layers[0]
    weights = sum(p.numel() * 4 for p in block.parameters())
    hessians = 4 * (64**2 * 3 + 64**2 + 64**2 * 2 + 128**2)  # q k v o up gate (K=64), down (K=128)
    assert block_need(block, 1000) == weights + hessians + 2000
    check_fits(3, 10, 10, torch.device("cuda", 0))
    with pytest.raises(WCTError, match="decoder block 3 needs about 0.50 GiB on cuda:0 .* 0.25 GiB is free"):
        check_fits(3, 2**29, 2**28, torch.device("cuda", 0))


def test_cli_stream_gives_the_same_checkpoint_and_perplexity(sharded, tmp_path):
    import os
    import subprocess
    import sys

    text = tmp_path / "book.txt"
    text.write_text("".join(f"Line {i}: the letter came by the {i * 37 % 101}th post.\n" for i in range(200)))
    repo = Path(__file__).resolve().parents[1]
    results = {}
    for stream in ("false", "true"):
        proc = subprocess.run(
            [sys.executable, "-m", "wct.quantize", f"model.name={sharded}", "calib=local", f"calib.source={text}",
             "calib.n_samples=4", "calib.seqlen=64", f"eval.corpora=[{text}]", "eval.seqlen=64",
             "eval.max_windows=3", "quant.target_bit=null", "quant.target_rank=4", "device=cpu", f"stream={stream}",
             "progress=false", f"out={tmp_path / stream}", f"hydra.run.dir={tmp_path / ('run-' + stream)}"],
            cwd=tmp_path, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(repo)})
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[stream] = json.loads((tmp_path / f"run-{stream}" / "results.json").read_text())
    assert results["true"]["ppl"] == results["false"]["ppl"]
    a, b = ShardReader(tmp_path / "false").load_all(), ShardReader(tmp_path / "true").load_all()
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_streaming_on_cuda_equals_in_memory_on_cuda(sharded, tmp_path):
    calib, recipe = calib_ids(), RECIPES[1]
    model, tok = load_model(sharded, dtype=torch.float32)
    quantize_model(model, calib, device="cuda", progress=False, **recipe)
    save_quantized(model, tok, tmp_path / "mem")
    quantize_streaming(sharded, tmp_path / "str", calib, device="cuda", progress=False, **recipe)
    a, b = ShardReader(tmp_path / "mem").load_all(), ShardReader(tmp_path / "str").load_all()
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_shard_writer_keeps_no_tensor_and_writes_files_safetensors_reads(tmp_path):
    """Each tensor goes to disk as it is added (the writer holds no reference: an output shard never waits in
    memory); the shards are safetensors files that safetensors itself loads back exactly, every dtype wct writes."""
    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5, generator=g), "f16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(2, 2, generator=g).bfloat16(), "i32": torch.randint(-9, 9, (4, 6), dtype=torch.int32),
        "i64": torch.arange(5), "u8": torch.arange(9, dtype=torch.uint8), "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4), "strided": torch.randn(6, 4, generator=g).t(),
    }
    writer = ShardWriter(tmp_path, max_bytes=64, metadata={"format": "pt", "who": "test"})
    for name, t in tensors.items():
        own = t.clone()
        alive = weakref.ref(own)
        writer.add(name, own)
        del own
        assert alive() is None, name
    files = writer.close()
    assert len(files) > 3 and (tmp_path / INDEX).is_file()
    back: dict[str, torch.Tensor] = {}
    for f in files:
        back.update(load_file(str(f)))
    assert back.keys() == tensors.keys()
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape and torch.equal(back[name], t), name
    assert not list(tmp_path.glob(".shard-*"))  # no data files left behind


def test_shard_writer_refuses_a_shard_that_reads_back_different(tmp_path, monkeypatch):
    import wct.format.shards as shards

    copy = shards.shutil.copyfileobj

    def corrupting(src, dst, length):  # a disk that flips the last byte written
        copy(src, dst, length)
        dst.seek(-1, 2)
        last = dst.tell()
        dst.flush()
        with open(dst.name, "r+b") as f:
            f.seek(last)
            byte = f.read(1)
            f.seek(last)
            f.write(bytes([byte[0] ^ 1]))

    monkeypatch.setattr(shards.shutil, "copyfileobj", corrupting)
    writer = ShardWriter(tmp_path, max_bytes=1 << 20)
    writer.add("a", torch.arange(10, dtype=torch.int32))
    with pytest.raises(OSError, match="tensor a reads back different"):
        writer.close()
