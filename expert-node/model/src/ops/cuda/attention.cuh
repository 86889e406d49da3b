// Included by kernels.cu (after its helpers f, rn, warp_sum and block_sum): attention's own
// kernels. Both round as the reference's eager attention in bf16 (transformers 4.57.3
// `eager_attention_forward`): scores = bf16(bf16(q . k) * scale), the causal mask, softmax in
// f32, probabilities cast to bf16, then probs @ v with f32 accumulation.
#pragma once

// Maximum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
__device__ float block_max(float v) {
    __shared__ float partial[32];
    __shared__ float total;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float p = lane < (int)(blockDim.x >> 5) ? partial[lane] : -INFINITY;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) p = fmaxf(p, __shfl_xor_sync(0xffffffffu, p, o));
        if (lane == 0) total = p;
    }
    __syncthreads();
    const float r = total;
    __syncthreads();
    return r;
}

// Prefill's scale, causal mask and softmax in one pass over the scores cuBLAS wrote (bf16
// q . k), replacing five elementwise launches over [heads, s, total] in f32: one block per row
// (head, query i), query i at absolute position past + i seeing keys 0..=past + i; masked
// entries become exactly 0, as exp(-inf) does in the reference. scores and probs
// [heads * s, total], row-major.
extern "C" __global__ void causal_softmax_bf16(const bf16* __restrict__ scores, bf16* __restrict__ probs,
                                               int s, int total, int past, float scale) {
    const size_t row = blockIdx.x;
    const int visible = min(past + (int)(row % s) + 1, total);
    const bf16* in = scores + row * total;
    bf16* out = probs + row * total;
    float m = -INFINITY;
    for (int j = threadIdx.x; j < visible; j += blockDim.x) m = fmaxf(m, f(rn(f(in[j]) * scale)));
    m = block_max(m);
    float sum = 0.f;
    for (int j = threadIdx.x; j < visible; j += blockDim.x) sum += expf(f(rn(f(in[j]) * scale)) - m);
    const float total_sum = block_sum(sum);
    for (int j = threadIdx.x; j < total; j += blockDim.x)
        out[j] = j < visible ? rn(expf(f(rn(f(in[j]) * scale)) - m) / total_sum) : rn(0.f);
}

// Where a decode block finds its sequence and head: `t` is the sequence's table entry (key
// buffer, value buffer ([kv_heads, capacity, d] each), cached length, capacity; rows 16-byte
// aligned), q [seqs, heads, d], k_new/v_new [seqs, kv_heads, d].
struct DecodeHead {
    const bf16* qh;
    bf16* kh;
    bf16* vh;
    const bf16* kn;
    const bf16* vn;
    int past, L;
    bool writes_cache;

    __device__ DecodeHead(const bf16* q, const bf16* k_new, const bf16* v_new, const unsigned long long* t,
                          int heads, int kv_heads, int head, int seq) {
        const int d = blockDim.x, groups = heads / kv_heads, kv = head / groups;
        const long long capacity = (long long)t[3];
        kh = reinterpret_cast<bf16*>(t[0]) + (size_t)kv * capacity * d;
        vh = reinterpret_cast<bf16*>(t[1]) + (size_t)kv * capacity * d;
        past = (int)t[2];
        L = past + 1;
        qh = q + ((size_t)seq * heads + head) * d;
        kn = k_new + ((size_t)seq * kv_heads + kv) * d;
        vn = v_new + ((size_t)seq * kv_heads + kv) * d;
        // The first query head of each KV head writes the new key/value into the cache (no block
        // reads that row from the cache, so no block waits for another).
        writes_cache = head % groups == 0;
    }

    // bf16(bf16(q . k_j) * scale) for positions [lo, hi) into s[j - lo]: a thread per position,
    // its key row summed in order from 16-byte loads in flight together.
    __device__ void scores(int lo, int hi, float scale, float* s) const {
        const int d = blockDim.x;
        for (int j = lo + threadIdx.x; j < hi; j += d) {
            const bf16* kr = j < past ? kh + (size_t)j * d : kn;
            float acc = 0.f;
#pragma unroll 8
            for (int i = 0; i < d; i += 8)
                acc = dot8(*reinterpret_cast<const uint4*>(qh + i), *reinterpret_cast<const uint4*>(kr + i), acc);
            s[j - lo] = f(rn(f(rn(acc)) * scale));
        }
    }

