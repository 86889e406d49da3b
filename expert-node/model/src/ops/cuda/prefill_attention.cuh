// Included by kernels.cu (after mma.cuh's primitives and attention.cuh): prefill's causal attention
// of one sequence in one launch, in place of two cuBLAS matmuls, the softmax kernel between them
// and the transposing copy of the output.
//
// FlashAttention-2's layout (arXiv 2307.08691): a block takes 64 query rows of one head, a warp 16
// of them, with the rows' queries, scores and outputs held in registers as the operands and
// accumulators of `mma.sync` m16n8k16 tiles, and key and value tiles of 64 positions streamed
// through shared memory. Its rounding is the reference's eager attention in bf16 (transformers
// 4.57.3 `eager_attention_forward`), not FlashAttention's: scores bf16(bf16(q . k) * scale),
// masked past each query, softmax in f32, each probability rounded to bf16 once normalized by
// the row's sum (times its reciprocal: within an f32 ulp of the quotient) and only then
// multiplied with v (f32 sums, one rounding at the end). So it takes
// two passes over the keys: the first finds each row's maximum and sum (the sum rescaled as the
// maximum grows, FlashAttention's online softmax: a few f32 ulps from a sum taken after the
// maximum, as any other order of that sum is), the second recomputes the scores, makes the
// probabilities and multiplies them with v.
#pragma once

#define PA_ROWS 64
#define PA_KEYS 64

// Two stages of a key and a value tile; the block's query rows pass through the first key tile's
// memory on their way to registers, before the stages are used (a third block then fits on an SM).
template <int D>
struct PrefillAttentionShared {
    struct {
        bf16 k[PA_KEYS][D + 8];
        bf16 v[PA_KEYS][D + 8];
    } stage[2];
};

