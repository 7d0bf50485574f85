// Attention over the KV cache for a few query tokens (decode), with GQA: softmax(q k^T * scale, masked) v.
//
// One pass over K and V with an online softmax (Milakov & Gimelshein 2018), split along the cache as in
// flash-decoding (Dao et al. 2023) so that a single decode token still fills the GPU.
// Layout: q (B, H, T, D) with element strides (q_sb, q_sh, q_st, 1); k, v (B, KV, S, D) views of the preallocated
// cache buffers with strides (kv_sb, kv_sh, kv_ss, 1); mask (B, T, S) bool, True where attending is allowed;
// out (B, H, T, D) contiguous. Query head h reads KV head h / G, G = H / KV (no K/V is repeated).
// Grid: x = ((b * T + t) * KV + kv) * gchunks + gc, y = split. Block: HB warps, one per query head of chunk gc, so the
// heads that share a KV head share every K/V tile read from global memory.
// Per tile of TS <= 32 slots the block stages K (row stride D + 1, so lanes reading one column of different rows hit
// different banks) and V in shared memory, in the accumulation type; q is staged too and read as a broadcast. Lane j
// scores slot j; the warp updates its running max m, sum l and output accumulators (lane owns d = lane + 32 i,
// D <= 256).
// Numerics follow the numpy backend: the score is the q.k dot product times the scale (rounded to the compute dtype
// on the host); masked slots score the lowest finite value of the accumulation type, so a row with no allowed slot
// (a padding query) averages V uniformly instead of producing NaN. With one split the block writes the normalised
// output; with several it writes (acc[D], m, l) per split to `part` and attention_combine_<dtype> merges them.

#include "common.cuh"

#define ATT_MAX_CHUNKS 8  // D <= 32 * ATT_MAX_CHUNKS

template <typename T>
__device__ __forceinline__ void attention_decode(const T* __restrict__ q, i64 q_sb, i64 q_sh, i64 q_st,
                                                 const T* __restrict__ k, const T* __restrict__ v, i64 kv_sb,
                                                 i64 kv_sh, i64 kv_ss, const unsigned char* __restrict__ mask,
                                                 T* __restrict__ out, typename Num<T>::acc* __restrict__ part, int H,
                                                 int KV, int T_, int S, int D, int TS, int split_len,
                                                 typename Num<T>::acc scale) {
    typedef typename Num<T>::acc A;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, HB = blockDim.x >> 5;
    const int G = H / KV, gchunks = (G + HB - 1) / HB;
    int idx = blockIdx.x;
    const int gc = idx % gchunks;
    idx /= gchunks;
    const int kvh = idx % KV;
    idx /= KV;
    const int t = idx % T_, b = idx / T_;
    const int g = gc * HB + warp, h = kvh * G + g;
    const bool active = g < G;  // inactive warps still help stage tiles and reach every barrier
    const int s_begin = blockIdx.y * split_len, s_end = min(S, s_begin + split_len);

    A* Ks = reinterpret_cast<A*>(dynamic_smem);  // [TS][D + 1]
    A* Vs = Ks + TS * (D + 1);                   // [TS][D]
    A* Qs = Vs + TS * D;                         // [HB][D]
    for (int d = lane; d < D; d += 32)
        Qs[warp * D + d] = active ? Num<T>::load(q[b * q_sb + h * q_sh + t * q_st + d]) : (A)0;
    const T* kb = k + b * kv_sb + kvh * kv_sh;
    const T* vb = v + b * kv_sb + kvh * kv_sh;
    const unsigned char* allowed = mask + ((i64)b * T_ + t) * S;

    A m = neg_inf((A)0), l = 0;
    A acc[ATT_MAX_CHUNKS];
#pragma unroll
    for (int i = 0; i < ATT_MAX_CHUNKS; ++i) acc[i] = 0;

    for (int s0 = s_begin; s0 < s_end; s0 += TS) {
        const int n = min(TS, s_end - s0);
        __syncthreads();  // the previous tile is consumed (and q is staged, on the first tile)
        for (int e = threadIdx.x; e < n * D; e += blockDim.x) {
            const int j = e / D, d = e - j * D;
            const i64 off = (i64)(s0 + j) * kv_ss + d;
            Ks[j * (D + 1) + d] = Num<T>::load(kb[off]);
            Vs[j * D + d] = Num<T>::load(vb[off]);
        }
        __syncthreads();
        A score = neg_inf((A)0);  // lanes without a slot: exp(-inf) = 0 below
        if (lane < n) {
            const A* kr = Ks + lane * (D + 1);
            const A* qr = Qs + warp * D;
            A dot = 0;
            for (int d = 0; d < D; ++d) dot = fma_(qr[d], kr[d], dot);
            score = allowed[s0 + lane] ? mul_rn(dot, scale) : lowest((A)0);
        }
        const A m_new = max_(m, warp_max(score));
        const A correction = exp_(m - m_new);  // 0 on the first tile (m = -inf)
        const A p = exp_(score - m_new);
        l = add_rn(mul_rn(l, correction), warp_sum(p));
#pragma unroll
        for (int i = 0; i < ATT_MAX_CHUNKS; ++i) acc[i] = mul_rn(acc[i], correction);
        for (int j = 0; j < n; ++j) {
            const A pj = __shfl_sync(0xffffffffu, p, j);
#pragma unroll
            for (int i = 0; i < ATT_MAX_CHUNKS; ++i) {
                const int d = lane + 32 * i;
                if (d < D) acc[i] = fma_(pj, Vs[j * D + d], acc[i]);
            }
        }
        m = m_new;
    }
    if (!active) return;
    const i64 row = ((i64)b * H + h) * T_ + t;
    if (gridDim.y == 1) {
#pragma unroll
        for (int i = 0; i < ATT_MAX_CHUNKS; ++i) {
            const int d = lane + 32 * i;
            if (d < D) out[row * D + d] = Num<T>::store(acc[i] / l);
        }
    } else {
        A* dst = part + (row * gridDim.y + blockIdx.y) * (D + 2);
#pragma unroll
        for (int i = 0; i < ATT_MAX_CHUNKS; ++i) {
            const int d = lane + 32 * i;
            if (d < D) dst[d] = acc[i];
        }
        if (lane == 0) {
            dst[D] = m;
            dst[D + 1] = l;
        }
    }
}