    // sum_j p[j - lo] * v_j over [lo, hi) in f32: thread (chunk, p) = (t / 8, t % 8) sums the 8
    // dimensions of its 16-byte chunk over positions lo + p, lo + p + 8, ... in order, then the 8
    // partial sums of each dimension meet in a butterfly within the warp; acc[i] is dimension
    // chunk * 8 + i on every thread of the chunk.
    __device__ void values(int lo, int hi, const float* p, float acc[8]) const {
        const int chunk = threadIdx.x >> 3, part = threadIdx.x & 7;
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[i] = 0.f;
#pragma unroll 4
        for (int j = lo + part; j < hi; j += 8) {
            const bf16* vr = j < past ? vh + (size_t)j * blockDim.x : vn;
            const uint4 v = *reinterpret_cast<const uint4*>(vr + chunk * 8);
            const __nv_bfloat162* pv = reinterpret_cast<const __nv_bfloat162*>(&v);
            const float pj = p[j - lo];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const float2 x = __bfloat1622float2(pv[i]);
                acc[2 * i] = fmaf(pj, x.x, acc[2 * i]);
                acc[2 * i + 1] = fmaf(pj, x.y, acc[2 * i + 1]);
            }
        }
#pragma unroll
        for (int i = 0; i < 8; ++i)
#pragma unroll
            for (int o = 1; o < 8; o <<= 1) acc[i] += __shfl_xor_sync(0xffffffffu, acc[i], o);
    }

    __device__ void write_cache() const {
        const int c = threadIdx.x, d = blockDim.x;
        if (writes_cache) {
            kh[(size_t)past * d + c] = kn[c];
            vh[(size_t)past * d + c] = vn[c];
        }
    }
};

// The 8 dimensions of a 16-byte chunk rounded to bf16, stored together.
__device__ __forceinline__ void store8(bf16* out, const float acc[8]) {
    uint4 r;
    __nv_bfloat162* pr = reinterpret_cast<__nv_bfloat162*>(&r);
#pragma unroll
    for (int i = 0; i < 4; ++i) pr[i] = __halves2bfloat162(rn(acc[2 * i]), rn(acc[2 * i + 1]));
    *reinterpret_cast<uint4*>(out) = r;
}

// One decode step of several sequences: block (head, seq) attends query head `head` of sequence
// `seq` to that sequence's cached positions and its new key/value. blockDim.x == d; dynamic
// shared memory holds one float per position.
__device__ void decode_attention_row(const bf16* __restrict__ q, const bf16* __restrict__ k_new,
                                     const bf16* __restrict__ v_new, const unsigned long long* t,
                                     bf16* __restrict__ out, int heads, int kv_heads, float scale, int seq) {
    extern __shared__ float probs[];
    const int head = blockIdx.x;
    const DecodeHead h(q, k_new, v_new, t, heads, kv_heads, head, seq);
    const int L = h.L;
    h.scores(0, L, scale, probs);
    __syncthreads();
    float m = -INFINITY;
    for (int j = threadIdx.x; j < L; j += blockDim.x) m = fmaxf(m, probs[j]);
    m = block_max(m);
    float sum = 0.f;
    for (int j = threadIdx.x; j < L; j += blockDim.x) {
        const float e = expf(probs[j] - m);
        probs[j] = e;
        sum += e;
    }
    const float total = block_sum(sum);
    for (int j = threadIdx.x; j < L; j += blockDim.x) probs[j] = f(rn(probs[j] / total));
    __syncthreads();
    float acc[8];
    h.values(0, L, probs, acc);
    if ((threadIdx.x & 7) == 0) store8(out + ((size_t)seq * heads + head) * blockDim.x + (threadIdx.x >> 3) * 8, acc);
    h.write_cache();
}

