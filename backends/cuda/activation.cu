// The SwiGLU family's elementwise step: out = act(gate) * up.
//
// Layout: gate, up, out [n] contiguous. act: 0 SiLU/Swish, 1 exact GELU (erf), 2 tanh GELU, 3 ReLU (the order of
// cupy_kernels.ACTIVATIONS). float32/float64 evaluate the numpy backend's expressions term by term in T;
// float16/bfloat16 evaluate the activation in float32 and round it once to T, then multiply by up in T, as torch
// does for half inputs.

#include "common.cuh"

template <typename A>
__device__ __forceinline__ A activation(A g, int act) {
    if (act == 0) return g / add_rn((A)1, exp_(-g));  // gate / (1 + exp(-gate))
    if (act == 1) {                                     // gate * 0.5 * (1 + erf(gate * sqrt(0.5)))
        const A e = erf_(mul_rn(g, (A)0.70710678118654757));
        return mul_rn(mul_rn(g, (A)0.5), add_rn((A)1, e));
    }
    if (act == 2) {  // 0.5 * gate * (1 + tanh(sqrt(2 / pi) * (gate + 0.044715 * gate ** 3)))
        const A inner = add_rn(g, mul_rn((A)0.044715, pow_(g, (A)3)));
        const A th = tanh_(mul_rn((A)0.79788456080286541, inner));
        return mul_rn(mul_rn((A)0.5, g), add_rn((A)1, th));
    }
    return g > (A)0 ? g : (A)0;  // ReLU
}

template <typename T>
__device__ __forceinline__ void gated_activation(const T* __restrict__ gate, const T* __restrict__ up,
                                                 T* __restrict__ out, i64 n, int act) {
    typedef typename Num<T>::acc A;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const A a = round_to<T>(activation<A>(Num<T>::load(gate[i]), act));
        out[i] = Num<T>::store(mul_rn(a, Num<T>::load(up[i])));
    }
}

#define GATED(S, T)                                                                                            \
    extern "C" __global__ void gated_activation_##S(const T* gate, const T* up, T* out, i64 n, int act) {      \
        gated_activation<T>(gate, up, out, n, act);                                                            \
    }
FOR_EACH_DTYPE(GATED)
