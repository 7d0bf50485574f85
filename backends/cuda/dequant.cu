// Weight-only quantized Linears (refllama.quant.types): W[n, k] = (code[n, k] - zero[n, g(k)]) * scale[n, g(k)].
//
// Codes, two storages:
//   * PackedIntWeight: each row a little-endian bit stream of unsigned b-bit codes in int32 words (code k at bits
//     [k*b, k*b + b)), row stride `row_words` words; zero defaults to 2^(b-1) (symmetric).
//   * Int8Weight: signed int8 codes, one byte each, row stride K bytes; zero defaults to 0. Flipping the sign bit
//     (b ^ 0x80 = b + 128) makes them unsigned, and the zero is shifted by 128 to match, so both storages share
//     one code path.
//   * GGUF Q8_0 / Q4_0 / Q4_1 blocks, repacked once on the host into the two storages above
//     (cupy_kernels.gguf_layout): Q8_0 as int8 codes, Q4_0 as a 4-bit stream with zero 8, Q4_1 as a 4-bit stream
//     with zero 0 and an additive min per block; groups of 32, scales d (and mins m) in the compute dtype.
// Groups: g(k) = g_idx[k] when given (GPTQ act-order), else k / group_size (group_size 0: one group per row).
// scale [N or 1, G] in the compute dtype, zero int32 [N or 1, G] or null; a row stride of 0 means per tensor.
// W[n, k] is formed exactly as refllama.quant.types.dequantize forms it: (code - zero) is a small integer, exact in
// the accumulation type, times the scale, rounded once. With mins (Q4_1) it is ggml's d * q + m, two float32
// roundings, whatever the compute dtype (the float64 reference dequantizes GGUF to float32 too).
//
// dequant_gemv_<dtype>_<kind>_m<MT>: y = x @ W.T (+ bias) for M <= MT tokens without materialising W (decode).
//   kind p4 / p8: packed 4 / 8-bit; s8: Int8Weight (and Q8_0); p4m: packed 4-bit plus mins (Q4_1). A chunk is
//   32 consecutive codes of one row: 4 words (p4, p4m) or 8 words (p8, s8), loaded as 16-byte vectors. Lane c of
//   a warp takes chunks c, c + 32, ...; a warp owns ROWS rows.
//   Per 8-code step each lane forms the 8 weights of each of its rows once, then applies them to every token.
//   A chunk must lie in one group (group_size 0 or a multiple of 32, no g_idx): its scale and zero are read once per
//   chunk. GPTQ act-order weights qualify after the host permutes their input columns once at upload (sorting
//   g_idx makes every group contiguous; x is gathered in the same order). Needs K % 32 == 0 and aligned x (the host
//   checks; otherwise it dequantizes).
// dequantize_<dtype>: rows of W as a dense [R, K] array in the compute dtype (rows[i], or all N rows when rows is
//   null), any bit width 1..8, any grouping: the prefill path (dense W, then cuBLAS), the fallback for what the
//   fused kernel does not take, the embedding gather from GGUF blocks, and the device-side check of the unpacking
//   against the references.

#include "common.cuh"

#define KIND_P4 4
#define KIND_P8 8
#define KIND_S8 9
#define KIND_P4M 5  // 4-bit plus an additive min per group (GGUF Q4_1)
#define DQ_WARPS 4  // blockDim.x = 32 * DQ_WARPS

// 0 <= u < 2^23 to float without an int->float conversion instruction (those run at a quarter of the FP32 rate):
// 0x4B000000 is 2^23, whose mantissa then holds u exactly.
__device__ __forceinline__ float small_uint_to(float, u32 u) { return __uint_as_float(0x4B000000u | u) - 8388608.0f; }
__device__ __forceinline__ double small_uint_to(double, u32 u) { return (double)u; }

// ggml's Q4_1 element: d * q + m with float32 roundings after the product and after the sum.
__device__ __forceinline__ float ggml_affine(float q, float d, float m) { return __fadd_rn(__fmul_rn(q, d), m); }

template <typename T, typename A>
__device__ __forceinline__ void load8(const T* __restrict__ p, A out[8]) {  // 8 elements, 16-byte aligned
    constexpr int VEC = 16 / sizeof(T);
    constexpr int LOADS = (8 + VEC - 1) / VEC;
#pragma unroll
    for (int l = 0; l < LOADS; ++l) {
        union { uint4 raw; T v[VEC]; } u;
        u.raw = *reinterpret_cast<const uint4*>(p + l * VEC);
#pragma unroll
        for (int j = 0; j < VEC; ++j)
            if (l * VEC + j < 8) out[l * VEC + j] = Num<T>::load(u.v[j]);
    }
}