// Flash-decoding (Dao et al., "Flash-Decoding for long-context inference", 2023): a head's
// positions split over gridDim.z blocks, so a long cache is read by many blocks at once rather
// than walked by one. The reference's rounding is kept, so the softmax's max and sum must be
// known before any probability is rounded: pass 1 takes each split's max and sum of exp, pass 2
// recomputes its scores, rounds its probabilities against the whole row's max and sum and sums
// its part of probs @ v in f32; the last split of a (sequence, head) to finish adds the parts in
// split order. Block (head, seq, split) takes positions [split * per, (split + 1) * per).
__device__ __forceinline__ void split_range(int L, int& lo, int& hi) {
    const int per = (L + gridDim.z - 1) / gridDim.z;
    lo = min(L, (int)blockIdx.z * per);
    hi = min(L, lo + per);
}

// Pass 1: stats[(seq * heads + head) * splits + split] = {max, sum of exp(score - max)} of the
// split's scores (-inf and 0 for an empty split); split 0 writes the new key/value into the cache.
__device__ void decode_split_stats(const bf16* __restrict__ q, const bf16* __restrict__ k_new,
                                   const bf16* __restrict__ v_new, const unsigned long long* t,
                                   float2* __restrict__ stats, int heads, int kv_heads, float scale, int seq) {
    extern __shared__ float probs[];
    const int head = blockIdx.x;
    const DecodeHead h(q, k_new, v_new, t, heads, kv_heads, head, seq);
    int lo, hi;
    split_range(h.L, lo, hi);
    h.scores(lo, hi, scale, probs);
    __syncthreads();
    float m = -INFINITY;
    for (int j = threadIdx.x; j < hi - lo; j += blockDim.x) m = fmaxf(m, probs[j]);
    m = block_max(m);
    float sum = 0.f;
    for (int j = threadIdx.x; j < hi - lo; j += blockDim.x) sum += expf(probs[j] - m);
    sum = block_sum(sum);
    if (threadIdx.x == 0) stats[((size_t)seq * heads + head) * gridDim.z + blockIdx.z] = make_float2(m, sum);
    if (blockIdx.z == 0) h.write_cache();
}

// Pass 2 (see above). parts: f32 [seqs, heads, splits, d]; tickets: u32 [seqs, heads], zero
// before the launch.
__device__ void decode_split_values(const bf16* __restrict__ q, const bf16* __restrict__ k_new,
                                    const bf16* __restrict__ v_new, const unsigned long long* t,
                                    const float2* __restrict__ stats, float* __restrict__ parts,
                                    uint32_t* __restrict__ tickets, bf16* __restrict__ out, int heads,
                                    int kv_heads, float scale, int seq) {
    extern __shared__ float probs[];
    __shared__ bool last;
    const int head = blockIdx.x, d = blockDim.x, splits = gridDim.z;
    const size_t row = (size_t)seq * heads + head;
    const DecodeHead h(q, k_new, v_new, t, heads, kv_heads, head, seq);
    // The whole row's max and sum, every block adding the splits in the same order.
    const float2* st = stats + row * splits;
    float m = -INFINITY;
    for (int c = 0; c < splits; ++c) m = fmaxf(m, st[c].x);
    float total = 0.f;
    for (int c = 0; c < splits; ++c)
        if (st[c].y > 0.f) total += st[c].y * expf(st[c].x - m);
    int lo, hi;
    split_range(h.L, lo, hi);
    h.scores(lo, hi, scale, probs);
    __syncthreads();
    for (int j = threadIdx.x; j < hi - lo; j += d) probs[j] = f(rn(expf(probs[j] - m) / total));
    __syncthreads();
    float acc[8];
    h.values(lo, hi, probs, acc);
    const int chunk = threadIdx.x >> 3;
    float* part = parts + (row * splits + blockIdx.z) * d;
    if ((threadIdx.x & 7) == 0)
#pragma unroll
        for (int i = 0; i < 8; ++i) part[chunk * 8 + i] = acc[i];
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(&tickets[row], 1u) == (uint32_t)splits - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    float sum = 0.f;
    const volatile float* all = parts + row * splits * d + threadIdx.x;
    for (int c = 0; c < splits; ++c) sum += all[(size_t)c * d];
    out[row * d + threadIdx.x] = rn(sum);
}

