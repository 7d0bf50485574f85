// W8A8 in the integer domain (refllama/quant/int8.py is the reference, term by term):
//   1. quantize_rows_{hf,vllm}_<dtype>: per-token int8 codes and scales of x [M, K];
//   2. int8_{gemv,gemm}_<dtype>: acc[m, n] = sum_k codes[m, k] * W[n, k] exactly in int32 (dp4a: four int8
//      products summed into an int32 per instruction, sm_61+), then the epilogue, fused:
//        EPI_ACC  (0): acc itself, int32 [M, N] (tests compare it with the reference bit for bit);
//        EPI_HF   (1): y = (T(acc) * w_scale) * x_scale, each product rounded to T (float32/float64);
//        EPI_VLLM (2): y = x_scale * (w_scale * E(acc)), E = float32 (float64 for a float64 model);
//      then + bias in T. float16/bfloat16 models run both epilogues in float32 and round once: T(acc) alone would
//      overflow float16 for long rows.
// Layout: codes [M, K] and W [N, K] int8 row-major (HF [out, in], as stored); w_scale [N] or [1] (ws_stride 1/0) in
// the compute dtype; x_scale [M] in T ("hf") or float32 ("vllm"); y [M, N] in T.

#include "common.cuh"

#define EPI_ACC 0
#define EPI_HF 1
#define EPI_VLLM 2

// --- 1. per-token quantization: one block per row --------------------------------------------------------------

template <typename T> struct Eps;  // np.finfo(T).eps
template <> struct Eps<float> { static __device__ __forceinline__ float v() { return 1.1920928955078125e-07f; } };
template <> struct Eps<double> { static __device__ __forceinline__ double v() { return 2.220446049250313e-16; } };
template <> struct Eps<f16> { static __device__ __forceinline__ float v() { return 0.0009765625f; } };
template <> struct Eps<bf16> { static __device__ __forceinline__ float v() { return 0.0078125f; } };

// compressed-tensors: scale = absmax / 127.5 in T (eps(T) for an all-zero row), codes = rint(clip(x / scale,
// -128, 127)), every operation rounded to T.
template <typename T>
__device__ __forceinline__ void quantize_rows_hf(const T* __restrict__ x, signed char* __restrict__ codes,
                                                 T* __restrict__ scales, int K) {
    typedef typename Num<T>::acc A;
    __shared__ A scratch[32];
    const T* row = x + (i64)blockIdx.x * K;
    A absmax = 0;
    for (int k = threadIdx.x; k < K; k += blockDim.x) absmax = max_(absmax, abs_(Num<T>::load(row[k])));
    absmax = block_reduce<A, true>(absmax, scratch);
    A scale = round_to<T>(absmax / (A)127.5);
    if (scale == (A)0) scale = Eps<T>::v();
    for (int k = threadIdx.x; k < K; k += blockDim.x) {
        const A q = min_(max_(round_to<T>(Num<T>::load(row[k]) / scale), (A)-128), (A)127);
        codes[(i64)blockIdx.x * K + k] = (signed char)(int)rint_(q);
    }
    if (threadIdx.x == 0) scales[blockIdx.x] = Num<T>::store(scale);
}

// vLLM (dynamic_scaled_int8_quant_kernel), always in float32: scale = absmax / 127, codes = rint(x * (127 / absmax));
// an all-zero row gets scale 0 and codes 0.
template <typename T>
__device__ __forceinline__ void quantize_rows_vllm(const T* __restrict__ x, signed char* __restrict__ codes,
                                                   float* __restrict__ scales, int K) {
    __shared__ float scratch[32];
    const T* row = x + (i64)blockIdx.x * K;
    float absmax = 0.0f;
    for (int k = threadIdx.x; k < K; k += blockDim.x) absmax = fmaxf(absmax, fabsf((float)Num<T>::load(row[k])));
    absmax = block_reduce<float, true>(absmax, scratch);
    const float inverse = absmax == 0.0f ? 0.0f : 127.0f / absmax;  // 0 * inf = NaN, which vLLM's convert makes 0
    for (int k = threadIdx.x; k < K; k += blockDim.x) {
        const float q = fminf(fmaxf(__fmul_rn((float)Num<T>::load(row[k]), inverse), -128.0f), 127.0f);
        codes[(i64)blockIdx.x * K + k] = (signed char)(int)rintf(q);
    }
    if (threadIdx.x == 0) scales[blockIdx.x] = absmax / 127.0f;
}

