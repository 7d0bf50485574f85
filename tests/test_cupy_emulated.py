"""The cupy backend run on the CPU: CuPy replaced by a NumPy stand-in, its kernels run two ways: as NumPy models of
their documented arithmetic, and as their CUDA C source itself, built for the CPU (tests/cuda_cpu).

What this checks without a GPU: every launch the backend makes matches the kernel's C signature (parsed from the
preprocessed sources: argument count, scalar widths, pointee dtypes, null only where a pointer goes), every
pointer is read as the GPU reads it (raw memory from the array's first element, with the strides the backend
passes, bounds-checked against the allocation, so a non-contiguous array or a wrong stride shows up), the
preconditions each kernel's comment states (alignment, K multiples, token slots, shared memory), and, with the
kernels' documented arithmetic in NumPy, the whole engine on the golden fixtures, the quantized fixtures and GGUF
blocks through backends/cupy_backend.py: upload plans, layouts, act-order permutation, dispatch, launch plans,
split attention.

With the CUDA C source run on the CPU, the same tests check the kernels' own indexing, reductions, shared memory and
barriers against the golden files. What it cannot check: the GPU itself (the hardware's schedules, memory model
and libdevice's transcendental functions; tests/test_cupy_compile.py compiles for sm_80/sm_90 and
tests/test_cupy_backend.py runs on a GPU).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import types
from functools import cache
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import refllama
from refllama.backends import cupy_kernels as ck
from refllama.config import ActivationType, LlamaConfig
from refllama.dtypes import DataType
from refllama.formats.checkpoint import load_weight_map
from refllama.formats.ggml_quants import GGMLType
from refllama.formats.safetensors import TensorSource
from refllama.model.weights import Linear
from refllama.quant import gguf_blocks
from refllama.quant.int8 import int8_accumulate
from refllama.quant.packing import pack_rows, unpack_rows
from refllama.quant.types import ActivationQuant, Int8Weight, PackedIntWeight

import cuda_cpu
from conftest import (
    F32_ATOL,
    F64_ATOL,
    FIXTURE_NAMES,
    FIXTURES,
    GOLDEN,
    HALF_ATOL,
    QUANT,
    QUANT_NAMES,
    SMOLLM2_ATOL,
    assert_close,
    decode_rows,
    golden,
    load_npz,
    quant_golden,
    smollm2_path,
)
from test_cupy_kernels import random_blocks

BF16 = np.dtype(ml_dtypes.bfloat16)

# ---------------------------------------------------------------- kernel signatures from the sources


def _preprocess(source: str) -> str | None:
    """The source with its macros expanded (cpp, else nvcc -E); None when neither is installed."""
    cpp = shutil.which("cpp")
    if cpp:
        return subprocess.run([cpp, "-P", "-x", "c++", "-"], input=source, capture_output=True, text=True,
                              check=True).stdout
    nvcc = ck.find_nvcc()
    if nvcc:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "module.cu"
            path.write_text(source)
            return subprocess.run([nvcc, "-E", str(path)], capture_output=True, text=True, check=True).stdout
    return None


# __global__ and __launch_bounds__ as written (cpp) or as CUDA's headers expand them (nvcc -E)
_KERNEL = re.compile(r'extern "C" (?:__global__|__attribute__\(\(global\)\)) void '
                     r'(?:__launch_bounds__\([^)]*\) |__attribute__\(\(launch_bounds\([^)]*\)\)\) )?(\w+)\(([^)]*)\)')


@cache
def signatures() -> dict[str, list[tuple[str, bool, str]]]:
    """kernel name -> [(C type, is pointer, parameter name)]."""
    out = {}
    for module in ck.MODULES:
        text = _preprocess(ck.module_source(module))
        if text is None:
            if os.environ.get("CI"):
                pytest.fail("no C preprocessor (cpp or nvcc): CI must check the kernel launches")
            pytest.skip("no C preprocessor (cpp or nvcc) to read the kernel signatures")
        for name, params in _KERNEL.findall(text):
            parsed = []
            for p in re.sub(r"__restrict(__)?", "", params).split(","):
                m = re.fullmatch(r"\s*(?:const\s+)?([\w:<> ]+?)\s*(\*?)\s*(\w+)\s*", p)
                assert m, f"cannot parse parameter {p!r} of {name}"
                parsed.append((m.group(1).strip(), bool(m.group(2)), m.group(3)))
            out[name] = parsed
    return out


_POINTEE = {"float": ["float32"], "double": ["float64"], "f16": ["float16"], "bf16": ["bfloat16"],
            "signed char": ["int8"], "unsigned char": ["uint8", "bool"], "unsigned short": ["uint16"],
            "u32": ["int32", "uint32", "int8"],  # int8 code rows are read as words too (dequant.cu)
            "int": ["int32"], "i64": ["int64"], "void": None,
            "Num<float>::acc": ["float32"], "Num<double>::acc": ["float64"], "Num<f16>::acc": ["float32"],
            "Num<bf16>::acc": ["float32"]}
_SCALAR = {"int": np.int32, "i64": np.int64, "double": np.float64, "float": np.float32,
           "Num<float>::acc": np.float32, "Num<double>::acc": np.float64, "Num<f16>::acc": np.float32,
           "Num<bf16>::acc": np.float32}

# ---------------------------------------------------------------- a NumPy "device"


class Pointer:
    def __init__(self, ptr: int):
        self.ptr = ptr


class DeviceArray(np.ndarray):
    """An array the stand-in CuPy made ("device memory"); host arrays stay plain ndarrays."""

    @property
    def data(self):  # cupy.ndarray.data.ptr
        return Pointer(self.__array_interface__["data"][0])

    def __matmul__(self, other):
        return matmul(self, other)


def dev(a: np.ndarray) -> DeviceArray:
    return np.asarray(a).view(DeviceArray)


def _owner(a: np.ndarray) -> np.ndarray:
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def _bounds(a: np.ndarray) -> tuple[int, int]:
    owner = _owner(a)
    lo = owner.__array_interface__["data"][0]
    return lo, lo + owner.nbytes


def strided(a, dtype, shape, strides) -> np.ndarray:
    """What a kernel sees at pointer `a` with these element strides: a bounds-checked view of the allocation."""
    assert isinstance(a, DeviceArray), f"a kernel got a host array ({type(a).__name__}) or null"
    dtype = np.dtype(dtype)
    start = a.__array_interface__["data"][0]
    lo, hi = _bounds(a)
    if not all(shape):
        return np.zeros(shape, dtype)
    extent = sum((n - 1) * s for n, s in zip(shape, strides, strict=True))
    assert min(strides) >= 0 and lo <= start and start + (extent + 1) * dtype.itemsize <= hi, \
        "device access out of bounds"
    raw = _owner(a).view(np.uint8).reshape(-1)
    count = (hi - start) // dtype.itemsize
    flat = raw[start - lo:start - lo + count * dtype.itemsize].view(dtype)
    return np.lib.stride_tricks.as_strided(flat, shape, [s * dtype.itemsize for s in strides])


def mem(a, dtype, count) -> np.ndarray:
    """`count` elements of `dtype` from pointer `a`, as flat memory (writes go to the allocation)."""
    return strided(a, dtype, (count,), (1,))


def aligned16(a) -> bool:
    return a.__array_interface__["data"][0] % 16 == 0


def matmul(a, b):
    out = np.matmul(np.asarray(a), np.asarray(b))
    dtype = np.result_type(a.dtype, b.dtype)
    return dev(out.astype(dtype, copy=False))  # NumPy returns float32 for bfloat16 operands; cuBLAS does not


def _fresh(shape, dtype) -> DeviceArray:
    """Uninitialised device memory: NaN (floats) or 0x5A bytes, so an unwritten output shows up."""
    a = np.empty(shape, dtype)
    if a.dtype.kind == "f" or a.dtype == BF16:
        a.view(np.uint8)[...] = 0xFF  # NaN in every float format
    else:
        a.view(np.uint8)[...] = 0x5A
    return dev(a)


def make_fake_cupy(launches: list[str], executor: str) -> types.ModuleType:
    """A CuPy stand-in whose kernels run as `executor`: "models" (the NumPy models below) or "cuda-c" (the kernel
    source itself, built for the CPU by tests/cuda_cpu)."""
    cp = types.ModuleType("cupy")
    cp.__version__ = "14-emulated"
    cp.ndarray = DeviceArray

    def asarray(a, dtype=None):
        if isinstance(a, DeviceArray):
            return a if dtype is None else dev(a.astype(dtype, copy=False))
        host = np.asarray(a)
        assert host.flags.c_contiguous or host.ndim == 0, "host->device copies in the backend are contiguous"
        return dev(np.array(host, dtype=dtype, copy=True))

    def empty(shape, dtype=np.float32):
        return _fresh(shape, dtype)

    cp.asarray = asarray
    cp.asnumpy = lambda a: np.array(a)
    cp.empty = empty
    cp.zeros = lambda shape, dtype=np.float32: dev(np.zeros(shape, dtype))
    cp.empty_like = lambda a: _fresh(a.shape, a.dtype)
    cp.ascontiguousarray = lambda a, dtype=None: dev(np.ascontiguousarray(a, dtype=dtype))
    cp.array = lambda a, order="C", copy=True: dev(np.array(a, order=order, copy=copy))
    cp.take = lambda a, idx, axis=None: dev(np.take(a, np.asarray(idx), axis=axis))
    cp.broadcast_to = lambda a, shape: dev(np.broadcast_to(a, shape))
    cp.matmul = matmul
    cp.copyto = np.copyto
    cp.exp = np.exp

    class Device:
        def __init__(self, id: int = 0):
            self.id, self.compute_capability = id, "90"
            self.attributes = {"MultiProcessorCount": 132}

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    class CUDARuntimeError(RuntimeError):
        pass

    cp.cuda = types.SimpleNamespace(
        Device=Device, runtime=types.SimpleNamespace(getDeviceCount=lambda: 1, CUDARuntimeError=CUDARuntimeError))

    class Kernel:
        def __init__(self, module: str, name: str):
            self.module, self.name = module, name
            self.params = signatures()[name]

        def __call__(self, grid, block, args, shared_mem=0):
            assert isinstance(grid, tuple) and isinstance(block, tuple)
            assert all(isinstance(g, int) and 0 < g < 2**31 for g in grid) and len(grid) <= 3
            assert all(isinstance(b, int) and b > 0 for b in block) and np.prod(block) <= 1024
            assert np.prod(block) % 32 == 0, "every kernel assumes whole warps"
            assert shared_mem <= ck.SHARED_MEMORY_LIMIT
            assert len(args) == len(self.params), f"{self.name}: {len(args)} args for {len(self.params)} params"
            values = {}
            for arg, (ctype, pointer, pname) in zip(args, self.params, strict=True):
                where = f"{self.name}({pname})"
                if pointer:
                    if isinstance(arg, np.uint64):
                        assert arg == 0, where
                        values[pname] = None
                        continue
                    assert isinstance(arg, DeviceArray), f"{where}: a {type(arg).__name__}, not device memory"
                    allowed = _POINTEE[ctype]
                    assert allowed is None or arg.dtype.name in allowed, f"{where}: {arg.dtype} for {ctype}*"
                else:
                    assert type(arg) is _SCALAR[ctype], f"{where}: {type(arg).__name__} for {ctype}"
                values[pname] = arg
            launches.append(self.name)
            if executor == "models":
                EMULATORS[self.name.split("_")[0]](self.name, values, grid, block, shared_mem)
                return
            cuda_cpu.launch(cuda_cpu.library(self.module), self.name, grid, block,
                            [(pointer, 0 if v is None else v.__array_interface__["data"][0]) if pointer else (False, v)
                             for (_, pointer, _), v in zip(self.params, values.values(), strict=True)])

    class RawModule:
        def __init__(self, path: str):
            self.module = path

        def get_function(self, name: str) -> Kernel:
            assert name in ck.MODULES[self.module], f"{name} is not in module {self.module}"
            return Kernel(self.module, name)

    cp.RawModule = RawModule
    return cp


# ---------------------------------------------------------------- NumPy models of the kernels


def _types(name: str) -> tuple[np.dtype, np.dtype]:
    """(T, accumulation type) from a kernel name's dtype suffix."""
    suffix = next(s for s in ("bf16", "f16", "f32", "f64") if f"_{s}" in name + "_")
    T = {"f32": np.dtype(np.float32), "f64": np.dtype(np.float64), "f16": np.dtype(np.float16), "bf16": BF16}[suffix]
    return T, np.dtype(np.float64 if suffix == "f64" else np.float32)


