"""Numba kernels for the numba backend (backends/numba_backend.py): the hot operations of one forward pass.

Layouts and exactness
* float32 only. Each kernel says which layout it reads; the backend passes arrays in that layout.
* `prange` runs over output rows: weight rows for the matmuls, (batch, head, query) rows for attention. Cheap ops
  (RMSNorm, RoPE, SiLU, per-token quantization) run on one thread, where starting threads costs more than the work.
* Exact kernels do the reference's float32 operations in the reference's order, without fused multiply-add, so
  they equal the numpy backend bit for bit: dequantization of every supported block format, RoPE, the W8A8
  activation quantization and epilogue, and the int8 x int8 -> int32 accumulators.
* Reductions (dot products, sums of squares, softmax sums) carry `fastmath={"reassoc", "contract"}` so that LLVM
  vectorises them. They differ from NumPy and BLAS in summation order only. fast-math flags sit on each LLVM
  instruction, so an exact helper called from a fast-math kernel stays exact.

Pitfalls measured while writing these (docs/numba.md has the numbers):
* Numba types `uint8 & 15` as int64, and converting that to float32 vectorises in 64-bit lanes. Writing
  `np.float32(np.uint8(q & 15))` keeps 32-bit lanes: 2x faster.
* A loop of 16 iterations, one Q4 block's 16 bytes, never runs vectorised. With a literal trip count LLVM unrolls
  it and leaves it scalar. With a run-time count, 16 is below the 32 elements of one pass of the vector body
  (8 lanes x 4 interleaved). The Q4_0/Q4_1/Q8_0 row dot products are therefore explicit LLVM vector code
  (`_row_dot`), 1.7x faster than per-block dots and 2.7x faster than the best loop form found.
* Inside a `parallel=True` kernel, numba turns array expressions such as `np.sum(x[a:b])` into parallel regions
  of their own, even outside `prange`: 18 of them made a 4-row matvec cost 250 us. Such helpers live in separate
  serial functions (`_block_sums`).
* From memory (not cache), a matvec waits on each row: prefetching a few rows ahead (`_prefetch_row`) made the
  quantized decode matvecs 2.7x faster, and the float32 one 1.1x with two threads (one thread alone: 1.18x
  slower).
* Inside `parallel=True`, writes through an array view created in the kernel are silently dropped
  (measured; docs/numba.md). Every output array, views included, is therefore created by the caller.

NUMBA_CACHE_DIR is set below, before numba is imported, because numba reads it once at import. Compiled kernels
go to a user cache directory, never beside the installed sources.
"""

from __future__ import annotations

import os


def cache_dir() -> str:
    """Where compiled kernels are cached: $NUMBA_CACHE_DIR if set, else $XDG_CACHE_HOME/refllama/numba."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get("NUMBA_CACHE_DIR") or os.path.join(base, "refllama", "numba")


os.environ["NUMBA_CACHE_DIR"] = cache_dir()

import numba  # noqa: E402  (after NUMBA_CACHE_DIR: numba reads it when first imported)
import numpy as np  # noqa: E402
from llvmlite import binding, ir  # noqa: E402
from numba import njit, prange, types  # noqa: E402
from numba.core import cgutils  # noqa: E402
from numba.extending import intrinsic  # noqa: E402

from refllama.backends import numba_progress  # noqa: E402, F401  (a status on stderr while kernels compile)


def _has_vnni() -> bool:
    """Whether the CPU numba compiles for has AVX-512 VNNI (numba targets the host unless NUMBA_CPU_NAME is set)."""
    if numba.config.CPU_NAME:  # a portable target (e.g. "generic"): no VNNI instructions
        return False
    features = binding.get_host_cpu_features()
    return bool(features.get("avx512vnni") and features.get("avx512bw"))


VNNI = _has_vnni()  # W8A8 then runs through numba_gemm's VNNI kernels, never int8_matmul or int8_matmul_float

if not numba.config.CACHE_DIR:  # numba was imported before this module: point it at the same directory
    numba.config.CACHE_DIR = os.environ["NUMBA_CACHE_DIR"]

REASSOC = {"reassoc", "contract"}
LOWEST = np.float32(np.finfo(np.float32).min)  # the reference's masked score (finite: padded rows stay finite)
PREFETCH_ROWS = 4  # matmul kernels prefetch the weight row this many rows ahead (measured best of 1..16)
SHARES = 48  # decode matvecs split their rows into this many equal shares (`_share`): even for 1, 2, 3, 4, 6, 8 threads

# ggml block formats with kernels here (refllama/formats/ggml_quants.py GGMLType values); others are dequantized at
# load. Bytes per block and elements per block:
Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K = 2, 3, 6, 7, 8, 12, 13, 14
GGUF_BLOCKS = {Q4_0: (18, 32), Q4_1: (20, 32), Q5_0: (22, 32), Q5_1: (24, 32), Q8_0: (34, 32), Q4_K: (144, 256),
               Q5_K: (176, 256), Q6_K: (210, 256)}
BLOCKS_32 = frozenset(kind for kind, (_, elements) in GGUF_BLOCKS.items() if elements == 32)  # gguf_matvecs' types


# ---------------------------------------------------------------------------------------------------------------
# LLVM building blocks: fp16 scales, prefetching, and a row of Q4/Q8 blocks dotted as explicit vectors
# ---------------------------------------------------------------------------------------------------------------

_F32 = ir.FloatType()
_I32 = ir.IntType(32)


@intrinsic
def f16(typingctx, lo, hi):
    """The IEEE half with little-endian bytes (lo, hi) as float32 (exact). Numba has no float16 on the CPU."""
    if not (isinstance(lo, types.Integer) and isinstance(hi, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        i16 = ir.IntType(16)
        low, high = (builder.trunc(builder.zext(a, _I32), i16) for a in args)
        bits = builder.or_(low, builder.shl(high, ir.Constant(i16, 8)))
        return builder.fpext(builder.bitcast(bits, ir.HalfType()), _F32)

    return types.float32(lo, hi), codegen


def _sum(builder, vector):
    """Horizontal sum of a float vector, in any order (a tree of vector adds)."""
    n = vector.type.count
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_F32, [_F32, vector.type]),
                                        f"llvm.vector.reduce.fadd.v{n}f32")
    return builder.call(fn, [ir.Constant(_F32, -0.0), vector], fastmath=("reassoc",))


def ir_loop(builder, start, stop, states, body, name):
    """Emit `for i in range(start, stop)` (int64 values) carrying LLVM values: each pass runs
    states = body(i, states), from `states`. Returns the states after the loop (the starting ones when it runs no
    pass), with the builder placed after it. The intrinsics' loops all take this shape."""
    entry = builder.block
    body_block, done = builder.append_basic_block(f"{name}.loop"), builder.append_basic_block(f"{name}.done")
    builder.cbranch(builder.icmp_signed("<", start, stop), body_block, done)
    builder.position_at_end(body_block)
    i = builder.phi(start.type)
    phis = [builder.phi(state.type) for state in states]
    steps = body(i, phis)
    latch = builder.block
    next_i = builder.add(i, ir.Constant(start.type, 1))
    for phi, first, step in ((i, start, next_i), *zip(phis, states, steps, strict=True)):
        phi.add_incoming(first, entry)
        phi.add_incoming(step, latch)
    builder.cbranch(builder.icmp_signed("<", next_i, stop), body_block, done)
    builder.position_at_end(done)
    finals = []
    for first, step in zip(states, steps, strict=True):
        final = builder.phi(first.type)
        final.add_incoming(first, entry)
        final.add_incoming(step, latch)
        finals.append(final)
    return finals


def _half(builder, where):
    """The fp16 at `where` (an i8 pointer) as float32 (exact)."""
    return builder.fpext(builder.load(builder.bitcast(where, ir.HalfType().as_pointer()), align=1), _F32)


def _half_splat(builder, where, lanes: int):
    """The fp16 at `where` (an i8 pointer) as float32 in `lanes` lanes (exact): the half is broadcast before it is
    widened, so x86 needs two instructions (vpbroadcastw, vcvtph2ps) instead of three."""
    i16 = ir.IntType(16)
    bits = builder.load(builder.bitcast(where, i16.as_pointer()), align=1)
    vector = ir.VectorType(i16, lanes)
    one = builder.insert_element(ir.Constant(vector, ir.Undefined), bits, ir.Constant(_I32, 0))
    splat = builder.shuffle_vector(one, ir.Constant(vector, ir.Undefined),
                                   ir.Constant(ir.VectorType(_I32, lanes), [0] * lanes))
    return builder.fpext(builder.bitcast(splat, ir.VectorType(ir.HalfType(), lanes)), ir.VectorType(_F32, lanes))


def _load(builder, where, vector_type):
    """An unaligned vector load from the i8 or float pointer `where`."""
    return builder.load(builder.bitcast(where, vector_type.as_pointer()), align=1)


