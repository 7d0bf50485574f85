// Dtype conversions on the device, for weights uploaded in their stored dtype (no host float copy of a
// memory-mapped checkpoint). 16-bit types travel as their bits (unsigned short). Widening is exact; narrowing
// rounds once, to nearest even, as NumPy and ml_dtypes do. One thread per element, grid-stride loop.

#include "common.cuh"

#define CONVERT(NAME, IN, OUT, EXPR)                                                                           \
    extern "C" __global__ void NAME(const IN* __restrict__ in, OUT* __restrict__ out, i64 n) {                 \
        for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {    \
            const IN v = in[i];                                                                                \
            out[i] = EXPR;                                                                                     \
        }                                                                                                      \
    }

CONVERT(bf16_to_f32, unsigned short, float, bf16_to_float(v))
CONVERT(bf16_to_f64, unsigned short, double, (double)bf16_to_float(v))
CONVERT(f32_to_bf16, float, unsigned short, float_to_bf16(v))
CONVERT(f16_to_bf16, unsigned short, unsigned short, float_to_bf16(f16_to_float(v)))  // f16 -> f32 is exact
CONVERT(bf16_to_f16, unsigned short, unsigned short, float_to_f16(bf16_to_float(v)))  // bf16 -> f32 is exact
