"""The CUDA kernels of the cupy backend, seen from the host: sources, compilation, launch plans. No CuPy import.

Everything here runs without a GPU and without CuPy, so CI tests it: assembling the sources in `cuda/`, compiling
them for any architecture (nvcc, or NVRTC through CuPy's raw bindings) with the per-kernel register and spill
report, and the decisions the backend makes before a launch (which kernel, grid, block, shared memory; how a weight
is uploaded; how an act-order weight is permuted). `backends/cupy_backend.py` does the launching.

Compilation: `module_source` splices `common.cuh` into a kernel file, so the text has no #include and compiles the
same under NVRTC (at run time) and nvcc (in CI). Options: C++17, no implicit multiply-add contraction (NumPy rounds
every product), no flush-to-zero of float32 denormals, IEEE division and square root (the compilers' defaults).
The backend compiles with NVRTC itself rather than through `cupy.RawModule(code=...)`, which appends `-ftz=true`.

    python -m refllama.backends.cupy_kernels [--compiler nvcc|nvrtc] [--arch 80,90]

compiles every module for every architecture and exits non-zero on a compile error, a register spill or local
memory use, or a kernel the backend expects that the module does not define.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from refllama.config import ActivationType
from refllama.dtypes import DataType

CUDA_DIR = Path(__file__).resolve().parent / "cuda"
COMMON = "common.cuh"

# Kernel name suffix per compute dtype (common.cuh: FOR_EACH_DTYPE).
DTYPE_SUFFIX = {DataType.F32: "f32", DataType.F64: "f64", DataType.F16: "f16", DataType.BF16: "bf16"}
SUFFIXES = tuple(DTYPE_SUFFIX.values())
ACTIVATION_CODES = {ActivationType.Silu: 0, ActivationType.Swish: 0, ActivationType.Gelu: 1,
                    ActivationType.GeluTanh: 2, ActivationType.Relu: 3}  # activation.cu

# Every entry point the backend may launch, per module (= file cuda/<module>.cu). The compile check asserts that
# each module defines exactly these.
MODULES: dict[str, tuple[str, ...]] = {
    "convert": ("bf16_to_f32", "bf16_to_f64", "f32_to_bf16", "f16_to_bf16", "bf16_to_f16"),
    "rms_norm": tuple(f"rms_norm_{s}" for s in SUFFIXES),
    "rope": tuple(f"rope_{s}" for s in SUFFIXES),
    "activation": tuple(f"gated_activation_{s}" for s in SUFFIXES),
    "gemv": tuple(f"gemv_{s}_m{mt}" for s in SUFFIXES for mt in (1, 2, 4, 8)),
    "dequant": tuple(name for s in SUFFIXES for name in
                     [f"dequant_gemv_{s}_{kind}_m{mt}" for kind in ("p4", "p8", "s8", "p4m") for mt in (1, 8)]
                     + [f"dequantize_{s}"]),
    "int8_matmul": tuple(name for s in SUFFIXES for name in
                         (f"quantize_rows_hf_{s}", f"quantize_rows_vllm_{s}", f"int8_gemv_{s}_m1",
                          f"int8_gemv_{s}_m8", f"int8_gemm_{s}")),
    "attention": tuple(name for s in SUFFIXES for name in (f"attention_decode_{s}", f"attention_combine_{s}")),
}
CI_ARCHS = ("80", "90")  # Ampere (A100) and Hopper (H100/H200)

# Launch constants mirrored from the sources (tests/test_cupy_kernels.py reads the #defines and compares).
GEMV_WARPS, GEMV_ROWS = 4, 2  # gemv.cu
DQ_WARPS = 4  # dequant.cu; rows per warp: 4 for one token, 2 for up to 8
I8_WARPS, I8_ROWS = 4, 2  # int8_matmul.cu
G_BM, G_BN = 64, 64  # int8_matmul.cu GEMM tile
ATT_MAX_CHUNKS = 8  # attention.cu: head_dim <= 256
MAX_GEMV_TOKENS = 8  # the GEMV kernels take up to 8 token rows; more is a GEMM (cuBLAS or int8_gemm)
ATTENTION_KERNEL_MAX_T = 16  # query tokens per call that use attention_decode; longer prefills use cuBLAS
SHARED_MEMORY_LIMIT = 48 * 1024  # dynamic shared memory without an opt-in attribute


# ---------------------------------------------------------------- sources and compilation


def module_source(module: str) -> str:
    """The compilable text of cuda/<module>.cu: `#include "common.cuh"` replaced by that file's text."""
    if module not in MODULES:
        raise KeyError(f"unknown kernel module {module!r} (known: {', '.join(MODULES)})")
    text = (CUDA_DIR / f"{module}.cu").read_text()
    common = (CUDA_DIR / COMMON).read_text().replace("#pragma once\n", "")
    include = f'#include "{COMMON}"'
    if text.count(include) != 1:
        raise ValueError(f"cuda/{module}.cu must include {COMMON} exactly once")
    return text.replace(include, f"// ---- {COMMON} ----\n{common}// ---- end of {COMMON} ----")


