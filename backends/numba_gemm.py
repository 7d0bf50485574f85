"""Kernels for the numba backend built on instructions Numba's loops do not reach: W8A8 on AVX-512 VNNI, bit for bit,
for prompts (a GEMM) and decode steps (a matvec); and for prompts, attention as two blocked matrix products, SiLU-mul
and the softmax with a vectorised float32 exp (`exp32`).

W8A8. The reference's int8 x int8 -> int32 accumulators are exact whatever the order, so any exact integer
instruction may compute them. vpdpbusd adds four u8 x s8 products into each of 16 int32 lanes per instruction: 64
multiply-adds where a float32 FMA does 16. It multiplies unsigned by signed bytes, so the activation codes a (int8)
go in as a + 128 and the result is corrected by 128 sum_k w[n, k], precomputed per weight row.
* a4 (ceil(K / 4), Mp * 4) uint8 (`quantize_pack`): for each 4 consecutive k, token m's 4 bytes at [4m, 4m + 4);
  tokens zero-padded to Mp (`padded_tokens`, a multiple of 16), k past K zero.
* w (N, K) int8, the weight rows as stored, K a multiple of 4 (else padded with zeros once by the caller): each
  row's 4 bytes at k = 4g are broadcast to every lane as one int32.
* The microkernel keeps ROWS x 2 accumulators (ROWS weight rows x 32 tokens) in registers over all of K.
* Work split: `prange` over runs of CHUNK-row chunks, one run per thread; within a chunk, for each 32-token group,
  every block of ROWS rows, so the chunk's rows stay in L2 across token groups.
W8A8 decode (up to SMALL_BATCH tokens, `int8_vnni_matvec`): the weight bytes dominate, so each row is read once,
in memory order, as stored (any K: no padded copy).
* a (M, K rounded up to 64) uint8 (`quantize_u8`): token m's codes + 128 at a[m, :K], zeros after.
* Per 64-byte chunk of a row: one load, vpdpbusd with each token's 64 bytes; a row's last partial chunk is a
  masked load. Accumulators (16 lanes) are summed four rows at a time by a shuffle tree, and the same epilogue
  as int8_matmul applied.
* Quantizing is part of the call, or skipped (`quantize` False) to reuse the last call's codes: the Linears that
  share one input (q/k/v, gate/up) quantize it once (NumbaBackend.linears).
* Work split: `prange` over one contiguous run of DECODE_ROWS-row blocks per thread.
Without VNNI (`VNNI` False) the backend keeps numba_kernels.int8_matmul (decode) and int8_matmul_float (prompts).

Attention. numba_kernels.attention (decode) dots one query with one key at a time. For a prompt, a block of
QUERIES positions of one head: scores = Q K^T over the keys up to the block's last allowed one through
numba_kernels' 4x4 microkernel, then (unnormalised softmax weights) V through the GGUF prompts' broadcast
microkernel (V's rows as they are; head sizes not a multiple of 32: V transposed, the 4x4 kernel), divided by
the row sums as there.

exp. NumPy's exp in a Numba loop is a call to libm's scalar expf (no SVML here), which kept the softmax and SiLU
scalar; `exp32` (numba_kernels', which the decode attention uses too) is plain float32 arithmetic that LLVM
vectorises, within 1.5 ulp.

docs/numba.md has the measurements.
"""

from __future__ import annotations

from refllama.backends.numba_kernels import (  # first: it sets NUMBA_CACHE_DIR, then imports numba
    LOWEST,
    PANEL_TOKENS,
    REASSOC,
    VNNI,
    _rows_times_tokens,
    _tokens_times_rows,
    _w8a8_epilogue,
    code_hf,
    code_vllm,
    exp32,
    ir_loop,
    quantize_tokens,
    readonly,
    token_scale,
)

# isort: split
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

