"""tests/cuda_cpu, the CUDA-on-CPU harness that runs the cupy backend's kernel source in test_cupy_emulated.py: its
barriers, shuffles and shared memory behave as CUDA specifies, and a kernel that would hang fails instead."""

from __future__ import annotations

import os

import numpy as np
import pytest

import cuda_cpu

if cuda_cpu.compiler() is None:
    if os.environ.get("CI"):
        raise RuntimeError("no C++ compiler: CI must run the CUDA kernels on the CPU")
    pytest.skip("no C++ compiler (g++) to run CUDA kernels on the CPU", allow_module_level=True)

SOURCE = r"""
extern __shared__ __align__(16) unsigned char dynamic_smem[];

extern "C" __global__ void lanes(int* out) {  // two shuffles per lane
    const int i = blockIdx.x * blockDim.x + threadIdx.x, lane = threadIdx.x & 31;
    const int from_next = __shfl_sync(0xffffffffu, lane * 10, (lane + 1) & 31);
    out[i] = from_next + 1000 * __shfl_xor_sync(0xffffffffu, lane, 5);
}

extern "C" __global__ void reverse(int* out) {  // every thread reads a value another thread wrote before the barrier
    __shared__ int s[64];
    s[threadIdx.x] = blockIdx.x * 64 + threadIdx.x;
    __syncthreads();
    out[blockIdx.x * 64 + threadIdx.x] = s[63 - threadIdx.x];
}

extern "C" __global__ void early_exit(int* out) {  // thread 0 never reaches the barrier: a hang on a GPU
    if (threadIdx.x == 0) return;
    __syncthreads();
    out[threadIdx.x] = 1;
}

extern "C" __global__ void unwritten(float* out) {  // reads dynamic shared memory nobody wrote
    out[threadIdx.x] = reinterpret_cast<const float*>(dynamic_smem)[threadIdx.x];
}
"""


@pytest.fixture(scope="module")
def lib():
    return cuda_cpu.build(SOURCE, ("lanes", "reverse", "early_exit", "unwritten"), "harness")


def _ptr(a: np.ndarray) -> tuple[bool, int]:
    return True, a.ctypes.data


def test_warp_shuffles(lib):
    out = np.zeros(128, np.int32)
    cuda_cpu.launch(lib, "lanes", (2,), (64,), [_ptr(out)])
    lane = np.arange(128) % 32
    np.testing.assert_array_equal(out, (lane + 1) % 32 * 10 + 1000 * (lane ^ 5))


def test_shared_memory_and_syncthreads(lib):
    out = np.zeros(192, np.int32)
    cuda_cpu.launch(lib, "reverse", (3,), (64,), [_ptr(out)])
    blocks, threads = np.divmod(np.arange(192), 64)
    np.testing.assert_array_equal(out, blocks * 64 + 63 - threads)


def test_a_thread_missing_a_barrier_fails_instead_of_hanging(lib):
    out = np.zeros(32, np.int32)
    with pytest.raises(cuda_cpu.LaunchError, match="deadlocked"):
        cuda_cpu.launch(lib, "early_exit", (1,), (32,), [_ptr(out)])


def test_blocks_must_be_whole_warps(lib):
    with pytest.raises(cuda_cpu.LaunchError, match="whole warps"):
        cuda_cpu.launch(lib, "lanes", (1,), (48,), [_ptr(np.zeros(48, np.int32))])


def test_dynamic_shared_memory_starts_as_nan(lib):
    out = np.zeros(32, np.float32)
    cuda_cpu.launch(lib, "unwritten", (1,), (32,), [_ptr(out)])
    assert np.isnan(out).all()