// --- 2. the integer product ------------------------------------------------------------------------------------

__device__ __forceinline__ int dot4(int a, int b, int c) {  // c + sum of the four int8 x int8 byte products
#if __CUDA_ARCH__ >= 610
    int d;
    asm("dp4a.s32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
#else
    for (int i = 0; i < 4; ++i) c += (int)(signed char)(a >> (8 * i)) * (int)(signed char)(b >> (8 * i));
    return c;
#endif
}

template <typename T>
__device__ __forceinline__ void epilogue(int acc, int m, int n, int N, int epi, const void* x_scale,
                                         const T* __restrict__ w_scale, int ws_stride, const T* __restrict__ bias,
                                         T* __restrict__ y, int* __restrict__ acc_out) {
    typedef typename Num<T>::acc A;
    if (epi == EPI_ACC) {
        acc_out[(i64)m * N + n] = acc;
        return;
    }
    const A ws = Num<T>::load(w_scale[n * ws_stride]);
    A out;
    if (epi == EPI_HF) {  // (acc.astype(T) * w_scale) * x_scale
        const A xs = Num<T>::load(reinterpret_cast<const T*>(x_scale)[m]);
        out = round_to<T>(mul_rn(round_to<T>(mul_rn((A)acc, ws)), xs));
    } else {  // x_scale * (w_scale * float(acc)), in float32 (float64 for a float64 model)
        const A xs = (A)reinterpret_cast<const float*>(x_scale)[m];
        out = round_to<T>(mul_rn(xs, mul_rn(ws, (A)acc)));
    }
    if (bias != nullptr) out = add_rn(out, Num<T>::load(bias[n]));
    y[(i64)m * N + n] = Num<T>::store(out);
}
// float16 / bfloat16: A is float32, so (A)acc is exact up to 2^24 and every product above is a float32 product; only
// the final store rounds to T (round_to<T> on intermediates is skipped by the specialisations below).
template <> __device__ __forceinline__ void epilogue<f16>(int acc, int m, int n, int N, int epi, const void* x_scale,
                                                          const f16* w_scale, int ws_stride, const f16* bias, f16* y,
                                                          int* acc_out) {
    if (epi == EPI_ACC) { acc_out[(i64)m * N + n] = acc; return; }
    const float ws = Num<f16>::load(w_scale[n * ws_stride]);
    const float xs = epi == EPI_HF ? Num<f16>::load(reinterpret_cast<const f16*>(x_scale)[m])
                                   : reinterpret_cast<const float*>(x_scale)[m];
    float out = epi == EPI_HF ? __fmul_rn(__fmul_rn((float)acc, ws), xs) : __fmul_rn(xs, __fmul_rn(ws, (float)acc));
    if (bias != nullptr) out = round_to<f16>(out) + Num<f16>::load(bias[n]);
    y[(i64)m * N + n] = Num<f16>::store(out);
}
template <> __device__ __forceinline__ void epilogue<bf16>(int acc, int m, int n, int N, int epi, const void* x_scale,
                                                           const bf16* w_scale, int ws_stride, const bf16* bias,
                                                           bf16* y, int* acc_out) {
    if (epi == EPI_ACC) { acc_out[(i64)m * N + n] = acc; return; }
    const float ws = Num<bf16>::load(w_scale[n * ws_stride]);
    const float xs = epi == EPI_HF ? Num<bf16>::load(reinterpret_cast<const bf16*>(x_scale)[m])
                                   : reinterpret_cast<const float*>(x_scale)[m];
    float out = epi == EPI_HF ? __fmul_rn(__fmul_rn((float)acc, ws), xs) : __fmul_rn(xs, __fmul_rn(ws, (float)acc));
    if (bias != nullptr) out = round_to<bf16>(out) + Num<bf16>::load(bias[n]);
    y[(i64)m * N + n] = Num<bf16>::store(out);
}

// GEMV (decode, M <= MT): a warp owns I8_ROWS rows; lanes stride along K in 16-byte vectors (16 codes = 4 dp4a per
// token), UNROLL vectors per row in flight. Needs K % 16 == 0 (the host checks; otherwise the GEMM below).
#define I8_ROWS 2
#define I8_WARPS 4

template <typename T, int MT>
__device__ __forceinline__ void int8_gemv(const signed char* __restrict__ codes, const signed char* __restrict__ W,
                                          int M, int N, int K, int epi, const void* x_scale,
                                          const T* __restrict__ w_scale, int ws_stride, const T* __restrict__ bias,
                                          T* __restrict__ y, int* __restrict__ acc_out) {
    constexpr int UNROLL = MT == 1 ? 4 : 2;
    const int lane = threadIdx.x & 31;
    const int n0 = (blockIdx.x * I8_WARPS + (threadIdx.x >> 5)) * I8_ROWS;
    if (n0 >= N) return;  // uniform across the warp
    int acc[MT][I8_ROWS];
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int r = 0; r < I8_ROWS; ++r) acc[m][r] = 0;
    for (int k0 = lane * 16; k0 < K; k0 += 32 * 16 * UNROLL) {
        int4 wv[UNROLL][I8_ROWS];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u)
#pragma unroll
            for (int r = 0; r < I8_ROWS; ++r) {
                const int k = k0 + u * 512;
                wv[u][r] = k < K && n0 + r < N ? *reinterpret_cast<const int4*>(W + (i64)(n0 + r) * K + k)
                                               : make_int4(0, 0, 0, 0);
            }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int k = k0 + u * 512;
            if (k >= K) break;
#pragma unroll
            for (int m = 0; m < MT; ++m) {
                if (m >= M) break;
                const int4 xv = *reinterpret_cast<const int4*>(codes + (i64)m * K + k);
#pragma unroll
                for (int r = 0; r < I8_ROWS; ++r) {
                    int a = acc[m][r];
                    a = dot4(xv.x, wv[u][r].x, a);
                    a = dot4(xv.y, wv[u][r].y, a);
                    a = dot4(xv.z, wv[u][r].z, a);
                    acc[m][r] = dot4(xv.w, wv[u][r].w, a);
                }
            }
        }
    }
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int r = 0; r < I8_ROWS; ++r) acc[m][r] = warp_sum(acc[m][r]);  // integer: exact in any order
    // Every lane now holds every sum; lane m * I8_ROWS + r writes output (m, n0 + r): one epilogue per lane.
    int mine = 0;
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int r = 0; r < I8_ROWS; ++r)
            if (lane == m * I8_ROWS + r) mine = acc[m][r];
    const int m = lane / I8_ROWS, n = n0 + lane % I8_ROWS;
    if (m < M && m < MT && n < N) epilogue<T>(mine, m, n, N, epi, x_scale, w_scale, ws_stride, bias, y, acc_out);
}

