"""Weight matrices in transparent huge pages (Linux), for backends whose decode step streams them from host memory:
the numba backend copies there the matrices that view the model file, and the GGUF loader makes its reordered q/k
rows there (gguf_llama.py), so the engine's kept source and the model share them.

A decode step reads every weight matrix once. Memory-mapped from the model file they sit in 4 KiB pages: 131,000
pages a token for SmolLM2-135M in float32, each a TLB miss and a page-table walk while the kernels stream. Copied
once at load into anonymous memory advised MADV_HUGEPAGE, 2 MiB pages cover them. Measured on a 2-vCPU AMD EPYC
(numba backend, 2 threads, the same weights in the same process, alternating): every float32 matvec of a SmolLM2
decode step 5% faster at the best of 40 passes and 9% at the median; whole Q8_0 decode steps 12% at the median
(docs/numba.md). The copy costs the load a pass over the weights; the mapped pages are let go as each tensor is
copied (refllama/loading.py `take_weights`), so resident memory stays about one copy of the weights.

Python's `mmap` gives the anonymous memory and the advice (MADV_HUGEPAGE); NumPy arrays view it.
"""

from __future__ import annotations

import mmap
import os
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HUGE_PAGE = 2 << 20  # x86-64 and arm64 (4 KiB base pages) transparent huge page size
CHUNK = 64 << 20  # address space reserved at a time; only the pages weights are written to become resident
ALIGN = 64  # every array starts on its own cache line
MIN_BYTES = 4096  # below a page there is nothing to gain
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def available() -> bool:
    """Whether weights go into huge pages: REFLLAMA_HUGE_PAGES is not "0", MADV_HUGEPAGE exists and the kernel's
    transparent huge page setting is "always" or "madvise" (not "never")."""
    if os.environ.get("REFLLAMA_HUGE_PAGES", "1") == "0" or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        return "[never]" not in THP_SETTING.read_text()
    except OSError:
        return False


class Arena:
    """Read-only copies of arrays, packed ALIGN-aligned into chunks of anonymous memory that start on a huge page
    boundary and are advised MADV_HUGEPAGE. A chunk lives while any array in it does: the arena refers to its
    chunks' mappings weakly, so the weights of a model let go (`set_precision` replacing them) give their memory
    back. When the arena held its chunks, every set_precision of SmolLM2 F32 on the numba backend kept ~460 MiB
    more."""

    def __init__(self) -> None:
        self._chunks: list[_Chunk] = []

    def copy(self, a: np.ndarray) -> np.ndarray:
        """A read-only, C-contiguous copy of `a` in the arena (its dtype and shape)."""
        nbytes = a.nbytes
        self._chunks = [chunk for chunk in self._chunks if chunk.mapping() is not None]
        for chunk in self._chunks:  # first fit: the tail of an earlier chunk takes a later, smaller array
            region = chunk.mapping()
            if region is not None and chunk.used + nbytes <= chunk.size:
                break
        else:
            region, start, size = _reserve(max(CHUNK, nbytes))
            chunk = _Chunk(weakref.ref(region), start, size)
            self._chunks.append(chunk)
        # a view of the mapping itself: each array refers to it (not to a chunk array), which keeps it mapped
        out = np.frombuffer(region, np.uint8, nbytes, chunk.start + chunk.used).view(a.dtype).reshape(a.shape)
        out[...] = a
        out.flags.writeable = False
        chunk.used += -(-nbytes // ALIGN) * ALIGN
        return out


@dataclass
class _Chunk:
    """One of an arena's chunks: its mapping (weakly: the arrays in it keep it), where the chunk starts in the
    mapping (a huge page boundary), its size, and the bytes given out so far."""

    mapping: weakref.ref
    start: int
    size: int
    used: int = 0


def _reserve(nbytes: int) -> tuple[mmap.mmap, int, int]:
    """(mapping, start, size): `nbytes` rounded up to whole huge pages of anonymous memory, from `start` in the
    mapping, a huge page boundary (the mapping is one huge page longer, and the part before the boundary is never
    touched, so never resident)."""
    size = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
    region = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_HUGEPAGE)
    return region, -np.frombuffer(region, np.uint8).ctypes.data % HUGE_PAGE, size