LANES = 16  # int32 lanes of one 512-bit vector
ROWS = 6  # weight rows per microkernel: ROWS x 2 accumulators, ROWS broadcasts and 2 vector loads per 4 k
TOKENS = 2 * LANES  # tokens per microkernel call (a 16-token call covers an odd last group)
CHUNK = 8 * ROWS  # weight rows per chunk: they stay in L2 while every token group passes

_I32 = ir.IntType(32)
_I64 = ir.IntType(64)


def padded_tokens(m: int) -> int:
    """Tokens of a packed activation block for m tokens: a multiple of LANES (the padding is zero)."""
    return -(-m // LANES) * LANES


# ---------------------------------------------------------------------------------------------------------------
# W8A8 through AVX-512 VNNI: vpdpbusd sums four u8 x s8 products into each int32 lane, exactly
# ---------------------------------------------------------------------------------------------------------------



def _vnni_microkernel(rows: int, vectors: int):
    """An intrinsic kernel(w, r0, a4, m0, g0, g1, tile): int32 tile[i * 16 * vectors + t] = sum over k in
    [4 g0, 4 g1) of a_u8[m0 + t, k] * w[r0 + i, k], exactly (int32 lanes; wrapping, but the caller's result fits).

    w (R, K) int8 rows as stored, K a multiple of 4: each row's 4 bytes at k = 4g are broadcast as one int32.
    a4 (K / 4, Mp * 4) uint8: token m's bytes k = 4g .. 4g + 3 at a4[g, 4m:4m + 4] (`quantize_pack`), so one
    <16 x i32> load holds 16 tokens' four bytes each, the layout vpdpbusd multiplies lane by lane."""
    vec = ir.VectorType(_I32, LANES)
    width = LANES * vectors

    @intrinsic
    def kernel(typingctx, w, r0, a4, m0, g0, g1, tile):
        if not (isinstance(w, types.Array) and w.ndim == 2 and w.layout == "C" and w.dtype == types.int8
                and isinstance(a4, types.Array) and a4.ndim == 2 and a4.layout == "C" and a4.dtype == types.uint8
                and isinstance(tile, types.Array) and tile.ndim == 1 and tile.layout == "C"
                and tile.dtype == types.int32 and all(isinstance(i, types.Integer) for i in (r0, m0, g0, g1))):
            return None

        def codegen(context, builder, signature, args):
            w_arr = context.make_array(signature.args[0])(context, builder, args[0])
            a_arr = context.make_array(signature.args[2])(context, builder, args[2])
            t_arr = context.make_array(signature.args[6])(context, builder, args[6])
            start_row, first_token, start, stop = (context.cast(builder, args[i], signature.args[i], types.int64)
                                                   for i in (1, 3, 4, 5))
            K = builder.extract_value(w_arr.shape, 1)
            row_bytes = builder.extract_value(a_arr.shape, 1)
            dot = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec, vec, vec]),
                                                 "llvm.x86.avx512.vpdpbusd.512")
            row_ptrs = [builder.gep(w_arr.data, [builder.mul(builder.add(start_row, ir.Constant(_I64, i)), K)])
                        for i in range(rows)]
            a_base = builder.gep(a_arr.data, [builder.mul(first_token, ir.Constant(_I64, 4))])
            broadcast = ir.Constant(vec, [0] * LANES)

            def body(g, accs):  # for g in range(g0, g1): k = 4g .. 4g + 3
                a_row = builder.gep(a_base, [builder.mul(g, row_bytes)])
                xs = [builder.load(builder.bitcast(builder.gep(a_row, [ir.Constant(_I64, 4 * LANES * v)]),
                                                   vec.as_pointer()), align=1) for v in range(vectors)]
                k = builder.mul(g, ir.Constant(_I64, 4))
                updated = []
                for i in range(rows):
                    word = builder.load(builder.bitcast(builder.gep(row_ptrs[i], [k]), _I32.as_pointer()), align=1)
                    ws = builder.shuffle_vector(builder.insert_element(ir.Constant(vec, ir.Undefined), word,
                                                                       ir.Constant(_I32, 0)),
                                                ir.Constant(vec, ir.Undefined), broadcast)
                    for v in range(vectors):
                        updated.append(builder.call(dot, [accs[i * vectors + v], xs[v], ws]))
                return updated

            finals = ir_loop(builder, start, stop, [ir.Constant(vec, [0] * LANES)] * (rows * vectors), body, "vnni")
            for j, final in enumerate(finals):
                i, v = divmod(j, vectors)
                where = builder.gep(t_arr.data, [ir.Constant(_I64, i * width + v * LANES)])
                builder.store(final, builder.bitcast(where, vec.as_pointer()), align=4)
            return context.get_dummy_value()

        return types.none(w, r0, a4, m0, g0, g1, tile), codegen

    return kernel


