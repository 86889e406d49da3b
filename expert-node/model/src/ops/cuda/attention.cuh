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

// One decode step of several sequences: block (head, seq) attends query head `head` of sequence
// `seq` (q [seqs, heads, d]) to that sequence's cached positions and its new key/value (k_new,
// v_new [seqs, kv_heads, d]), and the first query head of each KV head writes the new key/value
// into the cache (no block reads that row from the cache, so no block waits for another).
// `t` is the sequence's table entry: key buffer, value buffer ([kv_heads, capacity, d] each),
// cached length, capacity (rows 16-byte aligned). blockDim.x == d: a thread per position for the
// scores, a 16-byte chunk of v and an eighth of the positions per thread for probs @ v; dynamic
// shared memory holds one float per position.
__device__ void decode_attention_row(const bf16* __restrict__ q, const bf16* __restrict__ k_new,
                                     const bf16* __restrict__ v_new, const unsigned long long* t,
                                     bf16* __restrict__ out, int heads, int kv_heads, float scale, int seq) {
    extern __shared__ float probs[];
    const int d = blockDim.x, head = blockIdx.x;
    const int groups = heads / kv_heads, kv = head / groups;
    const long long capacity = (long long)t[3];
    bf16* kh = reinterpret_cast<bf16*>(t[0]) + (size_t)kv * capacity * d;
    bf16* vh = reinterpret_cast<bf16*>(t[1]) + (size_t)kv * capacity * d;
    const int past = (int)t[2], L = past + 1;
    const bf16* qh = q + ((size_t)seq * heads + head) * d;
    const bf16* kn = k_new + ((size_t)seq * kv_heads + kv) * d;
    const bf16* vn = v_new + ((size_t)seq * kv_heads + kv) * d;
    // A thread per position, summing its key row in order from 16-byte loads in flight together
    // (with a warp per position, each warp waited on a round trip to memory per position).
    for (int j = threadIdx.x; j < L; j += d) {
        const bf16* kr = j < past ? kh + (size_t)j * d : kn;
        float acc = 0.f;
#pragma unroll 8
        for (int i = 0; i < d; i += 8)
            acc = dot8(*reinterpret_cast<const uint4*>(qh + i), *reinterpret_cast<const uint4*>(kr + i), acc);
        probs[j] = f(rn(f(rn(acc)) * scale));
    }
    __syncthreads();
    float m = -INFINITY;
    for (int j = threadIdx.x; j < L; j += d) m = fmaxf(m, probs[j]);
    m = block_max(m);
    float sum = 0.f;
    for (int j = threadIdx.x; j < L; j += d) {
        const float e = expf(probs[j] - m);
        probs[j] = e;
        sum += e;
    }
    const float total = block_sum(sum);
    for (int j = threadIdx.x; j < L; j += d) probs[j] = f(rn(probs[j] / total));
    __syncthreads();
    // probs @ v: thread (chunk, p) = (t / 8, t % 8) sums the 8 dimensions of its 16-byte chunk
    // over the positions p, p + 8, ... in order, then the 8 partial sums of each dimension meet
    // in a butterfly within the warp. Each thread walks an eighth of the positions (one after
    // another, each a round trip to memory, were the whole cache's walk before).
    {
        const int chunk = threadIdx.x >> 3, p = threadIdx.x & 7;
        float acc[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[i] = 0.f;
#pragma unroll 4
        for (int j = p; j < L; j += 8) {
            const bf16* vr = j < past ? vh + (size_t)j * d : vn;
            const uint4 v = *reinterpret_cast<const uint4*>(vr + chunk * 8);
            const __nv_bfloat162* pv = reinterpret_cast<const __nv_bfloat162*>(&v);
            const float pj = probs[j];
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
        if (p == 0) {
            uint4 r;
            __nv_bfloat162* pr = reinterpret_cast<__nv_bfloat162*>(&r);
#pragma unroll
            for (int i = 0; i < 4; ++i) pr[i] = __halves2bfloat162(rn(acc[2 * i]), rn(acc[2 * i + 1]));
            *reinterpret_cast<uint4*>(out + ((size_t)seq * heads + head) * d + chunk * 8) = r;
        }
    }
    const int c = threadIdx.x;
    if (head % groups == 0) {
        kh[(size_t)past * d + c] = kn[c];
        vh[(size_t)past * d + c] = vn[c];
    }
}

// The table travels as a kernel parameter (no upload), for sequences seq_base + blockIdx.y.
#define DECODE_SEQS 32
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