# The same semantics under both compilers (both default to IEEE division and square root; spelled out anyway).
NVRTC_OPTIONS = ("-std=c++17", "--fmad=false", "--ftz=false", "--prec-div=true", "--prec-sqrt=true")
NVCC_OPTIONS = ("-std=c++17", "-fmad=false", "-ftz=false", "-prec-div=true", "-prec-sqrt=true")


@dataclass(frozen=True)
class KernelInfo:
    """One entry point as ptxas reports it."""

    registers: int
    stack_frame: int  # bytes
    spill_stores: int
    spill_loads: int
    shared_memory: int  # static, bytes


@dataclass
class CompileResult:
    module: str
    arch: str
    compiler: str
    seconds: float
    binary: bytes = b""  # cubin
    log: str = ""
    kernels: dict[str, KernelInfo] = field(default_factory=dict)

    def problems(self) -> list[str]:
        """What the compile check fails on: spills, local memory, and entry points that differ from MODULES."""
        out = []
        for name, k in sorted(self.kernels.items()):
            if k.spill_stores or k.spill_loads:
                out.append(f"{name}: {k.spill_stores} bytes spill stores, {k.spill_loads} bytes spill loads")
            if k.stack_frame:
                out.append(f"{name}: {k.stack_frame} bytes of stack frame (local memory)")
        expected = set(MODULES[self.module])
        if missing := sorted(expected - set(self.kernels)):
            out.append(f"missing entry points: {', '.join(missing)}")
        if extra := sorted(set(self.kernels) - expected):
            out.append(f"entry points not listed in cupy_kernels.MODULES: {', '.join(extra)}")
        if re.search(r"\bwarning\b", self.log, re.IGNORECASE):
            warnings = [ln for ln in self.log.splitlines() if "warning" in ln.lower()]
            out.append("compiler warnings:\n" + "\n".join(warnings))
        return [f"{self.module} sm_{self.arch} ({self.compiler}): {p}" for p in out]


class CompileError(RuntimeError):
    pass


