// Just enough of CUDA to run backends/cuda/*.cu on a CPU, for tests: every thread of a block is a fiber on one OS
// thread, __syncthreads() and warp shuffles are barriers between fibers, blocks run one after another.
//
// Why: CI has no GPU. Compiling the kernels (tests/test_cupy_compile.py) finds syntax and resource errors; this
// runs the same source text, so indexing, reductions, shared-memory use and barrier placement are checked against
// the golden files too. It is not a GPU: transcendental functions come from the C library (CUDA's differ by a few
// ulp), and the schedule is one legal interleaving, not the hardware's.
//
// Semantics kept from CUDA:
// * __syncthreads() waits for every thread of the block; a warp shuffle waits for all 32 lanes of its warp. A
//   thread that leaves the kernel while others wait at a barrier is a deadlock here (undefined on a GPU), and the
//   launch fails with a message instead of hanging.
// * __shared__ variables are one copy per block (function statics: blocks run one at a time). Dynamic shared
//   memory is filled with 0xFF bytes (NaN) before each block, so a read before any write shows up.
// * Floating point: compile with -ffp-contract=off, as the kernels are compiled with --fmad=false.

#pragma once

#include <math.h>
#include <string.h>
#include <ucontext.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#define REFLLAMA_CUDA_ON_CPU 1

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static  // one copy per block; the builder turns `extern __shared__` into `extern`

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

// Set by the scheduler before each fiber runs (one fiber runs at a time).
inline dim3 threadIdx, blockIdx, blockDim, gridDim;

struct __attribute__((aligned(16))) int4 { int x, y, z, w; };
struct __attribute__((aligned(16))) uint4 { unsigned x, y, z, w; };
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

template <class A, class B>
inline std::common_type_t<A, B> min(A a, B b) { return b < a ? b : a; }
template <class A, class B>
inline std::common_type_t<A, B> max(A a, B b) { return a < b ? b : a; }

template <class To, class From>
inline To bit_cast_(From v) {
    static_assert(sizeof(To) == sizeof(From));
    To out;
    memcpy(&out, &v, sizeof out);
    return out;
}
inline float __uint_as_float(unsigned v) { return bit_cast_<float>(v); }
inline float __int_as_float(int v) { return bit_cast_<float>(v); }
inline unsigned __float_as_uint(float v) { return bit_cast_<unsigned>(v); }
inline double __longlong_as_double(long long v) { return bit_cast_<double>(v); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }

// IEEE half conversions (GCC's _Float16: round to nearest even, as PTX cvt.rn)
inline float cpu_f16_to_float(unsigned short h) { return (float)bit_cast_<_Float16>(h); }
inline unsigned short cpu_float_to_f16(float f) { return bit_cast_<unsigned short>((_Float16)f); }

extern unsigned char dynamic_smem[];  // defined by the builder's wrapper, kDynamicSharedBytes long

namespace cuda_cpu {

constexpr size_t kStackBytes = 64 * 1024;
constexpr size_t kDynamicSharedBytes = 228 * 1024;

struct Barrier {
    unsigned arrived = 0;
    unsigned long generation = 0;
};

// Switching fibers: on x86-64 a few instructions (callee-saved registers, the stack pointer, MXCSR and the x87
// control word); elsewhere ucontext, whose swapcontext makes a system call per switch (6x slower on the emulated tests).
#if defined(__x86_64__)
extern "C" void cuda_cpu_switch(void** save_sp, void* load_sp);
asm(R"(
    .text
    .globl cuda_cpu_switch
    .hidden cuda_cpu_switch
    .type cuda_cpu_switch, @function
cuda_cpu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
)");

struct Context {
    void* sp = nullptr;
};

inline void switch_to(Context& from, Context& to) { cuda_cpu_switch(&from.sp, to.sp); }

// A fresh context that starts in start() on `stack` (which start() must never return from).
inline void make_context(Context& c, std::vector<char>& stack, void (*start)()) {
    uintptr_t top = (reinterpret_cast<uintptr_t>(stack.data()) + stack.size()) & ~uintptr_t(15);
    uint64_t* sp = reinterpret_cast<uint64_t*>(top);
    *--sp = 0;                                     // start()'s return address: never used
    *--sp = reinterpret_cast<uint64_t>(start);     // where cuda_cpu_switch's ret goes
    for (int i = 0; i < 6; ++i) *--sp = 0;         // rbp rbx r12 r13 r14 r15
    *--sp = 0x1F80ull | (0x037Full << 32);         // MXCSR and x87 control word: the defaults
    c.sp = sp;
}
#else
struct Context {
    ucontext_t uc;
};

inline void switch_to(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }

inline void make_context(Context& c, std::vector<char>& stack, void (*start)()) {
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = stack.data();
    c.uc.uc_stack.ss_size = stack.size();
    c.uc.uc_link = nullptr;
    makecontext(&c.uc, start, 0);
}
#endif

struct Fiber {
    Context context;
    std::vector<char> stack;
    dim3 index;
    bool done = false;
    unsigned shuffle_phase = 0;
};

struct Block {
    Context scheduler;
    std::vector<Fiber> fibers;
    Fiber* current = nullptr;
    Barrier block_barrier;
    std::vector<Barrier> warp_barriers;
    std::vector<uint64_t> shuffle_slots;  // [warp][phase 0/1][lane]
    unsigned long progress = 0;           // barrier arrivals and finished fibers: a round without any is a deadlock
    void (*body)(void*) = nullptr;
    void* body_arg = nullptr;
};

inline Block block_state;

inline void yield() { switch_to(block_state.current->context, block_state.scheduler); }

inline void wait(Barrier& b, unsigned participants) {
    const unsigned long generation = b.generation;
    ++block_state.progress;
    if (++b.arrived == participants) {
        b.arrived = 0;
        ++b.generation;
        return;
    }
    while (b.generation == generation) yield();
}

inline unsigned linear_thread() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }

