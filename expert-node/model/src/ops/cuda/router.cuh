// The router of an MoE layer (model/router.rs): softmax over the experts' logits in f32 (masked
// experts at -inf), the top k by probability (ties to the lower expert id), divided by their sum
// when `norm`, as Qwen3OmniMoeThinkerTextSparseMoeBlock in transformers 4.57.3.

// One token's top k by one warp (the first 32 threads of the block): `logit(e)` reads expert e's
// logit, `p` is E floats of shared memory. Writes the ids to ids[0, k) and the weights' f32 bits
// to weights[0, k).
template <typename Logit>
__device__ __forceinline__ void topk_row(Logit logit, const uint8_t* __restrict__ masked, int E, int k,
                                         int norm, float* p, uint32_t* __restrict__ ids,
                                         uint32_t* __restrict__ weights) {
    const int lane = threadIdx.x & 31;
    float m = -INFINITY;
    for (int e = lane; e < E; e += 32) {
        // Broken activations must not make every probability NaN (no comparison below would
        // pick an id then, and ids of E would send the experts' kernels out of bounds): a NaN
        // logit takes no probability, +inf counts as the largest finite float (FLT_MAX).
        const float l = logit(e);
        const float v = masked[e] || isnan(l) ? -INFINITY : fminf(l, 3.402823466e+38f);
        p[e] = v;
        m = fmaxf(m, v);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    // No finite logit at all: every probability 0 (the lowest ids are taken, with weight 0).
    const bool none = m == -INFINITY;
    float sum = 0.f;
    for (int e = lane; e < E; e += 32) {
        const float x = none ? 0.f : expf(p[e] - m);
        p[e] = x;
        sum += x;
    }
    sum = warp_sum(sum);
    for (int e = lane; e < E; e += 32) p[e] = none ? 0.f : p[e] / sum;
    __syncwarp();
    float total = 0.f;
    for (int i = 0; i < k; ++i) {
        float best = -1.f;
        uint32_t idx = E;
        for (int e = lane; e < E; e += 32) {
            if (p[e] > best) {
                best = p[e];
                idx = e;
            }
        }
        warp_argmax(best, idx);
        if (lane == 0) {
            ids[i] = idx;
            weights[i] = __float_as_uint(best);
            p[idx] = -1.f;
        }
        total += best;
        __syncwarp();
    }
    // total is 0 only without a finite logit (`none`): the weights stay 0.
    if (norm && lane == 0 && total > 0.f)
        for (int i = 0; i < k; ++i) weights[i] = __float_as_uint(__uint_as_float(weights[i]) / total);
}

// The top k of each token's logits (one warp per token, blockIdx.x): ids to out[t*k + i], the
// weights' f32 bits to out[n*k + t*k + i]. Dynamic shared memory holds E floats.
extern "C" __global__ void router_topk_bf16(const bf16* __restrict__ logits,
                                            const uint8_t* __restrict__ masked, int n, int E, int k,
                                            int norm, uint32_t* __restrict__ out) {
    extern __shared__ float p[];
    const size_t t = blockIdx.x;
    const bf16* row = logits + t * E;
    topk_row([&](int e) { return f(row[e]); }, masked, E, k, norm, p, out + t * k, out + (size_t)n * k + t * k);
}

// Batch-1 decode's whole router in one launch: the gate GEMV into `logits` (gemv_rows, one logit
// per warp in blocks of 8 warps: the same bits as gemv_bf16 on one row, which the batched path
// takes), then the last block to finish — counted in `ticket`, which it sets back to 0 for the
// next launch — takes the top k as router_topk_bf16 does (ids to out[0, k), weights to
// out[k, 2k)). One launch instead of two, with nothing between them. Dynamic shared memory holds
// E floats.
extern "C" __global__ void router_gate_topk1_bf16(const bf16* __restrict__ x, const bf16* __restrict__ gate,
                                                  const uint8_t* __restrict__ masked, int E, int K, int k,
                                                  int norm, bf16* __restrict__ logits,
                                                  unsigned int* __restrict__ ticket, uint32_t* __restrict__ out) {
    extern __shared__ float p[];
    __shared__ bool last;
    gemv_rows<1>(x, gate, E, K, logits);
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(ticket, 1u) == gridDim.x - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    if (threadIdx.x < 32) {
        // Through L2: other blocks wrote these during this launch.
        const unsigned short* bits = reinterpret_cast<const unsigned short*>(logits);
        topk_row([&](int e) { return f(__ushort_as_bfloat16(__ldcg(bits + e))); }, masked, E, k, norm, p, out,
                 out + k);
    }
    if (threadIdx.x == 0) *ticket = 0;
}