_int8_rows_by_32 = _vnni_microkernel(ROWS, 2)
_int8_rows_by_16 = _vnni_microkernel(ROWS, 1)


@njit(cache=True, parallel=True)
def quantize_pack(x, vllm, a4, scales, threads):
    """numba_kernels.quantize_tokens of x (M, K) float32, bit for bit, with the codes written as vpdpbusd reads
    them: a4[g, 4m + j] = code[m, 4g + j] + 128 (unsigned), scales (M,). a4 (ceil(K / 4), Mp * 4) must arrive
    zeroed: its entries past K and past M stay 0 and add nothing. The tokens are split across the threads (a
    serial pass was a tenth of a 2-thread W8A8 prefill)."""
    M = x.shape[0]
    parts = max(1, min(M, threads))
    for p in prange(parts):
        _quantize_pack_rows(x, vllm, a4, scales, p * M // parts, (p + 1) * M // parts)


@njit(cache=True)
def _quantize_pack_rows(x, vllm, a4, scales, lo, hi):
    K = x.shape[1]
    codes = np.empty((hi - lo, K), np.int8)
    quantize_tokens(x[lo:hi], vllm, codes, scales[lo:hi])
    for m in range(hi - lo):
        for k in range(K):
            a4[k >> 2, 4 * (lo + m) + (k & 3)] = np.uint8(np.int32(codes[m, k]) + 128)


@njit(cache=True)
def _int8_tile(w, r0, a4, m0, groups, tile):
    if 4 * (m0 + TOKENS) <= a4.shape[1]:
        _int8_rows_by_32(w, r0, a4, m0, 0, groups, tile)
        return TOKENS
    _int8_rows_by_16(w, r0, a4, m0, 0, groups, tile)
    return LANES


@njit(cache=True, parallel=True)
def int8_vnni_gemm(a4, M, w, w_sums, w_scale, a_scale, vllm, out, threads):
    """W8A8 for many tokens: numba_kernels.int8_matmul's accumulators and epilogue, bit for bit, with vpdpbusd.

    a4: the activation codes + 128 as unsigned bytes (`quantize_pack`); w (N, K) int8 with K a multiple of 4 (the
    stored rows, read in place); w_sums (N,) int32: sum_k w[n, k]. sum_k (a + 128) w - 128 sum_k w = sum_k a w,
    every step exact in int32 (or wrapping, when only the final sum is known to fit: the same result mod 2**32).
    """
    chunks = (w.shape[0] + CHUNK - 1) // CHUNK
    parts = max(1, min(chunks, threads))
    for p in prange(parts):
        _int8_chunks(a4, M, w, w_sums, w_scale, a_scale, vllm, out, p * chunks // parts, (p + 1) * chunks // parts)


@njit(cache=True)
def _int8_chunks(a4, M, w, w_sums, w_scale, a_scale, vllm, out, first, stop):
    """Chunks [first, stop) of int8_vnni_gemm: one thread's share, a serial function (numba_kernels' docstring:
    writes through views made inside a parallel kernel are dropped)."""
    N, K = w.shape
    groups = K // 4
    Mp = a4.shape[1] // 4
    tile = np.empty(ROWS * TOKENS, np.int32)
    last = np.zeros((ROWS, K), np.int8)  # the last rows, when fewer than ROWS remain
    for c in range(first, stop):
        n0 = c * CHUNK
        count = min(CHUNK, N - n0)
        for m0 in range(0, Mp, TOKENS):
            for r0 in range(0, count, ROWS):
                n = n0 + r0
                if n + ROWS <= N:
                    width = _int8_tile(w, n, a4, m0, groups, tile)
                else:
                    last[:N - n] = w[n:]
                    width = _int8_tile(last, 0, a4, m0, groups, tile)
                for i in range(min(ROWS, N - n)):
                    correction = np.int32(128) * w_sums[n + i]
                    for t in range(min(width, M - m0)):
                        acc = np.int32(tile[i * width + t] - correction)
                        out[m0 + t, n + i] = _w8a8_epilogue(acc, w_scale[n + i], a_scale[m0 + t], vllm)


# ---------------------------------------------------------------------------------------------------------------
# W8A8 decode (up to a few tokens) through AVX-512 VNNI: each weight row streamed once, in 64-byte chunks
# ---------------------------------------------------------------------------------------------------------------

DECODE_ROWS = 4  # weight rows per decode microkernel call, each with independent accumulators
DECODE_TOKENS = 4  # tokens per call (fewer left over: one at a time, the rows then come from L1)


def _sum_four(builder, accs):
    """<4 x i32> of the lane sums of four <16 x i32> vectors (wrapping adds, exact mod 2**32): pairs of rows
    interleaved and added, then pairs of pairs, then the four 128-bit quarters: about half the instructions of four
    separate horizontal sums (8 each)."""
    def interleave_add(x, y, width):  # lanes of x and y, `width` at a time alternately, low and high halves added
        low, high = [], []
        for q in range(4):  # within each 128-bit quarter, as unpacklo/unpackhi
            base = 4 * q
            for j in range(0, 2, width):
                low += [base + j + e for e in range(width)] + [LANES + base + j + e for e in range(width)]
                high += [base + 2 + j + e for e in range(width)] + [LANES + base + 2 + j + e for e in range(width)]
        mask = ir.VectorType(_I32, LANES)
        return builder.add(builder.shuffle_vector(x, y, ir.Constant(mask, low)),
                           builder.shuffle_vector(x, y, ir.Constant(mask, high)))

    pairs = [interleave_add(accs[0], accs[1], 1), interleave_add(accs[2], accs[3], 1)]
    quads = interleave_add(pairs[0], pairs[1], 2)  # each quarter: [r0, r1, r2, r3] partial sums
    half = ir.VectorType(_I32, 8)
    halves = builder.add(builder.shuffle_vector(quads, quads, ir.Constant(half, list(range(8)))),
                         builder.shuffle_vector(quads, quads, ir.Constant(half, list(range(8, 16)))))
    quarter = ir.VectorType(_I32, 4)
    return builder.add(builder.shuffle_vector(halves, halves, ir.Constant(quarter, list(range(4)))),
                       builder.shuffle_vector(halves, halves, ir.Constant(quarter, list(range(4, 8)))))


def _vnni_rows_microkernel(rows: int, tokens: int):
    """An intrinsic kernel(w, r0, a, m0, tile): int32 tile[t * rows + i] = sum_k a[m0 + t, k] * w[r0 + i, k]
    for i < rows, t < tokens, exactly (wrapping int32 lanes; the caller's final sums fit).

    w (N, K) int8, the rows as stored (any K); a (M, Kp) uint8 activation codes + 128, Kp a multiple of 64 with
    zeros past K (`quantize_u8`). The rows are read one after the other, in memory order: interleaving four rows'
    chunks (four streams 576 bytes apart) read memory at 5 GB/s on one core here, one row at a time at 14 (software
    prefetching 512 to 4096 bytes ahead measured no better). Per
    64-byte chunk of a row: one load, one of each token, `tokens` vpdpbusd into <16 x i32> accumulators (lane j
    sums bytes 4j..4j+3); a row's last partial chunk is a masked load, so no byte past a row (or the array) is
    read. The rows' loops are independent, so the CPU overlaps them. Then the lanes are added, four rows at a time
    (`_sum_four`)."""
    vec = ir.VectorType(_I32, LANES)
    bytes64 = ir.VectorType(ir.IntType(8), 4 * LANES)
    i1x64 = ir.VectorType(ir.IntType(1), 4 * LANES)

    @intrinsic
    def kernel(typingctx, w, r0, a, m0, tile):
        if not (isinstance(w, types.Array) and w.ndim == 2 and w.layout == "C" and w.dtype == types.int8
                and isinstance(a, types.Array) and a.ndim == 2 and a.layout == "C" and a.dtype == types.uint8
                and isinstance(tile, types.Array) and tile.ndim == 1 and tile.layout == "C"
                and tile.dtype == types.int32 and isinstance(r0, types.Integer) and isinstance(m0, types.Integer)):
            return None

        def codegen(context, builder, signature, args):
            w_arr = context.make_array(signature.args[0])(context, builder, args[0])
            a_arr = context.make_array(signature.args[2])(context, builder, args[2])
            t_arr = context.make_array(signature.args[4])(context, builder, args[4])
            start_row, first_token = (context.cast(builder, args[i], signature.args[i], types.int64) for i in (1, 3))
            K = builder.extract_value(w_arr.shape, 1)
            Kp = builder.extract_value(a_arr.shape, 1)
            module = builder.module
            dot = cgutils.get_or_insert_function(module, ir.FunctionType(vec, [vec, vec, vec]),
                                                 "llvm.x86.avx512.vpdpbusd.512")
            masked_load = cgutils.get_or_insert_function(
                module, ir.FunctionType(bytes64, [bytes64.as_pointer(), _I32, i1x64, bytes64]),
                "llvm.masked.load.v64i8.p0")
            reduce_add = cgutils.get_or_insert_function(module, ir.FunctionType(_I32, [vec]),
                                                        "llvm.vector.reduce.add.v16i32")
            token_ptrs = [builder.gep(a_arr.data, [builder.mul(builder.add(first_token, ir.Constant(_I64, t)), Kp)])
                          for t in range(tokens)]
            full = builder.lshr(K, ir.Constant(_I64, 6))  # whole 64-byte chunks
            rest = builder.and_(K, ir.Constant(_I64, 63))
            zero = ir.Constant(vec, [0] * LANES)
            limit = builder.trunc(rest, ir.IntType(8))
            mask = builder.icmp_unsigned("<", ir.Constant(bytes64, list(range(4 * LANES))), builder.shuffle_vector(
                builder.insert_element(ir.Constant(bytes64, ir.Undefined), limit, ir.Constant(_I32, 0)),
                ir.Constant(bytes64, ir.Undefined), ir.Constant(ir.VectorType(_I32, 4 * LANES), [0] * 4 * LANES)))

            def load(ptr, offset):
                return builder.load(builder.bitcast(builder.gep(ptr, [offset]), vec.as_pointer()), align=1)

            def step(accs, ws, offset):
                return [builder.call(dot, [acc, load(p, offset), ws]) for acc, p in zip(accs, token_ptrs, strict=True)]

            finals = []  # finals[i][t]: row i, token t
            for i in range(rows):
                row = builder.gep(w_arr.data, [builder.mul(builder.add(start_row, ir.Constant(_I64, i)), K)])

                def body(c, accs, row=row):  # for c in range(full): bytes [64c, 64c + 64) of the row
                    offset = builder.mul(c, ir.Constant(_I64, 64))
                    return step(accs, load(row, offset), offset)

                merged = ir_loop(builder, ir.Constant(_I64, 0), full, [zero] * tokens, body, f"vnni.row{i}")
                after = builder.block
                tail = builder.append_basic_block(f"vnni.row{i}.tail")
                done = builder.append_basic_block(f"vnni.row{i}.done")
                builder.cbranch(builder.icmp_signed(">", rest, ir.Constant(_I64, 0)), tail, done)

                builder.position_at_end(tail)  # the last K % 64 bytes: a masked load reads only those
                offset = builder.mul(full, ir.Constant(_I64, 64))
                ws = builder.bitcast(builder.call(masked_load, [
                    builder.bitcast(builder.gep(row, [offset]), bytes64.as_pointer()), ir.Constant(_I32, 1), mask,
                    ir.Constant(bytes64, [0] * 4 * LANES)]), vec)
                tailed = step(merged, ws, offset)
                builder.branch(done)

                builder.position_at_end(done)
                row_finals = [builder.phi(vec) for _ in merged]
                for final, before, value in zip(row_finals, merged, tailed, strict=True):
                    final.add_incoming(before, after)
                    final.add_incoming(value, tail)
                finals.append(row_finals)

            for t in range(tokens):  # token t's row sums, rows in order: tile[t * rows:(t + 1) * rows]
                per_row = [finals[i][t] for i in range(rows)]
                for i0 in range(0, rows, 4):
                    where = builder.gep(t_arr.data, [ir.Constant(_I64, t * rows + i0)])
                    if rows - i0 >= 4:
                        builder.store(_sum_four(builder, per_row[i0:i0 + 4]),
                                      builder.bitcast(where, ir.VectorType(_I32, 4).as_pointer()), align=4)
                    else:
                        for j in range(rows - i0):
                            builder.store(builder.call(reduce_add, [per_row[i0 + j]]),
                                          builder.gep(where, [ir.Constant(_I64, j)]))
            return context.get_dummy_value()

        return types.none(w, r0, a, m0, tile), codegen

    return kernel


_decode_rows_by_tokens = _vnni_rows_microkernel(DECODE_ROWS, DECODE_TOKENS)
_decode_rows_by_1 = _vnni_rows_microkernel(DECODE_ROWS, 1)
_decode_row_by_1 = _vnni_rows_microkernel(1, 1)


def decode_width(k: int) -> int:
    """Bytes per token of `quantize_u8`'s activation buffer for K inputs: K rounded up to 64."""
    return -(-k // 64) * 64


@njit(cache=True)
def quantize_u8(x, vllm, a, scales):
    """numba_kernels.quantize_tokens of x (M, K) float32, bit for bit, with the codes written as vpdpbusd reads
    them: a[m, k] = code[m, k] + 128 (unsigned), zeros past K in a (M, decode_width(K)); scales (M,)."""
    M, K = x.shape
    for m in range(M):
        scales[m], factor = token_scale(x[m], vllm)
        if vllm:
            for k in range(K):
                a[m, k] = np.uint8(code_vllm(x[m, k], factor) + 128)
        else:
            for k in range(K):
                a[m, k] = np.uint8(code_hf(x[m, k], factor) + 128)
        for k in range(K, a.shape[1]):
            a[m, k] = 0


@njit(cache=True, parallel=True)
def int8_vnni_matvec(x, quantize, a, a_scale, w, w_sums, w_scale, vllm, out, threads):
    """W8A8 for a few tokens (decode): numba_kernels.int8_matmul's result, bit for bit, each weight row read once.

    x (M, K) float32; with `quantize`, first a, a_scale = quantize_u8(x) (serial: tiny next to the weights);
    without, a and a_scale already hold them, so the Linears that share one input (q/k/v, gate/up) quantize it
    once. w (N, K) int8 as stored, w_sums (N,) int32 = sum_k w[n, k], w_scale (N,); out (M, N) float32.
    Rows split into `threads` equal contiguous runs of DECODE_ROWS-row blocks (numba.get_num_threads() in here
    would keep numba from caching the kernel)."""
    if quantize:
        quantize_u8(x, vllm, a, a_scale)
    blocks = (w.shape[0] + DECODE_ROWS - 1) // DECODE_ROWS
    parts = max(1, min(blocks, threads))
    for p in prange(parts):
        _decode_blocks(a, a_scale, w, w_sums, w_scale, vllm, out, p * blocks // parts, (p + 1) * blocks // parts)


@njit(cache=True)
def _decode_blocks(a, a_scale, w, w_sums, w_scale, vllm, out, first, stop):
    """Row blocks [first, stop) of int8_vnni_matvec: one thread's share, a serial function (numba_kernels'
    docstring: writes through views made inside a parallel kernel are dropped)."""
    N = w.shape[0]
    M = out.shape[0]
    tile = np.empty(DECODE_ROWS * DECODE_TOKENS, np.int32)
    for b in range(first, stop):
        n = b * DECODE_ROWS
        if n + DECODE_ROWS > N:  # the last rows, one at a time
            for r in range(n, N):
                for m in range(M):
                    _decode_row_by_1(w, r, a, m, tile)
                    acc = np.int32(tile[0] - np.int32(128) * w_sums[r])
                    out[m, r] = _w8a8_epilogue(acc, w_scale[r], a_scale[m], vllm)
            continue
        m = 0
        while m < M:
            width = DECODE_TOKENS if m + DECODE_TOKENS <= M else 1
            if width == DECODE_TOKENS:
                _decode_rows_by_tokens(w, n, a, m, tile)
            else:
                _decode_rows_by_1(w, n, a, m, tile)
            for t in range(width):
                for i in range(DECODE_ROWS):
                    acc = np.int32(tile[t * DECODE_ROWS + i] - np.int32(128) * w_sums[n + i])
                    out[m + t, n + i] = _w8a8_epilogue(acc, w_scale[n + i], a_scale[m + t], vllm)
            m += width


# ---------------------------------------------------------------------------------------------------------------
# SiLU-mul for prompts
# ---------------------------------------------------------------------------------------------------------------

@njit(cache=True, parallel=True, fastmath={"contract"})
def silu_mul(gate, up, out):
    """out = silu(gate) * up = gate / (1 + exp(-gate)) * up for (tokens, I) rows, with `exp32`: numba_kernels.silu_mul
    for prompts, where its scalar exp took 5% of a prefill."""
    M, width = gate.shape
    for m in prange(M):
        for i in range(width):
            g = gate[m, i]
            out[m, i] = g / (np.float32(1.0) + exp32(-g)) * up[m, i]


# ---------------------------------------------------------------------------------------------------------------
# Attention for prompts
# ---------------------------------------------------------------------------------------------------------------

QUERIES = 32  # query positions per parallel item (the backend uses this kernel from this many positions on)


@njit(cache=True, parallel=True)
def prompt_attention(q, k, v, length, mask, out):
    """numba_kernels.attention's result (same arguments, same masking rules) for many query positions: a parallel
    item per (batch, head, block of QUERIES positions)."""
    B, T, H = q.shape[:3]
    blocks = (T + QUERIES - 1) // QUERIES
    for r in prange(B * H * blocks):
        _attention_block(q, k, v, length, mask, out, r // (H * blocks), (r // blocks) % H, r % blocks)


@njit(cache=True, fastmath=REASSOC)
def _attention_block(q, k, v, length, mask, out, b, h, blk):
    """One item of prompt_attention: a serial function, since writes through views made inside a parallel
    kernel are dropped (numba_kernels' docstring)."""
    T, H, D = q.shape[1:]
    group = H // k.shape[1]
    scale = np.float32(D**-0.5)
    keys, values = k[b, h // group], v[b, h // group]
    t0 = blk * QUERIES
    n = min(T, t0 + QUERIES) - t0
    hi = 0  # keys [0, hi) hold every allowed key of the block's queries
    for t in range(n):
        last = -1
        for s in range(length - 1, -1, -1):
            if mask[b, t0 + t, s]:
                last = s
                break
        hi = max(hi, last + 1) if last >= 0 else length  # a padding query averages all of V uniformly
    queries = np.empty((n, D), np.float32)  # the block's query rows, contiguous for the microkernel
    for t in range(n):
        for d in range(D):  # element by element: a row assignment compiles a shape check whose message took 2 s
            queries[t, d] = q[b, t0 + t, h, d]
    scores = np.empty((n, hi), np.float32)  # q . k, then in place the unnormalised softmax weights
    for s in range(0, hi, 4):
        _tokens_times_rows(queries, keys[s:s + 4], min(4, hi - s), scores, s)
    for t in range(n):
        row, allowed = scores[t], mask[b, t0 + t]
        highest = LOWEST
        count = 0
        for s in range(hi):
            if allowed[s]:
                row[s] *= scale
                highest = max(highest, row[s])
                count += 1
        for s in range(hi):
            if count == 0:  # hi == length here
                row[s] = np.float32(1.0)
            else:  # masked keys: q . k is finite, so exp32(...) * 0 = 0; branch-free, the loop vectorises
                row[s] = exp32(row[s] - highest) * np.float32(allowed[s])
    result = np.empty((n, D), np.float32)  # sum_s w_s v_s, divided by sum_s w_s below (numba_kernels.attention)
    if D % PANEL_TOKENS == 0:  # the weights times V's rows as they are, by the GGUF prompts' broadcast microkernel
        _rows_times_tokens(scores, n, values[:hi], result)
    else:  # V transposed: its columns are the 4x4 microkernel's "weight rows"
        values_t = np.empty((D, hi), np.float32)
        for s in range(hi):
            for d in range(D):
                values_t[d, s] = values[s, d]
        for d in range(0, D, 4):
            _tokens_times_rows(scores, values_t[d:d + 4], min(4, D - d), result, d)
    for t in range(n):
        total = np.float32(0.0)
        for s in range(hi):
            total += scores[t, s]
        for d in range(D):
            out[b, t0 + t, h, d] = result[t, d] / total


def warm_prompt_attention() -> None:
    """Compile (or load) `prompt_attention` for the argument types the backend passes (numba_helper calls this
    alone)."""
    q, kv = np.ones((1, QUERIES + 1, 2, 64), np.float32), np.ones((1, 1, QUERIES + 1, 64), np.float32)
    mask = readonly(np.ones((1, QUERIES + 1, QUERIES + 1), np.bool_))
    prompt_attention(q, kv, kv, QUERIES + 1, mask, np.empty_like(q))


def warm_up() -> None:
    """Compile (or load from the cache) this module's kernels for the argument types the backend passes (the VNNI
    ones only where the CPU has VNNI: the backend calls them nowhere else)."""
    warm_prompt_attention()
    x = np.ones((QUERIES, 8), np.float32)
    silu_mul(x, x, np.empty_like(x))
    if not VNNI:
        return
    f32, ro = np.float32, readonly  # the backend passes the weight's arrays read-only
    w, w_sums, w_scale = ro(np.ones((7, 8), np.int8)), ro(np.full(7, 8, np.int32)), ro(np.ones(7, f32))
    for vllm in (False, True):
        a4, scales = np.zeros((2, 4 * padded_tokens(9)), np.uint8), np.empty(9, f32)
        quantize_pack(np.ones((9, 8), f32), vllm, a4, scales, 1)
        int8_vnni_gemm(a4, 9, w, w_sums, w_scale, scales, vllm, np.empty((9, 7), f32), 1)
    x, a = np.ones((5, 8), f32), np.empty((5, decode_width(8)), np.uint8)
    int8_vnni_matvec(x, True, a, np.empty(5, f32), w, w_sums, w_scale, False, np.empty((5, 7), f32), 1)


__all__ = ["CHUNK", "DECODE_ROWS", "DECODE_TOKENS", "LANES", "QUERIES", "ROWS", "TOKENS", "VNNI", "decode_width",
           "int8_vnni_gemm", "int8_vnni_matvec", "padded_tokens", "prompt_attention", "quantize_pack", "quantize_u8",
           "silu_mul", "warm_prompt_attention", "warm_up"]
