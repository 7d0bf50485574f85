"""The numba backend: the numpy backend's operations as Numba kernels, float32 on the CPU.

What runs where (kernels in backends/numba_kernels.py; docs/numba.md has the measurements):
* Every matmul is a Numba kernel over the weight as stored, `prange` over blocks of four weight rows:
  - float weights: a 4x4 register-blocked microkernel (no BLAS: see below); one token: a vector dot per row;
  - W8A8 (Int8Weight with `activation`): per-token int8 quantization, then int8 x int8 -> int32, bit for bit
    the reference (refllama/quant/int8.py); on CPUs with AVX-512 VNNI through numba_gemm (int8_vnni_matvec for
    decode steps, int8_vnni_gemm for prompts);
  - weight-only codes (Int8Weight, PackedIntWeight: compressed-tensors, GPTQ, AWQ): four rows at a time are
    dequantized exactly into a scratch block in L1 and multiplied by the same microkernel, so no float copy of a
    weight ever exists;
  - GGUF blocks (GGUFBlockWeight: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, kept as stored):
    decode reads every block type by a fused matvec without dequantizing; prompts dequantize 48 rows at a time
    and multiply them with every token by a broadcast microkernel (numba_kernels.gguf_matmuls).
* Linears of one input (q/k/v, gate/up: `linears`) run as one kernel where their weights allow: float32 or
  bfloat16 (`float_matmuls`), GGUF blocks (`gguf_matmuls` for prompts; `gguf_matvecs` for up to 8 tokens of the
  32-element block types), and W8A8 decode steps (the input quantized once): a decode step starts the threads
  about 5 times a layer instead of 9, and each thread streams an equal share of the group's rows.
* RMSNorm, RoPE, attention over the KV cache (GQA without repeating K/V) and SiLU-mul: Numba kernels, the
  cheap ones on one thread; for 32 or more positions attention, and for 2 or more tokens SiLU-mul, are
  backends/numba_gemm.py's kernels. Other gated activations
  (GELU, ReLU) are the numpy backend's.

Weights: on Linux the matrices that view the model file are copied once, at load, into huge pages
(`take_weight`, refllama/formats/hugepages.py): decode streams them 1.07-1.19x faster than from the file's 4 KiB
pages; REFLLAMA_HUGE_PAGES=0 keeps them mapped.

Threads: REFLLAMA_NUM_THREADS, by default the CPUs this process may run on (`os.sched_getaffinity`: a container's
or `taskset`'s share, not the machine's count), capped by NUMBA_NUM_THREADS; without the variable, fewer while other
work holds our CPUs (`threads_for_share`). The backend calls no BLAS: OpenBLAS's worker threads spin for a while
after each call, and so do OpenMP's (Numba's threading layer), so interleaving the two pools on two cores made
prefill 10x slower; one pool of Numba threads does everything. Compiled kernels are cached in a user directory
(numba_kernels.cache_dir()): the first process compiles those it calls (all of them: 40 s on two cores), with
the attention kernels compiled meanwhile by a second process (backends/numba_helper.py); later ones load them in a
fraction of a second.
"""

from __future__ import annotations

import operator
import os
import time
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

from refllama.backends import numba_gemm, numba_helper
from refllama.backends import numba_kernels as kernels  # first: it sets NUMBA_CACHE_DIR, then imports numba
from refllama.backends.numpy_backend import NumpyBackend
from refllama.config import ActivationType
from refllama.dtypes import DataType
from refllama.errors import BackendError
from refllama.formats import hugepages
from refllama.formats.ggml_quants import GGMLType
from refllama.formats.safetensors import mapped_base
from refllama.model.weights import Linear
from refllama.quant.gguf_blocks import GGUFBlockWeight
from refllama.quant.int8 import INT8_MAX_K
from refllama.quant.types import Int8Weight, PackedIntWeight, group_index