// GEMM (prefill): 64 x 64 output tiles, 256 threads as 16 x 16, each thread 4 x 4 outputs at rows ty + 16 i and
// columns tx + 16 j. K advances 32 codes (8 words) per tile; tiles are staged in shared memory as int32 words with a
// row stride of 9 words, so the 16 column rows a warp reads fall in 16 different banks. Any M, N, K: edges are
// zero-filled (a zero code adds nothing); rows are read as words when K % 4 == 0, else byte by byte.
#define G_BM 64
#define G_BN 64
#define G_BKW 8  // words of K per tile (32 codes)

__device__ __forceinline__ int load_word(const signed char* __restrict__ p, int row, int rows, int k, int K,
                                         bool words) {
    if (row >= rows || k >= K) return 0;
    const signed char* src = p + (i64)row * K + k;
    if (words) return *reinterpret_cast<const int*>(src);  // K % 4 == 0: k + 4 <= K and 4-byte aligned
    int w = 0;
    for (int i = 0; i < 4 && k + i < K; ++i) w |= ((int)(unsigned char)src[i]) << (8 * i);
    return w;
}

template <typename T>
__device__ __forceinline__ void int8_gemm(const signed char* __restrict__ codes, const signed char* __restrict__ W,
                                          int M, int N, int K, int epi, const void* x_scale,
                                          const T* __restrict__ w_scale, int ws_stride, const T* __restrict__ bias,
                                          T* __restrict__ y, int* __restrict__ acc_out) {
    __shared__ int As[G_BM][G_BKW + 1];
    __shared__ int Ws[G_BN][G_BKW + 1];
    const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
    const int m0 = blockIdx.y * G_BM, n0 = blockIdx.x * G_BN;
    const bool words = (K & 3) == 0;
    int acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0;
    for (int kt = 0; kt < K; kt += 4 * G_BKW) {
        __syncthreads();  // the previous tile is consumed
        for (int e = threadIdx.x; e < G_BM * G_BKW; e += blockDim.x) {  // 512 words of each operand
            const int row = e / G_BKW, w = e % G_BKW;
            As[row][w] = load_word(codes, m0 + row, M, kt + 4 * w, K, words);
            Ws[row][w] = load_word(W, n0 + row, N, kt + 4 * w, K, words);
        }
        __syncthreads();
#pragma unroll
        for (int w = 0; w < G_BKW; ++w) {
            int a[4], b[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) a[i] = As[ty + 16 * i][w];
#pragma unroll
            for (int j = 0; j < 4; ++j) b[j] = Ws[tx + 16 * j][w];
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] = dot4(a[i], b[j], acc[i][j]);
        }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int m = m0 + ty + 16 * i, n = n0 + tx + 16 * j;
            if (m < M && n < N) epilogue<T>(acc[i][j], m, n, N, epi, x_scale, w_scale, ws_stride, bias, y, acc_out);
        }
}