def rnd(v, T, A):
    """One operation's result in T (evaluated in A): NumPy's per-operation rounding."""
    return np.asarray(v).astype(T).astype(A)


def emu_convert(name, a, grid, block, smem):
    n = int(a["n"])
    src = {"bf16_to_f32": "u2", "bf16_to_f64": "u2", "f32_to_bf16": "f4", "f16_to_bf16": "f2",
           "bf16_to_f16": "u2"}[name]
    x = mem(a["in"], src, n)
    widened = (x.astype(np.uint32) << 16).view(np.float32) if src == "u2" else x.astype(np.float32)
    if name == "bf16_to_f32":
        mem(a["out"], np.float32, n)[:] = widened
    elif name == "bf16_to_f64":
        mem(a["out"], np.float64, n)[:] = widened
    elif name == "bf16_to_f16":
        mem(a["out"], np.float16, n)[:] = widened.astype(np.float16)
    else:
        mem(a["out"], BF16, n)[:] = widened.astype(BF16)


def emu_rms(name, a, grid, block, smem):
    T, A = _types(name)
    rows, D = grid[0], int(a["D"])
    x = mem(a["x"], T, rows * D).reshape(rows, D).astype(A)
    w = mem(a["weight"], T, D).astype(A)
    var = np.mean(x * x, axis=-1, keepdims=True, dtype=A)
    inv = A.type(1) / np.sqrt(var + A.type(a["eps"]))
    mem(a["out"], T, rows * D)[:] = (w * rnd(x * inv, T, A)).astype(T).reshape(-1)


