"""The C library's heap: handing freed memory back to the OS (glibc keeps freed heap pages resident otherwise)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap

import torch


@functools.cache
def libc_handle() -> ctypes.CDLL | None:
    """The C library, or None where it cannot be opened."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def release_freed_memory() -> None:
    """Hand the heap pages freed so far back to the OS (``malloc_trim``): glibc keeps them resident otherwise.
    Measured: streaming quantization of the 0.3B synthetic model crept 950 -> 1294 MiB over 8 blocks without it, flat
    at 688 -> 732 MiB with it (docs/scale.md); loading SmolLM2's tokenizer leaves 30 MiB of freed heap. A no-op where
    the C library has no ``malloc_trim``."""
    libc = libc_handle()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


MADV_DONTNEED = 4  # madvise advice (sys/mman.h): drop the pages from this process; clean file pages stay cached


def _file_mappings(suffix: str) -> list[tuple[int, int]]:
    """Address ranges of this process's mappings of files whose name ends with ``suffix`` (Linux /proc)."""
    try:
        lines = open("/proc/self/maps").read().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].endswith(suffix):
            lo, hi = (int(v, 16) for v in fields[0].split("-"))
            ranges.append((lo, hi))
    return ranges


HUGE_PAGE = 2 << 20  # a transparent huge page (x86-64, aarch64 with 4 KiB base pages)
ALIGN = 64  # each moved tensor starts on a cache line


def huge_page_arena(nbytes: int) -> torch.Tensor:
    """An anonymous uint8 buffer of ``nbytes`` that starts on a 2 MiB boundary and asks the kernel for transparent huge
    pages (``madvise(MADV_HUGEPAGE)``, honoured where ``/sys/kernel/mm/transparent_hugepage/enabled`` is ``always``
    or ``madvise``). Pages become resident as they are written, as with any anonymous memory.

    Why: a decode step streams every weight once per token; with 4 KiB pages each of a GEMV block's word rows (N·4
    bytes apart) is a TLB miss. Measured on the 1.5B model's layers (2 threads, DRAM): 16.6 -> 19.4 GB/s for the
    int16 GEMV (docs/kernels.md "Decode loop")."""
    arena = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # private: shared is shmem
    if hasattr(mmap, "MADV_HUGEPAGE"):
        arena.madvise(mmap.MADV_HUGEPAGE)
    buf = torch.frombuffer(arena, dtype=torch.uint8)  # keeps the mapping alive as long as a view of it lives
    start = -buf.data_ptr() % HUGE_PAGE
    return buf[start:start + nbytes]


def move_off_file_mappings(tensors: list, suffix: str = ".safetensors") -> int:
    """Replace each tensor (a ``torch.nn.Parameter`` or buffer, through ``.data``) that views a memory-mapped
    ``*.safetensors`` file by a copy in process memory — one huge-page arena (:func:`huge_page_arena`) holding them
    all — and release the mapped pages it was read from (``madvise(MADV_DONTNEED)``: clean file pages, so nothing is
    lost and the file's page cache keeps them). The values are unchanged, and tensors that shared memory share the
    copy; the resident size grows by at most one tensor at a time. Returns the bytes moved.

    Why: a decode step reads every weight once per token, and reads them faster from process memory than from the
    file mapping (measured: SmolLM2 OWQ-4.01 75-78 -> 88 tokens/s, the 1.5B synthetic model 11.1 -> 13.8;
    docs/kernels.md "Decode loop"). Only ranges inside a file mapping are released: ``madvise`` on anonymous memory
    would zero it. A no-op off Linux."""
    libc = libc_handle()
    maps = _file_mappings(suffix)
    if libc is None or not maps:
        return 0
    mapped = [t for t in tensors if t.numel() and t.is_contiguous()
              and any(lo <= t.data_ptr() and t.data_ptr() + t.nbytes <= hi for lo, hi in maps)]
    offsets, total = {}, 0  # one slot per distinct (address, dtype, shape), each rounded up to ALIGN bytes
    for t in mapped:
        if (key := (t.data_ptr(), t.dtype, t.shape)) not in offsets:
            offsets[key] = total
            total += -(-t.nbytes // ALIGN) * ALIGN
    if not offsets:
        return 0
    arena, page, done = huge_page_arena(total), 4096, {}
    for t in mapped:
        key, ptr, size = (t.data_ptr(), t.dtype, t.shape), t.data_ptr(), t.nbytes
        if key not in done:
            done[key] = arena[offsets[key]:offsets[key] + size].view(t.dtype).view(t.shape).copy_(t.data)
            start, end = -(-ptr // page) * page, (ptr + size) // page * page
            if end > start:
                libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED)
        t.data = done[key]
    return sum(t.nbytes for t in done.values())