#define INT8_KERNELS(S, T)                                                                                     \
    extern "C" __global__ void __launch_bounds__(256) quantize_rows_hf_##S(const T* x, signed char* codes,    \
                                                                           T* scales, int K) {                 \
        quantize_rows_hf<T>(x, codes, scales, K);                                                              \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(256) quantize_rows_vllm_##S(const T* x, signed char* codes,  \
                                                                             float* scales, int K) {           \
        quantize_rows_vllm<T>(x, codes, scales, K);                                                            \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(32 * I8_WARPS) int8_gemv_##S##_m1(                            \
        const signed char* codes, const signed char* W, int M, int N, int K, int epi, const void* x_scale,     \
        const T* w_scale, int ws_stride, const T* bias, T* y, int* acc_out) {                                  \
        int8_gemv<T, 1>(codes, W, M, N, K, epi, x_scale, w_scale, ws_stride, bias, y, acc_out);                \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(32 * I8_WARPS) int8_gemv_##S##_m8(                            \
        const signed char* codes, const signed char* W, int M, int N, int K, int epi, const void* x_scale,     \
        const T* w_scale, int ws_stride, const T* bias, T* y, int* acc_out) {                                  \
        int8_gemv<T, 8>(codes, W, M, N, K, epi, x_scale, w_scale, ws_stride, bias, y, acc_out);                \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(256) int8_gemm_##S(                                           \
        const signed char* codes, const signed char* W, int M, int N, int K, int epi, const void* x_scale,     \
        const T* w_scale, int ws_stride, const T* bias, T* y, int* acc_out) {                                  \
        int8_gemm<T>(codes, W, M, N, K, epi, x_scale, w_scale, ws_stride, bias, y, acc_out);                   \
    }
FOR_EACH_DTYPE(INT8_KERNELS)