def _block_codes(builder, block, codes_at: int, kind: str):
    """A Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 block's 32 codes as two 16-lane float vectors, elements 0-15 and 16-31 (exact):
    Q8_0 its int8 codes, Q4 the nibbles, Q5_1 the 5-bit codes, Q5_0 the signed codes q - 16."""
    i8, i64 = ir.IntType(8), ir.IntType(64)
    v16f, v16i = ir.VectorType(_F32, 16), ir.VectorType(_I32, 16)
    codes = builder.gep(block, [ir.Constant(i64, codes_at)])
    if kind == "q8_0":
        values = builder.sitofp(builder.sext(_load(builder, codes, ir.VectorType(i8, 32)),
                                             ir.VectorType(_I32, 32)), ir.VectorType(_F32, 32))
        return (builder.shuffle_vector(values, values, ir.Constant(v16i, list(range(16)))),
                builder.shuffle_vector(values, values, ir.Constant(v16i, list(range(16, 32)))))
    nibbles = builder.zext(_load(builder, codes, ir.VectorType(i8, 16)), v16i)
    low = builder.and_(nibbles, ir.Constant(v16i, [15] * 16))
    high = builder.lshr(nibbles, ir.Constant(v16i, [4] * 16))
    low, high = builder.uitofp(low, v16f), builder.uitofp(high, v16f)
    if kind in ("q5_0", "q5_1"):  # bit j of the little-endian 32-bit qh (4 bytes before the nibbles) is bit 4 of
        # element j. qh as 32 lane masks (AVX-512: mask registers) adds 16 where the bit is set (Q5_1), or subtracts
        # it where the bit is clear (Q5_0's signed q - 16: its bits inverted first), as one masked float add per
        # 16 lanes, all exact: 1.4x fewer instructions than shifting each lane's bit into place. Q5_0 has no offset
        # term, whose cancellation cost 9 eps32 at K = 1536 before.
        qh = builder.load(builder.bitcast(builder.gep(block, [ir.Constant(i64, codes_at - 4)]),
                                          _I32.as_pointer()), align=1)
        if kind == "q5_0":
            qh = builder.xor(qh, ir.Constant(_I32, -1))
        bits = builder.bitcast(qh, ir.VectorType(ir.IntType(1), 32))
        step = ir.Constant(v16f, [-16.0 if kind == "q5_0" else 16.0] * 16)
        halves = []
        for codes, lanes in ((low, range(16)), (high, range(16, 32))):
            mask = builder.shuffle_vector(bits, bits, ir.Constant(v16i, list(lanes)))
            halves.append(builder.select(mask, builder.fadd(codes, step), codes))
        return halves[0], halves[1]
    return low, high


def _row_dot(block_bytes: int, codes_at: int, kind: str):
    """An intrinsic row_dot(row, x, sums) -> float32: a weight row of Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 blocks dotted with x.

    row: the row's blocks (uint8, C-contiguous); x: K activations (float32, C); sums: the sum of each block's 32
    activations (Q4 offsets; unused for Q8_0). Written as LLVM vector code: a loop over blocks that keeps a
    16-lane accumulator, acc += d_b * (codes_b . x_b) lane by lane, so the row pays one horizontal sum at the end
    instead of one per block. Numba loops could not get there (module docstring): 1.7x faster than per-block dots.
    Codes: Q4 byte j holds element j (low nibble) and element j + 16 (high nibble); Q5 adds bit j of its
    little-endian 32-bit qh (bytes 2..5 after the scales) as bit 4 of element j; Q8_0 has 32 int8 codes.
    Offsets: Q4_1/Q5_1 add m_b * sums[b]; Q4_0 codes are nibble - 8, so it subtracts 8 d_b * sums[b]; Q5_0 dots
    the signed codes q - 16 themselves (no offset).
    """
    fm = ("reassoc", "contract")
    i64 = ir.IntType(64)
    v16f = ir.VectorType(_F32, 16)

    @intrinsic
    def row_dot(typingctx, row, x, sums):
        for array, dtype in ((row, types.uint8), (x, types.float32), (sums, types.float32)):
            if not (isinstance(array, types.Array) and array.ndim == 1 and array.layout == "C"
                    and array.dtype == dtype):
                return None

        def codegen(context, builder, signature, args):
            row_data, x_data, sums_data = (context.make_array(t)(context, builder, a).data
                                           for t, a in zip(signature.args, args, strict=True))
            x_shape = context.make_array(signature.args[1])(context, builder, args[1]).shape
            blocks = builder.udiv(builder.extract_value(x_shape, 0), ir.Constant(i64, 32))

            def body(b, states):
                acc, offset = states
                block = builder.gep(row_data, [builder.mul(b, ir.Constant(i64, block_bytes))])
                low, high = _block_codes(builder, block, codes_at, kind)
                x_block = builder.gep(x_data, [builder.mul(b, ir.Constant(i64, 32))])
                x_low = _load(builder, x_block, v16f)
                x_high = _load(builder, builder.gep(x_block, [ir.Constant(i64, 16)]), v16f)
                products = builder.fadd(builder.fmul(low, x_low, flags=fm), builder.fmul(high, x_high, flags=fm),
                                        flags=fm)
                d16 = _half_splat(builder, block, 16)
                next_acc = builder.fadd(acc, builder.fmul(d16, products, flags=fm), flags=fm)
                if kind in ("q8_0", "q5_0"):
                    return [next_acc, offset]
                factor = _half(builder, builder.gep(block, [ir.Constant(i64, 2 if kind in ("q4_1", "q5_1") else 0)]))
                return [next_acc, builder.fadd(offset, builder.fmul(factor, builder.load(builder.gep(sums_data, [b])),
                                                                    flags=fm), flags=fm)]

            final_acc, final_offset = ir_loop(builder, ir.Constant(i64, 0), blocks,
                                           [ir.Constant(v16f, [0.0] * 16), ir.Constant(_F32, 0.0)], body, "row_dot")
            total = _sum(builder, final_acc)
            if kind == "q4_0":
                return builder.fsub(total, builder.fmul(ir.Constant(_F32, 8.0), final_offset, flags=fm), flags=fm)
            return builder.fadd(total, final_offset, flags=fm)

        return types.float32(row, x, sums), codegen

    return row_dot


def _row_dequantize(block_bytes: int, codes_at: int, kind: str):
    """An intrinsic f(row, out): a weight row of Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 blocks dequantized into out (K,) float32,
    bit for bit ggml's: d * (q - 8) (Q4_0), d * q + m (Q4_1, Q5_1), d * q (Q5_0's signed q - 16, Q8_0). Every
    product d * q is exact in float32 (an 11-bit by 8-bit product), so no rounding order matters but the add of m.
    The codes as LLVM vectors (_block_codes): 8 to 20x the scalar loops (prompt panels dequantize every row)."""
    i64 = ir.IntType(64)
    v16f = ir.VectorType(_F32, 16)

    @intrinsic
    def dequantize(typingctx, row, out):
        for array, dtype in ((row, types.uint8), (out, types.float32)):
            if not (isinstance(array, types.Array) and array.ndim == 1 and array.layout == "C"
                    and array.dtype == dtype):
                return None

        def codegen(context, builder, signature, args):
            row_data, out_data = (context.make_array(t)(context, builder, a).data
                                  for t, a in zip(signature.args, args, strict=True))
            out_shape = context.make_array(signature.args[1])(context, builder, args[1]).shape
            blocks = builder.udiv(builder.extract_value(out_shape, 0), ir.Constant(i64, 32))

            def body(b, states):
                block = builder.gep(row_data, [builder.mul(b, ir.Constant(i64, block_bytes))])
                d = _half_splat(builder, block, 16)
                where = builder.gep(out_data, [builder.mul(b, ir.Constant(i64, 32))])
                for h, codes in enumerate(_block_codes(builder, block, codes_at, kind)):
                    if kind == "q4_0":
                        codes = builder.fsub(codes, ir.Constant(v16f, [8.0] * 16))
                    value = builder.fmul(d, codes)
                    if kind in ("q4_1", "q5_1"):
                        value = builder.fadd(value, _half_splat(builder, builder.gep(block, [ir.Constant(i64, 2)]), 16))
                    spot = builder.bitcast(builder.gep(where, [ir.Constant(i64, 16 * h)]), v16f.as_pointer())
                    builder.store(value, spot, align=4)
                return []

            ir_loop(builder, ir.Constant(i64, 0), blocks, [], body, "dequantize")
            return context.get_dummy_value()

        return types.none(row, out), codegen

    return dequantize


def _block_intrinsics(block_bytes: int, codes_at: int, kind: str):
    """A 32-element block type's two intrinsics, row_dot and dequantize, from one layout (as `_kquant_row_dot`)."""
    return _row_dot(block_bytes, codes_at, kind), _row_dequantize(block_bytes, codes_at, kind)


# bytes a block, where its codes start (after the fp16 scale(s) and Q5's 32-bit high bits)
q4_0_row_dot, q4_0_dequantize = _block_intrinsics(18, 2, "q4_0")
q4_1_row_dot, q4_1_dequantize = _block_intrinsics(20, 4, "q4_1")
q8_0_row_dot, q8_0_dequantize = _block_intrinsics(34, 2, "q8_0")
q5_0_row_dot, q5_0_dequantize = _block_intrinsics(22, 6, "q5_0")
q5_1_row_dot, q5_1_dequantize = _block_intrinsics(24, 8, "q5_1")