template <typename T, int KIND, int MT>
__device__ __forceinline__ void dequant_gemv(const u32* __restrict__ codes, int row_words, const T* __restrict__ scale,
                                             int scale_rs, const int* __restrict__ zero, int zero_rs, int zero_default,
                                             const T* __restrict__ mins, int group_size, const T* __restrict__ x,
                                             const T* __restrict__ bias, T* __restrict__ y, int M, int N, int K) {
    typedef typename Num<T>::acc A;
    constexpr bool NIBBLES = KIND == KIND_P4 || KIND == KIND_P4M;
    constexpr int WORDS = NIBBLES ? 4 : 8;              // words per 32-code chunk
    constexpr int ROWS = MT == 1 ? 4 : 2;                // rows per warp
    // chunks whose loads are in flight together (float64 has no registers to spare: it is the accuracy mode)
    constexpr int UNROLL = MT == 1 && sizeof(A) == 4 ? 2 : 1;
    const u32 flip = KIND == KIND_S8 ? 0x80808080u : 0u;  // signed bytes -> unsigned
    const int zero_shift = KIND == KIND_S8 ? 128 : 0;
    const int lane = threadIdx.x & 31;
    const int n0 = (blockIdx.x * DQ_WARPS + (threadIdx.x >> 5)) * ROWS;
    if (n0 >= N) return;  // uniform across the warp
    const int chunks = K / 32;

    A acc[MT][ROWS];
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int r = 0; r < ROWS; ++r) acc[m][r] = 0;

    for (int c0 = lane; c0 < chunks; c0 += 32 * UNROLL) {
        u32 wd[UNROLL][ROWS][WORDS];  // loads first, arithmetic after
#pragma unroll
        for (int u = 0; u < UNROLL; ++u)
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
                const int c = c0 + u * 32;
                const bool ok = c < chunks && n0 + r < N;
                const uint4* src = reinterpret_cast<const uint4*>(codes + (i64)(n0 + r) * row_words + (i64)c * WORDS);
#pragma unroll
                for (int v = 0; v < WORDS / 4; ++v) {
                    const uint4 q = ok ? src[v] : make_uint4(0, 0, 0, 0);
                    wd[u][r][4 * v] = q.x ^ flip;
                    wd[u][r][4 * v + 1] = q.y ^ flip;
                    wd[u][r][4 * v + 2] = q.z ^ flip;
                    wd[u][r][4 * v + 3] = q.w ^ flip;
                }
            }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int c = c0 + u * 32;
            if (c >= chunks) break;
            const int k_chunk = c * 32;
            A chunk_scale[ROWS], chunk_zero[ROWS], chunk_min[ROWS];
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
                const int n = min(n0 + r, N - 1);  // rows past N compute garbage that is never written
                const int g = group_size ? k_chunk / group_size : 0;
                chunk_scale[r] = Num<T>::load(scale[(i64)n * scale_rs + g]);
                chunk_zero[r] = (A)((zero ? zero[(i64)n * zero_rs + g] : zero_default) + zero_shift);
                chunk_min[r] = KIND == KIND_P4M ? Num<T>::load(mins[(i64)n * scale_rs + g]) : (A)0;
            }
#pragma unroll
            for (int s = 0; s < 4; ++s) {  // 8 codes per step
                A w[ROWS][8];
#pragma unroll
                for (int r = 0; r < ROWS; ++r) {
#pragma unroll
                    for (int j = 0; j < 8; ++j) {
                        const u32 q = NIBBLES ? (wd[u][r][s] >> (4 * j)) & 0xFu
                                              : (wd[u][r][2 * s + (j >> 2)] >> (8 * (j & 3))) & 0xFFu;
                        if (KIND == KIND_P4M)  // ggml Q4_1 (zero 0): d * q + m in float32
                            w[r][j] = (A)ggml_affine(small_uint_to(0.0f, q), (float)chunk_scale[r],
                                                     (float)chunk_min[r]);
                        else  // (code - zero) is exact; times the scale it is rounded once, as dequantize() does
                            w[r][j] = mul_rn(small_uint_to((A)0, q) - chunk_zero[r], chunk_scale[r]);
                    }
                }
#pragma unroll
                for (int m = 0; m < MT; ++m) {
                    if (m >= M) break;
                    A xv[8];
                    load8<T, A>(x + (i64)m * K + k_chunk + 8 * s, xv);
#pragma unroll
                    for (int j = 0; j < 8; ++j)
#pragma unroll
                        for (int r = 0; r < ROWS; ++r) acc[m][r] = fma_(xv[j], w[r][j], acc[m][r]);
                }
            }
        }
    }
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int r = 0; r < ROWS; ++r) acc[m][r] = warp_sum(acc[m][r]);
    // Every lane now holds every sum; lane m * ROWS + r writes output (m, n0 + r).
    A mine = 0;
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int r = 0; r < ROWS; ++r)
            if (lane == m * ROWS + r) mine = acc[m][r];
    const int m = lane / ROWS, n = n0 + lane % ROWS;
    if (m >= M || m >= MT || n >= N) return;
    A out = round_to<T>(mine);
    if (bias != nullptr) out = add_rn(out, Num<T>::load(bias[n]));
    y[(i64)m * N + n] = Num<T>::store(out);
}