// Merge the splits of one (b, h, t) row: out = sum_s acc_s e^(m_s - M) / sum_s l_s e^(m_s - M), M = max_s m_s.
// One block per row, threads over d.
template <typename T>
__device__ __forceinline__ void attention_combine(const typename Num<T>::acc* __restrict__ part, T* __restrict__ out,
                                                  int splits, int D) {
    typedef typename Num<T>::acc A;
    const A* src = part + (i64)blockIdx.x * splits * (D + 2);
    A M = neg_inf((A)0);
    for (int s = 0; s < splits; ++s) M = max_(M, src[s * (D + 2) + D]);
    A L = 0;
    for (int s = 0; s < splits; ++s) L = fma_(src[s * (D + 2) + D + 1], exp_(src[s * (D + 2) + D] - M), L);
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        A o = 0;
        for (int s = 0; s < splits; ++s) o = fma_(src[s * (D + 2) + d], exp_(src[s * (D + 2) + D] - M), o);
        out[(i64)blockIdx.x * D + d] = Num<T>::store(o / L);
    }
}

#define ATTENTION(S, T)                                                                                        \
    extern "C" __global__ void __launch_bounds__(256) attention_decode_##S(                                    \
        const T* q, i64 q_sb, i64 q_sh, i64 q_st, const T* k, const T* v, i64 kv_sb, i64 kv_sh, i64 kv_ss,     \
        const unsigned char* mask, T* out, Num<T>::acc* part, int H, int KV, int T_, int S_len, int D, int TS,      \
        int split_len, Num<T>::acc scale) {                                                                    \
        attention_decode<T>(q, q_sb, q_sh, q_st, k, v, kv_sb, kv_sh, kv_ss, mask, out, part, H, KV, T_, S_len, D,  \
                            TS, split_len, scale);                                                             \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(256) attention_combine_##S(const Num<T>::acc* part, T* out,  \
                                                                            int splits, int D) {               \
        attention_combine<T>(part, out, splits, D);                                                            \
    }
FOR_EACH_DTYPE(ATTENTION)