BF16 = np.dtype(ml_dtypes.bfloat16)
SMALL_BATCH = 8  # up to this many tokens: the fused matvec for GGUF blocks, the decode kernels for W8A8


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask), or the machine's count where there is no mask."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


SHARE_FLOOR = 0.85  # a forward pass whose threads got less of their CPUs than this ran on a busy machine
PROBE_EVERY = 32  # forward passes on fewer threads between tries of all of them
MAX_INTERVAL_S = 2.0  # a longer gap between forward passes (the caller idle) says nothing about the CPUs
LOW_PASSES = 2  # consecutive low shares before a trial of fewer threads
FASTER = 0.95  # a trial's thread count is kept if its pass took less than this fraction of the pass before it


def threads_for_share(current: int, share: float) -> int:
    """The threads for the next forward passes after one ran on `current` threads and got `share` of their CPU time
    (process CPU seconds / (wall seconds x threads)). Every parallel kernel ends in a barrier, and a decode step runs
    ~150 of them (SmolLM2), so when another process holds one of our CPUs each barrier waits for a descheduled thread.
    Measured on 2 CPUs with one core kept busy (SmolLM2 Q4_1 decode): 2 threads got a share of 0.64 and 42 tok/s,
    1 thread 79 tok/s; on the quiet machine the share was 0.99 (2 threads, 107 tok/s). So below SHARE_FLOOR run
    on the threads the share paid for (at least one)."""
    if share >= SHARE_FLOOR:
        return current
    return max(1, min(current - 1, int(share * current)))


def thread_count() -> int:
    """REFLLAMA_NUM_THREADS (default: usable_cpus()), capped at the threads Numba started with (NUMBA_NUM_THREADS,
    the cores); only an explicit setting above that cap warns."""
    text = os.environ.get("REFLLAMA_NUM_THREADS")
    if text is None:
        return min(usable_cpus(), kernels.numba.config.NUMBA_NUM_THREADS)
    try:
        wanted = int(text)
    except ValueError:
        raise BackendError(f"REFLLAMA_NUM_THREADS must be a positive integer, got {text!r}") from None
    if wanted < 1:
        raise BackendError(f"REFLLAMA_NUM_THREADS must be a positive integer, got {text!r}")
    available = kernels.numba.config.NUMBA_NUM_THREADS
    if wanted > available:
        warnings.warn(f"REFLLAMA_NUM_THREADS={wanted} exceeds the {available} threads Numba can run "
                      f"(NUMBA_NUM_THREADS); using {available}", stacklevel=3)
    return min(wanted, available)


@dataclass(frozen=True)
class _W8A8:
    q: np.ndarray  # int8 (N, K), C-contiguous (the stored view)
    scale: np.ndarray  # float32 (N,)
    vllm: bool
    q4: np.ndarray | None  # int8 (N, K rounded up to 4): q itself if K % 4 == 0, else zero-padded (prompts)
    sums: np.ndarray | None  # int32 (N,): sum_k q[n, k], the VNNI kernels' correction (None without VNNI)


@dataclass(frozen=True)
class _Codes:
    """Weight-only integer codes in the kernels' layout: W[n, i] = (code(n, i) - zero[n, group[i]]) * scale[...]."""

    codes: np.ndarray  # int8 (N, K) codes (bits 0), or uint8 (N, bytes) packed bit streams (bits 1..8)
    bits: int
    zero: np.ndarray  # int32 (N, G)
    scale: np.ndarray  # float32 (N, G)
    group: np.ndarray  # int32 (K,)


@dataclass(frozen=True)
class _Group:
    """A group of quantized Linears of one input as `linears` runs it: the kernel for up to SMALL_BATCH tokens and
    the one for more ("": one by one), the arrays they read, plus the group's other weights, weakly, to tell the
    group from another with the same first weight. Kept per first weight and dropped with it (no reference to it
    here)."""

    rest: tuple[weakref.ref, ...]
    decode: str  # "gguf_matvecs", "w8a8_decode" (NumbaBackend._w8a8_decode) or ""
    prompt: str  # "gguf_matmuls" or ""
    arrays: Any  # the GGUF kernels' three (kind, raw) slots flattened, or each weight's _W8A8
    rows: tuple[int, ...]  # N of each weight