// q [heads, s, D] contiguous; k and v [kv_heads, >= past + s, D] with rows D apart and heads
// `kv_stride` apart (the cache's buffers as they are); out [s, heads * D]. Query i sits at
// absolute position past + i and sees keys 0..=past + i.
template <int D>
__device__ __forceinline__ void prefill_attention(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                                  const bf16* __restrict__ v, bf16* __restrict__ out,
                                                  int heads, int kv_heads, int s, int past,
                                                  long long kv_stride, float scale) {
    using Shared = PrefillAttentionShared<D>;
    constexpr int CHUNKS = D / 8;  // 16-byte chunks of a row
    constexpr int KC = D / 16;     // k-steps of q . k
    constexpr int NT = D / 8;      // 8-wide output tiles of probs @ v
    constexpr int ST = PA_KEYS / 8;  // 8-wide score tiles of a key tile
    // The longest rows first: the causal mask makes the last query tiles the longest.
    const int tile = gridDim.x - 1 - blockIdx.x;
    const int h = blockIdx.y, kvh = h / (heads / kv_heads);
    const int q0 = tile * PA_ROWS, rows = min(PA_ROWS, s - q0);
    const int seen = past + q0 + rows;  // keys the block's last row sees
    const int n_tiles = (seen + PA_KEYS - 1) / PA_KEYS;
    Shared& sh = dynamic_shared_as<Shared>();
    const bf16* qh = q + ((size_t)h * s + q0) * D;
    const bf16* kh = k + (size_t)kvh * kv_stride;
    const bf16* vh = v + (size_t)kvh * kv_stride;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3, wm = warp * 16;
    // The positions of the warp's first row and of this lane's two rows (g and g + 8 of the
    // warp's 16), and the last key any row of the warp sees: key tiles past it are the warp's to
    // skip, and only tiles reaching past its first row hold masked keys.
    const int warp_first = past + q0 + wm;
    const int pos0 = warp_first + g, pos1 = pos0 + 8, warp_last = warp_first + 15;

    // The warp's queries as A operands, through shared memory (zeros past `rows`).
    static_assert(PA_ROWS == PA_KEYS, "the query rows pass through a key tile");
    bf16(*qs)[D + 8] = sh.stage[0].k;
    for (int i = threadIdx.x; i < PA_ROWS * CHUNKS; i += blockDim.x) {
        const int r = i / CHUNKS, c = (i % CHUNKS) * 8;
        cp_async16(&qs[r][c], qh + (size_t)(r < rows ? r : 0) * D + c, r < rows);
    }
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    uint32_t qa[KC][4];
#pragma unroll
    for (int c = 0; c < KC; ++c)
        ldmatrix_x4(qa[c], &qs[wm + (lane & 7) + ((lane >> 3) & 1) * 8][c * 16 + (lane >> 4) * 8]);
    __syncthreads();
    // Rows past `seen` are zeros: no row sees them, and a zero value times a zero probability adds
    // nothing where stale memory might hold NaN.
    auto load = [&](bf16 (*dst)[D + 8], const bf16* src, int kt) {
        const int j0 = kt * PA_KEYS;
        for (int i = threadIdx.x; i < PA_KEYS * CHUNKS; i += blockDim.x) {
            const int r = i / CHUNKS, c = (i % CHUNKS) * 8;
            const bool valid = j0 + r < seen;
            cp_async16(&dst[r][c], src + (size_t)(valid ? j0 + r : 0) * D + c, valid);
        }
    };
    // Scores of key tile kt, rounded as the reference does, -inf where masked: sc[n][e] is row
    // g (e < 2) or g + 8 (e >= 2), key kt * 64 + n * 8 + 2t + (e & 1).
    auto scores = [&](const bf16 (*keys)[D + 8], int kt, float (&sc)[ST][4]) {
#pragma unroll
        for (int n = 0; n < ST; ++n) sc[n][0] = sc[n][1] = sc[n][2] = sc[n][3] = 0.f;
#pragma unroll
        for (int c = 0; c < KC; ++c) {
#pragma unroll
            for (int n = 0; n < ST; n += 2) {
                uint32_t b[4];
                ldmatrix_x4(b, &keys[n * 8 + (lane & 7) + (lane >> 4) * 8][c * 16 + ((lane >> 3) & 1) * 8]);
                mma_16816(sc[n], qa[c], b[0], b[1]);
                mma_16816(sc[n + 1], qa[c], b[2], b[3]);
            }
        }
#pragma unroll
        for (int n = 0; n < ST; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) sc[n][e] = f(rn(f(rn(sc[n][e])) * scale));
        if (kt * PA_KEYS + PA_KEYS - 1 > warp_first) {
#pragma unroll
            for (int n = 0; n < ST; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int key = kt * PA_KEYS + n * 8 + 2 * t + (e & 1);
                    if (key > (e < 2 ? pos0 : pos1)) sc[n][e] = -INFINITY;
                }
        }
    };

    // Pass 1: each row's maximum and sum (per lane, over its quarter of the row's keys; the max is
    // shared across the row's four lanes after every tile, so every lane rescales alike).
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
    cp_async_ring<2>(n_tiles, [&](int kt) { load(sh.stage[kt % 2].k, kh, kt); }, [&](int kt) {
        if (kt * PA_KEYS > warp_last) return;
        float sc[ST][4];
        scores(sh.stage[kt % 2].k, kt, sc);
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float mx = m[r];
#pragma unroll
            for (int n = 0; n < ST; ++n) mx = fmaxf(mx, fmaxf(sc[n][2 * r], sc[n][2 * r + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            // Every row sees key 0, so the maximum is finite from the first tile on.
            float sum = l[r] * expf(m[r] - mx);
#pragma unroll
            for (int n = 0; n < ST; ++n) sum += expf(sc[n][2 * r] - mx) + expf(sc[n][2 * r + 1] - mx);
            m[r] = mx;
            l[r] = sum;
        }
    });
    // Each probability is exp(x - max) times the sum's reciprocal: within an f32 ulp of the
    // quotient, one division a row rather than one a key.
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
        inv[r] = 1.0f / l[r];
    }

    // Pass 2: the probabilities, rounded to bf16, times v.
    float o[NT][4];
#pragma unroll
    for (int n = 0; n < NT; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    cp_async_ring<2>(n_tiles,
                     [&](int kt) {
                         load(sh.stage[kt % 2].k, kh, kt);
                         load(sh.stage[kt % 2].v, vh, kt);
                     },
                     [&](int kt) {
                         if (kt * PA_KEYS > warp_last) return;
                         float sc[ST][4];
                         scores(sh.stage[kt % 2].k, kt, sc);
                         // exp(-inf) = 0: masked keys get probability 0, as in the reference.
                         uint32_t pa[ST / 2][4];
#pragma unroll
                         for (int n = 0; n < ST; ++n) {
                             const bf16 p0 = rn(expf(sc[n][0] - m[0]) * inv[0]);
                             const bf16 p1 = rn(expf(sc[n][1] - m[0]) * inv[0]);
                             const bf16 p2 = rn(expf(sc[n][2] - m[1]) * inv[1]);
                             const bf16 p3 = rn(expf(sc[n][3] - m[1]) * inv[1]);
                             pa[n / 2][(n & 1) * 2] = pack_bf16(p0, p1);
                             pa[n / 2][(n & 1) * 2 + 1] = pack_bf16(p2, p3);
                         }
                         const bf16(*values)[D + 8] = sh.stage[kt % 2].v;
#pragma unroll
                         for (int c = 0; c < ST / 2; ++c) {
#pragma unroll
                             for (int n = 0; n < NT; n += 2) {
                                 uint32_t b[4];
                                 ldmatrix_x4_trans(b, &values[c * 16 + (lane & 7) + ((lane >> 3) & 1) * 8]
                                                             [n * 8 + (lane >> 4) * 8]);
                                 mma_16816(o[n], pa[c], b[0], b[1]);
                                 mma_16816(o[n + 1], pa[c], b[2], b[3]);
                             }
                         }
                     });
    // Straight into [s, heads * D]: no transposing copy after.
    bf16* oh = out + (size_t)h * D;
    const size_t row_stride = (size_t)heads * D;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = wm + g + 8 * r;
        if (row >= rows) continue;
        bf16* dst = oh + (size_t)(q0 + row) * row_stride + 2 * t;
#pragma unroll
        for (int n = 0; n < NT; ++n)
            *reinterpret_cast<uint32_t*>(dst + n * 8) = pack_bf16(rn(o[n][2 * r]), rn(o[n][2 * r + 1]));
    }
}

// One entry point per head size (prefill_attention.rs: `HEAD_DIMS`); 128 threads, grid
// (ceil(s / PA_ROWS), heads), dynamic shared memory `PrefillAttentionShared<D>`.
#define PREFILL_ATTENTION(D)                                                                              \
    extern "C" __global__ void __launch_bounds__(128, 3) prefill_attention_d##D##_bf16(                      \
        const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,               \
        bf16* __restrict__ out, int heads, int kv_heads, int s, int past, long long kv_stride,            \
        float scale) {                                                                                    \
        prefill_attention<D>(q, k, v, out, heads, kv_heads, s, past, kv_stride, scale);                  \
    }
PREFILL_ATTENTION(32)
PREFILL_ATTENTION(64)
PREFILL_ATTENTION(128)
