// Shared by every kernel file: storage types, conversions, warp and block reductions.
//
// The sources include no system or CUDA header, so the same text compiles under NVRTC (what cupy.RawModule
// uses at run time) and nvcc (the compile check in CI) with no include paths. Half types are therefore plain
// 16-bit wrappers converted with PTX `cvt` (float16) or bit operations (bfloat16); arithmetic on them happens
// in float and is rounded back once per operation, as NumPy evaluates float16.
//
// Kernels are compiled with --fmad=false: no multiply-add is contracted implicitly, so an expression such as
// `x * cos + r * sin` rounds exactly as NumPy rounds it. Dot products ask for fused multiply-adds explicitly
// (`fma`), where the summation order differs from BLAS anyway.
//
// Every __global__ entry point is `extern "C"` (unmangled, so Python finds it by name) and calls a templated
// __device__ implementation; templates never sit inside `extern "C"`.

#pragma once

typedef long long i64;
typedef unsigned int u32;
typedef unsigned long long u64;

struct f16 { unsigned short bits; };
struct bf16 { unsigned short bits; };

#ifdef REFLLAMA_CUDA_ON_CPU  // tests/cuda_cpu/cuda_cpu.h: the same conversions without PTX
__device__ __forceinline__ float f16_to_float(unsigned short h) { return cpu_f16_to_float(h); }
__device__ __forceinline__ unsigned short float_to_f16(float f) { return cpu_float_to_f16(f); }
#else
__device__ __forceinline__ float f16_to_float(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ unsigned short float_to_f16(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));  // round to nearest even, as NumPy
    return h;
}
#endif

__device__ __forceinline__ float bf16_to_float(unsigned short b) {
    return __uint_as_float(((u32)b) << 16);  // exact: bfloat16 is the top half of a float32
}

__device__ __forceinline__ unsigned short float_to_bf16(float f) {
    // Round to nearest even, NaN kept quiet with its sign (what ml_dtypes does).
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}

// Num<T>: the accumulation type of a storage type and the two conversions. float16 and bfloat16 accumulate in
// float32, float32 in float32, float64 in float64.
template <typename T> struct Num;

template <> struct Num<float> {
    typedef float acc;
    static __device__ __forceinline__ float load(float x) { return x; }
    static __device__ __forceinline__ float store(float x) { return x; }
};

template <> struct Num<double> {
    typedef double acc;
    static __device__ __forceinline__ double load(double x) { return x; }
    static __device__ __forceinline__ double store(double x) { return x; }
};

template <> struct Num<f16> {
    typedef float acc;
    static __device__ __forceinline__ float load(f16 x) { return f16_to_float(x.bits); }
    static __device__ __forceinline__ f16 store(float x) { f16 h; h.bits = float_to_f16(x); return h; }
};

template <> struct Num<bf16> {
    typedef float acc;
    static __device__ __forceinline__ float load(bf16 x) { return bf16_to_float(x.bits); }
    static __device__ __forceinline__ bf16 store(float x) { bf16 h; h.bits = float_to_bf16(x); return h; }
};

// The value NumPy masks attention scores with: the most negative finite number of the accumulation type.
__device__ __forceinline__ float lowest(float) { return -3.402823466e+38f; }
__device__ __forceinline__ double lowest(double) { return -1.7976931348623157e+308; }

// Round a value of the accumulation type to the storage type and back: what one NumPy operation in T yields.
template <typename T>
__device__ __forceinline__ typename Num<T>::acc round_to(typename Num<T>::acc x) {
    return Num<T>::load(Num<T>::store(x));
}

// Unrounded-product operations the compiler must not contract (--fmad=false already forbids it; these say so
// at the call site as well).
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float fma_(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double fma_(double a, double b, double c) { return fma(a, b, c); }
__device__ __forceinline__ float exp_(float x) { return expf(x); }
__device__ __forceinline__ double exp_(double x) { return exp(x); }
__device__ __forceinline__ float max_(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double max_(double a, double b) { return fmax(a, b); }
__device__ __forceinline__ float min_(float a, float b) { return fminf(a, b); }
__device__ __forceinline__ double min_(double a, double b) { return fmin(a, b); }
__device__ __forceinline__ float abs_(float x) { return fabsf(x); }
__device__ __forceinline__ double abs_(double x) { return fabs(x); }
__device__ __forceinline__ float sqrt_(float x) { return sqrtf(x); }  // correctly rounded (-prec-sqrt=true)
__device__ __forceinline__ double sqrt_(double x) { return sqrt(x); }
__device__ __forceinline__ float rint_(float x) { return rintf(x); }  // round half to even, as np.rint
__device__ __forceinline__ double rint_(double x) { return rint(x); }
__device__ __forceinline__ float erf_(float x) { return erff(x); }
__device__ __forceinline__ double erf_(double x) { return erf(x); }
__device__ __forceinline__ float tanh_(float x) { return tanhf(x); }
__device__ __forceinline__ double tanh_(double x) { return tanh(x); }
__device__ __forceinline__ float pow_(float x, float y) { return powf(x, y); }
__device__ __forceinline__ double pow_(double x, double y) { return pow(x, y); }
__device__ __forceinline__ float neg_inf(float) { return -__int_as_float(0x7f800000); }
__device__ __forceinline__ double neg_inf(double) { return -__longlong_as_double(0x7ff0000000000000LL); }

// --- reductions ---------------------------------------------------------------------------------------------

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

template <typename A>
__device__ __forceinline__ A warp_max(A v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = max_(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum (or max) over the whole block; every thread gets the result. `scratch` holds one value per warp (<= 32).
// Called by all threads of the block; blockDim.x is a multiple of 32.
template <typename A, bool MAX>
__device__ __forceinline__ A block_reduce(A v, A* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = MAX ? warp_max(v) : warp_sum(v);
    __syncthreads();  // scratch may still be read by a previous reduction
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    A identity = MAX ? scratch[0] : (A)0;
    v = lane < warps ? scratch[lane] : identity;
    return MAX ? warp_max(v) : warp_sum(v);
}

// Dynamic shared memory, declared once for every kernel of a module (its type differs by instantiation).
extern __shared__ __align__(16) unsigned char dynamic_smem[];

// Instantiate a macro for every compute dtype: X(suffix, storage type). The suffixes are the ones
// backends/cupy_kernels.py appends to kernel names.
#define FOR_EACH_DTYPE(X) X(f32, float) X(f64, double) X(f16, f16) X(bf16, bf16)