def emu_rope(name, a, grid, block, smem):
    T, A = _types(name)
    B, H, Tn, D = (int(a[k]) for k in ("B", "H", "T_", "D"))
    x = strided(a["x"], T, (B, H, Tn, D), (int(a["sb"]), int(a["sh"]), int(a["st"]), 1)).astype(A)
    cos = mem(a["cos"], T, B * Tn * D).reshape(B, 1, Tn, D).astype(A)
    sin = mem(a["sin"], T, B * Tn * D).reshape(B, 1, Tn, D).astype(A)
    half = D // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    mem(a["out"], T, B * H * Tn * D)[:] = rnd(rnd(x * cos, T, A) + rnd(rotated * sin, T, A), T, A).astype(
        T).reshape(-1)


def emu_gated(name, a, grid, block, smem):
    T, A = _types(name)
    n = int(a["n"])
    g, up = mem(a["gate"], T, n).astype(A), mem(a["up"], T, n).astype(A)
    act = int(a["act"])
    with np.errstate(over="ignore"):
        if act == 0:
            y = g / (1 + np.exp(-g))
        elif act == 1:
            import math

            y = g * A.type(0.5) * (1 + np.vectorize(math.erf)(g * A.type(math.sqrt(0.5))).astype(A))
        elif act == 2:
            y = A.type(0.5) * g * (1 + np.tanh(A.type(0.7978845608028654) * (g + A.type(0.044715) * g**3)))
        else:
            y = np.maximum(g, 0)
    mem(a["out"], T, n)[:] = (rnd(y, T, A) * up).astype(T)