template <typename T>
__device__ __forceinline__ void dequantize(const u32* __restrict__ codes, int row_words, int bits, int signed_bytes,
                                           const T* __restrict__ scale, int scale_rs, const int* __restrict__ zero,
                                           int zero_rs, int zero_default, const T* __restrict__ mins, int group_size,
                                           const int* __restrict__ g_idx, const i64* __restrict__ rows,
                                           T* __restrict__ out, int R, int K) {
    typedef typename Num<T>::acc A;
    const u32 mask = (1u << bits) - 1u;
    const i64 total = (i64)R * K;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (i64)gridDim.x * blockDim.x) {
        const int row = (int)(i / K), k = (int)(i - (i64)row * K);
        const i64 n = rows ? rows[row] : row;
        int u;
        if (signed_bytes) {
            u = (int)(reinterpret_cast<const unsigned char*>(codes)[n * K + k] ^ 0x80u);
        } else {  // the 64-bit window of the code's word and the next: codes of 3, 5, 6, 7 bits straddle words
            const i64 bit = (i64)k * bits;
            const i64 word = n * row_words + (bit >> 5);
            u64 window = codes[word];
            if ((bit >> 5) + 1 < row_words) window |= (u64)codes[word + 1] << 32;
            u = (int)((window >> (bit & 31)) & mask);
        }
        const int g = g_idx ? g_idx[k] : (group_size ? k / group_size : 0);
        const int z = (zero ? zero[n * zero_rs + g] : zero_default) + (signed_bytes ? 128 : 0);
        const A s = Num<T>::load(scale[n * scale_rs + g]);
        if (mins)
            out[i] = Num<T>::store(
                (A)ggml_affine((float)(u - z), (float)s, (float)Num<T>::load(mins[n * scale_rs + g])));
        else
            out[i] = Num<T>::store(mul_rn((A)(u - z), s));
    }
}

#define DQ_GEMV(S, T, KNAME, KIND, MT)                                                                         \
    extern "C" __global__ void __launch_bounds__(32 * DQ_WARPS) dequant_gemv_##S##_##KNAME##_m##MT(            \
        const u32* codes, int row_words, const T* scale, int scale_rs, const int* zero, int zero_rs,            \
        int zero_default, const T* mins, int group_size, const T* x, const T* bias, T* y, int M, int N, int K) { \
        dequant_gemv<T, KIND, MT>(codes, row_words, scale, scale_rs, zero, zero_rs, zero_default, mins,        \
                                  group_size, x, bias, y, M, N, K);                                            \
    }
#define DEQUANTIZE(S, T)                                                                                       \
    extern "C" __global__ void dequantize_##S(const u32* codes, int row_words, int bits, int signed_bytes,      \
                                              const T* scale, int scale_rs, const int* zero, int zero_rs,       \
                                              int zero_default, const T* mins, int group_size, const int* g_idx, \
                                              const i64* rows, T* out, int R, int K) {                          \
        dequantize<T>(codes, row_words, bits, signed_bytes, scale, scale_rs, zero, zero_rs, zero_default, mins, \
                      group_size, g_idx, rows, out, R, K);                                                     \
    }
#define DQ_ALL(S, T)                                                                                           \
    DQ_GEMV(S, T, p4, KIND_P4, 1) DQ_GEMV(S, T, p4, KIND_P4, 8) DQ_GEMV(S, T, p8, KIND_P8, 1)                   \
    DQ_GEMV(S, T, p8, KIND_P8, 8) DQ_GEMV(S, T, s8, KIND_S8, 1) DQ_GEMV(S, T, s8, KIND_S8, 8)                   \
    DQ_GEMV(S, T, p4m, KIND_P4M, 1) DQ_GEMV(S, T, p4m, KIND_P4M, 8) DEQUANTIZE(S, T)
FOR_EACH_DTYPE(DQ_ALL)