@dataclass(frozen=True)
class _Blocks:
    raw: np.ndarray  # uint8 (N, bytes per row), C-contiguous
    kind: int  # GGMLType value
    in_features: int


class NumbaBackend(NumpyBackend):
    name = "numba"
    dtypes = (DataType.F32,)
    extra = "numba"
    # bfloat16 matrices and the GGUF block types its kernels read stay as stored (in huge pages: `take_weight`).
    reads_as_stored = frozenset({"BF16", *(GGMLType(kind).name for kind in kernels.GGUF_BLOCKS)})
    quantized_fallback = "raise"  # every quantized weight type has a kernel (linear_kernels, below the class)

    def __init__(self, dtype: DataType = DataType.F32):
        if dtype not in self.dtypes:
            raise BackendError(f"the numba backend computes in float32, not {dtype.value} "
                               "(the numpy backend computes in float64)")
        super().__init__(dtype)
        self.threads = thread_count()
        self.adaptive = "REFLLAMA_NUM_THREADS" not in os.environ  # an explicit count is used as it is
        self._threads_now = self.threads
        self._last: tuple[float, float, int] | None = None  # (wall, process CPU seconds, tokens) at the last start
        self._fewer = self.threads  # the reduced thread count, while one is in use or on trial
        self._trying = ""  # the last pass tried another thread count: "fewer" or "all"
        self._compare_s = 0.0  # ... and the time of the pass before it, on the count it would replace
        self._reduced_for = 0  # forward passes run on fewer threads since the last try of all of them
        self._low = 0  # consecutive passes on all threads with a low share (negative: a back-off)
        # Per quantized weight, its arrays in the kernels' layout, made on first use and dropped with the weight.
        self._prepared: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
        self._groups: weakref.WeakKeyDictionary[Any, _Group] = weakref.WeakKeyDictionary()  # `linears`' plans
        # Where `take_weight` puts the matrices a decode step streams; REFLLAMA_HUGE_PAGES=0 leaves them mapped.
        self._arena = hugepages.Arena() if hugepages.available() else None
        self._helper = numba_helper.start(usable_cpus())  # cold cache: attention kernels compile in a second process

    def forward_threads(self, tokens: int = 1) -> int:
        """The threads of the forward pass of `tokens` tokens starting now: REFLLAMA_NUM_THREADS if set; otherwise
        all of `self.threads` unless fewer were measured faster.

        A low CPU share on LOW_PASSES passes in a row (`threads_for_share`: other work holding our CPUs) starts a
        trial: one pass on fewer threads, kept only if it ran in under FASTER of the time of the pass before it (with
        as many tokens). The share alone misjudged a virtual machine whose host took time from both vCPUs: it fell
        below the floor while both threads still decoded 1.3-1.5x faster than one (SmolLM2 Q4_1, 2 vCPUs). A trial
        that loses is not repeated for PROBE_EVERY passes. On fewer threads, every PROBE_EVERY passes one runs on
        all of them again, and they stay if it ran faster than the pass before it. The time of a pass is the wall
        time between the starts of two passes of as many tokens (longer gaps than MAX_INTERVAL_S say nothing).
        Which threads run changes no result: every kernel splits its work by output rows."""
        if not self.adaptive or self.threads == 1:
            return self.threads
        wall, cpu = time.perf_counter(), time.process_time()
        last, self._last = self._last, (wall, cpu, tokens)
        elapsed = wall - last[0] if last is not None else 0.0
        if last is None or last[2] != tokens or not 0 < elapsed < MAX_INTERVAL_S:  # nothing to judge by
            if self._trying:  # a pass on trial: back to what ran before it
                self._threads_now = self._before_trial()
            self._trying = ""
        elif self._trying:  # the last pass tried another thread count: kept if it was faster
            if elapsed >= FASTER * self._compare_s:
                self._threads_now = self._before_trial()
                if self._trying == "fewer":
                    self._low = -PROBE_EVERY
            self._trying, self._reduced_for = "", 0
        elif self._threads_now == self.threads:
            wanted = threads_for_share(self.threads, (cpu - last[1]) / (elapsed * self.threads))
            self._low = self._low + 1 if self._low < 0 or wanted < self.threads else 0
            if self._low >= LOW_PASSES:
                self._fewer = self._threads_now = wanted
                self._trying, self._compare_s, self._low = "fewer", elapsed, 0
        else:
            self._reduced_for += 1
            if self._reduced_for >= PROBE_EVERY:
                self._threads_now = self.threads
                self._trying, self._compare_s = "all", elapsed
        return self._threads_now

    def _before_trial(self) -> int:
        """The thread count the pass on trial replaced: all of them for a trial of fewer, else the fewer."""
        return self.threads if self._trying == "fewer" else self._fewer

    def asarray(self, a: np.ndarray) -> np.ndarray:
        """As the numpy backend, except that bfloat16 matrices (Linear weights, the embedding table, 2-D scales)
        stay as stored: the matmul kernels widen them exactly as they read (`kernels.widen`), and
        every other reader converts them (`_float32`). Vectors (norm weights, biases) become float32."""
        a = np.asarray(a)
        if a.dtype == BF16 and a.ndim == 2:
            return a
        return super().asarray(a)

    def take_weight(self, a: np.ndarray) -> np.ndarray:
        """As `asarray`, and a matrix of at least hugepages.MIN_BYTES that views the model file (Linear weights, the
        embedding table, GGUF blocks and bfloat16 as stored, int8 codes) is copied once into huge pages
        (refllama/formats/hugepages.py), where the kernels stream it faster than from the file's 4 KiB pages: the
        same bytes, read-only like the map. Arrays the load made in memory stay where they are: the engine's kept
        source (`source_weights`, for set_precision) holds them too, so a copy would hold their bytes twice. (The
        GGUF loader makes its reordered q/k rows in huge pages itself, in an arena of its own.)"""
        array = self.asarray(a)
        if self._arena is None or array.ndim != 2 or array.nbytes < hugepages.MIN_BYTES \
                or mapped_base(array) is None:
            return array
        return self._arena.copy(array)

    # --- gathers and elementwise -----------------------------------------------------------------------------

    def embedding(self, table: Any, ids: np.ndarray) -> np.ndarray:
        # Every forward pass starts here: Numba's thread count is per calling thread, so set it for this one.
        kernels.numba.set_num_threads(self.forward_threads(int(np.size(ids))))
        if isinstance(table, GGUFBlockWeight):  # dequantize just the rows asked for (exact)
            blocks = self._blocks(table)
            rows = np.ascontiguousarray(ids, dtype=np.intp).reshape(-1)
            out = np.empty((rows.size, blocks.in_features), np.float32)
            kernels.dequantize_gguf(blocks.kind, blocks.raw, rows, out)
            return out.reshape(*np.shape(ids), blocks.in_features)
        return _float32(table[ids])

    def rms_norm(self, x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
        x2 = np.ascontiguousarray(x).reshape(-1, x.shape[-1])
        out = np.empty_like(x2)
        kernels.rms_norm(x2, kernels.readonly(weight), np.float32(eps), out)
        return out.reshape(x.shape)

    def apply_rope(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        # The kernel reads and writes (B, T, H, D) memory, which split_heads' (B, H, T, D) view of a Linear's output
        # already is (no copy); the result is a (B, H, T, D) view of it too: after attention the model transposes
        # back to (B, T, H, D), and the keys go into the cache by copy, so this layout saves a transpose copy.
        x = np.ascontiguousarray(x.transpose(0, 2, 1, 3))  # (B, T, H, D)
        out = np.empty(x.shape, np.float32)
        kernels.rope(x, np.ascontiguousarray(cos), np.ascontiguousarray(sin), out)
        return out.transpose(0, 2, 1, 3)

    def attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray) -> np.ndarray:
        B, H, T, D = q.shape
        queries = np.ascontiguousarray(q.transpose(0, 2, 1, 3))  # (B, T, H, D): no copy for apply_rope's output
        out = np.empty((B, T, H, D), np.float32)
        attention = numba_gemm.prompt_attention if T >= numba_gemm.QUERIES else kernels.attention
        if self._helper is not None and self._helper.wait(attention.py_func.__name__):
            self._helper = None  # every kernel it compiles is cached
        # the mask read-only: a broadcast one is, a padded batch's is not, and each would compile its own kernel
        attention(queries, _cache_buffer(k), _cache_buffer(v), k.shape[2], kernels.readonly(np.ascontiguousarray(mask)),
                  out)
        return out.transpose(0, 2, 1, 3)  # (B, H, T, D) view, as apply_rope

    def gated_activation(self, gate: np.ndarray, up: np.ndarray, act: ActivationType) -> np.ndarray:
        if act not in (ActivationType.Silu, ActivationType.Swish):
            return super().gated_activation(gate, up, act)
        out = np.empty(gate.shape, np.float32)
        width = gate.shape[-1]
        silu_mul = kernels.silu_mul if gate.size == width else numba_gemm.silu_mul
        silu_mul(np.ascontiguousarray(gate).reshape(-1, width), np.ascontiguousarray(up).reshape(-1, width),
                 out.reshape(-1, width))
        return out

    # --- Linear: float weights here, quantized ones through `linear_kernels` (below the class) ----------------

    def matmul(self, x: np.ndarray, w: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
        """x (..., K) @ w.T for a float32 or bfloat16 weight (N, K): the register-blocked microkernel."""
        x2 = _rows(x)  # (M, K)
        out = np.empty((x2.shape[0], w.shape[0]), np.float32)
        kernels.float_matmul(x2, _float_bits(w), out)
        return _finish(out, x, bias)

    def linears(self, x: np.ndarray, layers: Sequence[Linear]) -> list[np.ndarray]:
        """Up to three Linears of one input in one kernel, so a decode step starts the threads once for q/k/v and
        once for gate/up and each thread streams an equal share of the rows of all of them: float weights of one
        dtype (float32 or bfloat16) through `float_matmuls`; GGUF weights (each its own block type) through
        `gguf_matmuls` for more than SMALL_BATCH tokens and, when they are all of the 32-element block types,
        `gguf_matvecs` for fewer; for up to SMALL_BATCH tokens on AVX-512 VNNI CPUs, W8A8 weights of one
        activation semantics through `_w8a8_decode`, which quantizes x once for all of them. Other groups run one
        by one. Which of these a group of quantized weights takes is decided on its first call (`_group`)."""
        if not 1 < len(layers) <= 3:
            return super().linears(x, layers)
        weights = [layer.weight for layer in layers]
        x2 = _rows(x)  # (M, K)
        M = x2.shape[0]
        if isinstance(weights[0], np.ndarray):
            if not _float_group(weights):
                return super().linears(x, layers)
            none = 3 - len(weights)
            stored = [_float_bits(w) for w in weights]
            outs = [np.empty((M, w.shape[0]), np.float32) for w in weights]  # (M, N_i)
            kernels.float_matmuls(x2, *stored, *[kernels.NO_ROWS[stored[0].dtype]] * none, *outs,
                                  *[kernels.NO_OUTPUT] * none)
        else:
            group = self._group(weights)
            kernel = group.decode if M <= SMALL_BATCH else group.prompt
            if kernel == "":
                return super().linears(x, layers)
            if kernel == "w8a8_decode":
                outs = self._w8a8_decode(x2, group.arrays)  # x quantized once
            else:
                outs = [np.empty((M, n), np.float32) for n in group.rows]
                getattr(kernels, kernel)(*group.arrays, x2, *outs, *[kernels.NO_OUTPUT] * (3 - len(outs)))
        return [_finish(out, x, layer.bias) for out, layer in zip(outs, layers, strict=True)]

    def _group(self, weights: list[Any]) -> _Group:
        """How `linears` runs these quantized weights, kept with the first of them (a decode step asks 60 times)."""
        group = self._groups.get(weights[0])
        if group is None or not _refer_to(group.rest, weights[1:]):
            group = self._groups[weights[0]] = self._plan(weights)
        return group

    def _plan(self, weights: list[Any]) -> _Group:
        rest = tuple(weakref.ref(w) for w in weights[1:])
        if (all(isinstance(w, GGUFBlockWeight) and int(w.ggml_type) in kernels.GGUF_BLOCKS for w in weights)
                and len({w.shape[1] for w in weights}) == 1):
            blocks = [self._blocks(w) for w in weights]
            slots = [(b.kind, b.raw) for b in blocks] + [(kernels.Q8_0, kernels.NO_ROWS[np.dtype(np.uint8)])] * (
                3 - len(blocks))
            decode = "gguf_matvecs" if all(b.kind in kernels.BLOCKS_32 for b in blocks) else ""  # K-quants: one by one
            return _Group(rest, decode, "gguf_matmuls", tuple(a for slot in slots for a in slot),
                          tuple(b.raw.shape[0] for b in blocks))
        if (numba_gemm.VNNI and all(isinstance(w, Int8Weight) and w.activation is not None for w in weights)
                and len({w.activation.semantics for w in weights}) == 1):
            prepared = [self._w8a8_prepared(w) for w in weights]
            return _Group(rest, "w8a8_decode", "", prepared, tuple(p.q.shape[0] for p in prepared))
        return _Group(rest, "", "", (), ())

    def _linear_int8(self, x: np.ndarray, w: Int8Weight, bias: np.ndarray | None) -> np.ndarray:
        x2 = _rows(x)
        return _finish(self._w8a8(x2, w) if w.activation is not None else self._codes_matmul(x2, w), x, bias)

    def _linear_packed(self, x: np.ndarray, w: PackedIntWeight, bias: np.ndarray | None) -> np.ndarray:
        return _finish(self._codes_matmul(_rows(x), w), x, bias)

    def _linear_blocks(self, x: np.ndarray, w: GGUFBlockWeight, bias: np.ndarray | None) -> np.ndarray:
        x2 = _rows(x)
        blocks = self._blocks(w)
        out = np.empty((x2.shape[0], blocks.raw.shape[0]), np.float32)
        if x2.shape[0] <= SMALL_BATCH:  # gguf_matvec reads every block type the loader keeps
            kernels.gguf_matvec(blocks.kind, blocks.raw, x2, out)
        else:
            kernels.gguf_matmul(blocks.kind, blocks.raw, x2, out)
        return _finish(out, x, bias)

    def _codes_matmul(self, x: np.ndarray, w: Int8Weight | PackedIntWeight) -> np.ndarray:
        c = self._codes(w)
        out = np.empty((x.shape[0], c.codes.shape[0]), np.float32)
        kernels.codes_matmul(c.codes, c.bits, c.zero, c.scale, c.group, x, out)
        return out

    def _w8a8_decode(self, x: np.ndarray, prepared: list[_W8A8]) -> list[np.ndarray]:
        """x (M, K) times each weight, M <= SMALL_BATCH, on AVX-512 VNNI: quantized by the first call, reused by
        the others."""
        M, K = x.shape
        a = np.empty((M, numba_gemm.decode_width(K)), np.uint8)  # codes + 128, zero-padded to 64-byte chunks
        scales = np.empty(M, np.float32)
        outs = []
        for i, p in enumerate(prepared):
            out = np.empty((M, p.q.shape[0]), np.float32)
            numba_gemm.int8_vnni_matvec(x, i == 0, a, scales, p.q, p.sums, p.scale, p.vllm, out, self._threads_now)
            outs.append(out)
        return outs

    def _w8a8_prepared(self, w: Int8Weight) -> _W8A8:
        """The weight's arrays as the kernels read them, made on first use: the stored rows themselves (q, and q4
        unless K % 4 != 0), plus 4 bytes per row (`sums`) on a VNNI CPU and the scales as float32 (N,)."""
        p = self._prepared.get(w)
        if p is None:
            q = np.ascontiguousarray(w.q)
            N, K = q.shape
            if K > INT8_MAX_K:
                raise BackendError(f"an int32 accumulator overflows for K = {K} > {INT8_MAX_K}")
            scale = np.broadcast_to(np.asarray(w.scale, np.float32).reshape(-1), (N,))
            q4 = sums = None
            if numba_gemm.VNNI:
                q4 = q if K % 4 == 0 else np.pad(q, ((0, 0), (0, -K % 4)))
                sums = q.sum(axis=1, dtype=np.int32)
            ro = kernels.readonly
            p = self._prepared[w] = _W8A8(ro(q), ro(np.ascontiguousarray(scale)), w.activation.semantics == "vllm",
                                          None if q4 is None else ro(q4), None if sums is None else ro(sums))
        return p

    def _w8a8(self, x: np.ndarray, w: Int8Weight) -> np.ndarray:
        p = self._w8a8_prepared(w)
        M, K = x.shape
        if M <= SMALL_BATCH and p.sums is not None:  # AVX-512 VNNI, each weight row read once
            return self._w8a8_decode(x, [p])[0]
        out = np.empty((M, p.q.shape[0]), np.float32)
        scales = np.empty(M, np.float32)
        if M > SMALL_BATCH and p.q4 is not None:  # AVX-512 VNNI: exact int8 products, 3x to 4x the float path
            a4 = np.zeros((-(-K // 4), 4 * numba_gemm.padded_tokens(M)), np.uint8)
            numba_gemm.quantize_pack(x, p.vllm, a4, scales, self.threads)
            numba_gemm.int8_vnni_gemm(a4, M, p.q4, p.sums, p.scale, scales, p.vllm, out, self.threads)
            return out
        codes = np.empty((M, K), np.int8)
        kernels.quantize_tokens(x, p.vllm, codes, scales)
        if M <= SMALL_BATCH:  # a CPU without VNNI
            kernels.int8_matmul(codes, p.q, p.scale, scales, p.vllm, out)
            return out
        # Prefill: the same accumulators from float32 sums of at most EXACT_FLOAT_TERMS products (exact).
        chunks = -(-K // kernels.EXACT_FLOAT_TERMS)
        width = -(-K // chunks)
        split = np.zeros((M, chunks * width), np.float32)
        split[:, :K] = codes
        kernels.int8_matmul_float(np.ascontiguousarray(split.reshape(M, chunks, width).transpose(1, 0, 2)), p.q,
                                  p.scale, scales, p.vllm, out)
        return out

    def _codes(self, w: Int8Weight | PackedIntWeight) -> _Codes:
        """The codes, zeros, scales and column groups of a weight-only Linear, as refllama/quant/types.py means them."""
        p = self._prepared.get(w)
        if p is not None:
            return p
        N, K = w.shape
        if isinstance(w, Int8Weight):
            codes, bits, zero = np.ascontiguousarray(w.q), 0, w.zero_point
            default_zero = 0
        else:
            # Rows of int32 words are the rows' little-endian bit streams; GPTQ's transposed view is made contiguous.
            codes, bits, zero = np.ascontiguousarray(w.packed).view(np.uint8), w.bits, w.zero
            default_zero = 1 << (w.bits - 1)
        cols = group_index(w)
        G = 1 if cols is None else np.asarray(w.scale).shape[1]
        scale = np.asarray(w.scale, np.float32)[:, :G]
        zero = np.full((N, G), default_zero, np.int32) if zero is None else np.asarray(zero)[:, :G].astype(np.int32)
        group = np.zeros(K, np.int32) if cols is None else cols.astype(np.int32)
        ro = kernels.readonly
        p = self._prepared[w] = _Codes(ro(codes), bits, ro(np.ascontiguousarray(np.broadcast_to(zero, (N, G)))),
                                       ro(np.ascontiguousarray(np.broadcast_to(scale, (N, G)))), ro(group))
        return p

    def _blocks(self, w: GGUFBlockWeight) -> _Blocks:
        p = self._prepared.get(w)
        if p is None:
            kind = int(w.ggml_type)
            if kind not in kernels.GGUF_BLOCKS:
                raise BackendError(f"the numba backend has no kernel for GGUF {GGMLType(kind).name} blocks")
            p = self._prepared[w] = _Blocks(kernels.readonly(np.ascontiguousarray(w.raw)), kind, int(w.shape[1]))
        return p


NumbaBackend.linear_kernels = {Int8Weight: NumbaBackend._linear_int8, PackedIntWeight: NumbaBackend._linear_packed,
                               GGUFBlockWeight: NumbaBackend._linear_blocks}
BACKEND = NumbaBackend


def _rows(x: np.ndarray) -> np.ndarray:
    """x (..., K) as a C-contiguous float32 (M, K) matrix, the kernels' input layout."""
    return np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1])


def _finish(out: np.ndarray, x: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """A kernel's (M, N) output back to x's leading shape (..., N), plus the bias."""
    y = out.reshape(*x.shape[:-1], -1)
    return y if bias is None else y + bias


def _float_bits(w: np.ndarray) -> np.ndarray:
    """A float32 or bfloat16 matrix as the float kernels read it: C-contiguous, read-only, bfloat16 as its uint16
    bits."""
    w = kernels.readonly(np.ascontiguousarray(w))
    return w.view(np.uint16) if w.dtype == BF16 else w


def _refer_to(refs: tuple[weakref.ref, ...], objects: list[Any]) -> bool:
    """Whether the weak references `refs` point at exactly `objects`, by identity (arrays compare by value)."""
    return len(refs) == len(objects) and all(map(operator.is_, [ref() for ref in refs], objects))


def _float_group(weights: list[Any]) -> bool:
    """Whether `float_matmuls` can run these weights together: 2-D NumPy matrices of one dtype, float32 or
    bfloat16, with the same number of columns."""
    first = weights[0]
    return all(isinstance(w, np.ndarray) and w.ndim == 2 and w.dtype == first.dtype and w.shape[1] == first.shape[1]
               for w in weights) and first.dtype in (np.float32, BF16)


def _float32(a: np.ndarray) -> np.ndarray:
    """float32 values of a float32 or bfloat16 array (exact)."""
    return a.astype(np.float32) if a.dtype == BF16 else a


def _cache_buffer(a: np.ndarray) -> np.ndarray:
    """A C-contiguous (B, KV, S_max, D) array whose [:, :, :S] is `a`: the KV cache buffer behind the views that
    cache.update returns (so attention reads contiguous rows without a copy), `a` itself, or else a copy."""
    if a.flags.c_contiguous:
        return a
    base = a.base
    if (isinstance(base, np.ndarray) and base.flags.c_contiguous and base.dtype == a.dtype and base.ndim == 4
            and base.shape[:2] == a.shape[:2] and base.shape[3] == a.shape[3] and base.strides == a.strides
            and kernels.same_start(a, base)):
        return base
    return np.ascontiguousarray(a)
