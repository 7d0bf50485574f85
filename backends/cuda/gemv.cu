// y = x @ W.T (+ bias) for a few tokens (decode): float weights in the compute dtype, read once, at bandwidth.
//
// Layout: W [N, K] row-major, as HF stores a Linear ([out, in]); x [M, K] and y [M, N] contiguous; bias [N] or null.
// A warp owns GEMV_ROWS consecutive output rows. Its lanes stride along K in 16-byte vectors (4 float32, 8 float16
// or bfloat16, 2 float64), so one warp instruction reads 512 contiguous bytes of a weight row. Each lane first
// issues the loads of UNROLL such steps for all its rows (several KiB in flight per warp: a bandwidth-bound kernel
// needs many outstanding loads per SM, and decode has few rows per SM), then consumes them; the x vector of every
// token slot is loaded once per step and used for all rows (x stays in L1/L2: every warp reads the same x).
// MT is the number of token slots compiled in (1, 2, 4, 8); tokens M <= MT. Accumulation is in Num<T>::acc with
// explicit fused multiply-adds, then one warp reduction per output; the result is rounded to T, then the bias is
// added in T (what NumPy's `x @ W.T + bias` does).
// The host guarantees K % (16 / sizeof(T)) == 0 and 16-byte-aligned x and W; otherwise it calls cuBLAS.

#include "common.cuh"

template <typename T>
union Vec16 {  // 16 bytes seen as one vector load and as elements
    uint4 raw;
    T v[16 / sizeof(T)];
};

#define GEMV_ROWS 2
#define GEMV_WARPS 4  // blockDim.x = 32 * GEMV_WARPS

template <typename T, int MT>
__device__ __forceinline__ void gemv(const T* __restrict__ W, const T* __restrict__ x, const T* __restrict__ bias,
                                     T* __restrict__ y, int M, int N, int K) {
    typedef typename Num<T>::acc A;
    constexpr int VEC = 16 / sizeof(T);
    constexpr int UNROLL = MT <= 2 ? 4 : (MT == 4 ? 2 : 1);  // fewer in-flight loads where x takes registers
    constexpr int STEP = 32 * VEC;                             // elements of a row one warp step covers
    const int lane = threadIdx.x & 31;
    const int n0 = (blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5)) * GEMV_ROWS;
    if (n0 >= N) return;  // uniform across the warp
    A acc[MT][GEMV_ROWS];
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; ++r) acc[m][r] = 0;

    for (int k0 = lane * VEC; k0 < K; k0 += STEP * UNROLL) {
        Vec16<T> wv[UNROLL][GEMV_ROWS];  // loads first, arithmetic after
#pragma unroll
        for (int u = 0; u < UNROLL; ++u)
#pragma unroll
            for (int r = 0; r < GEMV_ROWS; ++r) {
                const int k = k0 + u * STEP;
                if (k < K && n0 + r < N) wv[u][r].raw = *reinterpret_cast<const uint4*>(W + (i64)(n0 + r) * K + k);
                else wv[u][r].raw = make_uint4(0, 0, 0, 0);  // rows past N contribute 0 and are never written
            }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int k = k0 + u * STEP;
            if (k >= K) break;
#pragma unroll
            for (int m = 0; m < MT; ++m) {
                if (m >= M) break;
                Vec16<T> xs;
                xs.raw = *reinterpret_cast<const uint4*>(x + (i64)m * K + k);
#pragma unroll
                for (int j = 0; j < VEC; ++j) {
                    const A xj = Num<T>::load(xs.v[j]);
#pragma unroll
                    for (int r = 0; r < GEMV_ROWS; ++r) acc[m][r] = fma_(xj, Num<T>::load(wv[u][r].v[j]), acc[m][r]);
                }
            }
        }
    }
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; ++r) acc[m][r] = warp_sum(acc[m][r]);
    // Every lane now holds every sum; lane m * GEMV_ROWS + r writes output (m, n0 + r).
    A mine = 0;
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; ++r)
            if (lane == m * GEMV_ROWS + r) mine = acc[m][r];
    const int m = lane / GEMV_ROWS, n = n0 + lane % GEMV_ROWS;
    if (m >= M || m >= MT || n >= N) return;
    A out = round_to<T>(mine);
    if (bias != nullptr) out = add_rn(out, Num<T>::load(bias[n]));
    y[(i64)m * N + n] = Num<T>::store(out);
}

#define GEMV(S, T, MT)                                                                                         \
    extern "C" __global__ void __launch_bounds__(32 * GEMV_WARPS)                                              \
    gemv_##S##_m##MT(const T* W, const T* x, const T* bias, T* y, int M, int N, int K) {                       \
        gemv<T, MT>(W, x, bias, y, M, N, K);                                                                   \
    }
#define GEMV_ALL_M(S, T) GEMV(S, T, 1) GEMV(S, T, 2) GEMV(S, T, 4) GEMV(S, T, 8)
FOR_EACH_DTYPE(GEMV_ALL_M)
