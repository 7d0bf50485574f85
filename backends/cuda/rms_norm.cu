// RMSNorm over the last axis: out = weight * (x * (1 / sqrt(mean(x * x) + eps))).
//
// Layout: x, out [rows, D] contiguous, weight [D]; one block per row (blockDim a multiple of 32, <= 1024).
// float32 and float64 follow the numpy backend operation by operation: squares and their mean in T, the reciprocal
// square root in T, x times it, then the weight times that (only the summation order differs: a tree here, pairwise
// in NumPy). float16 and bfloat16 follow HF: normalise in float32, round to T, then multiply by the weight in T.

#include "common.cuh"

template <typename T>
__device__ __forceinline__ void rms_norm(const T* __restrict__ x, const T* __restrict__ weight, T* __restrict__ out,
                                         int D, double eps) {
    typedef typename Num<T>::acc A;
    __shared__ A scratch[32];
    const T* row = x + (i64)blockIdx.x * D;
    T* dst = out + (i64)blockIdx.x * D;
    A squares = 0;
    for (int i = threadIdx.x; i < D; i += blockDim.x) {
        const A v = Num<T>::load(row[i]);
        squares = add_rn(squares, mul_rn(v, v));
    }
    squares = block_reduce<A, false>(squares, scratch);
    const A variance = squares / (A)D;
    const A inverse = (A)1 / sqrt_(add_rn(variance, (A)eps));  // eps rounded to A, as NumPy rounds a Python float
    for (int i = threadIdx.x; i < D; i += blockDim.x) {
        const A normed = round_to<T>(mul_rn(Num<T>::load(row[i]), inverse));
        dst[i] = Num<T>::store(mul_rn(Num<T>::load(weight[i]), normed));
    }
}

#define RMS_NORM(S, T)                                                                                         \
    extern "C" __global__ void __launch_bounds__(1024)                                                         \
    rms_norm_##S(const T* x, const T* weight, T* out, int D, double eps) { rms_norm<T>(x, weight, out, D, eps); }
FOR_EACH_DTYPE(RMS_NORM)
