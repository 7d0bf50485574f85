// Rotate-half RoPE with the host's tables: out = x * cos + rotate_half(x) * sin.
//
// Layout: x (B, H, T, D) is usually a strided view (the Linear output reshaped (B, T, H, D) and transposed), read
// through its element strides (sb, sh, st; the last axis contiguous); cos, sin (B, 1, T, D) contiguous, already in
// the compute dtype (computed in float64 on the host by refllama/model/rope.py, rounded once); out (B, H, T, D)
// contiguous, so the transpose's copy happens here for free. One thread per rotated pair (d, d + D/2):
//     out[d]       = x[d] * cos[d] + (-x[d + D/2]) * sin[d]
//     out[d + D/2] = x[d + D/2] * cos[d + D/2] + x[d] * sin[d + D/2]
// Each product and the sum are rounded to T separately, exactly as NumPy evaluates the expression.

#include "common.cuh"

template <typename T>
__device__ __forceinline__ void rope(const T* __restrict__ x, const T* __restrict__ cos, const T* __restrict__ sin,
                                     T* __restrict__ out, int B, int H, int T_, int D, i64 sb, i64 sh, i64 st) {
    typedef typename Num<T>::acc A;
    const int half = D / 2;
    const i64 pairs = (i64)B * H * T_ * half;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < pairs; i += (i64)gridDim.x * blockDim.x) {
        const int d = (int)(i % half);
        i64 r = i / half;
        const int t = (int)(r % T_);
        r /= T_;
        const int h = (int)(r % H);
        const int b = (int)(r / H);
        const T* src = x + b * sb + h * sh + t * st;
        const i64 table = ((i64)b * T_ + t) * D;
        T* dst = out + (((i64)b * H + h) * T_ + t) * D;
        const A x1 = Num<T>::load(src[d]), x2 = Num<T>::load(src[d + half]);
        const A a1 = round_to<T>(mul_rn(x1, Num<T>::load(cos[table + d])));
        const A b1 = round_to<T>(mul_rn(-x2, Num<T>::load(sin[table + d])));
        const A a2 = round_to<T>(mul_rn(x2, Num<T>::load(cos[table + d + half])));
        const A b2 = round_to<T>(mul_rn(x1, Num<T>::load(sin[table + d + half])));
        dst[d] = Num<T>::store(add_rn(a1, b1));
        dst[d + half] = Num<T>::store(add_rn(a2, b2));
    }
}

#define ROPE(S, T)                                                                                             \
    extern "C" __global__ void rope_##S(const T* x, const T* cos, const T* sin, T* out, int B, int H, int T_,   \
                                        int D, i64 sb, i64 sh, i64 st) {                                       \
        rope<T>(x, cos, sin, out, B, H, T_, D, sb, sh, st);                                                    \
    }
FOR_EACH_DTYPE(ROPE)