def emu_gemv(name, a, grid, block, smem):
    T, A = _types(name)
    M, N, K = int(a["M"]), int(a["N"]), int(a["K"])
    mt = int(name.rsplit("_m", 1)[1])
    assert 1 <= M <= mt and K % (16 // T.itemsize) == 0 and aligned16(a["W"]) and aligned16(a["x"])
    assert grid[0] * ck.GEMV_WARPS * ck.GEMV_ROWS >= N and block == (32 * ck.GEMV_WARPS,)
    w = mem(a["W"], T, N * K).reshape(N, K).astype(A)
    x = mem(a["x"], T, M * K).reshape(M, K).astype(A)
    y = rnd(x @ w.T, T, A)
    if a["bias"] is not None:
        y = y + mem(a["bias"], T, N).astype(A)
    mem(a["y"], T, M * N)[:] = y.astype(T).reshape(-1)


def _weights(a, N, K, bits, signed, A, T, g_idx=None, rows=None):
    """W[n, k] = (code - zero) * scale (+ min), as dequant.cu forms it, for the given rows (default all N)."""
    rows = np.arange(N) if rows is None else rows
    n_rows = int(rows.max()) + 1 if rows.size else 0
    rw = int(a["row_words"])
    if signed:
        codes = mem(a["codes"], np.int8, n_rows * K).reshape(n_rows, K).astype(np.int32)[rows]
        zero_shift = 0
    else:
        words = mem(a["codes"], np.int32, n_rows * rw).reshape(n_rows, rw)
        codes = unpack_rows(np.ascontiguousarray(words), bits, K).astype(np.int32)[rows]
        zero_shift = 0
    gs = int(a["group_size"])
    groups = g_idx if g_idx is not None else (np.arange(K) // gs if gs else np.zeros(K, np.int64))
    srs, zrs = int(a["scale_rs"]), int(a["zero_rs"])
    n_groups = int(groups.max()) + 1
    scale = mem(a["scale"], T, max(srs * (n_rows - 1) + n_groups, n_groups)).astype(A)
    sidx = rows[:, None] * srs + groups[None, :]
    zero = (mem(a["zero"], np.int32, max(zrs * (n_rows - 1) + n_groups, n_groups))[rows[:, None] * zrs
                                                                                   + groups[None, :]]
            if a["zero"] is not None else int(a["zero_default"])) + zero_shift
    if a["mins"] is not None:
        mins = mem(a["mins"], T, max(srs * (n_rows - 1) + n_groups, n_groups)).astype(np.float32)[sidx]
        w = (codes - zero).astype(np.float32) * scale[sidx].astype(np.float32) + mins
        return w.astype(A)
    return (codes - zero).astype(A) * scale[sidx]


def emu_dequant(name, a, grid, block, smem):
    T, A = _types(name)
    if name.startswith("dequantize"):
        R, K = int(a["R"]), int(a["K"])
        rows = None if a["rows"] is None else mem(a["rows"], np.int64, R).copy()
        g_idx = None if a["g_idx"] is None else mem(a["g_idx"], np.int32, K).astype(np.int64)
        n = R if rows is None else None
        w = _weights(a, n or 0, K, int(a["bits"]), bool(a["signed_bytes"]), A, T, g_idx,
                     None if rows is None else rows)
        mem(a["out"], T, R * K)[:] = w.astype(T).reshape(-1)
        return
    kind = name.split("_")[3]
    M, N, K = int(a["M"]), int(a["N"]), int(a["K"])
    mt = int(name.rsplit("_m", 1)[1])
    gs = int(a["group_size"])
    assert 1 <= M <= mt and K % 32 == 0 and (gs == 0 or gs % 32 == 0) and aligned16(a["codes"]) and aligned16(a["x"])
    assert (a["mins"] is not None) == (kind == "p4m")
    if kind == "s8":
        assert int(a["row_words"]) == K // 4
    w = _weights(a, N, K, 4 if kind.startswith("p4") else 8, kind == "s8", A, T)
    x = mem(a["x"], T, M * K).reshape(M, K).astype(A)
    y = rnd(x @ w.T, T, A)
    if a["bias"] is not None:
        y = y + mem(a["bias"], T, N).astype(A)
    mem(a["y"], T, M * N)[:] = y.astype(T).reshape(-1)


def emu_quantize(name, a, grid, block, smem):
    T, A = _types(name)
    M, K = grid[0], int(a["K"])
    x = mem(a["x"], T, M * K).reshape(M, K).astype(A)
    if "_hf_" in name:
        eps = {np.dtype(np.float32): 2.0**-23, np.dtype(np.float64): 2.0**-52, np.dtype(np.float16): 2.0**-10,
               BF16: 2.0**-7}[T]
        scale = rnd(np.abs(x).max(axis=1, keepdims=True) / A.type(127.5), T, A)
        scale = np.where(scale == 0, A.type(eps), scale)
        codes = np.rint(np.clip(rnd(x / scale, T, A), -128, 127))
        mem(a["scales"], T, M)[:] = scale.reshape(-1).astype(T)
    else:
        x32 = x.astype(np.float32)
        absmax = np.abs(x32).max(axis=1, keepdims=True)
        with np.errstate(divide="ignore"):
            inverse = np.where(absmax == 0, np.float32(0), np.float32(127) / absmax)
        codes = np.rint(np.clip(x32 * inverse, -128, 127))
        mem(a["scales"], np.float32, M)[:] = (absmax / np.float32(127)).reshape(-1)
    mem(a["codes"], np.int8, M * K)[:] = codes.astype(np.int8).reshape(-1)


def emu_int8(name, a, grid, block, smem):
    T, A = _types(name)
    M, N, K = int(a["M"]), int(a["N"]), int(a["K"])
    if "gemv" in name:
        assert M <= int(name.rsplit("_m", 1)[1]) and K % 16 == 0 and aligned16(a["codes"]) and aligned16(a["W"])
    else:
        assert grid == (ck.cdiv(N, ck.G_BN), ck.cdiv(M, ck.G_BM))
    acc = int8_accumulate(mem(a["codes"], np.int8, M * K).reshape(M, K).copy(),
                          mem(a["W"], np.int8, N * K).reshape(N, K).copy())
    epi = int(a["epi"])
    if epi == 0:
        mem(a["acc_out"], np.int32, M * N)[:] = acc.reshape(-1)
        return
    ws = mem(a["w_scale"], T, N if int(a["ws_stride"]) else 1).astype(A).reshape(1, -1)
    half = T.itemsize == 2
    if epi == 1:
        xs = mem(a["x_scale"], T, M).astype(A).reshape(-1, 1)
        y = (acc.astype(A) * ws) * xs if half else rnd(rnd(acc.astype(A) * ws, T, A) * xs, T, A)
    else:
        xs = mem(a["x_scale"], np.float32, M).astype(A).reshape(-1, 1)
        y = xs * (ws * acc.astype(A))
        y = y if half else rnd(y, T, A)
    if a["bias"] is not None:
        y = rnd(y, T, A) + mem(a["bias"], T, N).astype(A)
    mem(a["y"], T, M * N)[:] = y.astype(T).reshape(-1)


def emu_attention(name, a, grid, block, smem):
    T, A = _types(name)
    H, KV, Tn, S, D = (int(a[k]) for k in ("H", "KV", "T_", "S_len", "D")) if "decode" in name else (0,) * 5
    if "combine" in name:
        splits, D = int(a["splits"]), int(a["D"])
        rows = grid[0]
        part = mem(a["part"], A, rows * splits * (D + 2)).reshape(rows, splits, D + 2)
        m, total, acc = part[..., D], part[..., D + 1], part[..., :D]
        M = m.max(axis=1, keepdims=True)
        weight = np.exp(m - M)
        out = (acc * weight[..., None]).sum(1) / (total * weight).sum(1, keepdims=True)
        mem(a["out"], T, rows * D)[:] = out.astype(T).reshape(-1)
        return
    G = H // KV
    HB = block[0] // 32
    gchunks = ck.cdiv(G, HB)
    B = grid[0] // (Tn * KV * gchunks)
    assert grid[0] == B * Tn * KV * gchunks and HB <= min(G, 8) and D <= 32 * ck.ATT_MAX_CHUNKS
    TS, split_len, splits = int(a["TS"]), int(a["split_len"]), grid[1]
    assert smem >= (TS * (2 * D + 1) + HB * D) * A.itemsize and 1 <= TS <= 32 and split_len % TS == 0
    assert splits * split_len >= S > (splits - 1) * split_len
    q = strided(a["q"], T, (B, H, Tn, D), (int(a["q_sb"]), int(a["q_sh"]), int(a["q_st"]), 1)).astype(A)
    kv_strides = (int(a["kv_sb"]), int(a["kv_sh"]), int(a["kv_ss"]), 1)
    k = strided(a["k"], T, (B, KV, S, D), kv_strides).astype(A)
    v = strided(a["v"], T, (B, KV, S, D), kv_strides).astype(A)
    mask = mem(a["mask"], np.bool_, B * Tn * S).reshape(B, 1, Tn, S)
    heads = np.arange(H) // G
    scores = np.einsum("bhtd,bhsd->bhts", q, k[:, heads]) * A.type(a["scale"])
    scores = np.where(mask, scores, np.finfo(A).min)
    results = []
    for split in range(splits):
        lo, hi = split * split_len, min(S, (split + 1) * split_len)
        s = scores[..., lo:hi]
        m = s.max(axis=-1)
        p = np.exp(s - m[..., None])
        results.append((m, p.sum(-1), np.einsum("bhts,bhsd->bhtd", p, v[:, heads, lo:hi])))
    if splits == 1:
        m, total, acc = results[0]
        mem(a["out"], T, B * H * Tn * D)[:] = (acc / total[..., None]).astype(T).reshape(-1)
        return
    part = mem(a["part"], A, B * H * Tn * splits * (D + 2)).reshape(B, H, Tn, splits, D + 2)
    for split, (m, total, acc) in enumerate(results):
        part[:, :, :, split, :D], part[:, :, :, split, D], part[:, :, :, split, D + 1] = acc, m, total


EMULATORS = {"bf16": emu_convert, "f32": emu_convert, "f16": emu_convert, "rms": emu_rms, "rope": emu_rope,
             "gated": emu_gated, "gemv": emu_gemv, "dequant": emu_dequant, "dequantize": emu_dequant,
             "quantize": emu_quantize, "int8": emu_int8, "attention": emu_attention}


# ---------------------------------------------------------------- the backend on the stand-in


@pytest.fixture(scope="module", params=["models", "cuda-c"])
def emulated(request):
    """(the cupy_backend module loaded against the stand-in, the list of launched kernels), once with the kernels'
    NumPy models and once with their CUDA C source run on the CPU."""
    signatures()  # skips without a preprocessor
    if request.param == "cuda-c" and cuda_cpu.compiler() is None:
        if os.environ.get("CI"):
            pytest.fail("no C++ compiler: CI must run the CUDA kernels on the CPU")
        pytest.skip("no C++ compiler (g++) to run the CUDA kernels on the CPU")
    launches: list[str] = []
    fake = make_fake_cupy(launches, request.param)
    path = Path(ck.__file__).with_name("cupy_backend.py")
    spec = importlib.util.spec_from_file_location("refllama_cupy_backend_emulated", path)
    module = importlib.util.module_from_spec(spec)
    saved = sys.modules.get("cupy")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ck, "cached_binary", lambda module_name, arch: module_name)
        sys.modules["cupy"] = fake
        sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
        try:
            spec.loader.exec_module(module)
        finally:
            if saved is None:
                del sys.modules["cupy"]
            else:
                sys.modules["cupy"] = saved
        yield module, launches


def backend(emulated, dtype=DataType.F32):
    module, _ = emulated
    return module.CupyBackend(dtype)


def engine(emulated, folder: Path, dtype=DataType.F32, semantics="hf"):
    config = LlamaConfig.from_dir(folder)
    weights = load_weight_map(TensorSource(folder), config, activation_semantics=semantics)
    return refllama.GenericLlamaEngine(config, weights, backend(emulated, dtype))


def test_signatures_cover_every_kernel():
    names = set(signatures())
    assert names == {k for ks in ck.MODULES.values() for k in ks}


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixtures_through_the_backend(emulated, name):
    """Prefill (cuBLAS attention path past 16 tokens, kernel path below), decode through the cache (GEMV and split
    attention kernels), float32 and float64."""
    g = golden(name)
    e32, e64 = engine(emulated, FIXTURES / name), engine(emulated, FIXTURES / name, DataType.F64)
    for length in (10, 48):
        assert_close(e32.logits(g[f"ids_{length}"]), g[f"logits_{length}_f32"], F32_ATOL)
        np.testing.assert_allclose(e64.logits(g[f"ids_{length}"]), g[f"logits_{length}_f64"], rtol=0, atol=F64_ATOL)
    assert e32.generate_ids(g["ids_10"], max_new_tokens=16) == g["greedy_f32"].tolist()


@pytest.mark.parametrize("name", ["mixtral", "mixtral_bf16", "llama4", "llama4_noqk"])
def test_moe_fixtures_through_the_backend(emulated, name):
    """Mixtral and Llama 4 (tests/test_moe.py): routing on the host, only the chosen experts' Linears launched,
    Llama 4's interleaved RoPE through the base class's host reference."""
    g = golden(name)
    e32, e64 = engine(emulated, FIXTURES / name), engine(emulated, FIXTURES / name, DataType.F64)
    assert_close(e32.logits(g["ids_48"]), g["logits_48_f32"], F32_ATOL)
    np.testing.assert_allclose(e64.logits(g["ids_48"]), g["logits_48_f64"], rtol=0, atol=F64_ATOL)
    assert e32.generate_ids(g["ids_10"], max_new_tokens=16, stop_at_eos=False) == g["greedy_f32"].tolist()


def test_cached_decoding_and_padded_batches(emulated):
    g = golden("llama32")
    e = engine(emulated, FIXTURES / "llama32")
    ids = g["ids_48"][:30]
    full = e.logits(ids)
    cache = e.new_cache(1, 40)
    rows = [e.forward(ids[None, :7], cache)[0]] + [e.forward(ids[None, t:t + 1], cache)[0] for t in range(7, 30)]
    np.testing.assert_allclose(np.concatenate(rows), full, rtol=0, atol=F32_ATOL)
    a, b = g["ids_10"], g["ids_48"][:6]
    batch = np.stack([a, np.concatenate([np.zeros(4, np.int64), b])])
    attention = np.stack([np.ones(10, np.int64), np.r_[np.zeros(4, np.int64), np.ones(6, np.int64)]])
    positions = np.maximum(np.cumsum(attention, axis=1) - 1, 0)
    logits = e.forward(batch, e.new_cache(2, 12), attention, positions)
    np.testing.assert_allclose(logits[0], e.logits(a), rtol=0, atol=F32_ATOL)
    np.testing.assert_allclose(logits[1, 4:], e.logits(b), rtol=0, atol=F32_ATOL)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_paths(emulated, dtype):
    g = golden("llama32")
    e = engine(emulated, FIXTURES / "llama32", DataType.parse(dtype))
    ours = e.logits(g["ids_48"])
    assert ours.dtype == np.dtype(DataType.parse(dtype).numpy_dtype)
    np.testing.assert_allclose(ours.astype(np.float32), g["logits_48_f32"], rtol=0, atol=HALF_ATOL[dtype])
    assert len(e.generate_ids(g["ids_10"], 4, stop_at_eos=False)) == 4


@pytest.mark.parametrize("name", QUANT_NAMES)
def test_quantized_fixtures(emulated, name):
    g = quant_golden(name)
    semantics = "vllm" if name == "tiny-w8a8" else "hf"
    e = engine(emulated, QUANT / name, semantics=semantics)
    ids = g["ids_b"]
    key = "logits_b_int8vllm" if name == "tiny-w8a8" else (
        "logits_b_f32dequant" if "logits_b_f32dequant" in g else "logits_b")
    logits = e.logits(ids)
    assert_close(logits, g[key], F32_ATOL)
    np.testing.assert_allclose(decode_rows(e, ids, prefill=3), logits, rtol=0, atol=F32_ATOL)


@pytest.mark.parametrize("dtype", [DataType.F32, DataType.F64, DataType.BF16])
def test_ops_against_numpy(emulated, dtype):
    """Each op once on the paths the fixtures do not reach: split attention over a long cache (with a fully masked
    row), cuBLAS fallbacks, every activation; and every kernel module is launched."""
    from refllama.backends.numpy_backend import NumpyBackend

    _, launches = emulated
    before = len(launches)
    xp, ref = backend(emulated, dtype), NumpyBackend(DataType.F64)
    T = np.dtype(dtype.numpy_dtype)
    rng = np.random.default_rng(0)
    host = lambda *shape: rng.standard_normal(shape).astype(T)  # noqa: E731
    tol = 1e-5 if dtype is DataType.F32 else (1e-12 if dtype is DataType.F64 else 0.05)
    check = lambda got, want: np.testing.assert_allclose(  # noqa: E731
        xp.to_numpy(got).astype(np.float64), want, rtol=0, atol=tol * max(1.0, np.abs(want).max()))
    for M, K in ((1, 64), (3, 64), (20, 64), (2, 70)):
        x, w, b = host(M, K), host(33, K), host(33)
        check(xp.linear(xp.asarray(x), Linear(xp.asarray(w), xp.asarray(b))), ref.linear(x, Linear(w, b)))
    for (H, KV), Tq, S in (((8, 2), 1, 300), ((6, 3), 3, 40), ((4, 4), 20, 30), ((32, 8), 1, 1000)):
        q, k, v = host(2, H, Tq, 16), host(2, KV, S, 16), host(2, KV, S, 16)
        mask = np.broadcast_to(np.arange(S) <= (S - Tq + np.arange(Tq))[:, None], (2, Tq, S)).copy()
        mask[1, :, : S // 2] = False
        mask[1, 0] = False  # a padding query
        check(xp.attention(xp.asarray(q), xp.asarray(k), xp.asarray(v), xp.asarray(mask)),
              ref.attention(q, k, v, mask))
    x, w = host(2, 3, 96), host(96)
    check(xp.rms_norm(xp.asarray(x), xp.asarray(w), 1e-5), ref.rms_norm(x, w, 1e-5))
    for act in ActivationType:
        g, u = host(3, 50), host(3, 50)
        check(xp.gated_activation(xp.asarray(g), xp.asarray(u), act), ref.gated_activation(g, u, act))
    seen = set(launches[before:])
    assert f"attention_combine_{ck.DTYPE_SUFFIX[dtype]}" in seen
    for module in ("rms_norm", "attention", "activation", "gemv"):
        assert seen & set(ck.MODULES[module]), module


@pytest.mark.parametrize("name", ck.GGUF_BLOCK_TYPES)
def test_gguf_blocks(emulated, name):
    xp = backend(emulated)
    rng = np.random.default_rng(3)
    N, K = 40, 128
    w = gguf_blocks.GGUFBlockWeight(random_blocks(name, N, K, rng), GGMLType[name], (N, K))
    dense = gguf_blocks.dequantize(w)
    np.testing.assert_array_equal(xp.to_numpy(xp.dequantize(w)), dense)
    ids = np.array([[3, 0], [39, 3]])
    np.testing.assert_array_equal(xp.to_numpy(xp.embedding(w, xp.asarray(ids))), dense[ids])
    for M in (1, 5, 9):
        x = rng.standard_normal((M, K)).astype(np.float32)
        # float32 sums in the kernels' order: within 2 K eps of the float64 product's magnitude (any order)
        exact = x.astype(np.float64) @ dense.astype(np.float64).T
        bound = 2 * K * np.finfo(np.float32).eps * (np.abs(x.astype(np.float64)) @ np.abs(dense.astype(np.float64)).T)
        assert np.all(np.abs(xp.to_numpy(xp.linear(xp.asarray(x), Linear(w))) - exact) <= bound)


def test_act_order_weights_are_permuted_once_and_stay_exact(emulated):
    xp = backend(emulated)
    rng = np.random.default_rng(4)
    N, K, size = 24, 128, 32
    g_idx = rng.permutation(np.arange(K) // size).astype(np.int32)
    w = PackedIntWeight(pack_rows(rng.integers(0, 16, (N, K)), 4), rng.uniform(0.01, 0.02, (N, K // size)).astype(
        np.float32), 4, K, zero=rng.integers(0, 16, (N, K // size)).astype(np.int32), g_idx=g_idx)
    layout = xp.quant_layout(w)
    assert layout.perm is not None and layout.g_idx is None and layout.kind == "p4" and layout.group_size == size
    assert xp.quant_layout(w) is layout  # once per weight
    from refllama.quant.types import dequantize

    x = rng.standard_normal((1, K)).astype(np.float32)
    np.testing.assert_allclose(xp.to_numpy(xp.linear(xp.asarray(x), Linear(w))), x @ dequantize(w).T, rtol=0,
                               atol=1e-5)


def test_w8a8_per_tensor_and_errors(emulated):
    xp = backend(emulated)
    rng = np.random.default_rng(5)
    q = rng.integers(-127, 128, (16, 64), dtype=np.int8)
    w = Int8Weight(q, np.array([[0.01]], np.float32), activation=ActivationQuant("hf"))
    x = rng.standard_normal((3, 64)).astype(np.float32)
    from refllama.quant.int8 import w8a8_matmul

    np.testing.assert_array_equal(xp.to_numpy(xp.linear(xp.asarray(x), Linear(w))),
                                  w8a8_matmul(x, q, np.array([[0.01]], np.float32), "hf"))
    grouped = Int8Weight(q, np.ones((16, 2), np.float32), group_size=32, activation=ActivationQuant("hf"))
    from refllama.errors import BackendError

    with pytest.raises(BackendError, match="per-channel or per-tensor"):
        xp.linear(xp.asarray(x), Linear(grouped))


def test_activations(emulated):
    xp = backend(emulated)
    from refllama.backends.numpy_backend import NumpyBackend

    ref = NumpyBackend()
    g = np.random.default_rng(6).standard_normal((3, 50)).astype(np.float32)
    for act in ActivationType:
        np.testing.assert_allclose(xp.to_numpy(xp.gated_activation(xp.asarray(g), xp.asarray(g), act)),
                                   ref.gated_activation(g, g, act), rtol=0, atol=1e-6)


def test_smollm2_gguf_blocks_end_to_end(emulated):
    """The embedded SmolLM2 (Q8_0 embeddings, Q4_1 matrices) kept as blocks: the chat prompt against HF."""
    path = smollm2_path()
    module, _ = emulated
    g = load_npz(GOLDEN / "smollm2.npz")
    from refllama.formats.gguf import GGUFFile
    from refllama.formats.gguf_llama import GGUFTensorSource, config_from_gguf
    from refllama.loading import stored_block_types

    xp = module.CupyBackend(DataType.F32)
    gguf = GGUFFile(path)
    config = config_from_gguf(gguf)
    e = refllama.GenericLlamaEngine(config, load_weight_map(GGUFTensorSource(gguf, config, stored_block_types(xp)),
                                                            config), xp)
    assert isinstance(e.model.weights.layers[0].mlp.up_proj.weight, gguf_blocks.GGUFBlockWeight)
    assert isinstance(e.model.weights.embeddings, gguf_blocks.GGUFBlockWeight)
    logits = e.logits(g["chat_ids"])
    np.testing.assert_allclose(logits[g["chat_positions"]], g["chat_logits_f32"], rtol=0, atol=SMOLLM2_ATOL)
