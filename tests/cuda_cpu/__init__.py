"""The cupy backend's CUDA C kernels (backends/cuda/*.cu) compiled for the CPU with g++ and cuda_cpu.h, and
launched through ctypes: what tests/test_cupy_emulated.py runs when it executes the real kernel source.

Each module becomes one shared library with a `launch_<kernel>(dims, args)` entry per kernel, cached in
$TMPDIR/refllama-cuda-cpu under the hash of everything that goes into it.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import numpy as np

from refllama.backends import cupy_kernels as ck

HERE = Path(__file__).resolve().parent
HEADER = HERE / "cuda_cpu.h"
# -ffp-contract=off: the kernels are compiled with --fmad=false; hidden symbols: each library keeps its own state
FLAGS = ["-std=c++20", "-O1", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math", "-fvisibility=hidden", "-w"]


class LaunchError(AssertionError):
    pass


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def build(source: str, kernels: tuple[str, ...], name: str = "kernels") -> ctypes.CDLL:
    """CUDA C `source` (no #include) built for this CPU with a launch_<kernel> entry for each of `kernels`;
    compiled once per content, then loaded from the cache."""
    cxx = compiler()
    if cxx is None:
        raise FileNotFoundError("no C++ compiler (g++) to build the CUDA kernels for the CPU")
    wrappers = "".join(
        f'extern "C" __attribute__((visibility("default"))) int launch_{kernel}(const unsigned* dims, void** args) {{\n'
        f"    auto body = [](void* a) {{ cuda_cpu::call({kernel}, static_cast<void**>(a)); }};\n"
        "    return cuda_cpu::launch(dims, body, args);\n"
        "}\n"
        for kernel in kernels)
    text = (f'#include "{HEADER}"\n{source.replace("extern __shared__", "extern")}\n'
            "__attribute__((aligned(16))) unsigned char dynamic_smem[cuda_cpu::kDynamicSharedBytes];\n"
            f"{wrappers}")
    key = hashlib.sha256("\0".join([text, HEADER.read_text(), cxx, *FLAGS]).encode()).hexdigest()[:16]
    out_dir = Path(tempfile.gettempdir()) / "refllama-cuda-cpu"
    out_dir.mkdir(exist_ok=True)
    lib = out_dir / f"{name}-{key}.so"
    if not lib.exists():
        src = out_dir / f"{name}-{key}.cpp"
        src.write_text(text)
        partial = lib.with_suffix(f".{os.getpid()}.tmp")
        result = subprocess.run([cxx, *FLAGS, "-o", str(partial), str(src)], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"g++ could not build {name} for the CPU:\n{result.stderr[-4000:]}")
        partial.replace(lib)  # atomic: parallel test processes never load a half-written library
    return ctypes.CDLL(str(lib))


@cache
def library(module: str) -> ctypes.CDLL:
    """The kernels of backends/cuda/<module>.cu built for this CPU."""
    return build(ck.module_source(module), ck.MODULES[module], module)


def launch(lib: ctypes.CDLL, name: str, grid: tuple[int, ...], block: tuple[int, ...],
           args: list[tuple[bool, object]]) -> None:
    """Run kernel `name` of a library from build(). args: (is pointer, value) in parameter order; a pointer is an
    address (int, 0 for null), a scalar a NumPy scalar of the parameter's C type."""
    dims = (ctypes.c_uint * 6)(*(tuple(grid) + (1,) * (3 - len(grid))), *(tuple(block) + (1,) * (3 - len(block))))
    keep = []
    slots = (ctypes.c_void_p * max(1, len(args)))()
    for i, (pointer, value) in enumerate(args):
        if pointer:
            slots[i] = int(value)
        else:
            box = np.array([value])  # the scalar's bytes, kept alive for the call
            keep.append(box)
            slots[i] = box.ctypes.data
    status = getattr(lib, f"launch_{name}")(dims, slots)
    if status == 1:
        raise LaunchError(f"{name}: a block deadlocked (a thread left the kernel while others waited at a barrier)")
    if status:
        raise LaunchError(f"{name}: block {block} is not whole warps")
