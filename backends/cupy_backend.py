"""The CuPy backend: the numpy backend's operations on an NVIDIA GPU, with hand-written kernels for the hot ones.

What runs where (docs/cupy.md says why, and what is still unmeasured):
* kernels in backends/cuda/ (compiled by NVRTC at first use and cached on disk; backends/cupy_kernels.py plans
  every launch and is tested without a GPU): RMSNorm, RoPE with the host's tables, attention over the cache for
  decode (GQA without repeating K/V, one pass, split along the cache), the gated activation, float GEMV for
  decode, W8A8 (per-token int8 quantization, dp4a GEMV/GEMM with exact int32 accumulators and the scales fused),
  fused group-dequant GEMV for packed 4/8-bit and int8 weight-only Linears, dequantization, and dtype
  conversions at upload;
* CuPy: cuBLAS for float GEMMs (prefill, and any shape the GEMV kernels do not take), the embedding gather, the
  cache write (slice assignment into the preallocated buffer), the residual adds, and attention for long prefills
  (cuBLAS batched products and a softmax in CuPy, the numpy backend's expression).

Weights are uploaded once, in their stored dtype (a memory-mapped view goes straight to the device, no host float
copy), and converted on the device; integer tensors are kept as stored. float64 sources, and the float64 RoPE
tables of every step, are rounded once on the host exactly as the numpy backend rounds them. The KV cache is the
engine's preallocated per-layer buffers, made here with `zeros`.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from functools import cache
from typing import Any

import cupy as cp
import ml_dtypes
import numpy as np

from refllama.backends import cupy_kernels as ck
from refllama.backends.base import Backend
from refllama.config import ActivationType
from refllama.dtypes import DataType
from refllama.errors import BackendError
from refllama.formats.ggml_quants import GGMLType
from refllama.quant.gguf_blocks import GGUFBlockWeight
from refllama.quant.int8 import INT8_MAX_K
from refllama.quant.types import Int8Weight, PackedIntWeight

_ML_FLOATS = (ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2)
_BF16 = np.dtype(ml_dtypes.bfloat16)
_HALF_BITS = (np.dtype(np.float16), _BF16)  # uploaded as their bits (uint16) and viewed or converted on the device
NULL = np.uint64(0)  # a null pointer argument
EPI_ACC, EPI_HF, EPI_VLLM = 0, 1, 2  # int8_matmul.cu
ATTENTION_SCORE_BYTES = 1 << 30  # the cuBLAS attention path processes queries in chunks of at most this many scores


class _Kernels:
    """The compiled modules of one device, loaded at first use; `launch` runs a planned ck.Launch."""

    def __init__(self, device_id: int):
        with cp.cuda.Device(device_id) as device:
            self.arch = str(device.compute_capability)  # e.g. "90"
            self.num_sms = int(device.attributes["MultiProcessorCount"])
        self._module_of = {name: module for module, names in ck.MODULES.items() for name in names}
        self._modules: dict[str, cp.RawModule] = {}
        self._functions: dict[str, cp.RawKernel] = {}

    def function(self, name: str) -> cp.RawKernel:
        fn = self._functions.get(name)
        if fn is None:
            module = self._module_of[name]
            if module not in self._modules:
                self._modules[module] = cp.RawModule(path=str(ck.cached_binary(module, self.arch)))
            fn = self._functions[name] = self._modules[module].get_function(name)
        return fn

    def launch(self, launch: ck.Launch, *args: Any) -> None:
        self.function(launch.kernel)(launch.grid, launch.block, args, shared_mem=launch.shared_mem)


@cache
def _kernels(device_id: int) -> _Kernels:
    return _Kernels(device_id)


@dataclass(frozen=True)
class _QuantLayout:
    """A weight-only quantized Linear as the kernels read it (made once per weight, at its first use).

    codes: packed words (int32 [N, words]: PackedIntWeight, GGUF Q4_0/Q4_1 repacked) or int8 codes ([N, K]:
    Int8Weight, GGUF Q8_0), C-contiguous; scale [N or 1, G] and mins (GGUF Q4_1) in the compute dtype, zero (int32,
    or None for zero_default), with row strides 0 for one row; perm: for act-order weights whose groups could be
    made contiguous, the column order the codes were permuted to (x is gathered the same way); g_idx otherwise.
    """

    codes: cp.ndarray
    row_words: int
    bits: int
    signed: bool
    scale: cp.ndarray
    scale_rs: int
    zero: cp.ndarray | None
    zero_rs: int
    zero_default: int
    mins: cp.ndarray | None
    group_size: int  # 0: one group per row
    g_idx: cp.ndarray | None
    perm: cp.ndarray | None
    kind: str | None  # dequant_gemv variant, None: dequantize then a float product
    shape: tuple[int, int]


class CupyBackend(Backend):
    name = "cupy"
    # float32 and float64 are held to the numpy backend's bounds; float16 and bfloat16 follow HF's half-precision
    # conventions (bfloat16 arrays need CuPy >= 14).
    dtypes = (DataType.F32, DataType.F64, DataType.F16, DataType.BF16)
    extra = "cupy"
    marker = "refllama_gpu"
    # GGUF block types the kernels read: the loader keeps these as GGUFBlockWeight (refllama/quant/gguf_blocks.py);
    # they are repacked once, at first use, into the layouts of dequant.cu. Other types arrive dequantized.
    reads_as_stored = frozenset(ck.GGUF_BLOCK_TYPES)
    quantized_fallback = "raise"  # every quantized weight type has a kernel (linear_kernels, below the class)

    def __init__(self, dtype: DataType = DataType.F32, device: int | None = None):
        if dtype not in self.dtypes:
            names = ", ".join(d.value for d in self.dtypes)
            raise BackendError(f"the cupy backend computes in {names}, not {dtype.value}")
        try:
            count = cp.cuda.runtime.getDeviceCount()
        except cp.cuda.runtime.CUDARuntimeError as e:
            raise BackendError(f"the cupy backend needs a CUDA device: {e}") from None
        if count == 0:
            raise BackendError("the cupy backend needs a CUDA device; none is visible")
        self.device_id = cp.cuda.Device().id if device is None else device
        self.dtype = dtype
        self.np_dtype = np.dtype(dtype.numpy_dtype)
        self.acc_dtype = np.dtype(np.float64 if dtype is DataType.F64 else np.float32)  # kernels' accumulation type
        self.suffix = ck.DTYPE_SUFFIX[dtype]
        if dtype is DataType.BF16:
            try:
                cp.empty(1, dtype=_BF16)
            except Exception as e:  # CuPy < 14 has no bfloat16 arrays
                raise BackendError(f"bfloat16 needs CuPy >= 14 (this is {cp.__version__}): {e}") from None
        self.kernels = _kernels(self.device_id)
        # per quantized weight object, made at its first use
        self._layouts: weakref.WeakKeyDictionary[Any, _QuantLayout] = weakref.WeakKeyDictionary()
        self._w8a8: weakref.WeakKeyDictionary[Any, tuple[cp.ndarray, cp.ndarray]] = weakref.WeakKeyDictionary()

    # ------------------------------------------------------------------ arrays

    def asarray(self, a: Any) -> cp.ndarray:
        """Host array -> device array: floats in the compute dtype, integers and bools as they are (UploadPlan)."""
        if isinstance(a, cp.ndarray):
            return a.astype(self.np_dtype, copy=False) if _is_float(a.dtype) else a
        a = np.asarray(a)  # a memory map stays a view of the file
        is_float = _is_float(a.dtype)
        plan = ck.upload_plan(a.dtype, self.dtype if is_float else None, a.flags.c_contiguous,
                              a.T.flags.c_contiguous)
        if plan.convert == "host":
            return cp.asarray(np.ascontiguousarray(a, dtype=self.np_dtype))
        source = a if plan.layout == "direct" else (a.T if plan.layout == "transpose" else np.ascontiguousarray(a))
        stored = source.dtype
        if stored in _HALF_BITS:
            device = cp.asarray(source.view(np.uint16))  # the bits; no host conversion
        else:
            device = cp.asarray(source)
        device = self._convert(device, stored, plan.convert)
        return cp.ascontiguousarray(device.T) if plan.layout == "transpose" else device

    def _convert(self, device: cp.ndarray, stored: np.dtype, how: str) -> cp.ndarray:
        if how == "none":
            return device.view(stored) if stored in _HALF_BITS else device
        if how == "astype":
            source = device.view(stored) if stored in _HALF_BITS else device
            return source.astype(self.np_dtype)
        # a convert.cu kernel: 16-bit results are produced as bits and viewed as the compute dtype
        bits_out = self.np_dtype in _HALF_BITS
        out = cp.empty(device.shape, dtype=np.uint16 if bits_out else self.np_dtype)
        self.kernels.launch(ck.elementwise_launch(how, device.size), device, out, np.int64(device.size))
        return out.view(self.np_dtype) if bits_out else out

    def to_numpy(self, a: cp.ndarray) -> np.ndarray:
        if a.dtype == _BF16:
            return cp.asnumpy(a.view(np.uint16)).view(ml_dtypes.bfloat16)
        return cp.asnumpy(a)

    def zeros(self, shape: tuple[int, ...]) -> cp.ndarray:
        return cp.zeros(shape, dtype=self.np_dtype)

    def cache_write(self, buffer: cp.ndarray, values: cp.ndarray, start: int) -> cp.ndarray:
        buffer[:, :, start:start + values.shape[2]] = values  # in place, into the preallocated buffer
        return buffer

    def embedding(self, table: Any, ids: cp.ndarray) -> cp.ndarray:
        if isinstance(table, GGUFBlockWeight):  # dequantize just the rows asked for (exactly)
            rows = cp.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
            return self.dequantize_layout(self.quant_layout(table), rows).reshape(*ids.shape, table.shape[1])
        return cp.take(table, ids, axis=0)

    # ------------------------------------------------------------------ Linear

    def _linear_int8(self, x: cp.ndarray, w: Int8Weight, bias: cp.ndarray | None) -> cp.ndarray:
        if w.activation is not None:
            return self._linear_w8a8(x, w, bias)
        return self._linear_codes(x, self.quant_layout(w), bias)

    def _linear_weight_only(self, x: cp.ndarray, w: PackedIntWeight | GGUFBlockWeight,
                            bias: cp.ndarray | None) -> cp.ndarray:
        return self._linear_codes(x, self.quant_layout(w), bias)

    def matmul(self, x: cp.ndarray, w: cp.ndarray, bias: cp.ndarray | None = None) -> cp.ndarray:
        N, K = w.shape
        lead = x.shape[:-1]
        x2 = cp.ascontiguousarray(x.reshape(-1, K))
        M = x2.shape[0]
        launch = ck.gemv_launch(self.suffix, self.np_dtype.itemsize, M, N, K) if _aligned(x2, w) else None
        if launch is not None:
            y = cp.empty((M, N), dtype=self.np_dtype)
            self.kernels.launch(launch, w, x2, _ptr(bias), y, np.int32(M), np.int32(N), np.int32(K))
        else:
            y = x2 @ w.T  # cuBLAS
            if bias is not None:
                y += bias
        return y.reshape(*lead, N)

    def _linear_codes(self, x: cp.ndarray, q: _QuantLayout, bias: cp.ndarray | None) -> cp.ndarray:
        """Weight-only codes: W = (code - zero) * scale (+ min) never materialised for decode (dequant_gemv); prefill
        dequantizes to the compute dtype once per call and uses cuBLAS."""
        N, K = q.shape
        lead = x.shape[:-1]
        x2 = cp.ascontiguousarray(x.reshape(-1, K))
        if q.perm is not None:
            x2 = cp.take(x2, q.perm, axis=1)  # the column order the codes were permuted to
        M = x2.shape[0]
        launch = ck.dequant_gemv_launch(self.suffix, q.kind, M, N, K) if q.kind and _aligned(x2) else None
        if launch is None:
            return self.matmul(x2, self.dequantize_layout(q), bias).reshape(*lead, N)
        y = cp.empty((M, N), dtype=self.np_dtype)
        self.kernels.launch(launch, q.codes, np.int32(q.row_words), q.scale, np.int32(q.scale_rs), _ptr(q.zero),
                            np.int32(q.zero_rs), np.int32(q.zero_default), _ptr(q.mins), np.int32(q.group_size), x2,
                            _ptr(bias), y, np.int32(M), np.int32(N), np.int32(K))
        return y.reshape(*lead, N)

    def quant_layout(self, w: Int8Weight | PackedIntWeight | GGUFBlockWeight, permute: bool = True) -> _QuantLayout:
        """How the kernels read a weight-only quantized weight; made once per weight object (cached) unless
        `permute` is False (tests: the unpermuted layout, to compare with refllama.quant.types.dequantize)."""
        if permute and w in self._layouts:
            return self._layouts[w]
        N, K = w.shape
        mins = None
        if isinstance(w, GGUFBlockWeight):
            raw = cp.asnumpy(w.raw) if isinstance(w.raw, cp.ndarray) else np.asarray(w.raw)
            g = ck.gguf_layout(raw, GGMLType(w.ggml_type).name, (N, K))  # repacked once, on the host
            codes, bits, signed, zero, zero_default = g.codes, g.bits, g.signed, None, g.zero_default
            scale_src, group, g_idx_src, mins = g.scale, g.group_size, None, g.mins
        elif isinstance(w, PackedIntWeight):
            codes, bits, signed, zero, zero_default = w.packed, w.bits, False, w.zero, 1 << (w.bits - 1)
            scale_src, group, g_idx_src = w.scale, w.group_size, w.g_idx
        else:
            codes, bits, signed, zero, zero_default = w.q, 8, True, w.zero_point, 0
            scale_src, group, g_idx_src = w.scale, w.group_size, w.g_idx
        codes = _owned(self.asarray(codes))  # device arrays after the engine's upload; host arrays in tests
        scale = cp.ascontiguousarray(self.asarray(scale_src).reshape(scale_src.shape[0], -1))
        if mins is not None:
            mins = cp.ascontiguousarray(self.asarray(mins).reshape(scale.shape))
        zero = None if zero is None else cp.ascontiguousarray(self.asarray(zero).astype(np.int32).reshape(
            zero.shape[0], -1))
        group_size = group or 0
        g_idx = None if g_idx_src is None else self.asarray(g_idx_src).astype(np.int32)
        perm = None
        if g_idx is not None and permute and ck.fused_kind(bits, signed):
            found = ck.act_order_permutation(cp.asnumpy(g_idx), K)
            if found is not None and ck.fused_groups_ok(found[1], False):
                order, group_size = found
                if signed:
                    codes = cp.ascontiguousarray(codes[:, cp.asarray(order)])
                else:
                    codes = cp.asarray(ck.permute_packed_columns(cp.asnumpy(codes), bits, K, order))
                g_idx, perm = None, cp.asarray(order)
        groups_ok = ck.fused_groups_ok(group_size or None, g_idx is not None)
        kind = ck.fused_kind(bits, signed, mins is not None) if groups_ok else None
        layout = _QuantLayout(
            codes=codes, row_words=codes.shape[1] if not signed else K // 4, bits=bits, signed=signed, scale=scale,
            scale_rs=0 if scale.shape[0] == 1 else scale.shape[1], zero=zero,
            zero_rs=0 if zero is None or zero.shape[0] == 1 else zero.shape[1], zero_default=zero_default, mins=mins,
            group_size=group_size, g_idx=g_idx, perm=perm, kind=kind, shape=(N, K))
        if permute:
            self._layouts[w] = layout
        return layout

    def dequantize_layout(self, q: _QuantLayout, rows: cp.ndarray | None = None) -> cp.ndarray:
        """Rows (int64 indices; None: all) of the dense weight in the compute dtype, in the layout's column order."""
        N, K = q.shape
        R = N if rows is None else int(rows.size)
        out = cp.empty((R, K), dtype=self.np_dtype)
        if R:
            self.kernels.launch(ck.elementwise_launch(f"dequantize_{self.suffix}", R * K), q.codes,
                                np.int32(q.row_words), np.int32(q.bits), np.int32(q.signed), q.scale,
                                np.int32(q.scale_rs), _ptr(q.zero), np.int32(q.zero_rs), np.int32(q.zero_default),
                                _ptr(q.mins), np.int32(q.group_size), _ptr(q.g_idx), _ptr(rows), out, np.int32(R),
                                np.int32(K))
        return out

    def dequantize(self, w: Int8Weight | PackedIntWeight | GGUFBlockWeight) -> cp.ndarray:
        """refllama.quant.types.dequantize (gguf_blocks.dequantize) on the device: W [out, in], compute dtype."""
        return self.dequantize_layout(self.quant_layout(w, permute=False))

    def _linear_w8a8(self, x: cp.ndarray, w: Int8Weight, bias: cp.ndarray | None) -> cp.ndarray:
        N, K = w.shape
        lead = x.shape[:-1]
        x2 = cp.ascontiguousarray(x.reshape(-1, K))
        M = x2.shape[0]
        semantics = w.activation.semantics
        codes, x_scale = self.quantize_tokens(x2, semantics)
        w_q, w_scale = self._w8a8_operands(w)
        y = cp.empty((M, N), dtype=self.np_dtype)
        epi = EPI_HF if semantics == "hf" else EPI_VLLM
        self.kernels.launch(ck.int8_launch(self.suffix, M, N, K), codes, w_q, np.int32(M), np.int32(N),
                            np.int32(K), np.int32(epi), x_scale, w_scale, np.int32(1 if w_scale.size == N else 0),
                            _ptr(bias), y, NULL)
        return y.reshape(*lead, N)

    def _w8a8_operands(self, w: Int8Weight) -> tuple[cp.ndarray, cp.ndarray]:
        """The codes (aligned, contiguous) and the flat scale in the compute dtype, made once per weight."""
        if w not in self._w8a8:
            _check_w8a8(w)
            self._w8a8[w] = (_owned(self.asarray(w.q)), cp.ascontiguousarray(self.asarray(w.scale).reshape(-1)))
        return self._w8a8[w]

    def quantize_tokens(self, x: cp.ndarray, semantics: str) -> tuple[cp.ndarray, cp.ndarray]:
        """Per-token int8 codes (M, K) and scales (M,): "hf" in the compute dtype, "vllm" in float32
        (refllama.quant.int8.quantize_tokens_hf / _vllm, bit for bit)."""
        x2 = cp.ascontiguousarray(x.reshape(-1, x.shape[-1]))
        M, K = x2.shape
        codes = cp.empty((M, K), dtype=np.int8)
        scales = cp.empty((M,), dtype=self.np_dtype if semantics == "hf" else np.float32)
        if semantics not in ("hf", "vllm"):
            raise BackendError(f"unknown activation quantization semantics {semantics!r} (hf, vllm)")
        if M:
            self.kernels.launch(ck.Launch(f"quantize_rows_{semantics}_{self.suffix}", (M,), (256,)), x2, codes,
                                scales, np.int32(K))
        return codes, scales

    def int8_accumulate(self, a: cp.ndarray, w: cp.ndarray) -> cp.ndarray:
        """acc[m, n] = sum_k a[m, k] * w[n, k] for int8 a [M, K] and w [N, K], as int32 [M, N] (the kernels' integer
        product alone, for comparison with refllama.quant.int8.int8_accumulate)."""
        (M, K), N = a.shape, w.shape[0]
        if K > INT8_MAX_K:
            raise BackendError(f"an int32 accumulator overflows for K = {K} > {INT8_MAX_K}")
        acc = cp.empty((M, N), dtype=np.int32)
        a, w = _owned(self.asarray(a)), _owned(self.asarray(w))
        self.kernels.launch(ck.int8_launch(self.suffix, M, N, K), a, w, np.int32(M), np.int32(N), np.int32(K),
                            np.int32(EPI_ACC), NULL, NULL, np.int32(0), NULL, NULL, acc)
        return acc

    # ------------------------------------------------------------------ the rest of a layer

    def rms_norm(self, x: cp.ndarray, weight: cp.ndarray, eps: float) -> cp.ndarray:
        x = cp.ascontiguousarray(x)
        D = x.shape[-1]
        out = cp.empty_like(x)
        self.kernels.launch(ck.rms_norm_launch(self.suffix, x.size // D, D), x, cp.ascontiguousarray(weight), out,
                            np.int32(D), np.float64(eps))
        return out

    def apply_rope(self, x: cp.ndarray, cos: cp.ndarray, sin: cp.ndarray) -> cp.ndarray:
        B, H, T, D = x.shape
        if x.strides[-1] != x.itemsize:
            x = cp.ascontiguousarray(x)
        sb, sh, st = (s // x.itemsize for s in x.strides[:3])
        cos = cp.ascontiguousarray(cp.broadcast_to(cos, (B, 1, T, D)))
        sin = cp.ascontiguousarray(cp.broadcast_to(sin, (B, 1, T, D)))
        out = cp.empty((B, H, T, D), dtype=self.np_dtype)
        self.kernels.launch(ck.elementwise_launch(f"rope_{self.suffix}", B * H * T * (D // 2)), x, cos, sin, out,
                            np.int32(B), np.int32(H), np.int32(T), np.int32(D), np.int64(sb), np.int64(sh),
                            np.int64(st))
        return out

    def attention(self, q: cp.ndarray, k: cp.ndarray, v: cp.ndarray, mask: cp.ndarray) -> cp.ndarray:
        B, H, T, D = q.shape
        KV, S = k.shape[1], k.shape[2]
        plan = ck.attention_plan(self.suffix, B, H, KV, T, S, D, self.acc_dtype.itemsize, self.kernels.num_sms)
        if plan is None:
            return self._attention_matmul(q, k, v, mask)
        if q.strides[-1] != q.itemsize:
            q = cp.ascontiguousarray(q)
        if k.strides[-1] != k.itemsize or v.strides != k.strides:
            k, v = cp.ascontiguousarray(k), cp.ascontiguousarray(v)
        q_strides = [s // q.itemsize for s in q.strides[:3]]
        kv_strides = [s // k.itemsize for s in k.strides[:3]]
        mask = cp.ascontiguousarray(mask, dtype=np.bool_)
        out = cp.empty((B, H, T, D), dtype=self.np_dtype)
        part = cp.empty((B * H * T, plan.splits, D + 2), dtype=self.acc_dtype) if plan.splits > 1 else None
        self.kernels.launch(plan.launch, q, *map(np.int64, q_strides), k, v, *map(np.int64, kv_strides), mask, out,
                            _ptr(part), np.int32(H), np.int32(KV), np.int32(T), np.int32(S), np.int32(D),
                            np.int32(plan.tile_slots), np.int32(plan.split_len), self.acc_dtype.type(self._scale(D)))
        if part is not None:
            self.kernels.launch(ck.Launch(f"attention_combine_{self.suffix}", (B * H * T,),
                                          (32 * min(8, ck.cdiv(D, 32)),)), part, out, np.int32(plan.splits),
                                np.int32(D))
        return out

    def _scale(self, D: int) -> float:
        """head_dim ** -0.5 rounded to the compute dtype, as the numpy backend's np.asarray(D**-0.5, q.dtype)."""
        return float(np.asarray(D**-0.5, dtype=self.np_dtype))

    def _attention_matmul(self, q: cp.ndarray, k: cp.ndarray, v: cp.ndarray, mask: cp.ndarray) -> cp.ndarray:
        """The numpy backend's expression with cuBLAS products (long prefills): scores, scaled, masked with the lowest
        finite value, softmax, times V; float16/bfloat16 compute this in float32 and round the output once. GQA by
        grouping the query heads of each KV head into the row axis: (B, KV, G * T, D) @ (B, KV, D, S), no repeated
        K/V. Queries are processed in chunks of at most ATTENTION_SCORE_BYTES of scores."""
        B, H, T, D = q.shape
        KV, S = k.shape[1], k.shape[2]
        G = H // KV
        work = self.acc_dtype  # float32 for the half types, else the compute dtype
        scale = work.type(self._scale(D))
        lowest = np.finfo(work).min
        k_t = k.astype(work, copy=False).transpose(0, 1, 3, 2)  # (B, KV, D, S)
        v = v.astype(work, copy=False)
        out = cp.empty((B, H, T, D), dtype=self.np_dtype)
        chunk = max(1, min(T, ATTENTION_SCORE_BYTES // max(1, B * H * S * work.itemsize)))
        for t0 in range(0, T, chunk):
            t1 = min(T, t0 + chunk)
            Tc = t1 - t0
            qg = cp.ascontiguousarray(q[:, :, t0:t1], dtype=work).reshape(B, KV, G * Tc, D)
            scores = cp.matmul(qg, k_t)  # (B, KV, G*Tc, S)
            scores *= scale
            grouped = scores.reshape(B, KV, G, Tc, S)
            cp.copyto(grouped, lowest, where=~mask[:, None, None, t0:t1])
            grouped -= grouped.max(axis=-1, keepdims=True)
            cp.exp(grouped, out=grouped)
            grouped /= grouped.sum(axis=-1, keepdims=True)
            o = cp.matmul(scores, v)  # (B, KV, G*Tc, D)
            out[:, :, t0:t1] = o.reshape(B, H, Tc, D).astype(self.np_dtype, copy=False)
        return out

    def gated_activation(self, gate: cp.ndarray, up: cp.ndarray, act: ActivationType) -> cp.ndarray:
        try:
            code = ck.ACTIVATION_CODES[act]
        except KeyError:  # pragma: no cover - ActivationType is closed
            raise BackendError(f"activation {act} not implemented") from None
        gate, up = cp.ascontiguousarray(gate), cp.ascontiguousarray(up)
        out = cp.empty_like(gate)
        self.kernels.launch(ck.elementwise_launch(f"gated_activation_{self.suffix}", gate.size), gate, up, out,
                            np.int64(gate.size), np.int32(code))
        return out


def _is_float(dtype: np.dtype) -> bool:
    return np.issubdtype(dtype, np.floating) or dtype.type in _ML_FLOATS


def _ptr(a: cp.ndarray | None) -> cp.ndarray | np.uint64:
    return NULL if a is None else a


def _aligned(*arrays: cp.ndarray) -> bool:
    """C-contiguous and 16-byte aligned: what the vector loads of the GEMV kernels need."""
    return all(a.flags.c_contiguous and a.data.ptr % 16 == 0 for a in arrays)


def _owned(a: cp.ndarray) -> cp.ndarray:
    """A C-contiguous, 16-byte-aligned array with these values (a copy only when `a` is neither)."""
    return a if _aligned(a) else cp.array(a, order="C", copy=True)


def _check_w8a8(w: Int8Weight) -> None:
    """The W8A8 integer GEMM takes what refllama.quant.int8.w8a8_matmul takes: symmetric int8 weights with one scale
    per output channel or per tensor."""
    N, K = w.shape
    if w.zero_point is not None or w.group_size is not None or w.g_idx is not None or \
            int(np.prod(w.scale.shape)) not in (1, N):
        raise BackendError("W8A8 needs symmetric per-channel or per-tensor int8 weights (no zero point, groups or "
                           f"g_idx); got scale {list(w.scale.shape)} for a [{N}, {K}] weight")
    if K > INT8_MAX_K:
        raise BackendError(f"an int32 accumulator overflows for K = {K} > {INT8_MAX_K}")


CupyBackend.linear_kernels = {Int8Weight: CupyBackend._linear_int8, PackedIntWeight: CupyBackend._linear_weight_only,
                              GGUFBlockWeight: CupyBackend._linear_weight_only}
BACKEND = CupyBackend

__all__ = ["BACKEND", "CupyBackend"]