// The table travels as a kernel parameter (no upload), for sequences seq_base + blockIdx.y. 128
// sequences make 4 KiB of it, past the 4,096 bytes of parameters a launch took before CUDA 12.1
// (32,764 since, on sm_70 and later): a batch of 128 is one launch, not four (~10 us each on an
// H200 whatever the count).
#define DECODE_SEQS 128
struct DecodeTable {
    unsigned long long v[4 * DECODE_SEQS];
};

extern "C" __global__ void decode_attention_bf16(const bf16* __restrict__ q, const bf16* __restrict__ k_new,
                                                 const bf16* __restrict__ v_new, const DecodeTable table,
                                                 bf16* __restrict__ out, int heads, int kv_heads,
                                                 float scale, int seq_base) {
    decode_attention_row(q, k_new, v_new, table.v + 4 * blockIdx.y, out, heads, kv_heads, scale,
                         seq_base + blockIdx.y);
}

// The same with the table in device memory (entries for sequences 0, 1, ... from `table`): a
// captured decode step (CUDA graph) replays with the table rewritten between steps, where a
// kernel parameter would stay as captured.
extern "C" __global__ void decode_attention_indirect_bf16(const bf16* __restrict__ q, const bf16* __restrict__ k_new,
                                                          const bf16* __restrict__ v_new,
                                                          const unsigned long long* __restrict__ table,
                                                          bf16* __restrict__ out, int heads, int kv_heads,
                                                          float scale) {
    decode_attention_row(q, k_new, v_new, table + 4 * blockIdx.y, out, heads, kv_heads, scale, blockIdx.y);
}

// Flash-decoding's two passes (see decode_split_stats / decode_split_values), the table as a
// kernel parameter (sequences seq_base + blockIdx.y) or in device memory (graphs).
extern "C" __global__ void decode_split_stats_bf16(const bf16* __restrict__ q, const bf16* __restrict__ k_new,
                                                   const bf16* __restrict__ v_new, const DecodeTable table,
                                                   float2* __restrict__ stats, int heads, int kv_heads,
                                                   float scale, int seq_base) {
    decode_split_stats(q, k_new, v_new, table.v + 4 * blockIdx.y, stats, heads, kv_heads, scale,
                       seq_base + blockIdx.y);
}

extern "C" __global__ void decode_split_values_bf16(const bf16* __restrict__ q, const bf16* __restrict__ k_new,
                                                    const bf16* __restrict__ v_new, const DecodeTable table,
                                                    const float2* __restrict__ stats, float* __restrict__ parts,
                                                    uint32_t* __restrict__ tickets, bf16* __restrict__ out,
                                                    int heads, int kv_heads, float scale, int seq_base) {
    decode_split_values(q, k_new, v_new, table.v + 4 * blockIdx.y, stats, parts, tickets, out, heads,
                        kv_heads, scale, seq_base + blockIdx.y);
}

extern "C" __global__ void decode_split_stats_indirect_bf16(const bf16* __restrict__ q,
                                                            const bf16* __restrict__ k_new,
                                                            const bf16* __restrict__ v_new,
                                                            const unsigned long long* __restrict__ table,
                                                            float2* __restrict__ stats, int heads,
                                                            int kv_heads, float scale) {
    decode_split_stats(q, k_new, v_new, table + 4 * blockIdx.y, stats, heads, kv_heads, scale, blockIdx.y);
}

extern "C" __global__ void decode_split_values_indirect_bf16(
    const bf16* __restrict__ q, const bf16* __restrict__ k_new, const bf16* __restrict__ v_new,
    const unsigned long long* __restrict__ table, const float2* __restrict__ stats, float* __restrict__ parts,
    uint32_t* __restrict__ tickets, bf16* __restrict__ out, int heads, int kv_heads, float scale) {
    decode_split_values(q, k_new, v_new, table + 4 * blockIdx.y, stats, parts, tickets, out, heads, kv_heads,
                        scale, blockIdx.y);
}