def _splat(builder, value, vector_type):
    """A vector of vector_type with `value` in every lane."""
    lanes = vector_type.count
    one = builder.insert_element(ir.Constant(vector_type, ir.Undefined), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(one, ir.Constant(vector_type, ir.Undefined),
                                  ir.Constant(ir.VectorType(_I32, lanes), [0] * lanes))


def _kquant_row_dot(kind: str):
    """Two intrinsics for a weight row of Q4_K, Q5_K or Q6_K super-blocks: row_dot(row, x, sums) -> float32, the row
    dotted with x, and dequantize(row, out) (below).

    row: the row's super-blocks (uint8, C); x: K activations (float32, C); sums: the sums of x's sub-blocks of 32
    (Q4_K/Q5_K's min terms; unused for Q6_K). LLVM vector code over whole super-blocks: a 32-lane accumulator
    acc[j] += f_s * (q_s,j * x[32 s + j]) for the 32-value groups s, kept in registers along the row, and the
    per-super-block factors computed as vectors (Q4_K/Q5_K: the 6-bit scales and mins unpacked from their 12
    bytes lane by lane; Q6_K: 16 int8 scales) instead of one scalar sub-block at a time (one core, 576 x 1536:
    Q4_K 1.6x, Q6_K 1.5x the per-sub-block intrinsics this replaced). Q4_K/Q5_K subtract sum_s (dmin * min_s) *
    sums[s], kept in 8 lanes; one horizontal sum each at the end.
    Layouts (ggml): Q4_K/Q5_K: fp16 d, fp16 dmin, 12 bytes of scales/mins, (Q5_K: 32 bytes qh, bit s of byte j is
    bit 4 of value 32 s + j), 128 bytes of nibbles, 32 bytes holding groups 2c (low nibbles) and 2c + 1 (high);
    w = (d * scale_s) * q - dmin * min_s. Q6_K: 128 bytes of low nibbles, 64 of 2-bit highs, 16 int8 scales,
    fp16 d; value 128 h + 32 g + j has low nibble ql[64 h + 32 (g % 2) + j] >> 4 (g // 2), high bits
    qh[32 h + j] >> 2 g, scale 8 h + 2 g + (j >= 16); w = (d * scale) * (q - 32). Codes are shifted and masked in
    8-bit lanes for Q6_K (1.2x), in 32-bit lanes for Q4_K/Q5_K (8-bit lanes were 1.15x slower).
    """
    fm = ("reassoc", "contract")
    i8, i64 = ir.IntType(8), ir.IntType(64)
    v8f = ir.VectorType(_F32, 8)
    v16f, v16i = ir.VectorType(_F32, 16), ir.VectorType(_I32, 16)
    v32b, v32i, v32f = ir.VectorType(i8, 32), ir.VectorType(_I32, 32), ir.VectorType(_F32, 32)
    size = {"q4_k": 144, "q5_k": 176, "q6_k": 210}[kind]

    def lanes(values, width):
        return ir.Constant(ir.VectorType(_I32, width), values)

    def k4_factors(builder, block):
        """(d * scale_s, dmin * min_s) for the 8 groups s, as 8-lane vectors (ggml's get_scale_min_k4)."""
        packed = builder.zext(_load(builder, builder.gep(block, [ir.Constant(i64, 4)]), ir.VectorType(i8, 16)),
                              v16i)  # bytes 4..19: the 12 scale bytes, then 4 unused

        def pick(indices):
            return builder.shuffle_vector(packed, packed, lanes(indices, 8))

        upper = builder.and_(builder.lshr(pick([0, 1, 2, 3, 0, 1, 2, 3]), lanes([2] * 8, 8)),
                             lanes([0] * 4 + [0x30] * 4, 8))  # groups 4..7: bits 4-5 from p[s - 4] >> 2
        upper_min = builder.and_(builder.lshr(pick([4, 5, 6, 7, 4, 5, 6, 7]), lanes([2] * 8, 8)),
                                 lanes([0] * 4 + [0x30] * 4, 8))  # groups 4..7: from p[s] >> 2
        scale = builder.or_(builder.and_(pick([0, 1, 2, 3, 8, 9, 10, 11]), lanes([63] * 4 + [15] * 4, 8)), upper)
        low_min = builder.lshr(pick([4, 5, 6, 7, 8, 9, 10, 11]), lanes([0] * 4 + [4] * 4, 8))
        minimum = builder.or_(builder.and_(low_min, lanes([63] * 8, 8)), upper_min)
        d, dmin = _half(builder, block), _half(builder, builder.gep(block, [ir.Constant(i64, 2)]))
        return (builder.fmul(_splat(builder, d, v8f), builder.uitofp(scale, v8f)),
                builder.fmul(_splat(builder, dmin, v8f), builder.uitofp(minimum, v8f)))

    def k4_groups(builder, block):
        """[(offset, codes, factors)] for the 8 groups of 32 values (codes and factors as 32-lane float vectors),
        and the 8 group mins dmin * min_s."""
        factors, mins = k4_factors(builder, block)
        qh = builder.zext(_load(builder, builder.gep(block, [ir.Constant(i64, 16)]), v32b), v32i) \
            if kind == "q5_k" else None
        groups = []
        for c in range(4):
            nibbles = builder.zext(_load(builder, builder.gep(block, [ir.Constant(i64, size - 128 + 32 * c)]), v32b),
                                   v32i)
            for high, s in ((0, 2 * c), (1, 2 * c + 1)):
                q = builder.and_(builder.lshr(nibbles, lanes([4] * 32, 32)) if high else nibbles, lanes([15] * 32, 32))
                if qh is not None:
                    bit = builder.and_(builder.lshr(qh, lanes([s] * 32, 32)), lanes([1] * 32, 32))
                    q = builder.or_(q, builder.shl(bit, lanes([4] * 32, 32)))
                groups.append((32 * s, builder.uitofp(q, v32f),
                               builder.shuffle_vector(factors, factors, lanes([s] * 32, 32))))
        return groups, mins

    def q6_groups(builder, block):
        """[(offset, codes q - 32, factors)] for the 8 groups of 32 values, as 32-lane float vectors."""
        scales = builder.sitofp(_load(builder, builder.gep(block, [ir.Constant(i64, 192)]), ir.VectorType(i8, 16)),
                                v16f)
        factors = builder.fmul(_splat(builder, _half(builder, builder.gep(block, [ir.Constant(i64, 208)])), v16f),
                               scales)
        groups = []
        for h in range(2):
            highs = _load(builder, builder.gep(block, [ir.Constant(i64, 128 + 32 * h)]), v32b)
            for g in range(4):
                low = _load(builder, builder.gep(block, [ir.Constant(i64, 64 * h + 32 * (g % 2))]), v32b)
                low = builder.and_(builder.lshr(low, ir.Constant(v32b, [4 * (g // 2)] * 32)),
                                   ir.Constant(v32b, [15] * 32))
                high = builder.and_(builder.lshr(highs, ir.Constant(v32b, [2 * g] * 32)), ir.Constant(v32b, [3] * 32))
                q = builder.or_(low, builder.shl(high, ir.Constant(v32b, [4] * 32)))
                codes = builder.sitofp(builder.sub(q, ir.Constant(v32b, [32] * 32)), v32f)  # -32..31 fits in 8 bits
                s = 8 * h + 2 * g
                groups.append((128 * h + 32 * g, codes,
                               builder.shuffle_vector(factors, factors, lanes([s] * 16 + [s + 1] * 16, 32))))
        return groups

    def block_groups(builder, block):
        return (q6_groups(builder, block), None) if kind == "q6_k" else k4_groups(builder, block)

    def array_data(context, builder, signature, args, i):
        return context.make_array(signature.args[i])(context, builder, args[i])

    @intrinsic
    def row_dot(typingctx, row, x, sums):
        for array, dtype in ((row, types.uint8), (x, types.float32), (sums, types.float32)):
            if not (isinstance(array, types.Array) and array.ndim == 1 and array.layout == "C"
                    and array.dtype == dtype):
                return None

        def codegen(context, builder, signature, args):
            row_data, x_array, sums_data = (array_data(context, builder, signature, args, i) for i in range(3))
            row_data, x_data, sums_data = row_data.data, x_array.data, sums_data.data

            def body(b, states):
                total, offset = states
                block = builder.gep(row_data, [builder.mul(b, ir.Constant(i64, size))])
                x_block = builder.gep(x_data, [builder.mul(b, ir.Constant(i64, 256))])
                groups, mins = block_groups(builder, block)
                for at, codes, factor in groups:
                    xs = _load(builder, builder.gep(x_block, [ir.Constant(i64, at)]), v32f)
                    total = builder.fadd(total, builder.fmul(factor, builder.fmul(codes, xs, flags=fm), flags=fm),
                                         flags=fm)
                if mins is not None:
                    group_sums = _load(builder, builder.gep(sums_data, [builder.mul(b, ir.Constant(i64, 8))]), v8f)
                    offset = builder.fadd(offset, builder.fmul(mins, group_sums, flags=fm), flags=fm)
                return total, offset

            blocks = builder.udiv(builder.extract_value(x_array.shape, 0), ir.Constant(i64, 256))
            total, offset = ir_loop(builder, ir.Constant(i64, 0), blocks,
                                 [ir.Constant(v32f, [0.0] * 32), ir.Constant(v8f, [0.0] * 8)], body, "kquant")
            return builder.fsub(_sum(builder, total), _sum(builder, offset), flags=fm)

        return types.float32(row, x, sums), codegen

    @intrinsic
    def dequantize(typingctx, row, out):
        """The row dequantized into out (K,) float32, bit for bit ggml's: (d * scale) * q - dmin * min (Q4_K,
        Q5_K: both products exact), (d * scale) * (q - 32) (Q6_K), in that order, without fused operations."""
        for array, dtype in ((row, types.uint8), (out, types.float32)):
            if not (isinstance(array, types.Array) and array.ndim == 1 and array.layout == "C"
                    and array.dtype == dtype):
                return None

        def codegen(context, builder, signature, args):
            row_data, out_array = (array_data(context, builder, signature, args, i) for i in range(2))

            def body(b, states):
                block = builder.gep(row_data.data, [builder.mul(b, ir.Constant(i64, size))])
                out_block = builder.gep(out_array.data, [builder.mul(b, ir.Constant(i64, 256))])
                groups, mins = block_groups(builder, block)
                for at, codes, factor in groups:
                    value = builder.fmul(factor, codes)
                    if mins is not None:
                        value = builder.fsub(value, builder.shuffle_vector(mins, mins, lanes([at // 32] * 32, 32)))
                    builder.store(value, builder.bitcast(builder.gep(out_block, [ir.Constant(i64, at)]),
                                                         v32f.as_pointer()), align=4)
                return []

            ir_loop(builder, ir.Constant(i64, 0),
                 builder.udiv(builder.extract_value(out_array.shape, 0), ir.Constant(i64, 256)), [], body, "kquant")
            return context.get_dummy_value()

        return types.none(row, out), codegen

    return row_dot, dequantize


q4_k_row_dot, q4_k_dequantize = _kquant_row_dot("q4_k")
q5_k_row_dot, q5_k_dequantize = _kquant_row_dot("q5_k")
q6_k_row_dot, q6_k_dequantize = _kquant_row_dot("q6_k")


@intrinsic
def prefetch(typingctx, array, offset):
    """Hint the CPU to fetch the cache line holding array[offset] (a 1-D C array) ahead of its use."""
    if not (isinstance(array, types.Array) and array.ndim == 1 and array.layout == "C"
            and isinstance(offset, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        where = builder.bitcast(builder.gep(data, [args[1]]), ir.IntType(8).as_pointer())
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [
            where.type, _I32, _I32, _I32]), "llvm.prefetch.p0")
        builder.call(fn, [where, ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])
        return context.get_dummy_value()

    return types.none(array, offset), codegen


@intrinsic
def widen(typingctx, value):
    """A weight element as float32: float32 as is; uint16, the bits of a bfloat16, widened exactly (the bfloat16
    is the top half of the float32). Kernels over float weights read either, so a bfloat16 checkpoint's matrices
    stay as stored: half the bytes to stream per token, and the same float32 products as after a conversion."""
    if value == types.float32:
        return types.float32(value), lambda context, builder, signature, args: args[0]
    if value == types.uint16:
        def codegen(context, builder, signature, args):
            return builder.bitcast(builder.shl(builder.zext(args[0], _I32), ir.Constant(_I32, 16)), _F32)

        return types.float32(value), codegen
    return None


@njit(cache=True)
def _prefetch_row(matrix, n):
    """Prefetch row n of a C-contiguous 2-D array, if it exists. Matvec kernels fetch a few rows ahead: without it
    they compute on one row while waiting for the next, and decode ran 2.7x slower from memory than from cache."""
    if n < matrix.shape[0]:
        row = matrix[n]
        for offset in range(0, row.shape[0], 64):
            prefetch(row, offset)


@njit(cache=True, fastmath=REASSOC)
def dot(a, b):
    """sum_k a[k] * b[k], vectorised (summation order free); a may be a row of bfloat16 bits (`widen`)."""
    acc = np.float32(0.0)
    for k in range(a.shape[0]):
        acc += widen(a[k]) * b[k]
    return acc


@njit(cache=True, fastmath=REASSOC)
def _tokens_times_rows4(x, w0, w1, w2, w3, out, n):
    """out[m, n + i] = x[m] . w_i for every token m of x (M, K) and four weight rows w0..w3 (K,).

    The GEMM microkernel: four tokens by four rows per pass over K, so each weight element loaded feeds four
    multiply-adds and so does each activation (16 accumulators). Leftover tokens go one at a time, still four
    rows per pass (the decode case). Weight rows are float32 or bfloat16 bits (`widen`).
    """
    M, K = x.shape
    m = 0
    while m + 4 <= M:
        xa, xb, xc, xd = x[m], x[m + 1], x[m + 2], x[m + 3]
        a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = np.float32(0.0)
        c0 = c1 = c2 = c3 = d0 = d1 = d2 = d3 = np.float32(0.0)
        for k in range(K):
            p, q, r, s = widen(w0[k]), widen(w1[k]), widen(w2[k]), widen(w3[k])
            u = xa[k]
            a0, a1, a2, a3 = a0 + u * p, a1 + u * q, a2 + u * r, a3 + u * s
            u = xb[k]
            b0, b1, b2, b3 = b0 + u * p, b1 + u * q, b2 + u * r, b3 + u * s
            u = xc[k]
            c0, c1, c2, c3 = c0 + u * p, c1 + u * q, c2 + u * r, c3 + u * s
            u = xd[k]
            d0, d1, d2, d3 = d0 + u * p, d1 + u * q, d2 + u * r, d3 + u * s
        out[m, n], out[m, n + 1], out[m, n + 2], out[m, n + 3] = a0, a1, a2, a3
        out[m + 1, n], out[m + 1, n + 1], out[m + 1, n + 2], out[m + 1, n + 3] = b0, b1, b2, b3
        out[m + 2, n], out[m + 2, n + 1], out[m + 2, n + 2], out[m + 2, n + 3] = c0, c1, c2, c3
        out[m + 3, n], out[m + 3, n + 1], out[m + 3, n + 2], out[m + 3, n + 3] = d0, d1, d2, d3
        m += 4
    while m < M:
        xa = x[m]
        a0 = a1 = a2 = a3 = np.float32(0.0)
        for k in range(K):
            u = xa[k]
            a0, a1, a2, a3 = (a0 + u * widen(w0[k]), a1 + u * widen(w1[k]), a2 + u * widen(w2[k]),
                              a3 + u * widen(w3[k]))
        out[m, n], out[m, n + 1], out[m, n + 2], out[m, n + 3] = a0, a1, a2, a3
        m += 1


@njit(cache=True, inline="always")
def _share(N, part):
    """Rows [start, stop) of share `part` of SHARES contiguous, equal (within a row) shares of N rows. Decode
    matvecs run prange over the shares, which numba hands to its threads in contiguous runs, so each thread
    streams one contiguous, equal part of the weight (prange over 64-row chunks split 192 rows 128 : 64 between
    two threads, and 576 rows 320 : 256)."""
    return N * part // SHARES, N * (part + 1) // SHARES


@njit(cache=True)
def _tokens_times_rows(x, rows, count, out, n):
    """out[:, n:n + count] = x @ rows[:count].T for a block of up to four weight rows (count < 4: the last block)."""
    if count == 4:
        _tokens_times_rows4(x, rows[0], rows[1], rows[2], rows[3], out, n)
    else:
        for i in range(count):
            for m in range(x.shape[0]):
                out[m, n + i] = dot(rows[i], x[m])


# ---------------------------------------------------------------------------------------------------------------
# exp in float32 vector lanes (numba's np.exp calls libm's scalar expf: without SVML no loop around it vectorises)
# ---------------------------------------------------------------------------------------------------------------

@intrinsic
def _float_bits(typingctx, bits):
    """The float32 whose IEEE bits are the int32 `bits`."""
    if bits != types.int32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], _F32)

    return types.float32(bits), codegen


@njit(cache=True, inline="always")
def exp32(x):
    """exp(x) for float32 x within 1.5 ulp of the exact value (measured: 1.004 over [-87, 88]; libm's expf: 0.5), in
    plain arithmetic that LLVM vectorises: 0.23 ns an element against 2.3 for np.exp here. Cephes' expf:
    x = n ln2 + r (ln2 in two parts), exp(r) by a degree-7 polynomial, 2**n put into the exponent bits. x is
    clamped to [-87.34, 88.38]: below, exp(x) < 1.2e-38 comes out as 1.2e-38; above, as 2.4e38 instead of
    more or inf (softmax arguments are <= 0; SiLU divides by 1 + exp(-g), so ~ -0 either way)."""
    x = min(max(x, np.float32(-87.33654)), np.float32(88.37626))  # 2**n stays a normal float32
    n = np.floor(x * np.float32(1.44269504088896341) + np.float32(0.5))
    r = x - n * np.float32(0.693359375) - n * np.float32(-2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    return (p * (r * r) + r + np.float32(1.0)) * _float_bits(np.int32((np.int32(n) + 127) << 23))


# ---------------------------------------------------------------------------------------------------------------
# Elementwise and normalisation
# ---------------------------------------------------------------------------------------------------------------

@njit(cache=True, fastmath=REASSOC)
def _sum_squares(row):
    acc = np.float32(0.0)
    for k in range(row.shape[0]):
        acc += row[k] * row[k]
    return acc


@njit(cache=True)
def rms_norm(x, weight, eps, out):
    """out[r] = weight * (x[r] * (1 / sqrt(mean(x[r]**2) + eps))) for x, out (R, D), rounded as the reference."""
    R, D = x.shape
    for r in range(R):
        variance = _sum_squares(x[r]) / np.float32(D)
        inverse = np.float32(1.0) / np.sqrt(variance + eps)
        for d in range(D):
            out[r, d] = weight[d] * (x[r, d] * inverse)


@njit(cache=True)
def rope(x, cos, sin, out):
    """Rotate-half RoPE: out = x * cos + rotate_half(x) * sin, rotate_half(x) = (-x[D/2:], x[:D/2]).

    x, out (B, T, H, D) C-contiguous: the memory behind the model's (B, H, T, D) views, so a decode step and a
    prompt compile one specialisation (transposed views of one token are typed C, of several A); cos, sin
    (B, 1, T, D) C-contiguous.
    """
    B, T, H, D = x.shape
    half = D // 2
    for b in range(B):
        for t in range(T):
            for h in range(H):
                for d in range(half):  # both halves in one loop, which LLVM vectorises (two loops: 5.8x slower)
                    lo, hi = x[b, t, h, d], x[b, t, h, d + half]
                    out[b, t, h, d] = lo * cos[b, 0, t, d] - hi * sin[b, 0, t, d]  # = lo c + (-hi) s, exactly
                    out[b, t, h, d + half] = hi * cos[b, 0, t, d + half] + lo * sin[b, 0, t, d + half]


@njit(cache=True, error_model="numpy")
def silu_mul(gate, up, out):
    """out = gate / (1 + exp(-gate)) * up for gate, up, out (M, I), with `exp32` as numba_gemm.silu_mul, so a decode
    step and a prompt round alike. On one thread: the backend calls it for one token (numba_gemm.silu_mul takes
    more), and parallel=True doubled its compile time. NumPy's error model: Python's checks each division for a
    zero divisor (1 + exp(-g) >= 1 never is), which kept the loop scalar: 11.7 us a call for 1536, now 1.1."""
    M, width = gate.shape
    for m in range(M):
        for i in range(width):
            g = gate[m, i]
            out[m, i] = g / (np.float32(1.0) + exp32(-g)) * up[m, i]


# ---------------------------------------------------------------------------------------------------------------
# Attention over the KV cache
# ---------------------------------------------------------------------------------------------------------------

@njit(cache=True)
def same_start(a, b):
    """Whether arrays a and b start at the same address (0.4 us; NumPy's `.ctypes.data` takes 2 us each)."""
    return a.ctypes.data == b.ctypes.data


@njit(cache=True, parallel=True)
def attention(q, k, v, length, mask, out):
    """softmax(q k^T / sqrt(D), masked) v with grouped-query heads, one (batch, head, query) row per iteration
    (`_attention_row`).

    q, out (B, T, H, D), C-contiguous (the memory behind the model's (B, H, T, D) views); k, v (B, KV, S_max, D)
    C-contiguous cache buffers, of which the first `length` positions are used; mask (B, T, length) bool.
    Query head h reads KV head h // (H // KV), so K/V are never repeated.
    """
    B, T, H = q.shape[:3]
    for r in prange(B * H * T):
        _attention_row(q, k, v, length, mask, out, r // (H * T), (r // T) % H, r % T)


@njit(cache=True, fastmath=REASSOC)
def _attention_row(q, k, v, length, mask, out, b, h, t):
    """One row of `attention`, serial (writes through views made in a parallel kernel are dropped: above).

    As in the reference, a masked score is the lowest float32, so a row with no allowed key (a padding query)
    averages V uniformly; in every other row a masked key's weight is exp(lowest - max) = 0. Every key is dotted
    (a masked one's score is finite and unused) and the softmax is branch-free with `exp32`, so its loops
    vectorise; the weighted sum of V goes into a local accumulator, divided by the total once (fewer roundings
    than p_s = w_s / total).
    """
    D = q.shape[3]
    group = q.shape[2] // k.shape[1]
    keys, values = k[b, h // group], v[b, h // group]  # (S_max, D)
    query, allowed = q[b, t, h], mask[b, t]  # (D,), (length,)
    scale = np.float32(D**-0.5)
    weights = np.empty(length, np.float32)
    for s in range(length):
        weights[s] = dot(query, keys[s]) * scale
    highest = LOWEST
    count = 0
    for s in range(length):
        if allowed[s]:
            highest = max(highest, weights[s])
            count += 1
    total = np.float32(0.0)
    for s in range(length):
        if count == 0:
            weights[s] = np.float32(1.0)
        else:
            weights[s] = exp32(weights[s] - highest) if allowed[s] else np.float32(0.0)
        total += weights[s]
    acc = np.zeros(D, np.float32)
    for s in range(length):
        weight, value = weights[s], values[s]
        for d in range(D):
            acc[d] += weight * value[d]
    for d in range(D):
        out[b, t, h, d] = acc[d] / total


# ---------------------------------------------------------------------------------------------------------------
# float32 weights
# ---------------------------------------------------------------------------------------------------------------

def readonly(w: np.ndarray) -> np.ndarray:
    """w, or a read-only view of it. Weights reach the kernels read-only, as memory-mapped files give them, so that
    a kernel compiles one specialisation for them (numba types read-only and writable arrays apart)."""
    if not w.flags.writeable:
        return w
    view = w.view()
    view.flags.writeable = False
    return view


# An unused weight slot of float_matmuls and gguf_matvecs, by dtype, and its output (never written).
NO_ROWS = {np.dtype(t): readonly(np.empty((0, 0), t)) for t in (np.float32, np.uint16, np.uint8)}
NO_OUTPUT = np.empty((0, 0), np.float32)


def float_matmul(x, w, out):
    """out (M, N) = x (M, K) @ w.T for w (N, K) as stored: float32, or bfloat16 as its uint16 bits."""
    no_rows = NO_ROWS[w.dtype]
    float_matmuls(x, w, no_rows, no_rows, out, NO_OUTPUT, NO_OUTPUT)


@njit(cache=True)
def _matvec_span(w, token, out, start, stop):
    """out[0, n] = w[n] . token for the rows n of [start, stop) that w has (the span may run past either end). No
    software prefetch: on the AMD EPYC of docs/numba.md the hardware prefetcher keeps up with these long
    sequential runs, and prefetching 4 rows ahead made SmolLM2's float32 decode steps 12-15% slower."""
    for n in range(max(start, 0), min(stop, w.shape[0])):
        out[0, n] = dot(w[n], token)


@njit(cache=True)
def _rows_block(x, w, out, n):
    """out[:, n:n + 4] = x @ w[n:n + 4].T (fewer rows at the end of w), prefetching the rows four ahead."""
    for i in range(4):
        _prefetch_row(w, n + PREFETCH_ROWS + i)
    _tokens_times_rows(x, w[n:n + 4], min(4, w.shape[0] - n), out, n)


@njit(cache=True, parallel=True)
def float_matmuls(x, w0, w1, w2, out0, out1, out2):
    """out_i (M, N_i) = x (M, K) @ w_i.T for up to three weights of one input (q/k/v, gate/up; an unused weight
    has no rows: NO_ROWS of the same dtype, with NO_OUTPUT), in one parallel region: one thread start and one barrier
    instead of three. Weights as stored: float32, or bfloat16 as its uint16 bits (`widen`).

    One token (decode) is bound by reading the weights: a vector dot per weight row, the rows of all weights
    together cut into SHARES equal contiguous shares (`_share`), so each thread streams one equal run. More
    tokens: four weight rows per iteration through the microkernel.
    """
    N0, N1, N2 = w0.shape[0], w1.shape[0], w2.shape[0]
    if x.shape[0] == 1:
        token = x[0]
        for part in prange(SHARES):
            start, stop = _share(N0 + N1 + N2, part)
            _matvec_span(w0, token, out0, start, stop)
            _matvec_span(w1, token, out1, start - N0, stop - N0)
            _matvec_span(w2, token, out2, start - N0 - N1, stop - N0 - N1)
        return
    B0, B1, B2 = (N0 + 3) // 4, (N1 + 3) // 4, (N2 + 3) // 4
    for block in prange(B0 + B1 + B2):
        if block < B0:
            _rows_block(x, w0, out0, 4 * block)
        elif block < B0 + B1:
            _rows_block(x, w1, out1, 4 * (block - B0))
        else:
            _rows_block(x, w2, out2, 4 * (block - B0 - B1))


# ---------------------------------------------------------------------------------------------------------------
# W8A8: per-token int8 activations, int8 weights, exact int32 accumulators (refllama/quant/int8.py)
# ---------------------------------------------------------------------------------------------------------------

@njit(cache=True)
def quantize_tokens(x, vllm, codes, scales):
    """Per-token symmetric int8 codes (M, K) and scales (M,) of x (M, K) float32, bit for bit as int8.py.

    "hf" (compressed-tensors): scale = absmax / 127.5 (eps if 0), codes = rint(clip(x / scale, -128, 127)).
    "vllm": scale = absmax / 127, codes = rint(clip(x * (127 / absmax), -128, 127)); an all-zero row gives 0s.
    """
    M, K = x.shape
    for m in range(M):
        scales[m], factor = token_scale(x[m], vllm)
        if vllm:
            for k in range(K):
                codes[m, k] = np.int8(code_vllm(x[m, k], factor))
        else:
            for k in range(K):
                codes[m, k] = np.int8(code_hf(x[m, k], factor))


@njit(cache=True, inline="always")
def token_scale(row, vllm):
    """(scale, factor) of one token's row (K,) float32: "vllm" (absmax / 127, 127 / absmax or 0 for an all-zero
    row); "hf" (absmax / 127.5 or eps if that is 0, the same again: codes divide by it)."""
    absmax = np.float32(0.0)
    for k in range(row.shape[0]):
        absmax = max(absmax, abs(row[k]))
    if vllm:
        return absmax / np.float32(127.0), np.float32(127.0) / absmax if absmax > 0 else np.float32(0.0)
    scale = absmax / np.float32(127.5)
    if scale == 0:
        scale = np.float32(np.finfo(np.float32).eps)
    return scale, scale


@njit(cache=True, inline="always")
def code_vllm(value, inverse):
    """vLLM's int8 code of one float32 value, as an int32 in [-128, 127]."""
    scaled = value * inverse
    if scaled != scaled:  # 0 * inf from a subnormal absmax: the kernel's saturating convert gives 0
        scaled = np.float32(0.0)
    return np.int32(np.rint(min(max(scaled, np.float32(-128.0)), np.float32(127.0))))


@njit(cache=True, inline="always")
def code_hf(value, scale):
    """compressed-tensors' int8 code of one float32 value, as an int32 in [-128, 127]."""
    return np.int32(np.rint(min(max(value / scale, np.float32(-128.0)), np.float32(127.0))))


@njit(cache=True, inline="always")
def _w8a8_epilogue(acc, w_scale, a_scale, vllm):
    if vllm:
        return a_scale * (w_scale * np.float32(acc))
    return (np.float32(acc) * w_scale) * a_scale


@njit(cache=True)
def _int8_dot(a, w):
    """sum_k a[k] * w[k] of int8 vectors, exactly, in int32.

    `int32(acc + int32(a) * int32(w))`: numba computes int32 products in int64; truncating inside the loop lets
    LLVM keep 32-bit lanes, twice as fast as an int64 accumulator. The caller ensures K * 128 * 128 < 2**31.
    """
    acc = np.int32(0)
    for k in range(a.shape[0]):
        acc = np.int32(acc + np.int32(a[k]) * np.int32(w[k]))
    return acc


@njit(cache=True)
def _int8_token_rows4(a, w0, w1, w2, w3):
    """(a . w0, a . w1, a . w2, a . w3) for one token's int8 codes: each activation load feeds four rows."""
    acc0 = acc1 = acc2 = acc3 = np.int32(0)
    for k in range(a.shape[0]):
        u = np.int32(a[k])
        acc0 = np.int32(acc0 + u * np.int32(w0[k]))
        acc1 = np.int32(acc1 + u * np.int32(w1[k]))
        acc2 = np.int32(acc2 + u * np.int32(w2[k]))
        acc3 = np.int32(acc3 + u * np.int32(w3[k]))
    return acc0, acc1, acc2, acc3


@njit(cache=True)
def _int8_tokens4_rows4(a0, a1, a2, a3, w0, w1, w2, w3):
    """The 16 int32 dot products of four tokens' codes with four weight rows (token-major), as the float
    microkernel: every weight and activation element loaded feeds four multiply-adds (prefill, 1.3x)."""
    c00 = c01 = c02 = c03 = c10 = c11 = c12 = c13 = np.int32(0)
    c20 = c21 = c22 = c23 = c30 = c31 = c32 = c33 = np.int32(0)
    for k in range(a0.shape[0]):
        p, q, r, s = np.int32(w0[k]), np.int32(w1[k]), np.int32(w2[k]), np.int32(w3[k])
        u = np.int32(a0[k])
        c00, c01, c02, c03 = np.int32(c00 + u * p), np.int32(c01 + u * q), np.int32(c02 + u * r), np.int32(c03 + u * s)
        u = np.int32(a1[k])
        c10, c11, c12, c13 = np.int32(c10 + u * p), np.int32(c11 + u * q), np.int32(c12 + u * r), np.int32(c13 + u * s)
        u = np.int32(a2[k])
        c20, c21, c22, c23 = np.int32(c20 + u * p), np.int32(c21 + u * q), np.int32(c22 + u * r), np.int32(c23 + u * s)
        u = np.int32(a3[k])
        c30, c31, c32, c33 = np.int32(c30 + u * p), np.int32(c31 + u * q), np.int32(c32 + u * r), np.int32(c33 + u * s)
    return c00, c01, c02, c03, c10, c11, c12, c13, c20, c21, c22, c23, c30, c31, c32, c33


@njit(cache=True, parallel=True)
def int8_matmul(a, w, w_scale, a_scale, vllm, out):
    """out[m, n] from acc[m, n] = sum_k a[m, k] * w[n, k] (int8 codes, exact int32), then the scales.

    a (M, K) int8 activation codes; w (N, K) int8 weights (row-major, as stored); w_scale (N,) float32;
    a_scale (M,) float32; out (M, N) float32. Epilogue, as the reference rounds it: "hf" (acc * w_s) * a_s,
    "vllm" a_s * (w_s * acc). Four weight rows per iteration: by four tokens at a time, then one at a time.
    """
    N = w.shape[0]
    M = a.shape[0]
    for block in prange((N + 3) // 4):
        n = block * 4
        for i in range(4):
            _prefetch_row(w, n + PREFETCH_ROWS + i)
        if n + 4 > N:  # the last rows, one at a time
            for i in range(n, N):
                for m in range(M):
                    out[m, i] = _w8a8_epilogue(_int8_dot(a[m], w[i]), w_scale[i], a_scale[m], vllm)
            continue
        w0, w1, w2, w3 = w[n], w[n + 1], w[n + 2], w[n + 3]
        m = 0
        while m + 4 <= M:
            accs = _int8_tokens4_rows4(a[m], a[m + 1], a[m + 2], a[m + 3], w0, w1, w2, w3)
            for t in range(4):
                for i in range(4):
                    out[m + t, n + i] = _w8a8_epilogue(accs[4 * t + i], w_scale[n + i], a_scale[m + t], vllm)
            m += 4
        while m < M:
            accs4 = _int8_token_rows4(a[m], w0, w1, w2, w3)
            for i in range(4):
                out[m, n + i] = _w8a8_epilogue(accs4[i], w_scale[n + i], a_scale[m], vllm)
            m += 1


EXACT_FLOAT_TERMS = 1024  # a float32 sum of up to 1024 int8 x int8 products is exact: |any partial sum| <= 2**24


@njit(cache=True, parallel=True)
def int8_matmul_float(a, w, w_scale, a_scale, vllm, out):
    """int8_matmul for many tokens (prefill): the same int32 accumulators, bit for bit, with the float microkernel.

    Every product of two int8 codes is an integer of magnitude <= 2**14, so a float32 sum of at most 1024 of them,
    in any order and with fused multiply-adds, has only integer partial sums of magnitude <= 2**24: all exact.
    K is cut into chunks of at most EXACT_FLOAT_TERMS; each chunk's dot products are computed in float32 (exact)
    and added in int32. a (chunks, M, C) holds the activation codes as float32, K split into `chunks` runs of C
    (zero-padded); w (N, K) int8 as stored, four rows at a time converted to float32 chunks in a scratch block.
    The float microkernel is 1.5x faster than the int8 one here.
    """
    chunks, M, C = a.shape
    N, K = w.shape
    for c in prange((N + 63) // 64):  # 64 rows per iteration: one set of scratch allocations each
        rows = np.zeros((chunks, 4, C), np.float32)  # the zero padding past K stays zero
        part = np.empty((M, 4), np.float32)
        acc = np.empty((M, 4), np.int32)
        for n in range(c * 64, min(N, c * 64 + 64), 4):
            count = min(4, N - n)
            for i in range(count):
                _prefetch_row(w, n + PREFETCH_ROWS + i)
                for chunk in range(chunks):
                    start = chunk * C
                    for j in range(min(C, K - start)):
                        rows[chunk, i, j] = np.float32(w[n + i, start + j])
            for m in range(M):
                for i in range(4):
                    acc[m, i] = 0
            for chunk in range(chunks):
                _tokens_times_rows(a[chunk], rows[chunk], count, part, 0)
                for m in range(M):
                    for i in range(count):
                        acc[m, i] += np.int32(part[m, i])
            for m in range(M):
                for i in range(count):
                    out[m, n + i] = _w8a8_epilogue(acc[m, i], w_scale[n + i], a_scale[m], vllm)


# ---------------------------------------------------------------------------------------------------------------
# Integer codes with group scales (compressed-tensors int8 / pack-quantized, GPTQ, AWQ after its load-time repack)
# ---------------------------------------------------------------------------------------------------------------

@njit(cache=True)
def dequantize_codes_row(codes, bits, zero, scale, group, out):
    """One row of W = (code - zero[g]) * scale[g] into out (K,), exact (refllama/quant/types.py `dequantize`).

    codes: the row's int8 codes (bits 0) or the bytes of its packed little-endian bit stream, code i at bits
    [i*b, i*b + b) (bits 1..8). zero (int32), scale (float32): the row's (G,) values. group (K,) int32: g(i).
    """
    K = out.shape[0]
    if bits == 0:
        for i in range(K):
            g = group[i]
            out[i] = np.float32(np.int32(codes[i]) - zero[g]) * scale[g]
        return
    mask = (1 << bits) - 1
    last = codes.shape[0] - 1
    for i in range(K):
        start = i * bits
        byte = start >> 3
        window = np.int32(codes[byte])
        if byte < last:  # a code may straddle two bytes
            window |= np.int32(codes[byte + 1]) << 8
        g = group[i]
        out[i] = np.float32(((window >> (start & 7)) & mask) - zero[g]) * scale[g]


@njit(cache=True, parallel=True)
def codes_matmul(codes, bits, zero, scale, group, x, out):
    """out (M, N) = x (M, K) @ W.T with W given by its codes (N, row bytes), zero/scale (N, G), group (K,).

    Four weight rows at a time are dequantized exactly into a scratch block in L1, then multiplied with every
    token by the microkernel: one pass over the stored codes serves decode and prefill alike.
    """
    N = codes.shape[0]
    K = x.shape[1]
    for c in prange((N + 63) // 64):  # 64 rows per iteration: one scratch allocation each
        rows = np.empty((4, K), np.float32)
        for n in range(c * 64, min(N, c * 64 + 64), 4):
            count = min(4, N - n)
            for i in range(count):
                _prefetch_row(codes, n + PREFETCH_ROWS + i)
                dequantize_codes_row(codes[n + i], bits, zero[n + i], scale[n + i], group, rows[i])
            _tokens_times_rows(x, rows, count, out, n)


# ---------------------------------------------------------------------------------------------------------------
# GGUF blocks (ggml-quants.c's dequantize_row_*, as refllama/formats/ggml_quants.py), one weight row at a time.
# A row of an [out, in] weight is in/block consecutive blocks; each block starts with its fp16 scale(s).
# ---------------------------------------------------------------------------------------------------------------

@njit(cache=True)
def dequantize_gguf_row(kind, row, out):
    """One weight row of ggml blocks (`kind` a GGMLType value in GGUF_BLOCKS) to float32, exactly as ggml."""
    if kind == Q8_0:
        q8_0_dequantize(row, out)
    elif kind == Q4_0:
        q4_0_dequantize(row, out)
    elif kind == Q4_1:
        q4_1_dequantize(row, out)
    elif kind == Q5_0:
        q5_0_dequantize(row, out)
    elif kind == Q5_1:
        q5_1_dequantize(row, out)
    elif kind == Q4_K:
        q4_k_dequantize(row, out)
    elif kind == Q5_K:
        q5_k_dequantize(row, out)
    else:
        q6_k_dequantize(row, out)


@njit(cache=True)
def dequantize_gguf(kind, raw, rows, out):
    """out[i] = weight row rows[i]; raw (N, bytes per row) uint8, out (len(rows), K). Embedding lookups: a row per
    token, microseconds each, so serial (parallel=True took 2x the compile time, 4-9 s, and gained nothing)."""
    for i in range(rows.shape[0]):
        dequantize_gguf_row(kind, raw[rows[i]], out[i])


PANEL_ROWS = 6  # weight rows per pass of the prompt microkernel (`_panel_tile`): 12 vector accumulators
PANEL_TOKENS = 32  # tokens per pass: two 16-lane vectors; prompts are padded to a multiple of this
PANEL_DEPTH = 64  # products summed in registers before they are added to the output (summation error, L1)
PANEL_SHARE = 48  # weight rows per parallel iteration, dequantized together: 8 microkernel row blocks


def _panel_tile(count: int):
    """An intrinsic f(rows, r, k0, k1, xt, m, acc): acc[i, m:m + PANEL_TOKENS] += sum over k in [k0, k1) of
    rows[i, k] * xt[k, m:m + PANEL_TOKENS] for the weight rows r <= i < r + count.

    rows (R, K): dequantized weight rows; xt (K, M padded) the tokens transposed; acc (R, M padded); all float32,
    C. The GEMM microkernel in broadcast form: per k, two vector loads of tokens and one
    broadcast weight per row feed 2 x count fused multiply-adds into accumulators held in registers, without
    horizontal sums (on AVX-512, 1.2x the register-blocked dot products of `_tokens_times_rows4`). Each lane is a
    sequential fused sum of k1 - k0 products, then added to acc.
    """
    v16f = ir.VectorType(_F32, 16)
    i64 = ir.IntType(64)

    @intrinsic
    def panel_tile(typingctx, rows, r, k0, k1, xt, m, acc):
        for array in (rows, xt, acc):
            if not (isinstance(array, types.Array) and array.ndim == 2 and array.layout == "C"
                    and array.dtype == types.float32):
                return None
        if not all(isinstance(i, types.Integer) for i in (r, k0, k1, m)):
            return None

        def codegen(context, builder, signature, args):
            t = signature.args
            rows_array, xt_array, acc_array = (context.make_array(t[i])(context, builder, args[i]) for i in (0, 4, 6))
            K, width = builder.extract_value(rows_array.shape, 1), builder.extract_value(xt_array.shape, 1)
            r, first, last, m = (context.cast(builder, args[i], t[i], types.int64) for i in (1, 2, 3, 5))
            fmuladd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16f, [v16f] * 3),
                                                     "llvm.fmuladd.v16f32")
            weights = [builder.gep(rows_array.data, [builder.mul(builder.add(r, ir.Constant(i64, i)), K)])
                       for i in range(count)]

            def body(k, accs):
                tokens = builder.gep(xt_array.data, [builder.add(builder.mul(k, width), m)])
                xs = [_load(builder, builder.gep(tokens, [ir.Constant(i64, 16 * h)]), v16f) for h in range(2)]
                steps = []
                for i in range(count):
                    w = _splat(builder, builder.load(builder.gep(weights[i], [k])), v16f)
                    steps += [builder.call(fmuladd, [w, xs[h], accs[2 * i + h]]) for h in range(2)]
                return steps

            finals = ir_loop(builder, first, last, [ir.Constant(v16f, [0.0] * 16)] * (2 * count), body, "panel")
            for i in range(count):
                row = builder.gep(acc_array.data, [builder.add(builder.mul(builder.add(r, ir.Constant(i64, i)), width),
                                                               m)])
                for h in range(2):
                    spot = builder.bitcast(builder.gep(row, [ir.Constant(i64, 16 * h)]), v16f.as_pointer())
                    builder.store(builder.fadd(builder.load(spot, align=4), finals[2 * i + h]), spot, align=4)
            return context.get_dummy_value()

        return types.none(rows, r, k0, k1, xt, m, acc), codegen

    return panel_tile


panel_tile1, panel_tile2, panel_tile3, panel_tile4, panel_tile5, panel_tile6 = (
    _panel_tile(count) for count in range(1, PANEL_ROWS + 1))


@njit(cache=True)
def aligned_empty(rows, cols):
    """An uninitialised (rows, cols) float32 array, C-contiguous, starting on a 64-byte boundary, so that with cols a
    multiple of 16 no 16-lane vector load of a row straddles two cache lines. Numba's np.empty aligns to 32 bytes
    (0 or 32 modulo 64, by process): the prompt microkernel (48 rows, K = 1536, 128 tokens, one thread) ran at 113
    GFLOP/s on aligned tokens, 111 at 32 bytes off and 110 at 16 (2-vCPU AMD EPYC)."""
    flat = np.empty(rows * cols + 16, np.float32)
    start = (-(flat.ctypes.data // 4)) % 16
    return flat[start:start + rows * cols].reshape((rows, cols))


@njit(cache=True)
def _transpose_span(x, xt, k0, k1):
    """xt[k, :] = x[:, k] for k in [k0, k1), zero past the M tokens: part of the prompt microkernel's token vectors
    xt (K, M rounded up to PANEL_TOKENS). Spans of 16 k: a cache line of each token at a time (with k outer, rows
    6 KiB apart (K = 1536) fell into two L1 sets and the transpose ran 4x slower)."""
    M = x.shape[0]
    for k in range(k0, k1):
        xt[k, M:] = 0.0
    for m in range(M):
        for k in range(k0, k1):
            xt[k, m] = x[m, k]


@njit(cache=True)
def _rows_times_tokens(rows, count, xt, acc):
    """acc[:count] = rows[:count] @ xt: depth passes of PANEL_DEPTH over every PANEL_ROWS rows and PANEL_TOKENS
    tokens, so a pass's slice of xt is read from cache by all the rows (K = 1536, 128 tokens: xt is 768 KiB)."""
    K, width = xt.shape
    acc[:count] = 0.0
    for k0 in range(0, K, PANEL_DEPTH):
        k1 = min(K, k0 + PANEL_DEPTH)
        for r in range(0, count, PANEL_ROWS):
            left = min(PANEL_ROWS, count - r)
            for m in range(0, width, PANEL_TOKENS):
                if left == 6:
                    panel_tile6(rows, r, k0, k1, xt, m, acc)
                elif left == 5:
                    panel_tile5(rows, r, k0, k1, xt, m, acc)
                elif left == 4:
                    panel_tile4(rows, r, k0, k1, xt, m, acc)
                elif left == 3:
                    panel_tile3(rows, r, k0, k1, xt, m, acc)
                elif left == 2:
                    panel_tile2(rows, r, k0, k1, xt, m, acc)
                else:
                    panel_tile1(rows, r, k0, k1, xt, m, acc)


def gguf_matmul(kind, raw, x, out):
    """out (M, N) = x (M, K) @ W.T from the blocks raw (N, bytes per row), for prompts: `gguf_matmuls` with one
    weight."""
    no_rows = NO_ROWS[raw.dtype]
    gguf_matmuls(kind, raw, kind, no_rows, kind, no_rows, x, out, NO_OUTPUT, NO_OUTPUT)


@njit(cache=True)
def _blocks_panel(kind, raw, n0, xt, rows, acc, out):
    """out[:, n0:n0 + PANEL_SHARE] (fewer rows at the end of raw) = x @ W[n0:...].T: the rows dequantized exactly
    into `rows` (vector code), multiplied with the transposed tokens xt by the broadcast microkernel into `acc`,
    then written token-major."""
    count = min(PANEL_SHARE, raw.shape[0] - n0)
    for i in range(count):
        dequantize_gguf_row(kind, raw[n0 + i], rows[i])
    _rows_times_tokens(rows, count, xt, acc)
    for m in range(out.shape[0]):  # token-major: each token's outputs are contiguous
        for i in range(count):
            out[m, n0 + i] = acc[i, m]


@njit(cache=True, parallel=True)
def gguf_matmuls(kind0, raw0, kind1, raw1, kind2, raw2, x, out0, out1, out2):
    """out_i (M, N_i) = x (M, K) @ W_i.T from the blocks raw_i (N_i, bytes per row), any block types, for prompts:
    up to three weights of one input (an unused one is NO_ROWS, with NO_OUTPUT) in one call. The tokens are
    transposed once, in parallel spans of 16 k, padded to PANEL_TOKENS; then per parallel iteration, PANEL_SHARE
    rows of one weight (`_blocks_panel`), the iterations of all weights together. Each output is a sum of
    ceil(K / PANEL_DEPTH) sequential fused sums of PANEL_DEPTH products (at most 2.1 eps32 of sum |x w| measured,
    tests/test_numba_backend.py)."""
    M, K = x.shape
    xt = aligned_empty(K, -(-M // PANEL_TOKENS) * PANEL_TOKENS)
    for span in prange((K + 15) // 16):
        _transpose_span(x, xt, 16 * span, min(K, 16 * span + 16))
    C0 = (raw0.shape[0] + PANEL_SHARE - 1) // PANEL_SHARE
    C1 = (raw1.shape[0] + PANEL_SHARE - 1) // PANEL_SHARE
    C2 = (raw2.shape[0] + PANEL_SHARE - 1) // PANEL_SHARE
    for c in prange(C0 + C1 + C2):
        rows = np.empty((PANEL_SHARE, K), np.float32)
        acc = aligned_empty(PANEL_SHARE, xt.shape[1])
        if c < C0:
            _blocks_panel(kind0, raw0, c * PANEL_SHARE, xt, rows, acc, out0)
        elif c < C0 + C1:
            _blocks_panel(kind1, raw1, (c - C0) * PANEL_SHARE, xt, rows, acc, out1)
        else:
            _blocks_panel(kind2, raw2, (c - C0 - C1) * PANEL_SHARE, xt, rows, acc, out2)


@njit(cache=True)
def _block_sums(x):
    """(M, K / 32): the sum of each block of 32 activations, the offset term of Q4_0/Q4_1. A separate serial
    function: inside a parallel=True kernel, numba turns each np.sum into a parallel region of its own, which cost
    20x the whole matvec."""
    M, K = x.shape
    sums = np.empty((M, K // 32), np.float32)
    for m in range(M):
        for b in range(K // 32):
            sums[m, b] = np.sum(x[m, b * 32:b * 32 + 32])
    return sums


@njit(cache=True, inline="always")
def _gguf_row_dot(kind, row, x, sums):
    """One row of Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 blocks dotted with x (K,); sums (K / 32,): the sums of x's blocks."""
    if kind == Q8_0:
        return q8_0_row_dot(row, x, sums)
    if kind == Q4_1:
        return q4_1_row_dot(row, x, sums)
    if kind == Q4_0:
        return q4_0_row_dot(row, x, sums)
    if kind == Q5_0:
        return q5_0_row_dot(row, x, sums)
    return q5_1_row_dot(row, x, sums)


def gguf_matvec(kind, raw, x, out):
    """out (M, N) = x (M, K) @ W.T for a few tokens straight from the blocks (decode), a weight row per iteration,
    nothing dequantized.

    Q4_0/Q4_1/Q5_0/Q5_1/Q8_0: y = sum_b d_b * (q_b . x_b), plus m_b * sum(x_b) (Q4_1, Q5_1), minus 8 d_b *
    sum(x_b) (Q4_0): the row_dot intrinsics. K-quants: per sub-block, the scale times the codes' dot
    with x, minus the min times the sub-block's sum of x (Q4_K, Q5_K). Two kernels, chosen here: with both loops
    in one parallel function, Q4_1 decode ran ~20% slower (SmolLM2, 2 threads: 82 against 102 tok/s).
    """
    if kind == Q4_K or kind == Q5_K or kind == Q6_K:
        _kquant_matvec(kind, raw, x, out)
    else:
        _blocks_matvec(kind, raw, x, out)


@njit(cache=True, parallel=True)
def _blocks_matvec(kind, raw, x, out):
    """gguf_matvec for the 32-element block types."""
    N = raw.shape[0]
    block_sums = _block_sums(x)
    for n in prange(N):
        _prefetch_row(raw, n + PREFETCH_ROWS)
        row = raw[n]
        for m in range(x.shape[0]):
            out[m, n] = _gguf_row_dot(kind, row, x[m], block_sums[m])


@njit(cache=True, parallel=True)
def _kquant_matvec(kind, raw, x, out):
    """gguf_matvec for the K-quants."""
    N = raw.shape[0]
    block_sums = _block_sums(x)
    for part in prange(SHARES):
        start, stop = _share(N, part)
        for n in range(start, stop):
            _prefetch_row(raw, n + PREFETCH_ROWS)
            for m in range(x.shape[0]):
                if kind == Q6_K:
                    out[m, n] = q6_k_row_dot(raw[n], x[m], block_sums[m])
                elif kind == Q5_K:
                    out[m, n] = q5_k_row_dot(raw[n], x[m], block_sums[m])
                else:
                    out[m, n] = q4_k_row_dot(raw[n], x[m], block_sums[m])



@njit(cache=True)
def _blocks_span(kind, raw, x, sums, out, start, stop):
    """out[:, n] = x @ W[n] for the rows n of [start, stop) that raw has (the span may run past either end), for
    the 32-element block types; sums: `_block_sums(x)`."""
    for n in range(max(start, 0), min(stop, raw.shape[0])):
        _prefetch_row(raw, n + PREFETCH_ROWS)
        row = raw[n]
        for m in range(x.shape[0]):
            out[m, n] = _gguf_row_dot(kind, row, x[m], sums[m])


@njit(cache=True, parallel=True)
def gguf_matvecs(kind0, raw0, kind1, raw1, kind2, raw2, x, out0, out1, out2):
    """out_i (M, N_i) = x (M, K) @ W_i.T for up to three weights of one input in 32-element block types (each its
    own; an unused one is NO_ROWS, with NO_OUTPUT), a few tokens (decode): `gguf_matvec`'s row dots, with the
    block sums of x taken once and one parallel region instead of three, the rows of all weights cut into SHARES
    equal shares."""
    N0, N1, N2 = raw0.shape[0], raw1.shape[0], raw2.shape[0]
    sums = _block_sums(x)
    for part in prange(SHARES):
        start, stop = _share(N0 + N1 + N2, part)
        _blocks_span(kind0, raw0, x, sums, out0, start, stop)
        _blocks_span(kind1, raw1, x, sums, out1, start - N0, stop - N0)
        _blocks_span(kind2, raw2, x, sums, out2, start - N0 - N1, stop - N0 - N1)


def warm_attention() -> None:
    """Compile (or load) `attention` for the argument types the backend passes (numba_helper calls this alone)."""
    q, kv = np.ones((1, 5, 2, 64), np.float32), np.ones((1, 1, 8, 64), np.float32)
    attention(q, kv, kv, 5, readonly(np.ones((1, 5, 5), np.bool_)), np.empty_like(q))


def warm_up() -> None:
    """Compile (or load from the cache) every kernel the backend calls on this CPU, for the argument types it passes:
    decode (one token, whose transposed views NumPy still calls contiguous) and prefill (several tokens); weights
    read-only."""
    f32, i32, ro = np.float32, np.int32, readonly
    warm_attention()
    for T in (1, 5):
        x = np.ones((T, 256), f32)
        rms_norm(x, ro(np.ones(256, f32)), f32(1e-5), np.empty_like(x))
        float_matmul(x, ro(np.ones((6, 256), f32)), np.empty((T, 6), f32))
        silu_mul(x, x, np.empty_like(x))
        q = np.ones((1, T, 2, 64), f32)
        table = np.ones((1, 1, T, 64), f32)
        rope(q, table, table, np.empty_like(q))
        kv = np.ones((1, 2, 8, 64), f32)
        same_start(kv[:, :, :5], kv)  # a strided view of a cache buffer, as the backend asks
        codes, scales = np.empty((T, 256), np.int8), np.empty(T, f32)
        quantize_tokens(x, False, codes, scales)
        w8, w_scale = ro(np.ones((6, 256), np.int8)), ro(np.ones(6, f32))
        if not VNNI:  # with VNNI the backend calls numba_gemm's instead: 34 -> 23 s here, cold
            int8_matmul(codes, w8, w_scale, scales, False, np.empty((T, 6), f32))
            int8_matmul_float(np.ones((1, T, 256), f32), w8, w_scale, scales, False, np.empty((T, 6), f32))
        zero, scale, group = ro(np.zeros((6, 1), i32)), ro(np.ones((6, 1), f32)), ro(np.zeros(256, i32))
        for stored, bits in ((w8, 0), (ro(np.ones((6, 128), np.uint8)), 4)):
            codes_matmul(stored, bits, zero, scale, group, x, np.empty((T, 6), f32))
        for kind, (size, block) in GGUF_BLOCKS.items():
            raw = ro(np.zeros((6, size * 256 // block), np.uint8))
            dequantize_gguf(kind, raw, np.arange(T), np.empty((T, 256), f32))
            gguf_matmul(kind, raw, x, np.empty((T, 6), f32))
            gguf_matvec(kind, raw, x, np.empty((T, 6), f32))
        blocks = readonly(np.zeros((6, 22 * 8), np.uint8))
        gguf_matvecs(Q5_0, blocks, Q5_0, blocks, Q5_0, NO_ROWS[blocks.dtype], x, np.empty((T, 6), f32),
                     np.empty((T, 6), f32), NO_OUTPUT)


__all__ = ["GGUF_BLOCKS", "VNNI", "attention", "cache_dir", "codes_matmul", "dequantize_gguf", "float_matmul",
           "float_matmuls", "gguf_matmul", "gguf_matmuls", "gguf_matvec", "gguf_matvecs", "int8_matmul",
           "int8_matmul_float", "quantize_tokens", "readonly", "rms_norm", "rope", "same_start", "silu_mul",
           "warm_attention", "warm_up"]