template <class T>
inline T shuffle(T v, unsigned source_lane) {
    static_assert(sizeof(T) <= sizeof(uint64_t));
    Fiber& f = *block_state.current;
    const unsigned tid = linear_thread(), warp = tid / 32, lane = tid % 32;
    uint64_t* slots = &block_state.shuffle_slots[(warp * 2 + f.shuffle_phase) * 32];
    f.shuffle_phase ^= 1;  // two slot sets: a lane reuses a set only after every lane passed the next barrier
    uint64_t raw = 0;
    memcpy(&raw, &v, sizeof v);
    slots[lane] = raw;
    wait(block_state.warp_barriers[warp], 32);
    T out;
    memcpy(&out, &slots[source_lane % 32], sizeof out);
    return out;
}

inline void entry() {
    Block& b = block_state;
    b.body(b.body_arg);
    b.current->done = true;
    ++b.progress;
    yield();  // never resumed: the scheduler skips finished fibers
}

// Run body(arg) as every thread of every block. Returns 0, or 1 when a block deadlocked at a barrier.
inline int launch(const unsigned* dims, void (*body)(void*), void* arg) {
    Block& b = block_state;
    gridDim = {dims[0], dims[1], dims[2]};
    blockDim = {dims[3], dims[4], dims[5]};
    const unsigned threads = blockDim.x * blockDim.y * blockDim.z;
    if (threads % 32 != 0) return 2;
    b.fibers.resize(threads);
    b.warp_barriers.assign(threads / 32, Barrier{});
    b.shuffle_slots.assign(threads / 32 * 2 * 32, 0);
    b.body = body;
    b.body_arg = arg;
    for (unsigned bz = 0; bz < gridDim.z; ++bz)
        for (unsigned by = 0; by < gridDim.y; ++by)
            for (unsigned bx = 0; bx < gridDim.x; ++bx) {
                blockIdx = {bx, by, bz};
                b.block_barrier = Barrier{};
                for (auto& w : b.warp_barriers) w = Barrier{};
                memset(dynamic_smem, 0xFF, kDynamicSharedBytes);
                for (unsigned t = 0; t < threads; ++t) {
                    Fiber& f = b.fibers[t];
                    f.stack.resize(kStackBytes);
                    f.index = {t % blockDim.x, t / blockDim.x % blockDim.y, t / (blockDim.x * blockDim.y)};
                    f.done = false;
                    f.shuffle_phase = 0;
                    make_context(f.context, f.stack, entry);
                }
                for (unsigned remaining = threads; remaining;) {
                    const unsigned long before = b.progress;
                    remaining = 0;
                    for (auto& f : b.fibers) {
                        if (f.done) continue;
                        b.current = &f;
                        threadIdx = f.index;
                        switch_to(b.scheduler, f.context);
                        remaining += !f.done;
                    }
                    if (remaining && b.progress == before) return 1;
                }
            }
    return 0;
}

// Calls a kernel with its arguments from a void* array: pointers as the pointer values, scalars by address.
template <class T>
inline T argument(void* a) {
    if constexpr (std::is_pointer_v<T>) return static_cast<T>(a);
    else return *static_cast<T*>(a);
}

template <class... P, size_t... I>
inline void call(void (*kernel)(P...), void** args, std::index_sequence<I...>) {
    kernel(argument<P>(args[I])...);
}

template <class... P>
inline void call(void (*kernel)(P...), void** args) {
    call(kernel, args, std::index_sequence_for<P...>{});
}

}  // namespace cuda_cpu

inline void __syncthreads() {
    cuda_cpu::wait(cuda_cpu::block_state.block_barrier,
                   blockDim.x * blockDim.y * blockDim.z);
}

template <class T>
inline T __shfl_xor_sync(unsigned, T v, int lane_mask, int = 32) {
    return cuda_cpu::shuffle(v, (cuda_cpu::linear_thread() % 32) ^ (unsigned)lane_mask);
}

template <class T>
inline T __shfl_sync(unsigned, T v, int source_lane, int = 32) {
    return cuda_cpu::shuffle(v, (unsigned)source_lane);
}