_ENTRY = re.compile(r"Compiling entry function '(\w+)' for 'sm_(\d+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def parse_ptxas_log(log: str) -> dict[str, KernelInfo]:
    """Per entry point: registers, stack frame, spills, static shared memory (`ptxas -v` output)."""
    kernels: dict[str, KernelInfo] = {}
    current: str | None = None
    frame = (0, 0, 0)
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            current, frame = m.group(1), (0, 0, 0)
        elif current and (m := _FRAME.search(line)):
            frame = (int(m.group(1)), int(m.group(2)), int(m.group(3)))
        elif current and (m := _USED.search(line)):
            kernels[current] = KernelInfo(int(m.group(1)), frame[0], frame[1], frame[2], int(m.group(2) or 0))
            current = None
    return kernels


def find_nvcc() -> str | None:
    """nvcc on PATH, else under CUDA_HOME / CUDA_PATH or /usr/local/cuda."""
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    return None


def compile_nvcc(module: str, arch: str, nvcc: str | None = None) -> CompileResult:
    """Compile cuda/<module>.cu to a cubin for sm_<arch> with nvcc; CompileError with the log on failure."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise CompileError("nvcc not found (PATH, CUDA_HOME, /usr/local/cuda)")
    with tempfile.TemporaryDirectory(prefix="refllama-cuda-") as tmp:
        src, out = Path(tmp) / f"{module}.cu", Path(tmp) / f"{module}.cubin"
        src.write_text(module_source(module))
        cmd = [nvcc, "-cubin", f"-arch=sm_{arch}", *NVCC_OPTIONS, "-Xptxas", "-v,-warn-spills,-warn-lmem-usage",
               "-o", str(out), str(src)]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        log = proc.stdout + proc.stderr
        if proc.returncode != 0:
            raise CompileError(f"nvcc failed on {module}.cu for sm_{arch}:\n{log}")
        return CompileResult(module, arch, "nvcc", seconds, out.read_bytes(), log, parse_ptxas_log(log))


def nvrtc_version() -> tuple[int, int]:
    from cupy.cuda import nvrtc  # CuPy's raw bindings; loading libnvrtc needs no GPU

    return tuple(nvrtc.getVersion())  # type: ignore[return-value]


def nvrtc_target(arch: str) -> tuple[str, str]:
    """(-arch option, "cubin" or "ptx"): a cubin when this NVRTC knows the architecture, else PTX for the newest one
    it knows below it (the driver then compiles the PTX for the device)."""
    from cupy.cuda import nvrtc

    supported = sorted(int(a) for a in nvrtc.getSupportedArchs())
    wanted = int(arch)
    if wanted in supported:
        return f"-arch=sm_{wanted}", "cubin"
    below = [a for a in supported if a <= wanted]
    if not below:
        raise CompileError(f"NVRTC {nvrtc_version()} supports sm_{supported[0]}..sm_{supported[-1]}, not sm_{arch}")
    return f"-arch=compute_{below[-1]}", "ptx"


def compile_nvrtc(module: str, arch: str, report: bool = True) -> CompileResult:
    """Compile cuda/<module>.cu for sm_<arch> with NVRTC (CuPy's raw bindings). `binary` is a cubin, or PTX when
    NVRTC does not know the architecture (`nvrtc_target`). CompileError with the log on failure."""
    from cupy.cuda import nvrtc

    arch_option, kind = nvrtc_target(arch)
    options = [arch_option, *NVRTC_OPTIONS]
    if report and kind == "cubin":
        options += ["--ptxas-options=-v", "--ptxas-options=-warn-spills", "--ptxas-options=-warn-lmem-usage"]
    program = nvrtc.createProgram(module_source(module), f"{module}.cu", [], [])
    start = time.perf_counter()
    try:
        try:
            nvrtc.compileProgram(program, options)
        except nvrtc.NVRTCError as e:
            raise CompileError(f"NVRTC failed on {module}.cu for sm_{arch}: {e}\n"
                               f"{nvrtc.getProgramLog(program)}") from None
        seconds = time.perf_counter() - start
        log = nvrtc.getProgramLog(program)
        binary = nvrtc.getCUBIN(program) if kind == "cubin" else nvrtc.getPTX(program)
    finally:
        nvrtc.destroyProgram(program)
    return CompileResult(module, arch, "nvrtc", seconds, binary, log, parse_ptxas_log(log))


def cache_dir() -> Path:
    """Where compiled modules are kept: $REFLLAMA_CACHE_DIR/cuda, else ~/.cache/refllama/cuda."""
    root = os.environ.get("REFLLAMA_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "refllama") / "cuda"


def cached_binary(module: str, arch: str) -> Path:
    """A compiled module for sm_<arch> (NVRTC), from the cache when its source, options and compiler match."""
    version = ".".join(map(str, nvrtc_version()))
    arch_option, kind = nvrtc_target(arch)
    key = hashlib.sha256("\0".join([module_source(module), *NVRTC_OPTIONS, arch_option, version]).encode())
    path = cache_dir() / f"{module}-sm{arch}-{key.hexdigest()[:20]}.{kind}"
    if not path.is_file():
        result = compile_nvrtc(module, arch, report=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(result.binary if isinstance(result.binary, bytes) else result.binary.encode())
        tmp.replace(path)  # atomic: concurrent processes never read a half-written file
    return path


def check_all(compiler: str = "nvcc", archs: Sequence[str] = CI_ARCHS,
              modules: Sequence[str] | None = None) -> tuple[list[CompileResult], list[str]]:
    """Compile every module for every architecture (in parallel); the results and every problem found."""
    jobs = [(m, a) for m in (modules or MODULES) for a in archs]
    compile_one = compile_nvcc if compiler == "nvcc" else compile_nvrtc
    results: list[CompileResult] = []
    problems: list[str] = []
    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        futures = [pool.submit(compile_one, m, a) for m, a in jobs]
        for future in futures:
            try:
                result = future.result()
            except CompileError as e:
                problems.append(str(e))
                continue
            results.append(result)
            problems += result.problems()
    return results, problems


# ---------------------------------------------------------------- launch plans


@dataclass(frozen=True)
class Launch:
    kernel: str
    grid: tuple[int, ...]
    block: tuple[int, ...]
    shared_mem: int = 0


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@lru_cache(maxsize=4096)
def elementwise_launch(kernel: str, n: int, block: int = 256) -> Launch:
    """A grid-stride loop over n elements: enough blocks to cover n, capped (the loop does the rest)."""
    return Launch(kernel, (max(1, min(cdiv(n, block), 1 << 16)),), (block,))


@lru_cache(maxsize=4096)
def rms_norm_launch(suffix: str, rows: int, D: int) -> Launch:
    """One block per row, about 4 elements per thread, 32..1024 threads."""
    threads = 32 * min(32, max(1, cdiv(D, 128)))
    return Launch(f"rms_norm_{suffix}", (rows,), (threads,))


def token_slots(M: int, choices: Sequence[int]) -> int:
    """The smallest compiled token-slot count that holds M tokens."""
    return next(mt for mt in choices if mt >= M)


@lru_cache(maxsize=4096)  # plans sit on every call's host path
def gemv_launch(suffix: str, itemsize: int, M: int, N: int, K: int) -> Launch | None:
    """Float GEMV for M <= 8 tokens when rows split into 16-byte vectors; None means: use cuBLAS."""
    if not 1 <= M <= MAX_GEMV_TOKENS or K % (16 // itemsize):
        return None
    mt = token_slots(M, (1, 2, 4, 8))
    return Launch(f"gemv_{suffix}_m{mt}", (cdiv(N, GEMV_WARPS * GEMV_ROWS),), (32 * GEMV_WARPS,))


@lru_cache(maxsize=4096)
def dequant_gemv_launch(suffix: str, kind: str, M: int, N: int, K: int) -> Launch | None:
    """Fused dequant GEMV ("p4", "p8", "s8", "p4m") for M <= 8 tokens and K % 32 == 0; None: dequantize, then a GEMM."""
    if not 1 <= M <= MAX_GEMV_TOKENS or K % 32:
        return None
    mt = 1 if M == 1 else 8
    rows = 4 if mt == 1 else 2
    return Launch(f"dequant_gemv_{suffix}_{kind}_m{mt}", (cdiv(N, DQ_WARPS * rows),), (32 * DQ_WARPS,))


@lru_cache(maxsize=4096)
def int8_launch(suffix: str, M: int, N: int, K: int) -> Launch:
    """W8A8 integer product: the dp4a GEMV for M <= 8 tokens and K % 16 == 0, else the tiled dp4a GEMM."""
    if M <= MAX_GEMV_TOKENS and K % 16 == 0:
        return Launch(f"int8_gemv_{suffix}_m{1 if M == 1 else 8}", (cdiv(N, I8_WARPS * I8_ROWS),), (32 * I8_WARPS,))
    return Launch(f"int8_gemm_{suffix}", (cdiv(N, G_BN), cdiv(M, G_BM)), (256,))


@dataclass(frozen=True)
class AttentionPlan:
    launch: Launch
    splits: int
    split_len: int  # cache slots per split, a multiple of tile_slots
    tile_slots: int  # TS
    heads_per_block: int  # HB


@lru_cache(maxsize=4096)
def attention_plan(suffix: str, B: int, H: int, KV: int, T: int, S: int, D: int, acc_itemsize: int,
                   num_sms: int) -> AttentionPlan | None:
    """Launch parameters of attention_decode, or None where the cuBLAS path takes the call (long prefills, head_dim
    over 256, or too little shared memory even for one slot per tile).

    Blocks: one per (b, t, kv head, chunk of <= 8 query heads) and split of the cache. Splits are added until about
    two blocks per SM run, keeping at least 64 slots per split (fewer would spend more on merging than on reading).
    """
    if T > ATTENTION_KERNEL_MAX_T or D > 32 * ATT_MAX_CHUNKS or H % KV or S < 1:
        return None
    G = H // KV
    hb = min(G, 8)
    gchunks = cdiv(G, hb)
    ts = next((ts for ts in (32, 16, 8, 4, 2, 1)
               if (ts * (2 * D + 1) + hb * D) * acc_itemsize <= SHARED_MEMORY_LIMIT), None)
    if ts is None:
        return None
    base = B * T * KV * gchunks
    splits = max(1, min(cdiv(2 * num_sms, base), cdiv(S, max(64, ts))))
    split_len = cdiv(cdiv(S, splits), ts) * ts
    splits = cdiv(S, split_len)  # every split holds at least one slot
    smem = (ts * (2 * D + 1) + hb * D) * acc_itemsize
    launch = Launch(f"attention_decode_{suffix}", (base, splits), (32 * hb,), smem)
    return AttentionPlan(launch, splits, split_len, ts, hb)


# ---------------------------------------------------------------- weights: upload and layout


_WIDE_EXACT = {("float16", "float32"), ("float16", "float64"), ("float32", "float64"), ("float32", "float16")}
_DEVICE_KERNEL = {("bfloat16", "float32"): "bf16_to_f32", ("bfloat16", "float64"): "bf16_to_f64",
                  ("bfloat16", "float16"): "bf16_to_f16", ("float32", "bfloat16"): "f32_to_bf16",
                  ("float16", "bfloat16"): "f16_to_bf16"}


@dataclass(frozen=True)
class UploadPlan:
    """How a host array reaches the device.

    layout: "direct" (C-contiguous: copied as it lies, also straight from a memory map), "transpose" (its transpose
    is C-contiguous, e.g. GPTQ's qweight.T: that is copied, then transposed on the device), or "host-copy" (any
    other strides: one contiguous host copy first).
    convert: "none"; "host" (float64 and other sources: NumPy/ml_dtypes round once on the host, as the numpy
    backend does, so per-step RoPE tables agree bit for bit); "astype" (CuPy's conversion: exact widening, or
    float32 -> float16 with round-to-nearest-even); or a kernel of convert.cu (bfloat16 widening and every rounding
    to bfloat16), applied to the uploaded bits. So a bfloat16 or float16 checkpoint never has a float32 copy on the
    host.
    """

    layout: str
    convert: str


def upload_plan(src: np.dtype, compute: DataType | None, c_contiguous: bool, transpose_contiguous: bool) -> UploadPlan:
    """`compute` is the compute dtype for floating-point sources and None for integers and bools (kept as they are)."""
    layout = "direct" if c_contiguous else ("transpose" if transpose_contiguous else "host-copy")
    src_name = np.dtype(src).name
    if compute is None or src_name == compute.value:
        return UploadPlan(layout, "none")
    pair = (src_name, compute.value)
    if pair in _WIDE_EXACT:
        return UploadPlan(layout, "astype")
    if pair in _DEVICE_KERNEL:
        return UploadPlan(layout, _DEVICE_KERNEL[pair])
    return UploadPlan("host-copy", "host")  # the converting copy is contiguous whatever the strides were


def act_order_permutation(g_idx: np.ndarray, in_features: int) -> tuple[np.ndarray, int] | None:
    """(perm, group_size) that makes an act-order weight's groups contiguous, or None when they cannot be.

    GPTQ's act-order assigns each input column k a group g_idx[k] in a permuted order. Reading the columns in the
    order perm = argsort(g_idx) (stable) makes column k' belong to group k' // group_size, provided every group
    holds the same number of columns: then W[:, perm] (codes permuted once, at upload) is an ordinary grouped weight,
    and x @ W.T = x[:, perm] @ W[:, perm].T. Only the summation order changes.
    """
    g = np.asarray(g_idx).astype(np.int64)
    if g.shape != (in_features,) or in_features == 0:
        return None
    groups = int(g.max()) + 1
    if g.min() < 0 or in_features % groups:
        return None
    size = in_features // groups
    perm = np.argsort(g, kind="stable")
    if not np.array_equal(g[perm], np.arange(in_features) // size):
        return None
    return perm, size


def permute_packed_columns(packed: np.ndarray, bits: int, in_features: int, perm: np.ndarray) -> np.ndarray:
    """The packed rows of W[:, perm]: unpack, reorder the codes, pack again (refllama.quant.packing)."""
    from refllama.quant.packing import pack_rows, unpack_rows

    codes = unpack_rows(np.asarray(packed), bits, in_features)
    return pack_rows(codes[:, perm], bits)


def fused_kind(bits: int | None, signed_bytes: bool, mins: bool = False) -> str | None:
    """The dequant_gemv variant for a code storage: p4, p8 (packed), s8 (int8 codes), p4m (4-bit with mins), or
    None (dequantize, then a float product)."""
    if signed_bytes:
        return None if mins else "s8"
    if mins:
        return "p4m" if bits == 4 else None
    return {4: "p4", 8: "p8"}.get(bits or 0)


def fused_groups_ok(group_size: int | None, g_idx_present: bool) -> bool:
    """dequant_gemv reads one scale per 32-code chunk: per-row scales, or groups of a multiple of 32 columns."""
    return not g_idx_present and (group_size is None or group_size % 32 == 0)


# ---------------------------------------------------------------- GGUF blocks

GGUF_BLOCK_TYPES = ("Q8_0", "Q4_0", "Q4_1")  # GGMLType names the kernels read (after gguf_layout)
_GGUF_FIELDS = {
    "Q8_0": [("d", "<f2"), ("qs", "i1", 32)],
    "Q4_0": [("d", "<f2"), ("qs", "u1", 16)],
    "Q4_1": [("d", "<f2"), ("m", "<f2"), ("qs", "u1", 16)],
}


@dataclass(frozen=True)
class CodesLayout:
    """Integer codes in one of the kernels' two storages, with their groups (host arrays).

    codes: int8 [N, K] (signed) or the packed little-endian bit stream, int32 [N, ceil(K * bits / 32)];
    scale (and mins) [N, K / group_size]; W[n, k] = (codes[n, k] - zero_default) * scale[n, k // group_size]
    (+ mins[n, k // group_size], rounded as ggml rounds d * q + m).
    """

    codes: np.ndarray
    bits: int
    signed: bool
    scale: np.ndarray
    zero_default: int
    mins: np.ndarray | None
    group_size: int


def gguf_layout(raw: np.ndarray, ggml_type_name: str, shape: tuple[int, int]) -> CodesLayout:
    """Rows of ggml blocks (uint8 [N, bytes per row]) -> the same weight as CodesLayout, exactly.

    Q8_0 (fp16 d, 32 int8): int8 codes, scale d, zero 0: d * q.
    Q4_0 (fp16 d, 16 bytes: element j in the low nibble of byte j, element j + 16 in its high nibble): a 4-bit
    stream in element order, scale d, zero 8: d * (q - 8).
    Q4_1 (fp16 d, fp16 m, nibbles as Q4_0): a 4-bit stream, scale d, zero 0, mins m: d * q + m.
    Every product (q - z) * d is exact in float32 (an 8-bit integer times an fp16 value), so these are ggml's
    float32 values bit for bit (refllama/formats/ggml_quants.py).
    """
    from refllama.quant.packing import pack_rows

    if ggml_type_name not in _GGUF_FIELDS:
        raise ValueError(f"GGUF {ggml_type_name} blocks have no kernel layout (known: {', '.join(_GGUF_FIELDS)})")
    N, K = shape
    if K % 32:
        raise ValueError(f"GGUF rows hold whole blocks of 32; got {K} columns")
    blocks = np.ascontiguousarray(np.asarray(raw, dtype=np.uint8).reshape(N, -1)).view(
        np.dtype(_GGUF_FIELDS[ggml_type_name]))  # (N, K / 32)
    if blocks.shape != (N, K // 32):
        raise ValueError(f"{ggml_type_name} rows of {raw.shape} bytes do not hold {K} columns")
    scale = np.ascontiguousarray(blocks["d"])
    if ggml_type_name == "Q8_0":
        return CodesLayout(np.ascontiguousarray(blocks["qs"]).reshape(N, K), 8, True, scale, 0, None, 32)
    nibbles = blocks["qs"]  # (N, K / 32, 16)
    codes = np.concatenate([nibbles & 15, nibbles >> 4], axis=-1).reshape(N, K)  # element order
    packed = pack_rows(codes, 4)
    if ggml_type_name == "Q4_0":
        return CodesLayout(packed, 4, False, scale, 8, None, 32)
    return CodesLayout(packed, 4, False, scale, 0, np.ascontiguousarray(blocks["m"]), 32)


# ---------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m refllama.backends.cupy_kernels",
                                     description="Compile every CUDA kernel module; fail on errors and spills.")
    parser.add_argument("--compiler", choices=("nvcc", "nvrtc"), default="nvcc")
    parser.add_argument("--arch", default=",".join(CI_ARCHS), help="comma-separated, e.g. 80,90")
    parser.add_argument("--verbose", action="store_true", help="registers per kernel")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    results, problems = check_all(args.compiler, args.arch.split(","))
    for r in sorted(results, key=lambda r: (r.module, r.arch)):
        regs = [k.registers for k in r.kernels.values()]
        print(f"{r.module:12s} sm_{r.arch} {r.compiler}: {len(r.kernels):3d} kernels, {r.seconds:5.1f} s, "
              f"registers {min(regs, default=0)}..{max(regs, default=0)}")
        if args.verbose:
            for name, k in sorted(r.kernels.items()):
                print(f"    {name:32s} {k.registers:4d} registers, {k.shared_memory} B static smem")
    print(f"{len(results)} module compilations in {time.perf_counter() - start:.1f} s; "
          f"{len(problems)} problem(s)")
    for p in problems:
        print("FAIL", p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

